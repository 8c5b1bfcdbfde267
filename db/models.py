"""SQLAlchemy 2 models: the SQL database is the source of truth.

A job's status and progress are derived from its image rows (a GROUP BY
status), never from a counter that could drift.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Annotated

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Image statuses. An image moves queued -> processing -> done | failed;
# queued (or processing) -> cancelled when its job is cancelled.
QUEUED, PROCESSING, DONE, FAILED, CANCELLED = "queued", "processing", "done", "failed", "cancelled"
IMAGE_STATUSES = (QUEUED, PROCESSING, DONE, FAILED, CANCELLED)
UNFINISHED = (QUEUED, PROCESSING)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


# Shared column types.
pk_id = Annotated[str, mapped_column(Uuid(as_uuid=False), primary_key=True, default=new_id)]
timestamp = Annotated[datetime, mapped_column(DateTime(timezone=True), default=utcnow)]
optional_timestamp = Annotated[datetime | None, mapped_column(DateTime(timezone=True))]

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Tenant(Base):
    """A hospital. Every job and image belongs to exactly one."""

    __tablename__ = "tenants"

    id: Mapped[pk_id]
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # Signs job-completion callbacks (HMAC-SHA256); shown once with the first key.
    webhook_secret: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[timestamp]

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant")


class ApiKey(Base):
    """An API key, stored only as its SHA-256 hash (keys are 256-bit random)."""

    __tablename__ = "api_keys"

    id: Mapped[pk_id]
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown to humans to tell keys apart
    created_at: Mapped[timestamp]
    revoked_at: Mapped[optional_timestamp]

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency"),)

    id: Mapped[pk_id]
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    label: Mapped[str | None] = mapped_column(String(200))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # SHA-256 over the submission (files, names, ids, label, callback): the same key with another body is a 422
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    image_count: Mapped[int] = mapped_column(Integer, default=0)
    callback_url: Mapped[str | None] = mapped_column(String(2000))  # POSTed a signed summary on completion
    # None until the job finishes; then pending -> delivered | failed (retries spent). Set from None by
    # one conditional UPDATE, so exactly one process sends the callback (worker/callbacks.py).
    callback_state: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[timestamp]
    cancelled_at: Mapped[optional_timestamp]
    # A job opened for parts (POST /v1/jobs with open=true) takes more files (POST /v1/jobs/<id>/images)
    # while this is true: its status is "receiving", and it cannot finish nor its callback fire. Closing
    # it (or cancelling, or the reconciler after OPEN_JOB_IDLE_HOURS) sets it false, once, by a
    # conditional UPDATE, and sets closed_at. A job submitted whole is made false (the server default:
    # what code from before parts inserts too), with no closed_at.
    receiving: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    closed_at: Mapped[optional_timestamp]

    images: Mapped[list[Image]] = relationship(back_populates="job", passive_deletes=True)
    deliveries: Mapped[list[CallbackDelivery]] = relationship(back_populates="job", passive_deletes=True)
    parts: Mapped[list[JobPart]] = relationship(back_populates="job", passive_deletes=True)


class JobPart(Base):
    """One request that added files to an open job: its positions, and its Idempotency-Key and
    fingerprint, so a part sent again after a lost answer is answered with the first one."""

    __tablename__ = "job_parts"
    __table_args__ = (UniqueConstraint("job_id", "idempotency_key", name="uq_job_parts_job_idempotency"),)

    id: Mapped[pk_id]
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    first_position: Mapped[int] = mapped_column(Integer)
    image_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[timestamp]

    job: Mapped[Job] = relationship(back_populates="parts")


class Image(Base):
    """One submitted file, its processing state and, once done, its statistics.

    Statistics are computed at the image's original resolution. `area_mm2` is
    null unless the pixel spacing is known; `spacing_source` says which
    spacing was used.
    """

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("job_id", "position", name="uq_images_job_position"),
        Index("ix_images_job_status", "job_id", "status"),
        Index("ix_images_status_lease", "status", "lease_expires_at"),
    )

    id: Mapped[pk_id]
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # order within the submission
    filename: Mapped[str | None] = mapped_column(String(300))
    external_id: Mapped[str | None] = mapped_column(String(200))
    content_type: Mapped[str | None] = mapped_column(String(100))
    source_format: Mapped[str | None] = mapped_column(String(16))  # PNG | JPEG | DICOM, once decoded
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    blob_key: Mapped[str | None] = mapped_column(String(300))

    status: Mapped[str] = mapped_column(String(16), default=QUEUED)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[optional_timestamp]
    enqueued_at: Mapped[timestamp]  # last time a task for it was sent (the reconciler re-sends lost ones)
    created_at: Mapped[timestamp]
    started_at: Mapped[optional_timestamp]
    finished_at: Mapped[optional_timestamp]
    processing_ms: Mapped[float | None] = mapped_column(Float)
    model_version: Mapped[str | None] = mapped_column(String(100))

    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    pixel_spacing_mm: Mapped[float | None] = mapped_column(Float)  # row spacing; columns in spacing_col_mm
    spacing_col_mm: Mapped[float | None] = mapped_column(Float)
    spacing_source: Mapped[str | None] = mapped_column(String(40))

    tumor_detected: Mapped[bool | None] = mapped_column(Boolean)
    area_px: Mapped[int | None] = mapped_column(Integer)
    area_fraction: Mapped[float | None] = mapped_column(Float)
    area_mm2: Mapped[float | None] = mapped_column(Float)
    bbox_x: Mapped[int | None] = mapped_column(Integer)
    bbox_y: Mapped[int | None] = mapped_column(Integer)
    bbox_w: Mapped[int | None] = mapped_column(Integer)
    bbox_h: Mapped[int | None] = mapped_column(Integer)
    centroid_x: Mapped[float | None] = mapped_column(Float)
    centroid_y: Mapped[float | None] = mapped_column(Float)
    n_regions: Mapped[int | None] = mapped_column(Integer)
    prob_max: Mapped[float | None] = mapped_column(Float)
    prob_mean: Mapped[float | None] = mapped_column(Float)
    mask_key: Mapped[str | None] = mapped_column(String(300))
    overlay_key: Mapped[str | None] = mapped_column(String(300))

    job: Mapped[Job] = relationship(back_populates="images")


class CallbackDelivery(Base):
    """One attempt to POST a job's completion summary to its callback URL."""

    __tablename__ = "callback_deliveries"
    __table_args__ = (UniqueConstraint("job_id", "attempt", name="uq_callback_deliveries_job_attempt"),)

    id: Mapped[pk_id]
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)  # 1, 2, ...
    status: Mapped[str] = mapped_column(String(16))  # delivered | failed
    http_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[timestamp]

    job: Mapped[Job] = relationship(back_populates="deliveries")


class WorkerHeartbeat(Base):
    """A worker process seen recently, with its loaded model (for /readyz and /metrics)."""

    __tablename__ = "worker_heartbeats"

    hostname: Mapped[str] = mapped_column(String(200), primary_key=True)  # Celery node name
    model_version: Mapped[str | None] = mapped_column(String(100))
    device: Mapped[str | None] = mapped_column(String(100))
    started_at: Mapped[timestamp]
    last_seen_at: Mapped[timestamp]
    images_done: Mapped[int] = mapped_column(Integer, default=0)
    last_batch_size: Mapped[int | None] = mapped_column(Integer)
    gpu_memory_mb: Mapped[float | None] = mapped_column(Float)


STAT_COLUMNS = (
    "tumor_detected", "area_px", "area_fraction", "area_mm2",
    "bbox_x", "bbox_y", "bbox_w", "bbox_h", "centroid_x", "centroid_y",
    "n_regions", "prob_max", "prob_mean",
)  # fmt: skip
