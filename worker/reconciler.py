"""The reconciler: the SQL database is the truth, the broker only carries work.

If the broker loses tasks (Redis restarted or flushed, a message dropped) or a
worker dies holding a chunk, images stay `queued` or `processing` forever
unless something looks. Every RECONCILE_INTERVAL_S seconds the reconciler:

- puts `processing` images whose lease expired back to `queued` (their
  worker is presumed dead: a live worker renews its leases while its chunk
  runs; the task's claim accepts them again), or, in a cancelled job, to
  `cancelled`;
- when the broker's queue is empty, re-enqueues `queued` images of
  uncancelled jobs that were last enqueued more than RECONCILE_GRACE_S ago;
- cuts short (cancels) jobs opened for parts that got none for
  OPEN_JOB_IDLE_HOURS (their client died, or gave up, before closing them),
  so they end and their callbacks fire;
- sends the job-completion callbacks nothing else will (`sweep_callbacks`:
  jobs finished by a cancellation, or whose callback task was lost);
- once an hour, when RETENTION_DAYS is set, purges jobs older than that
  (rows and blobs), and blob folders an interrupted upload left without a
  job row (db/retention.py).

Re-enqueuing is safe because `segment_chunk` is idempotent: a duplicate
task finds its images done or leased and skips them. Run one per deployment
(`bonedetect reconciler`); two would only send some duplicate tasks.
Torch-free.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from bonedetect.queue import enqueue_chunks, waiting_messages
from bonedetect.settings import Settings
from db.models import CANCELLED, PROCESSING, QUEUED, Image, Job, utcnow

log = logging.getLogger("bonedetect.reconciler")

RETENTION_EVERY_S = 3600.0


def broker_queue_length(app: Celery, queue: str) -> int | None:
    """Messages waiting in the broker's queue, or None when the broker cannot say.

    Redis deletes a list when its last message is taken (and a restart or a
    flush deletes it too), so a queue the broker does not know holds nothing.
    """
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5)  # ask once, do not wait it out
            channel = conn.default_channel
            try:
                return waiting_messages(channel, queue)
            except conn.channel_errors as err:  # NOT_FOUND: no such queue, so nothing waits in it
                log.debug("queue %s not declared: %s", queue, err)
                return 0
    except Exception as err:  # broker away
        log.debug("queue length unavailable: %s", err)
        return None


def reconcile_once(
    sessions: sessionmaker[Session], app: Celery, settings: Settings, grace_s: float | None = None
) -> dict:
    grace_s = settings.reconcile_grace_s if grace_s is None else grace_s
    now = utcnow()
    with sessions.begin() as session:
        # A lease that expired in a cancelled job: its image is cancelled, not queued again (nothing
        # would ever take it: the claim and the re-enqueue below skip cancelled jobs).
        abandoned = session.execute(
            update(Image)
            .where(Image.status == PROCESSING, Image.lease_expires_at < now,
                   Image.job_id.in_(select(Job.id).where(Job.cancelled_at.is_not(None))))
            .values(status=CANCELLED, finished_at=now, lease_expires_at=None)
            .returning(Image.id)
            .execution_options(synchronize_session=False)
        ).scalars().all()
        expired = (
            session.execute(
                update(Image)
                .where(Image.status == PROCESSING, Image.lease_expires_at < now)
                .values(status=QUEUED, lease_expires_at=None)
                .returning(Image.id)
            )
            .scalars()
            .all()
        )
    waiting = broker_queue_length(app, settings.queue_name)
    if waiting is None:
        waiting = 0 if expired else None
    requeue: list[str] = []
    if waiting == 0:
        with sessions.begin() as session:
            requeue = session.scalars(
                select(Image.id)
                .join(Job, Job.id == Image.job_id)
                .where(
                    Image.status == QUEUED,
                    Job.cancelled_at.is_(None),
                    Image.enqueued_at < now - timedelta(seconds=grace_s),
                )
                .order_by(Image.job_id, Image.position)
            ).all()
            if requeue:
                session.execute(
                    update(Image)
                    .where(Image.id.in_(requeue))
                    .values(enqueued_at=now)
                    .execution_options(synchronize_session=False)
                )
        if requeue:
            enqueue_chunks(app, list(requeue), settings.chunk_size)
    if expired or requeue or abandoned:
        log.warning("reconciler: %d expired leases, %d images re-enqueued, %d of cancelled jobs cancelled",
                    len(expired), len(requeue), len(abandoned))
    return {"expired_leases": len(expired), "requeued": len(requeue), "broker_waiting": waiting,
            "cancelled_expired": len(abandoned)}


class Reconciler(threading.Thread):
    """Runs reconcile_once every `interval` seconds (and the retention purge
    every hour when RETENTION_DAYS is set) until stop()."""

    def __init__(self, settings: Settings, interval: float | None = None, grace_s: float | None = None):
        super().__init__(name="bonedetect-reconciler", daemon=True)
        from bonedetect.queue import make_celery
        from db.blobstore import open_blob_store
        from db.session import make_engine, make_sessionmaker

        self.settings = settings
        self.interval = settings.reconcile_interval_s if interval is None else interval
        self.grace_s = settings.reconcile_grace_s if grace_s is None else grace_s
        self.sessions = make_sessionmaker(make_engine(settings.database_url))
        self.blobs = open_blob_store(settings.blob_url)
        self.app = make_celery(settings)
        self.rounds = 0
        self._last_retention = float("-inf")
        self._stop_event = threading.Event()

    def round(self) -> dict:
        result = reconcile_once(self.sessions, self.app, self.settings, self.grace_s)
        try:
            from db.jobs import close_idle_jobs

            with self.sessions.begin() as session:
                closed = close_idle_jobs(session, self.settings.open_job_idle_hours)
            if closed:
                log.warning("reconciler: cut short %d jobs that got no part for %d hours (never closed): %s%s",
                            len(closed), self.settings.open_job_idle_hours, ", ".join(closed[:10]),
                            " ..." if len(closed) > 10 else "")
            result["closed_idle_jobs"] = len(closed)
        except Exception:
            log.exception("closing idle open jobs failed")
        try:  # job-completion callbacks nothing else will send (worker/callbacks.py)
            from worker.callbacks import sweep_callbacks

            result["callbacks"] = sweep_callbacks(self.sessions, self.app, self.settings)
        except Exception:
            log.exception("callback sweep failed")
        if self.settings.retention_days > 0 and time.monotonic() - self._last_retention >= RETENTION_EVERY_S:
            from db.retention import purge_expired, purge_orphan_blobs

            result["purged_jobs"] = purge_expired(self.sessions, self.blobs, self.settings.retention_days)
            result["purged_orphans"] = purge_orphan_blobs(self.sessions, self.blobs, self.settings.orphan_blob_hours)
            self._last_retention = time.monotonic()
        self.rounds += 1
        return result

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.round()
            except Exception:  # database or broker away: try again next round
                log.exception("reconciler round failed")

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=self.interval + 5)
