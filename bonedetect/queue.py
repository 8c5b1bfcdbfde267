"""The Celery app, shared by the API (which only sends tasks by name) and the
worker (which runs them). Importing this module never imports torch.

Reliability lives here, in configuration, as Celery's docs advise for long
tasks: late acks, reject on worker loss (at-least-once delivery; the task is
idempotent), prefetch 1, results ignored (the SQL database is the record).
"""

from __future__ import annotations

import logging
import time

from celery import Celery

from bonedetect.settings import Settings

SEGMENT_TASK = "worker.tasks.segment_chunk"

log = logging.getLogger("bonedetect.queue")

# kombu's virtual transports (the embedded broker's SQLAlchemy one) look for a message and, when the queues are
# empty, sleep polling_interval seconds, 1 by default, before looking again: an idle worker of the embedded
# default took 0.77-0.95 s to claim a new job's first chunk (python -m bench --quick, 2-core CPU; 0.16 s over
# Redis, which blocks on the queue instead). At 0.2 s: 0.20-0.21 s, and an idle worker uses 1.7% of a core
# instead of 0.4% (0.05 s: 0.08 s and 5.2%). A worker busy with a chunk does not poll (docs/benchmarks.md).
EMBEDDED_POLL_S = 0.2


def make_celery(settings: Settings) -> Celery:
    settings.ensure_home()
    app = Celery("bonedetect", broker=settings.broker_url)
    if settings.embedded:
        use_embedded_polling()
    transport_options: dict = {}
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # Redis redelivers a task not acked within visibility_timeout: keep it
        # above the slowest chunk. (kombu's SQLAlchemy transport passes its
        # options to create_engine, so Redis-only options must not go there.)
        transport_options["visibility_timeout"] = settings.visibility_timeout_s
    app.conf.update(
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue_name,
        task_routes={SEGMENT_TASK: {"queue": settings.queue_name}},
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(settings.task_time_limit_s - 60, 60),
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # The model loads lazily on the first task; a prefork child doing it in
        # worker_process_init would be killed after 4 s.
        worker_proc_alive_timeout=60,
        task_serializer="json",
        accept_content=["json"],
    )
    if settings.broker_url.startswith("sqla+sqlite"):
        prepare_embedded_broker(app, settings)
    return app


def prepare_embedded_broker(app: Celery, settings: Settings, attempts: int = 6) -> None:
    """Make the embedded broker's tables and this deployment's two queues now, tolerating other processes
    that do the same at the same moment.

    kombu's SQLAlchemy transport makes its tables (``create_all``) and a queue's row by looking first and
    then inserting, guarded by a lock of one process only (celery/kombu#1187): processes that start at once
    on a new broker file can both insert, and the loser's error reaches it unhandled. A worker's consumer
    declares its queues at start, so one of two workers started together could stop at once ("Unrecoverable
    error: IntegrityError: UNIQUE constraint failed: kombu_queue.name"; 3 of 35 pairs of workers started
    together on a new home, docs/benchmarks.md). Here the loser meets the winner's table or row and tries
    again on a fresh connection, which then finds them: a worker, the API and the reconciler all make their
    app here before anything of theirs declares a queue. Should the broker's file not open at all (a home
    that cannot be written), this only logs it: the process goes on as before, to Celery's own connection
    retries and errors."""
    from kombu import Queue
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(attempts):
        try:
            with app.connection_for_write() as conn:
                channel = conn.default_channel
                try:
                    for name in (settings.queue_name, settings.callback_queue):
                        Queue(name, channel=channel).declare()
                finally:
                    _close_session(channel)
            return
        except (IntegrityError, OperationalError) as err:
            # another process made the table or row first, or held the file
            if attempt == attempts - 1:
                log.warning("could not prepare the embedded broker's queues: %s", err)
                return
            time.sleep(0.05 * (attempt + 1))


def worker_pool(concurrency: int) -> dict:
    """The worker's Celery pool for WORKER_CONCURRENCY chunks at once (worker/app.py sets it): ``solo`` for
    one (the task runs in the worker's main thread), ``threads`` for more, which share the process's one
    model (worker/pipeline.py: the network takes one batch at a time). Never prefork: CUDA must not start
    before a fork, and each child would load a model of its own. Neither pool enforces time limits
    (Celery's docs): the leases and the reconciler are the guard."""
    if concurrency < 1:
        raise ValueError(f"a worker runs at least one chunk at a time, got {concurrency}")
    return {"worker_pool": "solo" if concurrency == 1 else "threads", "worker_concurrency": concurrency}


def use_embedded_polling(seconds: float = EMBEDDED_POLL_S) -> None:
    """Have kombu's SQLAlchemy transport poll every ``seconds`` (EMBEDDED_POLL_S) in this process.

    Set on the transport class: its ``transport_options`` go to ``create_engine``, which refuses a
    ``polling_interval``. Only the embedded broker uses that transport."""
    from kombu.transport import sqlalchemy

    sqlalchemy.Transport.polling_interval = seconds


def enqueue_chunks(app: Celery, image_ids: list[str], chunk_size: int) -> int:
    """Send one segment_chunk task per chunk of ids; returns the number sent."""
    sent = 0
    for start in range(0, len(image_ids), chunk_size):
        app.send_task(SEGMENT_TASK, args=[image_ids[start : start + chunk_size]])
        sent += 1
    return sent


def waiting_messages(channel, queue: str) -> int:
    """Messages waiting in ``queue`` on a kombu channel (a passive declare: raises the channel's error when the
    broker has no such queue).

    kombu's SQLAlchemy transport (the embedded broker) never closes its channel's session, so each call would
    keep a pooled connection checked out until the garbage collector found the channel; at 15 (pool 5 +
    overflow 10) the next caller in the process waited 30 s for one. The session is given back here.
    """
    try:
        return channel.queue_declare(queue=queue, passive=True).message_count
    finally:
        _close_session(channel)


def _close_session(channel) -> None:
    """Give back the SQLAlchemy session kombu's SQLAlchemy channel opened (it never does; waiting_messages)."""
    session = getattr(channel, "_session", None)
    if session is not None:
        session.close()
