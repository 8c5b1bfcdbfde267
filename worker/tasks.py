"""The Celery task: segment one chunk of images.

`segment_chunk(image_ids)` is idempotent. Delivery is at-least-once
(acks_late + reject_on_worker_lost), so:

- it claims only images still `queued`, or `processing` with an expired
  lease (a worker that died), of jobs not cancelled; images already done,
  failed, cancelled or leased by a live worker are skipped;
- masks and overlays go to keys derived from the image id, so a rerun
  overwrites rather than duplicates;
- results are written in one transaction at the end, each row only if it is
  still `processing`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from celery.exceptions import Retry
from sqlalchemy import exists, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from bonedetect.queue import SEGMENT_TASK
from bonedetect.settings import Settings
from db.blobstore import BlobStore, image_prefix, open_blob_store
from db.models import DONE, FAILED, PROCESSING, QUEUED, STAT_COLUMNS, Image, Job, utcnow
from db.session import make_engine, make_sessionmaker
from worker.app import app
from worker.pipeline import ImageResult, Pipeline

log = logging.getLogger("bonedetect.worker")


@dataclass
class WorkerContext:
    settings: Settings
    sessions: sessionmaker[Session]
    blobs: BlobStore
    pipeline: Pipeline
    model_version: str


_context: WorkerContext | None = None
_context_lock = threading.Lock()


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
    from model.inference import Segmenter

    if not torch.cuda.is_available() and settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    loaded = load_checkpoint(settings.model_checkpoint or DEFAULT_CHECKPOINT)
    segmenter = Segmenter(loaded, batch_size=settings.infer_batch_size)
    segmenter.predict([_warmup_image()])  # first call pays for allocation and kernel selection
    log.info("model %s loaded on %s (%s)", loaded.version, segmenter.device, loaded.label)
    return WorkerContext(
        settings=settings,
        sessions=make_sessionmaker(make_engine(settings.database_url)),
        blobs=open_blob_store(settings.blob_url),
        pipeline=Pipeline(segmenter, max_pixels=settings.max_image_pixels, threads=settings.io_threads),
        model_version=loaded.version,
    )


def _warmup_image():
    import numpy as np

    return np.zeros((64, 64), dtype=np.uint8)


def claim(ctx: WorkerContext, image_ids: list[str]) -> list[tuple[str, str]]:
    """Mark claimable images `processing` with a lease; returns (id, blob_key) pairs."""
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
            .returning(Image.id, Image.blob_key)
        ).all()
    order = {image_id: i for i, image_id in enumerate(image_ids)}
    return sorted(((r.id, r.blob_key) for r in rows), key=lambda r: order.get(r[0], 0))


def store_blobs(ctx: WorkerContext, session: Session, results: list[ImageResult]) -> dict[str, tuple[str, str]]:
    """Write masks and overlays under keys derived from the image id."""
    keys = {}
    ok_ids = [r.image_id for r in results if r.ok]
    meta = {
        row.id: (row.tenant_id, row.job_id)
        for row in session.execute(select(Image.id, Image.tenant_id, Image.job_id).where(Image.id.in_(ok_ids)))
    }
    for r in results:
        if not r.ok:
            continue
        tenant_id, job_id = meta[r.image_id]
        prefix = image_prefix(tenant_id, job_id, r.image_id)
        ctx.blobs.put_bytes(f"{prefix}/mask.png", r.mask_png)
        ctx.blobs.put_bytes(f"{prefix}/overlay.png", r.overlay_png)
        keys[r.image_id] = (f"{prefix}/mask.png", f"{prefix}/overlay.png")
    return keys


def write_results(ctx: WorkerContext, results: list[ImageResult]) -> None:
    """One transaction: every row of the chunk moves to done or failed together."""
    now = utcnow()
    with ctx.sessions.begin() as session:
        keys = store_blobs(ctx, session, results)
        for r in results:
            values = dict(
                finished_at=now,
                lease_expires_at=None,
                processing_ms=r.processing_ms,
                model_version=ctx.model_version,
                width=r.width,
                height=r.height,
            )
            if r.ok:
                values.update({c: getattr(r.stats, c) for c in STAT_COLUMNS})
                values.update(status=DONE, error=None, mask_key=keys[r.image_id][0], overlay_key=keys[r.image_id][1])
                if r.pixel_spacing_mm:
                    values.update(pixel_spacing_mm=r.pixel_spacing_mm[0], spacing_col_mm=r.pixel_spacing_mm[1])
                    values.update(spacing_source=r.spacing_source)
            else:
                values.update(status=FAILED, error=r.error)
            session.execute(
                update(Image).where(Image.id == r.image_id, Image.status == PROCESSING).values(**values)
            )


def release(ctx: WorkerContext, image_ids: list[str]) -> None:
    """Give claimed images back to the queue after a chunk-wide failure."""
    with ctx.sessions.begin() as session:
        session.execute(
            update(Image)
            .where(Image.id.in_(image_ids), Image.status == PROCESSING)
            .values(status=QUEUED, lease_expires_at=None)
        )


def fail(ctx: WorkerContext, image_ids: list[str], reason: str) -> None:
    with ctx.sessions.begin() as session:
        session.execute(
            update(Image)
            .where(Image.id.in_(image_ids), Image.status == PROCESSING)
            .values(status=FAILED, error=reason, finished_at=utcnow(), lease_expires_at=None)
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
    ctx = worker_context()
    try:
        claimed = claim(ctx, image_ids)
    except OperationalError as err:  # database away: try again later, nothing was changed
        raise self.retry(exc=err, countdown=min(2**self.request.retries, 60))
    if not claimed:
        return {"processed": 0}
    ids = [i for i, _ in claimed]
    try:
        items = [(i, (lambda key=key: ctx.blobs.get_bytes(key))) for i, key in claimed]
        results = ctx.pipeline.run(items)
        write_results(ctx, results)
    except Retry:
        raise
    except Exception as err:
        log.exception("chunk of %d images failed", len(ids))
        if self.request.retries >= self.max_retries:
            fail(ctx, ids, f"internal error after {self.request.retries + 1} attempts: {err}")
            return {"processed": 0, "failed": len(ids)}
        try:
            release(ctx, ids)
        except OperationalError:
            pass  # the leases expire and the reconciler re-enqueues them
        raise self.retry(exc=err, countdown=min(2**self.request.retries, 60))
    done = sum(r.ok for r in results)
    log.info("chunk done: %d done, %d failed", done, len(results) - done)
    return {"processed": len(results), "done": done}
