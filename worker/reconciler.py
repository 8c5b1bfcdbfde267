"""The reconciler: the SQL database is the truth, the broker only carries work.

If the broker loses tasks (Redis restarted or flushed, a message dropped) or a
worker dies holding a chunk, images stay `queued` or `processing` forever
unless something looks. Every `interval` seconds the reconciler:

- puts `processing` images whose lease expired back to `queued` (their
  worker is presumed dead; the task's claim accepts them again);
- when the broker's queue is empty, re-enqueues `queued` images of
  uncancelled jobs that were last enqueued more than `grace_s` ago.

Re-enqueuing is safe because `segment_chunk` is idempotent: a duplicate
task finds its images done or leased and skips them. Torch-free.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from bonedetect.queue import enqueue_chunks
from bonedetect.settings import Settings
from db.models import PROCESSING, QUEUED, Image, Job, utcnow

log = logging.getLogger("bonedetect.reconciler")


def broker_queue_length(app: Celery, queue: str) -> int | None:
    """Messages waiting in the broker's queue, or None when the broker cannot say."""
    try:
        with app.connection_for_read() as conn:
            return conn.default_channel.queue_declare(queue=queue, passive=True).message_count
    except Exception as err:  # queue not declared yet, or broker away
        log.debug("queue length unavailable: %s", err)
        return None


def reconcile_once(sessions: sessionmaker[Session], app: Celery, settings: Settings, grace_s: float = 60.0) -> dict:
    now = utcnow()
    with sessions.begin() as session:
        expired = session.execute(
            update(Image)
            .where(Image.status == PROCESSING, Image.lease_expires_at < now)
            .values(status=QUEUED, lease_expires_at=None)
            .returning(Image.id)
        ).scalars().all()
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
                session.execute(update(Image).where(Image.id.in_(requeue)).values(enqueued_at=now))
        if requeue:
            enqueue_chunks(app, list(requeue), settings.chunk_size)
    if expired or requeue:
        log.warning("reconciler: %d expired leases, %d images re-enqueued", len(expired), len(requeue))
    return {"expired_leases": len(expired), "requeued": len(requeue), "broker_waiting": waiting}


class Reconciler(threading.Thread):
    """Runs reconcile_once every `interval` seconds until stop()."""

    def __init__(self, settings: Settings, interval: float = 30.0, grace_s: float = 60.0):
        super().__init__(name="bonedetect-reconciler", daemon=True)
        from bonedetect.queue import make_celery
        from db.session import make_engine, make_sessionmaker

        self.settings = settings
        self.interval = interval
        self.grace_s = grace_s
        self.sessions = make_sessionmaker(make_engine(settings.database_url))
        self.app = make_celery(settings)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                reconcile_once(self.sessions, self.app, self.settings, self.grace_s)
            except Exception:  # database or broker away: try again next round
                log.exception("reconciler round failed")

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=self.interval + 5)
