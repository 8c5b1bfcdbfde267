"""Job-completion callbacks: a signed JSON POST to the job's callback URL.

How a callback becomes due, exactly once:

- after every `segment_chunk` task (Celery's `task_postrun` signal, in the
  worker process, after the task's transaction committed), the jobs of that
  chunk are checked with one conditional UPDATE:
  `callback_state: NULL -> 'pending'` where the job has a callback URL and no
  image left `queued` or `processing`. The worker whose commit came last sees
  every image finished; the UPDATE lets exactly one process win even when two
  finish the last images at once. The winner sends `deliver_callback(job_id)`.
- `sweep_callbacks` (for the reconciler's round) catches what the signal
  cannot: jobs finished by a cancellation in the API, a worker killed between
  its commit and the claim, and a 'pending' job whose task the broker lost.

`deliver_callback` POSTs the job summary, signed with the tenant's webhook
secret (`X-BoneDetect-Signature: sha256=HMAC(secret, "<timestamp>.<body>")`),
records each attempt in `callback_deliveries`, and retries failures with
exponential backoff (full jitter) up to `callback_max_retries`; then the
state is 'failed'. docs/callbacks.md is the receiver's side. Torch-free.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

from celery.signals import task_postrun
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy import exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from bonedetect.queue import SEGMENT_TASK
from bonedetect.settings import Settings
from db.jobs import job_progress
from db.models import UNFINISHED, CallbackDelivery, Image, Job, Tenant, utcnow
from worker.app import app

log = logging.getLogger("bonedetect.callbacks")

CALLBACK_TASK = "worker.callbacks.deliver_callback"
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
EVENT = "job.finished"
SIGNATURE_HEADER = "X-BoneDetect-Signature"
TIMESTAMP_HEADER = "X-BoneDetect-Timestamp"
USER_AGENT = "BoneDetect-Callback/1"
ERROR_EXCERPT = 300  # characters of a receiver's error answer kept with the attempt


# -- per-process state ----------------------------------------------------------

_state: tuple[Settings, sessionmaker[Session]] | None = None
_state_lock = threading.Lock()


def _context() -> tuple[Settings, sessionmaker[Session]]:
    global _state
    with _state_lock:
        if _state is None:
            from db.session import make_engine, make_sessionmaker

            settings = Settings.from_env()
            _state = settings, make_sessionmaker(make_engine(settings.database_url))
        return _state


# -- becoming due ---------------------------------------------------------------


def claim_finished(session: Session, job_ids: list[str] | None) -> list[str]:
    """Mark 'pending' the jobs among `job_ids` (None: all jobs) that have a callback URL, no callback
    yet, are closed (take no more parts) and have no unfinished image; returns their ids. One
    conditional UPDATE: exactly one caller wins a job."""
    if job_ids is not None and not job_ids:
        return []
    unfinished = exists().where(Image.job_id == Job.id, Image.status.in_(UNFINISHED))
    query = update(Job).where(
        Job.callback_url.is_not(None), Job.callback_state.is_(None), Job.receiving.is_(False), ~unfinished
    )
    if job_ids is not None:
        query = query.where(Job.id.in_(job_ids))
    return list(session.execute(query.values(callback_state=PENDING).returning(Job.id)).scalars())


def send_callback(celery_app, settings: Settings, job_id: str) -> None:
    celery_app.send_task(CALLBACK_TASK, args=[job_id], queue=settings.callback_queue)


@task_postrun.connect
def _after_chunk(task=None, args=None, **_kwargs) -> None:
    """After a segment_chunk task (committed or not): send the callbacks of the jobs it finished."""
    if task is None or task.name != SEGMENT_TASK or not args:
        return
    try:
        settings, sessions = _context()
        with sessions.begin() as session:
            job_ids = session.scalars(select(Image.job_id).where(Image.id.in_(list(args[0]))).distinct()).all()
            due = claim_finished(session, list(job_ids))
        for job_id in due:
            send_callback(app, settings, job_id)
    except Exception:  # the reconciler's sweep_callbacks catches up
        log.exception("could not check the jobs of a finished chunk for callbacks")


def sweep_callbacks(sessions: sessionmaker[Session], celery_app, settings: Settings, stale_s: float | None = None) -> int:
    """Send the callbacks nothing else will: finished jobs never claimed (cancelled in the API, or a
    worker died after its commit), and 'pending' ones silent for `stale_s` (their task was lost).
    For the reconciler's round; returns how many it sent."""
    if stale_s is None:  # longer than the longest wait between two attempts, plus one attempt
        stale_s = 2 * settings.callback_backoff_max_s + settings.callback_timeout_s + 60
    with sessions.begin() as session:
        due = claim_finished(session, None)
        cutoff = utcnow() - timedelta(seconds=stale_s)
        last_attempt = (
            select(func.max(CallbackDelivery.created_at)).where(CallbackDelivery.job_id == Job.id).scalar_subquery()
        )
        last_finish = select(func.max(Image.finished_at)).where(Image.job_id == Job.id).scalar_subquery()
        stale = session.scalars(
            select(Job.id).where(Job.callback_state == PENDING, func.coalesce(last_attempt, last_finish) < cutoff)
        ).all()
    for job_id in [*due, *stale]:
        send_callback(celery_app, settings, job_id)
    return len(due) + len(stale)


# -- the summary and its signature ---------------------------------------------


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    if dt.tzinfo is None:  # SQLite hands back naive UTC
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def job_summary(session: Session, job: Job) -> dict:
    """What the receiver gets: the job's final state, as GET /v1/jobs/<id> reports it, and its links
    (paths on the API that sent the job; fetch them with the tenant's API key)."""
    p = job_progress(session, job)
    return {
        "event": EVENT,
        "job_id": job.id,
        "label": job.label,
        "status": p.status,
        "counts": p.counts,
        "total": p.total,
        "created_at": _iso(job.created_at),
        "started_at": _iso(p.started_at),
        "finished_at": _iso(p.finished_at),
        "cancelled_at": _iso(job.cancelled_at),
        "model_versions": p.model_versions,
        "links": {
            "self": f"/v1/jobs/{job.id}",
            "images": f"/v1/jobs/{job.id}/images",
            "results_csv": f"/v1/jobs/{job.id}/results.csv",
        },
    }


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The X-BoneDetect-Signature value: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">."""
    digest = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not a new destination: the signed body goes only where the job said."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def post(url: str, body: bytes, secret: str, job_id: str, attempt: int, timeout: float) -> tuple[int | None, str | None]:
    """One delivery attempt: (HTTP status or None, error or None). Delivered means a 2xx answer."""
    timestamp = str(int(time.time()))
    request = urllib.request.Request(url, data=body, method="POST")
    for name, value in {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-BoneDetect-Event": EVENT,
        "X-BoneDetect-Job": job_id,
        "X-BoneDetect-Delivery": f"{job_id}/{attempt}",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: signature(secret, timestamp, body),
    }.items():
        request.add_header(name, value)
    try:
        with _opener.open(request, timeout=timeout) as response:
            response.read(65536)
            return response.status, None
    except urllib.error.HTTPError as err:
        excerpt = err.read(ERROR_EXCERPT).decode("utf-8", "replace").strip()
        return err.code, f"HTTP {err.code} {err.reason}" + (f": {excerpt}" if excerpt else "")
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        return None, f"{type(reason).__name__}: {reason}"[:ERROR_EXCERPT]


# -- the task -------------------------------------------------------------------


@app.task(name=CALLBACK_TASK, bind=True, acks_late=True, ignore_result=True, max_retries=None)
def deliver_callback(self, job_id: str) -> dict:
    """One attempt to deliver a job's callback; retries itself with backoff until delivered or spent."""
    settings, sessions = _context()
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.callback_url is None or job.callback_state in (DELIVERED, FAILED):
            return {"skipped": True}
        secret = session.scalar(select(Tenant.webhook_secret).where(Tenant.id == job.tenant_id))
        body = json.dumps(job_summary(session, job), separators=(",", ":")).encode("utf-8")
        url = job.callback_url
        attempt = (session.scalar(select(func.max(CallbackDelivery.attempt)).where(CallbackDelivery.job_id == job_id)) or 0) + 1
    if secret:
        http_status, error = post(url, body, secret, job_id, attempt, settings.callback_timeout_s)
    else:  # a tenant created before secrets existed: nothing to sign with
        http_status, error = None, "the tenant has no webhook secret: run `bonedetect webhook-secret <tenant>`"
    delivered = error is None and http_status is not None and 200 <= http_status < 300
    spent = attempt > settings.callback_max_retries or not secret
    try:
        _record(sessions, job_id, attempt, delivered, spent, http_status, error)
    except IntegrityError:  # a duplicate of this task recorded the same attempt number first
        log.warning("job %s: callback attempt %d was recorded by another delivery; stopping this one", job_id, attempt)
        return {"duplicate": True}
    if delivered:
        log.info("job %s: callback delivered (attempt %d, HTTP %s)", job_id, attempt, http_status)
        return {"delivered": True, "attempt": attempt}
    if spent:
        log.warning("job %s: callback failed after %d attempts: %s", job_id, attempt, error)
        return {"delivered": False, "attempt": attempt}
    countdown = get_exponential_backoff_interval(
        settings.callback_backoff_s, attempt - 1, settings.callback_backoff_max_s, full_jitter=True
    )
    log.info("job %s: callback attempt %d failed (%s); next in %d s", job_id, attempt, error, countdown)
    raise self.retry(countdown=countdown, max_retries=None, queue=settings.callback_queue)


def _record(sessions, job_id: str, attempt: int, delivered: bool, spent: bool, http_status, error) -> None:
    """The attempt's row, and the final state once delivered or spent: one transaction."""
    with sessions.begin() as session:
        session.add(
            CallbackDelivery(
                job_id=job_id,
                attempt=attempt,
                status=DELIVERED if delivered else FAILED,
                http_status=http_status,
                error=None if delivered else (error or f"HTTP {http_status}"),
            )
        )
        if delivered or spent:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.callback_state == PENDING)
                .values(callback_state=DELIVERED if delivered else FAILED)
            )
