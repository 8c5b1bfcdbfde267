"""Liveness and readiness, for load balancers, orchestrators and people (no API key).

    GET /healthz   200 while the process answers
    GET /readyz    200 when the system can do work: the database answers, the
                   broker answers, and at least one worker with a loaded model
                   wrote its heartbeat within HEARTBEAT_STALE_S; else 503 with
                   the failing checks and Retry-After
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from flask import Blueprint
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from api import services
from api.errors import RETRY_AFTER_S
from bonedetect.queue import waiting_messages
from bonedetect.settings import Settings
from db.models import WorkerHeartbeat, utcnow

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__)

BROKER_TIMEOUT_S = 3.0  # a probe must answer well within an orchestrator's probe timeout


def broker_queue_depth(settings: Settings, timeout: float = BROKER_TIMEOUT_S) -> int:
    """Messages (chunk tasks) waiting in the broker's segment queue; raises if the broker is unreachable.

    Redis: the length of the queue's lists (what KEDA scales on); the embedded
    SQLAlchemy transport: its visible messages. Tasks a worker has reserved
    but not acked are not counted.
    """
    from kombu import Connection
    from kombu.exceptions import ChannelError

    options: dict = {}
    if settings.broker_url.startswith(("redis://", "rediss://")):
        options = {"socket_connect_timeout": timeout, "socket_timeout": timeout, "max_retries": 0}
    with Connection(settings.broker_url, connect_timeout=timeout, transport_options=options) as conn:
        conn.ensure_connection(max_retries=0, timeout=timeout)
        with conn.channel() as channel:
            try:
                return waiting_messages(channel, settings.queue_name)
            except ChannelError:  # no such queue yet: nothing was ever sent to it
                return 0


@dataclass
class AliveWorker:
    hostname: str
    model_version: str | None
    device: str | None
    images_done: int
    last_batch_size: int | None
    gpu_memory_mb: float | None
    age_s: float  # seconds since its last heartbeat


def alive_workers(session: Session, stale_s: int) -> list[AliveWorker]:
    """Workers whose heartbeat is younger than stale_s seconds (loaded model or not)."""
    now = utcnow()
    rows = session.scalars(
        select(WorkerHeartbeat)
        .where(WorkerHeartbeat.last_seen_at >= now - timedelta(seconds=stale_s))
        .order_by(WorkerHeartbeat.hostname)
    ).all()
    out = []
    for r in rows:
        seen = r.last_seen_at if r.last_seen_at.tzinfo else r.last_seen_at.replace(tzinfo=now.tzinfo)
        out.append(
            AliveWorker(
                r.hostname, r.model_version, r.device, r.images_done or 0, r.last_batch_size, r.gpu_memory_mb,
                max(0.0, (now - seen).total_seconds()),
            )
        )  # fmt: skip
    return out


@bp.get("/healthz")
def healthz():
    """The process answers."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    """Database, broker and a worker with a loaded model: every check is reported, failing or not."""
    svc = services()
    checks: dict[str, dict] = {}
    errors: list[str] = []
    workers: list[AliveWorker] | None = None
    try:
        with svc.sessionmaker() as session:
            session.execute(text("SELECT 1"))
            workers = alive_workers(session, svc.settings.heartbeat_stale_s)
        checks["database"] = {"ok": True}
    except Exception as err:  # any failure means: do not route traffic here yet
        log.warning("not ready: database: %s", err)
        checks["database"] = {"ok": False, "error": "database unavailable"}
        errors.append("database unavailable, retry later")
    try:
        checks["broker"] = {"ok": True, "queue_depth": broker_queue_depth(svc.settings)}
    except Exception as err:
        log.warning("not ready: broker: %s", err)
        checks["broker"] = {"ok": False, "error": "broker unavailable"}
        errors.append("broker unavailable")
    if workers is not None:
        ready = [w for w in workers if w.model_version]
        checks["workers"] = {
            "ok": bool(ready),
            "alive": len(workers),
            "with_model": len(ready),
            "model_versions": sorted({w.model_version for w in ready}),
        }
        if not ready:
            stale = svc.settings.heartbeat_stale_s
            errors.append(
                f"no worker with a loaded model seen in the last {stale} s"
                + (f" ({len(workers)} alive, still loading)" if workers else "")
            )
    if errors:
        body = {"status": "unavailable", "error": "; ".join(errors), "checks": checks}
        return body, 503, {"Retry-After": str(RETRY_AFTER_S)}
    return {"status": "ready", "checks": checks}
