"""The Celery task: segment one chunk of images.

`segment_chunk(image_ids)` is idempotent. Delivery is at-least-once
(acks_late + reject_on_worker_lost), and the reconciler re-sends work it
thinks lost, so:

- it claims only images still `queued`, or `processing` with an expired
  lease (a worker that died), of jobs not cancelled; images already done,
  failed, cancelled or leased by a live worker are skipped. A claim bumps
  the image's `attempts`, and that number is the claim's token;
- while the chunk runs, a thread renews the leases it holds, so a slow chunk
  on a live worker is never taken for a dead worker's;
- results are written in one transaction at the end, only for rows still
  `processing` under this task's token (locked first), so when two tasks
  ran the same image, exactly one result (row, mask, overlay) is kept:
  the later claim's;
- masks and overlays go to keys derived from the image id, so a rerun
  overwrites rather than duplicates.

The database may go away (a restart, a failover). Claiming and writing
results retry with exponential backoff for up to DB_RETRY_S; a chunk whose
work is done is not thrown away because the database blinked.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from celery.exceptions import Retry
from sqlalchemy import exc as sa_exc
from sqlalchemy import bindparam, exists, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from bonedetect import allocator
from bonedetect.queue import SEGMENT_TASK
from bonedetect.settings import Settings
from db.blobstore import BlobStore, image_prefix, open_blob_store
from db.models import DONE, FAILED, PROCESSING, QUEUED, STAT_COLUMNS, Image, Job, utcnow
from db.session import make_engine, make_sessionmaker
from worker.app import app
from worker.pipeline import ImageResult, Pipeline

log = logging.getLogger("bonedetect.worker")

T = TypeVar("T")


@dataclass
class WorkerContext:
    settings: Settings
    sessions: sessionmaker[Session]
    blobs: BlobStore
    pipeline: Pipeline
    model_version: str


_context: WorkerContext | None = None
_context_lock = threading.Lock()
_in_hand = 0  # chunks this process is running (WORKER_CONCURRENCY: up to 2 at once)
_in_hand_lock = threading.Lock()


def worker_context() -> WorkerContext:
    """Load the model once per process, on the first task (never before a fork)."""
    global _context
    with _context_lock:
        if _context is None:
            _context = build_context(Settings.from_env())
        return _context


def build_context(settings: Settings) -> WorkerContext:
    import torch

    from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint

    if not torch.cuda.is_available() and settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    configure_process(settings)
    loaded = load_checkpoint(settings.model_checkpoint or DEFAULT_CHECKPOINT)
    segmenter = warm_segmenter(loaded, settings, cuda=torch.cuda.is_available())
    log.info("model %s served as %s on %s, threshold %g (%s)", loaded.version, segmenter.version, segmenter.device,
             segmenter.postprocessor.threshold, loaded.label)
    engine_args = {"connect_args": {"connect_timeout": 10}} if settings.database_url.startswith("postgres") else {}
    pipeline = Pipeline(segmenter, max_pixels=settings.max_image_pixels, threads=settings.io_threads,
                        io_priority=settings.io_priority, overlays=settings.overlays == "eager",
                        reduced_jpeg=settings.jpeg_decode == "reduced", gpu_decode=settings.gpu_decode,
                        gpu_decode_batch=settings.gpu_decode_batch == "on")
    return WorkerContext(
        settings=settings,
        sessions=make_sessionmaker(make_engine(settings.database_url, **engine_args)),
        blobs=open_blob_store(settings.blob_url),
        pipeline=pipeline,
        # the rows say what made them: "+flip-tta" with INFER_TTA=flip, "+jpeg-reduced" when large JPEGs are
        # decoded smaller (JPEG_DECODE=reduced with lazy overlays on the CPU), which moves masks slightly
        model_version=segmenter.version + ("+jpeg-reduced" if pipeline.reduces_jpeg else ""),
    )


def configure_process(settings: Settings) -> None:
    """The worker process's allocator (before the model's first allocations) and OpenCV's threads.

    OPENCV_THREADS=1 (the default): the pipeline's I/O threads are the
    parallelism; OpenCV's own pool would only add threads that compete with
    the network's for the same cores (on the 2-core CPU, pipeline/model 0.845
    and 0.877 with one OpenCV thread against 0.821 with OpenCV's default of
    two, docs/benchmarks.md)."""
    import cv2

    kept = allocator.apply(settings.allocator)
    log.info("allocator %s: %s", settings.allocator,
             "freed memory kept for reuse, given back after each chunk" if kept
             else "glibc's defaults" if settings.allocator == "system" else "not available here (not glibc); defaults")
    if settings.opencv_threads:
        cv2.setNumThreads(settings.opencv_threads)


def warm_segmenter(loaded, settings: Settings, cuda: bool):
    """The worker's Segmenter, compiled per TORCH_COMPILE, after one warm-up
    pass (allocation, kernel selection and compilation happen before any task).
    With ``auto``, a compile that fails (a host without a C compiler or Triton)
    is logged and the network served uncompiled; with ``on`` the error stands."""
    from model.inference import Segmenter, cpu_has_native_bf16, serving_tta, wants_cpu_bf16

    if settings.infer_cpu_bf16 == "on" and not cuda and cpu_has_native_bf16() is False:
        log.warning("INFER_CPU_BF16=on on a CPU without native bf16 (no avx512_bf16 or amx_bf16 flag): autocast "
                    "emulates bf16 there and runs several times slower than fp32; use auto or off")
    compile_network = settings.torch_compile == "on" or (settings.torch_compile == "auto" and cuda)
    kwargs = dict(batch_size=settings.infer_batch_size, flip_tta=serving_tta(settings.infer_tta, loaded),
                  cpu_bf16=wants_cpu_bf16(settings.infer_cpu_bf16), cudnn_benchmark=settings.cudnn_benchmark == "on")
    if kwargs["flip_tta"] != "off" and kwargs["flip_tta"] not in loaded.postprocessors_tta:
        log.warning("INFER_TTA=%s: %s has no threshold chosen for that mode; serving it at the plain threshold %g "
                    "(training.thresholds --tta %s chooses one)", settings.infer_tta, loaded.version,
                    loaded.postprocessor.threshold, kwargs["flip_tta"])
    t0 = time.perf_counter()
    segmenter = Segmenter(loaded, compile_network=compile_network, **kwargs)
    try:
        segmenter.predict([_warmup_image()])
    except Exception:
        if not compile_network or settings.torch_compile == "on":
            raise
        log.exception("torch.compile failed during the warm-up; serving the network uncompiled (TORCH_COMPILE=off hides this)")
        compile_network = False
        segmenter = Segmenter(loaded, **kwargs)
        segmenter.predict([_warmup_image()])
    log.info("warm-up in %.1f s (torch.compile %s)", time.perf_counter() - t0, "on" if compile_network else "off")
    return segmenter


def _warmup_image():
    import numpy as np

    return np.zeros((64, 64), dtype=np.uint8)


# -- the database going away -----------------------------------------------------------


def database_unavailable(err: BaseException) -> bool:
    """Connection refused or lost, server restarting, deadlock, SQLite busy: worth a retry."""
    if isinstance(err, sa_exc.DBAPIError) and err.connection_invalidated:
        return True
    return isinstance(
        err, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError)
    )


def retry_database(fn: Callable[[], T], what: str, patience_s: float, first_s: float = 0.5, max_s: float = 15.0) -> T:
    """fn() until it stops failing for want of a database, with exponential backoff
    (and jitter) for at most `patience_s` seconds; then the last error is raised.
    fn must be a whole transaction, safe to run again."""
    deadline = time.monotonic() + patience_s
    delay, attempt = first_s, 1
    while True:
        try:
            return fn()
        except Exception as err:
            if not database_unavailable(err) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database unavailable (attempt %d), retrying in %.1f s: %s", what, attempt, delay, err)
            time.sleep(delay * random.uniform(0.8, 1.2))
            delay, attempt = min(delay * 2, max_s), attempt + 1


# -- claim, renew, write ---------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    image_id: str
    blob_key: str
    attempt: int  # the row's `attempts` after this claim: the token that owns its result


def claim(ctx: WorkerContext, image_ids: list[str]) -> list[Claimed]:
    """Mark claimable images `processing` with a lease; returns them in the chunk's order."""
    now = utcnow()
    with ctx.sessions.begin() as session:
        rows = session.execute(
            update(Image)
            .where(
                Image.id.in_(image_ids),
                ~exists().where(Job.id == Image.job_id, Job.cancelled_at.is_not(None)),
                or_(
                    Image.status == QUEUED,
                    (Image.status == PROCESSING) & (Image.lease_expires_at < now),
                ),
            )
            .values(
                status=PROCESSING,
                started_at=now,
                attempts=Image.attempts + 1,
                lease_expires_at=now + timedelta(seconds=ctx.settings.lease_s),
            )
            .returning(Image.id, Image.blob_key, Image.attempts)
        ).all()
    order = {image_id: i for i, image_id in enumerate(image_ids)}
    claimed = [Claimed(r.id, r.blob_key, r.attempts) for r in rows]
    return sorted(claimed, key=lambda c: order.get(c.image_id, 0))


def _by_attempt(claimed: list[Claimed]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = defaultdict(list)
    for c in claimed:
        groups[c.attempt].append(c.image_id)
    return groups


def renew_leases(ctx: WorkerContext, claimed: list[Claimed]) -> int:
    """Push the leases this task still holds lease_s into the future; returns how many."""
    until = utcnow() + timedelta(seconds=ctx.settings.lease_s)
    renewed = 0
    with ctx.sessions.begin() as session:
        for attempt, ids in _by_attempt(claimed).items():
            renewed += session.execute(
                update(Image)
                .where(Image.id.in_(ids), Image.status == PROCESSING, Image.attempts == attempt)
                .values(lease_expires_at=until)
                .execution_options(synchronize_session=False)
            ).rowcount
    return renewed


class LeaseKeeper:
    """Renews a chunk's leases every lease_s / 3 seconds until the chunk ends.

    If the worker dies, so does this thread, and the leases run out: that is
    how the reconciler tells a dead worker's chunk from a slow one.
    """

    def __init__(self, ctx: WorkerContext, claimed: list[Claimed]):
        self.ctx, self.claimed = ctx, claimed
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bonedetect-lease", daemon=True)

    def _run(self) -> None:
        interval = max(self.ctx.settings.lease_s / 3, 0.2)
        while not self._done.wait(interval):
            try:
                renew_leases(self.ctx, self.claimed)
            except Exception as err:  # database away: the write at the end retries
                log.warning("could not renew %d leases: %s", len(self.claimed), err)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=30)


def owned_rows(session: Session, claimed: list[Claimed]) -> dict[str, tuple[str, str]]:
    """{image_id: (tenant_id, job_id)} of the rows still `processing` under this task's
    claim, locked (FOR UPDATE on PostgreSQL) until the transaction ends."""
    owned: dict[str, tuple[str, str]] = {}
    for attempt, ids in _by_attempt(claimed).items():
        rows = session.execute(
            select(Image.id, Image.tenant_id, Image.job_id)
            .where(Image.id.in_(ids), Image.status == PROCESSING, Image.attempts == attempt)
            .order_by(Image.id)  # one lock order for every worker: no deadlocks between them
            .with_for_update()
        )
        owned.update({row.id: (row.tenant_id, row.job_id) for row in rows})
    return owned


def store_blobs(
    ctx: WorkerContext, owned: dict[str, tuple[str, str]], results: list[ImageResult], attempts: dict[str, int] | None = None
) -> dict[str, tuple[str, str]]:
    """Write masks (and eager overlays) of the owned rows under keys derived from the image id.
    The overlay key is recorded either way: it is where the overlay is, or will be once rendered."""
    keys = {}
    for r in results:
        if not r.ok or r.image_id not in owned:
            continue
        tenant_id, job_id = owned[r.image_id]
        prefix = image_prefix(tenant_id, job_id, r.image_id)
        ctx.blobs.put_bytes(f"{prefix}/mask.png", r.mask_png)
        if r.overlay_png is not None:
            ctx.blobs.put_bytes(f"{prefix}/overlay.png", r.overlay_png)
        elif (attempts or {}).get(r.image_id, 1) > 1:
            # OVERLAYS=lazy (the API renders it at this key on first request), and an earlier attempt by
            # an eager worker may have left an overlay of its own mask here: it must not outlive that mask.
            ctx.blobs.delete_prefix(f"{prefix}/overlay.png")
        if r.seg_dcm:  # DICOM sources: served by GET /v1/images/<id>/seg.dcm
            ctx.blobs.put_bytes(f"{prefix}/seg.dcm", r.seg_dcm)
        keys[r.image_id] = (f"{prefix}/mask.png", f"{prefix}/overlay.png")
    return keys


def write_results(ctx: WorkerContext, claimed: list[Claimed], results: list[ImageResult]) -> int:
    """One transaction: every row of the chunk this task still owns moves to done or
    failed together. Rows another claim took over (or a purge removed) are left
    alone. Returns how many rows were written.

    The rows are written by one statement per kind of row (done, done with a
    pixel spacing, failed), each executed for all its rows at once
    (executemany): one UPDATE per image, compiled and sent one by one, cost
    ~0.6 of the ~0.8 core-ms per image this write took (docs/benchmarks.md)."""
    token = {c.image_id: c.attempt for c in claimed}
    now = utcnow()
    with ctx.sessions.begin() as session:
        owned = owned_rows(session, claimed)
        keys = store_blobs(ctx, owned, results, token)
        rows: dict[tuple[str, ...], list[dict]] = defaultdict(list)  # the columns a row sets -> those rows
        written: set[str] = set()
        for r in results:
            if r.image_id not in owned or r.image_id in written:
                continue  # another claim's row; or an image seen twice, whose first result stands as it did
            written.add(r.image_id)
            values = dict(
                finished_at=now,
                lease_expires_at=None,
                processing_ms=r.processing_ms,
                model_version=ctx.model_version,
                width=r.width,
                height=r.height,
                source_format=r.source_format,
            )
            if r.ok:
                values.update({c: getattr(r.stats, c) for c in STAT_COLUMNS})
                values.update(status=DONE, error=None, mask_key=keys[r.image_id][0], overlay_key=keys[r.image_id][1])
                if r.pixel_spacing_mm:
                    values.update(pixel_spacing_mm=r.pixel_spacing_mm[0], spacing_col_mm=r.pixel_spacing_mm[1])
                    values.update(spacing_source=r.spacing_source)
            else:
                values.update(status=FAILED, error=r.error)
            params = {f"new_{column}": value for column, value in values.items()}
            rows[tuple(values)].append({"row_id": r.image_id, "row_attempt": token[r.image_id], **params})
        images = Image.__table__  # a Core UPDATE: executed with a list of rows it is one executemany
        for columns, params in rows.items():
            session.execute(
                update(images)
                .where(images.c.id == bindparam("row_id"), images.c.status == PROCESSING,
                       images.c.attempts == bindparam("row_attempt"))
                .values({column: bindparam(f"new_{column}") for column in columns}),
                params,
            )
    return len(owned)


def release(ctx: WorkerContext, claimed: list[Claimed]) -> None:
    """Give this task's claimed images back to the queue after a chunk-wide failure."""
    with ctx.sessions.begin() as session:
        for attempt, ids in _by_attempt(claimed).items():
            session.execute(
                update(Image)
                .where(Image.id.in_(ids), Image.status == PROCESSING, Image.attempts == attempt)
                .values(status=QUEUED, lease_expires_at=None)
                .execution_options(synchronize_session=False)
            )


def fail(ctx: WorkerContext, claimed: list[Claimed], reason: str) -> None:
    with ctx.sessions.begin() as session:
        for attempt, ids in _by_attempt(claimed).items():
            session.execute(
                update(Image)
                .where(Image.id.in_(ids), Image.status == PROCESSING, Image.attempts == attempt)
                .values(status=FAILED, error=reason, finished_at=utcnow(), lease_expires_at=None)
                .execution_options(synchronize_session=False)
            )


@app.task(
    name=SEGMENT_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    max_retries=5,
)
def segment_chunk(self, image_ids: list[str]) -> dict:
    global _in_hand
    ctx = worker_context()
    with _in_hand_lock:
        _in_hand += 1
    try:
        result = _segment_chunk(self, ctx, image_ids)
    finally:
        with _in_hand_lock:
            _in_hand -= 1
            last_out = _in_hand == 0
    if last_out and ctx.settings.allocator == "keep":
        # What the chunks freed goes back to the kernel once none is in hand: memory between chunks stays flat.
        # Not while another chunk runs: its threads would fault the pages straight back in (bonedetect/allocator.py).
        allocator.release_free_memory()
    return result


def _segment_chunk(self, ctx: WorkerContext, image_ids: list[str]) -> dict:
    started, spent = time.perf_counter(), Counter()  # this chunk's wall-clock seconds by what the network did
    patience = ctx.settings.db_retry_s
    try:
        claimed = retry_database(lambda: claim(ctx, image_ids), "claim", patience)
    except Exception as err:
        if not database_unavailable(err):
            raise
        # Nothing was changed; the images stay queued for a retry or the reconciler.
        raise self.retry(exc=err, countdown=min(2**self.request.retries, 60))
    if not claimed:
        return {"processed": 0}
    try:
        with LeaseKeeper(ctx, claimed):
            items = [(c.image_id, (lambda key=c.blob_key: ctx.blobs.get_bytes(key))) for c in claimed]
            run_started = time.perf_counter()
            results = ctx.pipeline.run(items, walls=spent)
            pipeline_s = time.perf_counter() - run_started
            # The work is done: keep it through a database restart rather than redo it.
            written = retry_database(lambda: write_results(ctx, claimed, results), "write results", patience)
    except Retry:
        raise
    except Exception as err:
        log.exception("chunk of %d images failed", len(claimed))
        try:
            if self.request.retries >= self.max_retries:
                reason = f"internal error after {self.request.retries + 1} attempts: {err}"
                retry_database(lambda: fail(ctx, claimed, reason), "fail", 60)
                return {"processed": 0, "failed": len(claimed)}
            retry_database(lambda: release(ctx, claimed), "release", 60)
        except Exception as db_err:
            if not database_unavailable(db_err):
                raise
            log.warning("could not give back %d images: their leases run out for the reconciler", len(claimed))
        raise self.retry(exc=err, countdown=min(2**self.request.retries, 60))
    done = sum(r.ok for r in results)
    if written < len(results):
        log.warning(
            "%d of %d images were taken over by another claim; their results were dropped",
            len(results) - written,
            len(results),
        )
    seconds = time.perf_counter() - started
    # Whether the network was fed: its share of the pipeline's time, and where the rest went.
    network_share = spent["forward"] / pipeline_s if pipeline_s > 0 else 0.0
    log.info(
        "chunk done: %d done, %d failed in %.2f s; the network ran %.0f%% of the pipeline's %.2f s",
        done, len(results) - done, seconds, 100.0 * network_share, pipeline_s,
        extra={"images": len(results), "done": done, "seconds": round(seconds, 3), "pipeline_s": round(pipeline_s, 3),
               "network_share": round(network_share, 3), "input_wait_s": round(spent["input"], 3),
               "finish_wait_s": round(spent["finishing"] + spent["draining"], 3),
               "network_wait_s": round(spent["network"], 3),  # its turn at the network waited for another chunk's
               "database_s": round(max(0.0, seconds - pipeline_s), 3)},
    )  # fmt: skip
    return {"processed": len(results), "done": done, "written": written}
