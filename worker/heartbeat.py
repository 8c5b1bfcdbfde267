"""Worker heartbeats, per-image log lines and the worker's JSON logging.

Each worker process keeps one row in `worker_heartbeats` (db.models.WorkerHeartbeat),
keyed by its Celery node name: the model version it loaded, its device, when it
started, when it was last seen, how many images it finished, the size of its
last chunk and its peak GPU memory. The API reads these rows for `/readyz` (is
any worker with a loaded model alive?) and `/metrics`.

Wired to Celery signals by `connect()` (worker/app.py), so worker/tasks.py
knows nothing of it:

- `setup_logging`: JSON logs (bonedetect/logs.py) instead of Celery's own set-up;
- `worker_ready`: start the heartbeat thread, which first loads and warms the
  model (`worker.tasks.worker_context()`, the same one the first task would
  load) so the worker reports ready before any work arrives, then touches its
  row every HEARTBEAT_INTERVAL_S seconds; also while a long chunk runs;
- `task_prerun` / `task_postrun`: bind the chunk's job and image ids to every
  log line of the task, log one line per image it finished, and add the chunk
  to the row (images done, chunk size, GPU memory);
- `worker_shutdown`: delete the row, so the worker stops counting at once.

Only for the `solo` (one process per GPU, as bonedetect runs it) and
`threads` pools: with prefork the signals would fire in other processes.
A heartbeat that cannot reach the database is logged and retried; it never
stops the worker or fails a task.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from bonedetect.logs import bind, configure_logging, unbind
from bonedetect.queue import SEGMENT_TASK
from bonedetect.settings import Settings
from db.models import DONE, FAILED, Image, WorkerHeartbeat, utcnow
from db.session import make_engine, make_sessionmaker

log = logging.getLogger("bonedetect.worker")


@dataclass
class ModelInfo:
    version: str | None = None
    device: str | None = None


def gpu_memory_mb(device: str | None) -> float | None:
    """Peak GPU memory PyTorch allocated in this process (MiB); None off the GPU."""
    if not device or not device.startswith("cuda"):
        return None
    import torch

    return round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**20, 1)


def loaded_model() -> ModelInfo | None:
    """The model this process has loaded (worker.tasks' context), or None if none yet."""
    tasks = sys.modules.get("worker.tasks")  # not imported: no task ran, no model loaded
    ctx = getattr(tasks, "_context", None)
    if ctx is None:
        return None
    return ModelInfo(ctx.model_version, str(ctx.pipeline.segmenter.device))


class Heartbeat:
    """The heartbeat row of one worker process, and the thread that keeps it fresh."""

    def __init__(self, settings: Settings, hostname: str, sessions: sessionmaker[Session] | None = None):
        self.settings = settings
        self.hostname = hostname
        self.sessions = sessions or make_sessionmaker(make_engine(settings.database_url))
        self.started_at = utcnow()
        self.model = ModelInfo()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one write at a time: the thread and the task's postrun
        self._thread: threading.Thread | None = None

    # -- the row ---------------------------------------------------------------

    def beat(self, images_done: int = 0, batch_size: int | None = None, reset: bool = False) -> None:
        """Insert or refresh this worker's row; add `images_done` finished images."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    self._write(images_done, batch_size, reset)
                    return
                except IntegrityError:  # another insert of the same name raced this one: update it instead
                    if attempt == 2:
                        raise

    def _write(self, images_done: int, batch_size: int | None, reset: bool) -> None:
        now = utcnow()
        with self.sessions.begin() as session:
            row = session.get(WorkerHeartbeat, self.hostname, with_for_update=True)
            if row is None:
                row = WorkerHeartbeat(hostname=self.hostname, started_at=self.started_at, images_done=0)
                session.add(row)
            elif reset:
                row.started_at, row.images_done, row.last_batch_size = self.started_at, 0, None
            row.last_seen_at = now
            row.model_version, row.device = self.model.version, self.model.device
            row.images_done = (row.images_done or 0) + images_done
            if batch_size is not None:
                row.last_batch_size = batch_size
            try:
                row.gpu_memory_mb = gpu_memory_mb(self.model.device)
            except Exception:  # a GPU query must never cost the heartbeat
                row.gpu_memory_mb = None

    def delete(self) -> None:
        with self._lock, self.sessions.begin() as session:
            row = session.get(WorkerHeartbeat, self.hostname)
            if row is not None:
                session.delete(row)

    # -- the thread ------------------------------------------------------------

    def start(self, preload: bool = True) -> None:
        self._thread = threading.Thread(target=self._run, args=(preload,), name="bonedetect-heartbeat", daemon=True)
        self._thread.start()

    def _run(self, preload: bool) -> None:
        self._safe_beat(reset=True)  # alive (not yet ready) while the model loads
        if preload:
            try:
                import worker.tasks as tasks

                t0 = time.perf_counter()
                tasks.worker_context()
                log.info("model preloaded in %.1f s", time.perf_counter() - t0)
            except Exception:
                log.exception("could not load the model: this worker will not report ready")
        while True:
            self.model = loaded_model() or self.model
            self._safe_beat()
            if self._stop.wait(self.settings.heartbeat_interval_s):
                return

    def _safe_beat(self, **kw) -> None:
        try:
            self.beat(**kw)
        except Exception as err:  # database away: try again next interval
            log.warning("heartbeat not written: %s", err)

    def chunk_done(self, images_done: int, batch_size: int | None) -> None:
        self.model = loaded_model() or self.model
        self._safe_beat(images_done=images_done, batch_size=batch_size)

    def stop(self, delete: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if delete:
            try:
                self.delete()
            except Exception as err:
                log.warning("heartbeat row not deleted: %s", err)


# -- Celery signals ------------------------------------------------------------------


@dataclass
class _State:
    heartbeat: Heartbeat | None = None
    tasks: dict[str, tuple[object, datetime]] = field(default_factory=dict)  # task id -> (log token, start)


_state = _State()


def _pool_name(consumer) -> str:
    pool = getattr(consumer, "pool", None)
    return type(pool).__module__.rsplit(".", 1)[-1] if pool is not None else ""


def on_setup_logging(**_kw) -> None:
    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)


def on_worker_ready(sender=None, **_kw) -> None:
    settings = Settings.from_env()
    hostname = getattr(sender, "hostname", None) or socket.gethostname()
    pool = _pool_name(sender)
    # Loading the model in a prefork parent would start CUDA before the fork.
    preload = pool in ("solo", "thread", "threads", "")
    heartbeat = Heartbeat(settings, hostname)
    heartbeat.start(preload=preload)
    _state.heartbeat = heartbeat
    log.info("heartbeat started for %s (pool %s, every %d s)", hostname, pool or "?", settings.heartbeat_interval_s)


def on_worker_shutdown(**_kw) -> None:
    heartbeat, _state.heartbeat = _state.heartbeat, None
    if heartbeat is not None:
        heartbeat.stop(delete=True)


def on_task_prerun(task_id=None, task=None, args=None, **_kw) -> None:
    heartbeat = _state.heartbeat
    if heartbeat is None or getattr(task, "name", None) != SEGMENT_TASK or not args:
        return
    image_ids = [str(i) for i in args[0]]
    fields = {"task_id": task_id, "image_ids": image_ids}
    try:
        with heartbeat.sessions() as session:
            job_ids = sorted(set(session.scalars(select(Image.job_id).where(Image.id.in_(image_ids)))))
        if len(job_ids) == 1:
            fields["job_id"] = job_ids[0]
        elif job_ids:
            fields["job_ids"] = job_ids
    except Exception as err:
        log.debug("chunk's job ids not read: %s", err)
    _state.tasks[task_id] = (bind(**fields), utcnow())


def on_task_postrun(task_id=None, task=None, args=None, retval=None, state=None, **_kw) -> None:
    heartbeat = _state.heartbeat
    entry = _state.tasks.pop(task_id, None)
    if heartbeat is None or entry is None:
        return
    token, started = entry
    try:
        unbind(token)  # the per-image lines name their own image, not the whole chunk's
    except ValueError:
        pass
    try:
        if state == "SUCCESS" and isinstance(retval, dict):
            _log_images(heartbeat, [str(i) for i in args[0]], started, task_id)
            processed = int(retval.get("processed", 0))  # 0: a duplicate delivery, every image already handled
            heartbeat.chunk_done(int(retval.get("done", 0)), processed or None)
        else:
            heartbeat.chunk_done(0, None)
    except Exception as err:
        log.warning("chunk bookkeeping failed: %s", err, extra={"task_id": task_id})


def _log_images(heartbeat: Heartbeat, image_ids: list[str], started: datetime, task_id: str | None) -> None:
    """One line per image this task finished (claimed after it started), with its job id."""
    with heartbeat.sessions() as session:
        rows = session.execute(
            select(
                Image.id, Image.job_id, Image.status, Image.error, Image.processing_ms,
                Image.tumor_detected, Image.area_px, Image.model_version,
            ).where(Image.id.in_(image_ids), Image.status.in_((DONE, FAILED)), Image.started_at >= started)
        ).all()  # fmt: skip
    for r in rows:
        fields = {"job_id": r.job_id, "image_id": r.id, "task_id": task_id, "status": r.status, "processing_ms": r.processing_ms}
        if r.status == DONE:
            fields.update(tumor_detected=r.tumor_detected, area_px=r.area_px, model_version=r.model_version)
            log.info("image done", extra=fields)
        else:
            log.warning("image failed: %s", r.error, extra={**fields, "error": r.error})


def connect(app=None) -> None:
    """Connect the handlers above to Celery's signals (idempotent)."""
    from celery import signals

    signals.setup_logging.connect(on_setup_logging, weak=False, dispatch_uid="bonedetect.setup_logging")
    signals.worker_ready.connect(on_worker_ready, weak=False, dispatch_uid="bonedetect.worker_ready")
    signals.worker_shutdown.connect(on_worker_shutdown, weak=False, dispatch_uid="bonedetect.worker_shutdown")
    signals.task_prerun.connect(on_task_prerun, weak=False, dispatch_uid="bonedetect.task_prerun")
    signals.task_postrun.connect(on_task_postrun, weak=False, dispatch_uid="bonedetect.task_postrun")
