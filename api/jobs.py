"""Jobs: submit a batch, poll it, page through its images, download the CSV, cancel.

A submission is committed whole or not at all: blobs first, then the job
and all its image rows in one transaction, and only then the chunk tasks.

A large batch may instead be sent as one job in parts: `POST /v1/jobs` with
`open=true` makes a job that is "receiving"; each `POST /v1/jobs/<id>/images`
adds a part, committed whole or not at all as a submission is, and queued at
once, so the first radiographs are processed while the rest still arrive
(several parts may be sent at once, through several API processes);
`POST /v1/jobs/<id>/close` says there is no more. Until then the job cannot
finish nor its callback fire. Positions are given to a part when it commits,
under the job row's lock, so parts sent at once never share one.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import uuid
from datetime import datetime, timezone

from flask import Blueprint, Response, request, stream_with_context, url_for
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import Services, db_session, services
from api.archives import ArchiveError, expand_uploads
from api.auth import authenticate, owned, tenant_id
from api.callbacks import FIELD as CALLBACK_FIELD
from api.callbacks import callback_json, parse_callback_url
from api.errors import ApiError
from api.images import IMAGE_FIELDS, image_json, iso
from api.uploads import (
    Submission,
    discard_body,
    flag,
    idempotency_key,
    parse_submission,
    submission_digest,
    sniff,
)
from db.blobstore import TooLarge, image_prefix, job_prefix
from db.jobs import CALLBACK_HELD, close_job as close_open_job, job_progress
from db.models import CANCELLED, FAILED, IMAGE_STATUSES, QUEUED, UNFINISHED, Image, Job, JobPart, new_id, utcnow
from db.retention import delete_job_blobs, delete_job_rows

log = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
bp.before_request(authenticate)

CSV_PAGE = 500


# -- JSON shapes ---------------------------------------------------------------


def links(job_id: str) -> dict:
    return {
        "self": url_for("jobs.get_job", job_id=job_id),
        "images": url_for("jobs.list_images", job_id=job_id),
        "results_csv": url_for("jobs.results_csv", job_id=job_id),
    }


def job_json(session: Session, job: Job) -> dict:
    p = job_progress(session, job)
    return {
        "job_id": job.id,
        "label": job.label,
        "status": p.status,
        "counts": p.counts,
        "total": p.total,
        "progress": p.progress,
        "created_at": iso(job.created_at),
        "started_at": iso(p.started_at),
        "finished_at": iso(p.finished_at),
        "cancelled_at": iso(job.cancelled_at),
        "closed_at": iso(job.closed_at),
        "model_versions": p.model_versions,
        "links": links(job.id),
        "callback": callback_json(session, job),
    }


def rejected_in(session: Session, job_id: str, first: int, count: int) -> list[dict]:
    rows = session.execute(
        select(Image.position, Image.filename, Image.error)
        .where(Image.job_id == job_id, Image.blob_key.is_(None), Image.position >= first, Image.position < first + count)
        .order_by(Image.position)
    ).all()
    return [{"position": r.position, "filename": r.filename, "error": r.error} for r in rows]


def submitted(session: Session, job: Job, status: int):
    """The answer to a submission; the same for its idempotent replays (a job opened for parts: the
    files of the opening request only, the job's image count less its parts', in one statement; the
    parts' and close URLs while it is receiving)."""
    count = session.scalar(
        select(Job.image_count - func.coalesce(select(func.sum(JobPart.image_count)).where(JobPart.job_id == Job.id)
                                               .scalar_subquery(), 0)).where(Job.id == job.id)
    )
    rejected = rejected_in(session, job.id, 0, count)
    status_url = url_for("jobs.get_job", job_id=job.id)
    body = {
        "job_id": job.id,
        "status_url": status_url,
        "image_count": count,
        "accepted": count - len(rejected),
        "rejected": rejected,
    }
    if job.receiving:
        body["parts_url"] = url_for("jobs.add_images", job_id=job.id)
        body["close_url"] = url_for("jobs.close_job", job_id=job.id)
    return body, status, {"Location": status_url}


def part_answer(session: Session, job_id: str, part: JobPart, status: int):
    """The answer to a part of an open job; the same for its idempotent replays."""
    rejected = rejected_in(session, job_id, part.first_position, part.image_count)
    return {
        "job_id": job_id,
        "part_id": part.id,
        "first_position": part.first_position,
        "image_count": part.image_count,
        "accepted": part.image_count - len(rejected),
        "rejected": rejected,
        "status_url": url_for("jobs.get_job", job_id=job_id),
    }, status


# -- pagination ------------------------------------------------------------------


def parse_limit(default: int, maximum: int) -> int:
    raw = request.args.get("limit")
    if raw is None:
        return default
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ApiError(400, f"limit must be a positive integer (at most {maximum})")
    return min(limit, maximum)


def encode_cursor(*parts) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> list:
    try:
        return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except ValueError:
        raise ApiError(400, "invalid cursor") from None


# -- endpoints -------------------------------------------------------------------


@bp.post("")
def submit_job():
    session, svc = db_session(), services()
    key = idempotency_key(request)
    if key and (existing := _job_by_key(session, key)) and existing.request_sha256 is None:
        discard_body(request)  # a job from before fingerprints: the key alone decides, as it did then
        return submitted(session, existing, 200)
    sub = parse_submission(request, svc.settings)
    callback_url = parse_callback_url(request.form.get(CALLBACK_FIELD))
    digest = submission_digest(sub, callback_url) if key else None
    if key and existing:
        return _replay(session, existing, digest)
    job = Job(id=new_id(), tenant_id=tenant_id(), label=sub.label, idempotency_key=key, image_count=len(sub.files),
              receiving=sub.open)
    job.callback_url, job.request_sha256 = callback_url, digest
    if sub.open and callback_url:
        job.callback_state = CALLBACK_HELD
    try:
        session.add(job)
        images, queued = _store_images(svc, job, sub)
        session.add_all(images)
        job.image_count = len(images)
        session.commit()
    except IntegrityError:
        _discard(session, svc, job)
        existing = _job_by_key(session, key) if key else None
        if existing is None:
            raise
        return _replay(session, existing, digest)  # a concurrent request with the same key won
    except BaseException:
        _discard(session, svc, job)
        raise
    _enqueue(svc, job.id, queued)
    return submitted(session, job, 202)


def _enqueue(svc: Services, job_id: str, queued: list[str]) -> None:
    """Send the chunk tasks of rows just committed; a broker that is away loses nothing."""
    try:
        if queued:
            svc.enqueue(queued)
    except Exception:  # the rows are committed and queued: the reconciler re-enqueues them
        log.exception("job %s: could not enqueue %d images; left queued for the reconciler", job_id, len(queued))


def _replay(session: Session, existing: Job, digest: str | None):
    """The answer to a repeated Idempotency-Key: the job it made, if the request is the same one."""
    if existing.request_sha256 is not None and digest != existing.request_sha256:
        raise ApiError(422, f"this Idempotency-Key was already used for a different submission (job {existing.id}); "
                            "use a new key for a new batch")
    return submitted(session, existing, 200)


def _job_by_key(session: Session, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id(), Job.idempotency_key == key))


def _discard(session: Session, svc: Services, job: Job) -> None:
    try:
        session.rollback()
    finally:
        svc.blobs.delete_prefix(job_prefix(job.tenant_id, job.id))


def _store_images(svc: Services, job: Job, sub: Submission, stored: list[Image] | None = None) -> tuple[list[Image], list[str]]:
    """Copy each file to the blob store and make its row (positions from 0); returns the rows, not
    yet added to a session, and the queued ids. `stored`, when given, collects the rows as they
    are made, so a caller can delete the blobs of a part that failed half-way.

    A file that is not PNG, JPEG or DICOM becomes a failed row with its reason;
    the rest of the batch goes on. A zip archive becomes one row per member
    file (api/archives.py).
    """
    queued = []
    images = [] if stored is None else stored
    for position, entry in enumerate(expand_uploads(sub, svc.settings)):
        filename = entry.filename
        image = Image(id=new_id(), job_id=job.id, tenant_id=job.tenant_id, position=position)
        image.filename, image.external_id = filename, entry.external_id
        content_type, error = (None, entry.error) if entry.error else sniff(entry.stream)
        if not error:
            blob_key = image_prefix(job.tenant_id, job.id, image.id) + "/source"
            try:
                image.size_bytes = svc.blobs.put_stream(blob_key, entry.stream, max_bytes=svc.settings.max_file_bytes)
            except TooLarge:
                limit = svc.settings.max_file_bytes
                raise ApiError(413, f"file {filename!r} is larger than the limit of {limit} bytes") from None
            except ArchiveError as err:  # a corrupt zip member fails alone
                error = str(err)
        if error:
            image.status, image.error, image.finished_at = FAILED, error, utcnow()
            image.size_bytes = entry.size
        else:
            image.status, image.content_type, image.blob_key = QUEUED, content_type, blob_key
            queued.append(image.id)
        images.append(image)
    return images, queued


@bp.post("/<job_id>/images")
def add_images(job_id: str):
    """Add a part to a job opened with open=true: committed whole or not at all, queued at once.
    Several parts may be sent at once; each gets the next free positions when it commits.
    An Idempotency-Key (per job) makes a part safe to send again after a lost answer."""
    session, svc = db_session(), services()
    job = owned(Job, job_id, "job")
    key = idempotency_key(request)
    existing = _part_by_key(session, job.id, key) if key else None
    if existing is None and not job.receiving:
        discard_body(request)  # refused before a byte is stored: the client reads the 409 at once
        _check_open(job)
    sub = parse_submission(request, svc.settings, part=True)
    digest = submission_digest(sub, None) if key else None
    if existing is not None:
        return _replay_part(session, job.id, existing, digest)
    job_id, tenant = job.id, job.tenant_id  # the row may be purged meanwhile: not read from it again
    stored: list[Image] = []
    try:
        images, queued = _store_images(svc, job, sub, stored)
        # The job row's lock (PostgreSQL) or the database's write lock (SQLite) is held from here to the
        # commit: parts sent at once get consecutive ranges, and a close waits for a part in flight.
        end = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.receiving.is_(True))
            .values(image_count=Job.image_count + len(images))
            .returning(Job.image_count)
            .execution_options(synchronize_session=False)
        ).scalar()
        if end is None:  # closed, cancelled or purged while the part was arriving
            session.rollback()
            now = session.get(Job, job_id, populate_existing=True)
            if now is None:
                raise ApiError(404, "job not found")
            _check_open(now)
            raise ApiError(409, "this job takes no more files")
        first = end - len(images)
        for image in images:
            image.position += first
        part = JobPart(id=new_id(), job_id=job.id, idempotency_key=key, request_sha256=digest,
                       first_position=first, image_count=len(images))
        session.add_all([*images, part])
        session.commit()
    except IntegrityError:
        _discard_part(session, svc, tenant, job_id, stored)
        existing = _part_by_key(session, job_id, key) if key else None
        if existing is None:
            raise
        return _replay_part(session, job_id, existing, digest)  # the same part, sent twice at once: the other won
    except BaseException:
        _discard_part(session, svc, tenant, job_id, stored)
        raise
    _enqueue(svc, job_id, queued)
    return part_answer(session, job_id, part, 202)


def _check_open(job: Job) -> None:
    if job.cancelled_at is not None:
        raise ApiError(409, "this job was cancelled: it takes no more files")
    if not job.receiving:
        how = "is closed" if job.closed_at is not None else "was submitted whole"
        raise ApiError(409, f"this job {how}: it takes no more files (open a job with open=true to send it in parts)")


def _part_by_key(session: Session, job_id: str, key: str) -> JobPart | None:
    return session.scalar(select(JobPart).where(JobPart.job_id == job_id, JobPart.idempotency_key == key))


def _replay_part(session: Session, job_id: str, part: JobPart, digest: str | None):
    if digest != part.request_sha256:
        raise ApiError(422, f"this Idempotency-Key was already used for a different part of job {job_id} "
                            f"(positions {part.first_position}-{part.first_position + part.image_count - 1}); "
                            "use a new key for a new part")
    return part_answer(session, job_id, part, 200)


def _discard_part(session: Session, svc: Services, tenant: str, job_id: str, images: list[Image]) -> None:
    try:
        session.rollback()
    finally:
        for image in images:
            if image.blob_key:
                svc.blobs.delete_prefix(image_prefix(tenant, job_id, image.id))


@bp.post("/<job_id>/close")
def close_job(job_id: str):
    """No more parts: the job finishes when its images have. Idempotent. When every image is already
    finished, the job's callback is sent by the reconciler's next round (worker/callbacks.py)."""
    session = db_session()
    job = owned(Job, job_id, "job")
    close_open_job(session, job.id)  # waits for a part still committing (the row's lock): the count is final
    session.commit()
    session.refresh(job)
    return job_json(session, job)


@bp.get("")
def list_jobs():
    session = db_session()
    limit = parse_limit(default=20, maximum=100)
    query = select(Job).where(Job.tenant_id == tenant_id())
    if cursor := request.args.get("cursor"):
        created_at, job_id = _job_cursor(cursor)
        query = query.where(or_(Job.created_at < created_at, and_(Job.created_at == created_at, Job.id < job_id)))
    jobs = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all()
    last = jobs[limit - 1] if len(jobs) > limit else None
    return {
        "jobs": [job_json(session, job) for job in jobs[:limit]],
        "next_cursor": encode_cursor(iso(last.created_at), last.id) if last else None,
    }


def _job_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created_at, job_id = decode_cursor(cursor)
        created_at = datetime.fromisoformat(created_at)
        return created_at.astimezone(timezone.utc), str(uuid.UUID(job_id))
    except (TypeError, ValueError):
        raise ApiError(400, "invalid cursor") from None


@bp.get("/<job_id>")
def get_job(job_id: str):
    session = db_session()
    return job_json(session, owned(Job, job_id, "job"))


@bp.delete("/<job_id>")
def cancel_job(job_id: str):
    """Cancel what is still queued; images already processing finish. Idempotent.

    With ?purge=true: delete the job, its image rows and every blob (sources,
    masks, overlays) now; the job answers 404 afterwards.
    """
    session = db_session()
    job = owned(Job, job_id, "job")
    if _purge_requested():
        purged = delete_job_rows(session, job)
        session.commit()
        try:
            delete_job_blobs(services().blobs, purged)
        except Exception:  # the rows are gone; the orphan sweep (db/retention.py) removes the blobs
            log.exception("job %s purged, but its blobs could not be deleted now", job.id)
        return {"job_id": purged.job_id, "purged": True, "images": purged.images}
    now = utcnow()
    # A job receiving parts is cut short first (the row's lock: a part still committing lands before,
    # and is cancelled below with the rest), and always ends "cancelled": its batch is not whole.
    close_open_job(session, job.id, cancel=True)
    session.refresh(job)  # as the row is now (closed by another client meanwhile, say)
    unfinished = session.scalar(select(func.count()).where(Image.job_id == job.id, Image.status.in_(UNFINISHED)))
    if unfinished and job.cancelled_at is None:
        job.cancelled_at = now
    session.execute(
        update(Image)
        .where(Image.job_id == job.id, Image.status == QUEUED)
        .values(status=CANCELLED, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return job_json(session, job), 202


def _purge_requested() -> bool:
    return flag(request.args.get("purge"), "purge")


@bp.get("/<job_id>/images")
def list_images(job_id: str):
    session = db_session()
    job = owned(Job, job_id, "job")
    limit = parse_limit(default=100, maximum=1000)
    after = _position_cursor(request.args.get("cursor"))
    query = select(Image).where(Image.job_id == job.id, Image.position > after)
    if status := request.args.get("status"):
        if status not in IMAGE_STATUSES:
            raise ApiError(400, f"status must be one of {', '.join(IMAGE_STATUSES)}")
        query = query.where(Image.status == status)
    images = session.scalars(query.order_by(Image.position).limit(limit + 1)).all()
    return {
        "job_id": job.id,
        "images": [image_json(im) for im in images[:limit]],
        "next_cursor": encode_cursor(images[limit - 1].position) if len(images) > limit else None,
    }


def _position_cursor(cursor: str | None) -> int:
    if not cursor:
        return -1
    parts = decode_cursor(cursor)
    if not (isinstance(parts, list) and len(parts) == 1 and type(parts[0]) is int):
        raise ApiError(400, "invalid cursor")
    return parts[0]


@bp.get("/<job_id>/results.csv")
def results_csv(job_id: str):
    """Every image of the job as one CSV row (IMAGE_FIELDS), streamed page by page."""
    session = db_session()
    job = owned(Job, job_id, "job")

    def page(after: int) -> list[Image]:
        query = select(Image).where(Image.job_id == job.id, Image.position > after).order_by(Image.position)
        return session.scalars(query.limit(CSV_PAGE)).all()

    first = page(-1)  # before the response starts, so a database error still answers JSON

    def lines():
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(IMAGE_FIELDS)
        batch = first
        while True:
            for im in batch:
                writer.writerow(_csv_cell(v) for v in image_json(im).values())
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            if len(batch) < CSV_PAGE:
                return
            batch = page(batch[-1].position)

    return Response(
        stream_with_context(lines()),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="bonedetect-{job.id}.csv"'},
    )


def _csv_cell(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value  # a spreadsheet would run it as a formula
    return value
