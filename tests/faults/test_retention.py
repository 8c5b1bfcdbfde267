"""Retention: an explicit purge of one job removes its rows and every blob;
RETENTION_DAYS purges what is older, through the CLI and the reconciler;
blob folders an interrupted upload left without a job row are swept."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from bench.services import radiographs, start_system
from bonedetect.client import ApiError
from bonedetect.local import settings_env
from db.models import Image, Job, utcnow

pytestmark = pytest.mark.integration


def rows_of(system, job_id: str) -> int:
    with system.sessions() as session:
        return session.scalar(select(func.count()).select_from(Image).where(Image.job_id == job_id))


def folder(system, tenant_id: str, job_id: str):
    return system.blob_root / "tenants" / tenant_id / "jobs" / job_id


def tenant_of(system, job_id: str) -> str:
    with system.sessions() as session:
        return session.get(Job, job_id).tenant_id


def test_purging_a_job_removes_its_rows_and_every_blob(tmp_path, pg_url, private_redis):
    system = start_system(tmp_path / "system", pg_url, private_redis.url, workers=1)
    try:
        client = system.client()
        purged_job = client.submit(radiographs(3, seed=31))["job_id"]
        kept_job = client.submit(radiographs(1, seed=32))["job_id"]
        for job_id in (purged_job, kept_job):
            client.wait(job_id, timeout=120, poll=0.25)
        image_id = next(client.images(purged_job))["image_id"]
        files = folder(system, tenant_of(system, purged_job), purged_job)
        assert {p.name for p in files.rglob("*") if p.is_file()} == {"source", "mask.png"}
        client.overlay_png(image_id)  # rendered on request (OVERLAYS=lazy) and kept beside the mask
        assert {p.name for p in files.rglob("*") if p.is_file()} == {"source", "mask.png", "overlay.png"}

        with pytest.raises(ApiError) as err:
            client.request("DELETE", f"/v1/jobs/{purged_job}?purge=maybe")
        assert err.value.status == 400
        answer = client.request("DELETE", f"/v1/jobs/{purged_job}?purge=true")
        assert b'"purged":true' in answer.replace(b" ", b"") and b'"images":3' in answer.replace(b" ", b"")

        for path in (f"/v1/jobs/{purged_job}", f"/v1/images/{image_id}", f"/v1/images/{image_id}/mask.png"):
            with pytest.raises(ApiError) as err:
                client.request("GET", path)
            assert err.value.status == 404, path
        assert rows_of(system, purged_job) == 0
        assert not files.exists(), "sources, masks and overlays are gone"
        assert [j["job_id"] for j in client.get_json("/v1/jobs")["jobs"]] == [kept_job]
        assert client.job(kept_job)["status"] == "done" and rows_of(system, kept_job) == 1
    finally:
        system.stop()


def test_retention_purges_jobs_older_than_n_days_and_orphan_blobs(tmp_path, pg_url, private_redis):
    from worker.reconciler import Reconciler

    system = start_system(tmp_path / "system", pg_url, private_redis.url, workers=0)
    try:
        client = system.client()
        old, middle, new = (client.submit(radiographs(2, seed=40 + i))["job_id"] for i in range(3))
        with system.sessions.begin() as session:  # play the clock: jobs made 10 and 3 days ago
            for job_id, days in ((old, 10), (middle, 3)):
                session.execute(update(Job).where(Job.id == job_id).values(created_at=utcnow() - timedelta(days=days)))
        tenant = tenant_of(system, new)
        # What an API killed mid-upload leaves: files of a job that never got its row.
        stale_orphan, fresh_orphan = (folder(system, tenant, str(uuid.uuid4())) for _ in range(2))
        for orphan in (stale_orphan, fresh_orphan):
            (orphan / str(uuid.uuid4())).mkdir(parents=True)
            (orphan / next(orphan.iterdir()).name / "source").write_bytes(b"\xff\xd8\xff partial upload")
        two_days_ago = time.time() - 2 * 86400
        for path in [stale_orphan, *stale_orphan.rglob("*")]:
            os.utime(path, (two_days_ago, two_days_ago))

        env = settings_env(system.settings)
        run = subprocess.run([sys.executable, "-m", "bonedetect.cli", "purge", "--older-than-days", "7"],
                             env=env, capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert "purged 1 jobs" in run.stdout and "1 blob folders without a job row" in run.stdout
        assert rows_of(system, old) == 0 and not folder(system, tenant, old).exists()
        assert not stale_orphan.exists(), "an orphan untouched for a day (ORPHAN_BLOB_HOURS=24) is swept"
        assert fresh_orphan.exists(), "an upload still arriving is not"
        assert rows_of(system, middle) == 2 and folder(system, tenant, middle).exists()

        # The reconciler applies RETENTION_DAYS on its own.
        reconciler = Reconciler(dataclasses.replace(system.settings, retention_days=2), interval=3600)
        assert reconciler.round()["purged_jobs"] == 1
        assert rows_of(system, middle) == 0 and not folder(system, tenant, middle).exists()
        assert [j["job_id"] for j in client.get_json("/v1/jobs")["jobs"]] == [new]

        # An explicit purge from the command line, whatever the job's age.
        run = subprocess.run(
            [sys.executable, "-m", "bonedetect.cli", "purge", "--job", new], env=env, capture_output=True, text=True
        )
        assert run.returncode == 0 and "2 images" in run.stdout, run.stderr
        assert client.get_json("/v1/jobs")["jobs"] == [] and not folder(system, tenant, new).exists()
    finally:
        system.stop()


def test_orphan_blobs_are_found_on_s3_too(tmp_path):
    """The sweep lists an S3-compatible store by prefix (moto's in-process S3)."""
    pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    import boto3

    from db.blobstore import S3BlobStore, job_prefix
    from db.migrate import upgrade
    from db.retention import orphan_folders, purge_orphan_blobs
    from db.session import make_engine, make_sessionmaker
    from db.tenants import create_tenant

    url = f"sqlite:///{tmp_path / 'bd.sqlite'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    with sessions.begin() as session:
        tenant, _ = create_tenant(session, "hospital-s3")
        job = Job(tenant_id=tenant.id, image_count=1)
        session.add(job)
        session.flush()
        tenant_id, job_id = tenant.id, job.id
    orphan_id = str(uuid.uuid4())
    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="scans")
        blobs = S3BlobStore("scans", "site-a", client=client)
        for j in (job_id, orphan_id):
            blobs.put_bytes(f"{job_prefix(tenant_id, j)}/{uuid.uuid4()}/source", b"\xff\xd8\xff")
        assert orphan_folders(sessions, blobs, older_than_hours=1) == [], "just written: an upload in progress"
        later = utcnow() + timedelta(hours=2)
        assert [f.job_id for f in orphan_folders(sessions, blobs, 1, now=later)] == [orphan_id]
        assert purge_orphan_blobs(sessions, blobs, 1, now=later) == 1
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="scans").get("Contents", [])]
        assert len(keys) == 1 and job_id in keys[0], "the job with a row keeps its files"
