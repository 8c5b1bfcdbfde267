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


def positive_or_auto(env: dict, name: str) -> int | None:
    """env[name]: a positive integer, or None for "auto" (also when unset); ValueError naming ``name`` otherwise."""
    raw = (env.get(name) or "auto").strip().lower()
    if raw == "auto":
        return None
    value = _int(env, name, 0)
    if value < 1:
        raise ValueError(f"{name} must be a positive integer or 'auto', got {raw!r}")
    return value


ALLOCATOR_MODES = ("keep", "system")  # ALLOCATOR; the first is the default (bonedetect/allocator.py)
JPEG_DECODE_MODES = ("reduced", "full")  # JPEG_DECODE; the first is the default (worker/decode.py)
OVERLAY_MODES = ("lazy", "eager")  # OVERLAYS; the first is the default (worker/overlay.py)
GPU_DECODE_MODES = ("auto", "on", "off")  # GPU_DECODE; the first is the default (worker/gpu_decode.py)
GPU_DECODE_BATCH_MODES = ("on", "off")  # GPU_DECODE_BATCH; the first is the default (worker/gpu_decode.py)
CUDNN_BENCHMARK_MODES = ("on", "off")  # CUDNN_BENCHMARK; the first is the default (model.inference.Segmenter)
CPU_BF16_MODES = ("off", "on", "auto")  # INFER_CPU_BF16; the first is the default (model.inference.wants_cpu_bf16)
IO_PRIORITY_MODES = ("auto", "idle", "normal")  # IO_PRIORITY; the first is the default (worker.pipeline.pool_priority)
# INFER_TTA: auto = the mode the checkpoint was validated to be served with (its "tta"; none: off), or one of
# model.inference.TTA_FLIPS's modes, which say what each runs
TTA_MODES = ("auto", "off", "flip", "flip4")


def choose(name: str, value: str | None, choices: tuple[str, ...]) -> str:
    """The mode setting ``name``'s ``value``, stripped and lower-cased, one of ``choices`` (the first
    when unset or empty); else a ValueError that names the setting, its choices and the value. The one
    reading of a mode, from the environment (``Settings``) or passed straight to the code that uses it
    (a ``Pipeline`` built by the bench or a test)."""
    raw = (value or choices[0]).strip().lower()
    if raw not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return raw


def _choice(env: dict, name: str, choices: tuple[str, ...]) -> str:
    """env[name] read by ``choose``."""
    return choose(name, env.get(name), choices)


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    broker_url: str
    blob_url: str
    model_checkpoint: str | None  # None: model.checkpoint.DEFAULT_CHECKPOINT
    chunk_size: int = 32  # images per Celery task: the GPU wants batches
    infer_batch_size: int | None = None  # images per forward pass inside a chunk; None (auto): by device (model.inference.default_batch_size)
    max_files_per_job: int = 10_000
    max_file_bytes: int = 64 * 1024**2
    max_request_bytes: int = 4 * 1024**3
    max_image_pixels: int = 100_000_000  # decompression-bomb guard, checked before decoding
    task_time_limit_s: int = 1800  # backstop per chunk; the broker redelivers after visibility_timeout_s
    visibility_timeout_s: int = 7200
    queue_name: str = "segment"
    lease_s: int = 120  # a live worker renews its chunk's leases every lease_s/3; one that lapses means the worker died
    torch_threads: int = 0  # CPU inference threads per worker; 0: PyTorch's default
    io_threads: int = 4  # decode/encode threads that overlap the network
    # the I/O threads' CPU scheduling: idle (Linux's SCHED_IDLE) runs them on the cores the network leaves
    # free, without preempting it; normal shares the cores evenly; auto: idle where the network runs on the
    # CPU, normal on a GPU
    io_priority: str = "auto"
    # chunks one worker process holds at once, sharing its one loaded model (bonedetect.queue.worker_pool): 1 runs
    # them one after another (Celery's solo pool); 2 lets one chunk's decoding, finishing and database writes
    # overlap the next chunk's network, so a GPU is not left idle between chunks (Celery's threads pool).
    # None (auto): 2 on a worker with a GPU, 1 on a CPU, where the network already keeps the cores busy
    worker_concurrency: int | None = None
    opencv_threads: int = 1  # OpenCV's own threads per worker; 1: the I/O threads are the parallelism; 0: OpenCV's default
    infer_cpu_bf16: str = "off"  # on: bf16 autocast for the network on CPU workers; auto: on where the CPU has AVX512-BF16 or AMX
    infer_tta: str = "auto"  # the checkpoint's mode; off; flip: mean with the left-right mirrored pass (2x the network's work); flip4: also up-down and both (4x)
    torch_compile: str = "auto"  # auto: torch.compile the network on CUDA workers; on; off
    cudnn_benchmark: str = "on"  # on: cuDNN times its algorithms for the frames' shape once and keeps the fastest (CUDA only); off: its heuristics
    allocator: str = "keep"  # keep: workers keep freed memory for the next image (no page faults); system: glibc's defaults
    jpeg_decode: str = "reduced"  # reduced: with lazy overlays, CPU workers decode JPEGs at 1/2-1/8 size when the frame is that small; full
    gpu_decode: str = "auto"  # auto: CUDA workers decode JPEGs with nvJPEG where torchvision can; on: nvJPEG, or the worker does not load its model and logs why; off: the CPU
    gpu_decode_batch: str = "on"  # on: with gpu_decode, a forward batch's plain JPEGs in one nvJPEG call; off: one call per image
    overlays: str = "lazy"  # lazy: the API renders an overlay on its first request; eager: the worker writes each (worker/overlay.py)
    log_level: str = "INFO"
    log_format: str = "json"  # json: one object per line with job/image ids (bonedetect/logs.py); text: for a terminal
    heartbeat_interval_s: int = 15  # how often a worker writes its heartbeat row
    heartbeat_stale_s: int = 60  # a worker silent this long is not counted alive (/readyz, /metrics)
    callback_max_retries: int = 8  # job-completion callback: retries after the first attempt, then "failed"
    callback_backoff_s: int = 10  # first retry after ~this, doubling (full jitter), capped at callback_backoff_max_s
    callback_backoff_max_s: int = 600
    callback_timeout_s: int = 10  # per HTTP attempt
    reconcile_interval_s: int = 30  # seconds between the reconciler's rounds
    reconcile_grace_s: int = 60  # a queued image this old, with the broker's queue empty, was lost: re-enqueue it
    db_retry_s: int = 600  # a worker retries a database that went away this long (backoff) before giving work back
    retention_days: int = 0  # the reconciler purges jobs (rows and blobs) older than this; 0: keep forever
    orphan_blob_hours: int = 24  # blob folders without a job row (an upload cut off by a crash) are purged after this
    open_job_idle_hours: int = 24  # a job opened for parts that got none for this long is cut short (cancelled) by the reconciler; 0: never
    extra: dict = field(default_factory=dict)

    @property
    def callback_queue(self) -> str:
        """Job-completion callbacks have their own queue, so they do not wait behind other jobs' chunks."""
        return f"{self.queue_name}-callbacks"

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
            infer_batch_size=positive_or_auto(env, "INFER_BATCH_SIZE"),
            max_files_per_job=_int(env, "MAX_FILES_PER_JOB", 10_000),
            max_file_bytes=_int(env, "MAX_FILE_BYTES", 64 * 1024**2),
            max_request_bytes=_int(env, "MAX_REQUEST_BYTES", 4 * 1024**3),
            max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", 100_000_000),
            task_time_limit_s=_int(env, "TASK_TIME_LIMIT_S", 1800),
            visibility_timeout_s=_int(env, "VISIBILITY_TIMEOUT_S", 7200),
            queue_name=env.get("QUEUE_NAME") or "segment",
            lease_s=_int(env, "LEASE_S", 120),
            torch_threads=_int(env, "TORCH_THREADS", 0),
            io_threads=_int(env, "IO_THREADS", 4),
            io_priority=_choice(env, "IO_PRIORITY", IO_PRIORITY_MODES),
            worker_concurrency=positive_or_auto(env, "WORKER_CONCURRENCY"),
            opencv_threads=_int(env, "OPENCV_THREADS", 1),
            overlays=_choice(env, "OVERLAYS", OVERLAY_MODES),
            jpeg_decode=_choice(env, "JPEG_DECODE", JPEG_DECODE_MODES),
            gpu_decode=_choice(env, "GPU_DECODE", GPU_DECODE_MODES),
            gpu_decode_batch=_choice(env, "GPU_DECODE_BATCH", GPU_DECODE_BATCH_MODES),
            allocator=_choice(env, "ALLOCATOR", ALLOCATOR_MODES),
            torch_compile=_choice(env, "TORCH_COMPILE", ("auto", "on", "off")),
            cudnn_benchmark=_choice(env, "CUDNN_BENCHMARK", CUDNN_BENCHMARK_MODES),
            infer_tta=_choice(env, "INFER_TTA", TTA_MODES),
            infer_cpu_bf16=_choice(env, "INFER_CPU_BF16", CPU_BF16_MODES),
            callback_max_retries=_int(env, "CALLBACK_MAX_RETRIES", 8),
            callback_backoff_s=_int(env, "CALLBACK_BACKOFF_S", 10),
            callback_backoff_max_s=_int(env, "CALLBACK_BACKOFF_MAX_S", 600),
            callback_timeout_s=_int(env, "CALLBACK_TIMEOUT_S", 10),
            log_level=env.get("LOG_LEVEL") or "INFO",
            log_format=env.get("LOG_FORMAT") or "json",
            heartbeat_interval_s=_int(env, "HEARTBEAT_INTERVAL_S", 15),
            heartbeat_stale_s=_int(env, "HEARTBEAT_STALE_S", 60),
            reconcile_interval_s=_int(env, "RECONCILE_INTERVAL_S", 30),
            reconcile_grace_s=_int(env, "RECONCILE_GRACE_S", 60),
            db_retry_s=_int(env, "DB_RETRY_S", 600),
            retention_days=_int(env, "RETENTION_DAYS", 0),
            orphan_blob_hours=_int(env, "ORPHAN_BLOB_HOURS", 24),
            open_job_idle_hours=_int(env, "OPEN_JOB_IDLE_HOURS", 24),
        )

    def ensure_home(self) -> None:
        """Create the home folder (./var/): SQLite files and blobs in embedded mode, logs in any mode."""
        self.home.mkdir(parents=True, exist_ok=True)
