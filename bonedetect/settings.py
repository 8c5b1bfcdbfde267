"""One settings object, read from environment variables by every process.

The defaults give the embedded mode: everything under ./var/ (SQLite file,
local-folder blob store, Celery over kombu's SQLAlchemy transport on SQLite),
nothing to install but Python packages. Scale-out sets DATABASE_URL,
BROKER_URL and BLOB_URL (docker-compose.yml does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _int(env: dict, name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    broker_url: str
    blob_url: str
    model_checkpoint: str | None  # None: model.checkpoint.DEFAULT_CHECKPOINT
    chunk_size: int = 32  # images per Celery task: the GPU wants batches
    infer_batch_size: int = 16  # images per forward pass inside a chunk
    max_files_per_job: int = 10_000
    max_file_bytes: int = 64 * 1024**2
    max_request_bytes: int = 4 * 1024**3
    max_image_pixels: int = 100_000_000  # decompression-bomb guard, checked before decoding
    task_time_limit_s: int = 1800  # backstop per chunk; the broker redelivers after visibility_timeout_s
    visibility_timeout_s: int = 7200
    queue_name: str = "segment"
    lease_s: int = 900  # an image "processing" longer than this is presumed lost and re-enqueued
    torch_threads: int = 0  # CPU inference threads per worker; 0: PyTorch's default
    io_threads: int = 4  # decode/encode threads that overlap the network
    extra: dict = field(default_factory=dict)

    @property
    def embedded(self) -> bool:
        return self.broker_url.startswith("sqla+")

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        home = Path(env.get("BONEDETECT_HOME") or "var").resolve()
        return cls(
            home=home,
            database_url=env.get("DATABASE_URL") or f"sqlite:///{home / 'bonedetect.sqlite'}",
            broker_url=env.get("BROKER_URL") or f"sqla+sqlite:///{home / 'broker.sqlite'}",
            blob_url=env.get("BLOB_URL") or f"file://{home / 'blobs'}",
            model_checkpoint=env.get("MODEL_CHECKPOINT") or None,
            chunk_size=_int(env, "CHUNK_SIZE", 32),
            infer_batch_size=_int(env, "INFER_BATCH_SIZE", 16),
            max_files_per_job=_int(env, "MAX_FILES_PER_JOB", 10_000),
            max_file_bytes=_int(env, "MAX_FILE_BYTES", 64 * 1024**2),
            max_request_bytes=_int(env, "MAX_REQUEST_BYTES", 4 * 1024**3),
            max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", 100_000_000),
            task_time_limit_s=_int(env, "TASK_TIME_LIMIT_S", 1800),
            visibility_timeout_s=_int(env, "VISIBILITY_TIMEOUT_S", 7200),
            queue_name=env.get("QUEUE_NAME") or "segment",
            lease_s=_int(env, "LEASE_S", 900),
            torch_threads=_int(env, "TORCH_THREADS", 0),
            io_threads=_int(env, "IO_THREADS", 4),
        )

    def ensure_home(self) -> None:
        """Create ./var/ for the embedded mode's SQLite files and blobs."""
        if self.database_url.startswith("sqlite") or self.embedded or self.blob_url.startswith("file:"):
            self.home.mkdir(parents=True, exist_ok=True)
