"""Retention: purging jobs, their image rows and their blobs.

- `purge_job`: one job, on request (`DELETE /v1/jobs/<id>?purge=true`,
  `bonedetect purge --job ID`): its rows go in one transaction (images and
  callback deliveries cascade from the job), then every blob under the job's
  prefix (sources, masks, overlays). Rows go first: a crash between the two
  leaves blobs without a row, never a row whose files are gone.
- `purge_expired`: every job created more than RETENTION_DAYS ago, whatever
  its state (the reconciler runs it hourly when RETENTION_DAYS > 0; also
  `bonedetect purge --older-than-days N`).
- `purge_orphan_blobs`: blob folders of jobs that have no row, untouched for
  ORPHAN_BLOB_HOURS: what an upload cut off by a crash of the API leaves
  (a submission's blobs are written before its rows commit). The age is
  that of the newest file in the folder, so an upload still in progress is
  never taken.

A worker still busy with a purged job finds no row to write to and writes
nothing (worker/tasks.py locks its rows before writing its blobs).
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from db.blobstore import BlobStore, job_prefix
from db.models import Image, Job, JobPart, utcnow

log = logging.getLogger("bonedetect.retention")

BATCH = 100  # jobs per transaction when purging by age


@dataclass(frozen=True)
class PurgedJob:
    job_id: str
    tenant_id: str
    images: int


def delete_job_rows(session: Session, job: Job) -> PurgedJob:
    """Delete the job's rows in the caller's transaction (the caller commits, then
    deletes the blobs under job_prefix(...))."""
    images = session.scalar(select(func.count()).select_from(Image).where(Image.job_id == job.id)) or 0
    # Images first: SQLite's cascade needs PRAGMA foreign_keys, which another tool may not set.
    session.execute(delete(Image).where(Image.job_id == job.id).execution_options(synchronize_session=False))
    session.execute(delete(JobPart).where(JobPart.job_id == job.id).execution_options(synchronize_session=False))
    session.execute(delete(Job).where(Job.id == job.id).execution_options(synchronize_session=False))
    return PurgedJob(job.id, job.tenant_id, images)


def delete_job_blobs(blobs: BlobStore, purged: PurgedJob) -> None:
    blobs.delete_prefix(job_prefix(purged.tenant_id, purged.job_id))


def purge_job(
    sessions: sessionmaker[Session], blobs: BlobStore, job_id: str, tenant_id: str | None = None
) -> PurgedJob | None:
    """Purge one job (of `tenant_id` when given); None if there is no such job."""
    with sessions.begin() as session:
        query = select(Job).where(Job.id == job_id)
        if tenant_id is not None:
            query = query.where(Job.tenant_id == tenant_id)
        job = session.scalar(query)
        if job is None:
            return None
        purged = delete_job_rows(session, job)
    delete_job_blobs(blobs, purged)
    log.info("purged job %s (%d images)", purged.job_id, purged.images)
    return purged


def purge_expired(
    sessions: sessionmaker[Session], blobs: BlobStore, older_than_days: float, now: datetime | None = None
) -> int:
    """Purge every job created more than `older_than_days` ago; returns how many."""
    if older_than_days <= 0:
        raise ValueError(f"older_than_days must be positive, got {older_than_days}")
    cutoff = (now or utcnow()) - timedelta(days=older_than_days)
    total = 0
    while True:
        with sessions.begin() as session:
            jobs = session.scalars(
                select(Job).where(Job.created_at < cutoff).order_by(Job.created_at).limit(BATCH)
            ).all()
            purged = [delete_job_rows(session, job) for job in jobs]
        for p in purged:
            delete_job_blobs(blobs, p)
        total += len(purged)
        if len(purged) < BATCH:
            break
    if total:
        log.info("retention: purged %d jobs created before %s", total, cutoff.isoformat())
    return total


# -- orphan blobs ---------------------------------------------------------------------


@dataclass(frozen=True)
class BlobFolder:
    tenant_id: str
    job_id: str
    newest: datetime  # when the newest file in it was written


def _is_uuid(name: str) -> bool:
    try:
        uuid.UUID(name)
        return True
    except ValueError:
        return False


def _is_local(blobs: BlobStore) -> bool:
    return getattr(blobs, "root", None) is not None


def _is_s3(blobs: BlobStore) -> bool:
    return hasattr(blobs, "client") and hasattr(blobs, "bucket")


def _s3_base(blobs) -> str:
    return f"{blobs.prefix}/tenants/" if getattr(blobs, "prefix", "") else "tenants/"


def _s3_children(blobs, prefix: str) -> list[str]:
    """The names of the 'folders' directly under an S3 prefix."""
    names = []
    for page in blobs.client.get_paginator("list_objects_v2").paginate(
        Bucket=blobs.bucket, Prefix=prefix, Delimiter="/"
    ):
        names += [p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
    return names


def job_folder_ids(blobs: BlobStore) -> list[tuple[str, str]]:
    """(tenant_id, job_id) of every tenants/<tenant>/jobs/<job> folder in the blob store."""
    if _is_local(blobs):
        root = Path(blobs.root) / "tenants"
        pairs = [(t.name, j.name) for t in root.glob("*") for j in (t / "jobs").glob("*") if j.is_dir()]
    elif _is_s3(blobs):
        base = _s3_base(blobs)
        pairs = [(t, j) for t in _s3_children(blobs, base) for j in _s3_children(blobs, f"{base}{t}/jobs/")]
    else:
        raise NotImplementedError(f"cannot list the folders of {blobs!r}")
    return sorted((t, j) for t, j in pairs if _is_uuid(t) and _is_uuid(j))


def newest_write(blobs: BlobStore, tenant_id: str, job_id: str) -> datetime:
    """When anything under the job's folder was last written (an upload in progress is recent)."""
    if _is_local(blobs):
        folder = Path(blobs.root) / job_prefix(tenant_id, job_id)
        newest = 0.0
        for dirpath, _dirs, files in os.walk(folder):
            for path in [dirpath, *(os.path.join(dirpath, f) for f in files)]:
                try:
                    newest = max(newest, os.stat(path).st_mtime)
                except FileNotFoundError:  # removed while we looked
                    pass
        return datetime.fromtimestamp(newest, timezone.utc)
    prefix = _s3_base(blobs) + f"{tenant_id}/jobs/{job_id}/"
    newest_s3 = datetime.fromtimestamp(0, timezone.utc)
    for page in blobs.client.get_paginator("list_objects_v2").paginate(Bucket=blobs.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            newest_s3 = max(newest_s3, obj["LastModified"])
    return newest_s3


def orphan_folders(
    sessions: sessionmaker[Session], blobs: BlobStore, older_than_hours: float, now: datetime | None = None
) -> list[BlobFolder]:
    """Job folders with no job row whose newest file is older than `older_than_hours`.
    Only folders without a row are looked into, so a large store costs one listing."""
    cutoff = (now or utcnow()) - timedelta(hours=older_than_hours)
    folders = job_folder_ids(blobs)
    known: set[str] = set()
    with sessions() as session:
        for start in range(0, len(folders), 500):
            ids = [job_id for _, job_id in folders[start : start + 500]]
            known.update(str(i) for i in session.scalars(select(Job.id).where(Job.id.in_(ids))))
    orphans = []
    for tenant_id, job_id in folders:
        if job_id in known:
            continue
        newest = newest_write(blobs, tenant_id, job_id)
        if newest < cutoff:
            orphans.append(BlobFolder(tenant_id, job_id, newest))
    return orphans


def purge_orphan_blobs(
    sessions: sessionmaker[Session], blobs: BlobStore, older_than_hours: float, now: datetime | None = None
) -> int:
    """Delete the blob folders of jobs that have no row (see orphan_folders); returns how many."""
    orphans = orphan_folders(sessions, blobs, older_than_hours, now)
    for f in orphans:
        blobs.delete_prefix(job_prefix(f.tenant_id, f.job_id))
    if orphans:
        log.info("retention: removed %d blob folders without a job row", len(orphans))
    return len(orphans)
