"""Running the parts on one machine: the API in a thread, workers as processes.

Used by `bonedetect demo`, the integration tests and the benchmark, so all
three start the system the same way.
"""

from __future__ import annotations

import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from bonedetect.settings import Settings


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes another process read the same settings."""
    env = dict(os.environ)
    env.update(
        BONEDETECT_HOME=str(settings.home),
        DATABASE_URL=settings.database_url,
        BROKER_URL=settings.broker_url,
        BLOB_URL=settings.blob_url,
        CHUNK_SIZE=str(settings.chunk_size),
        INFER_BATCH_SIZE=str(settings.infer_batch_size or "auto"),
        QUEUE_NAME=settings.queue_name,
        LEASE_S=str(settings.lease_s),
        TORCH_THREADS=str(settings.torch_threads),
        IO_THREADS=str(settings.io_threads),
        IO_PRIORITY=settings.io_priority,
        WORKER_CONCURRENCY=str(settings.worker_concurrency or "auto"),
        OPENCV_THREADS=str(settings.opencv_threads),
        OVERLAYS=settings.overlays,
        JPEG_DECODE=settings.jpeg_decode,
        GPU_DECODE=settings.gpu_decode,
        GPU_DECODE_BATCH=settings.gpu_decode_batch,
        ALLOCATOR=settings.allocator,
        TORCH_COMPILE=settings.torch_compile,
        CUDNN_BENCHMARK=settings.cudnn_benchmark,
        INFER_TTA=settings.infer_tta,
        INFER_CPU_BF16=settings.infer_cpu_bf16,
        LOG_LEVEL=settings.log_level,
        LOG_FORMAT=settings.log_format,
    )
    if settings.model_checkpoint:
        env["MODEL_CHECKPOINT"] = str(settings.model_checkpoint)
    env.update(extra)
    return env


@dataclass
class ApiServer:
    server: BaseWSGIServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs) -> None:  # no access log line per poll
        pass


def serve_api(settings: Settings, host: str = "127.0.0.1", port: int = 0, access_log: bool = False) -> ApiServer:
    """Start the API on a real socket in a background thread (port 0: any free one)."""
    from api import create_app

    handler = WSGIRequestHandler if access_log else _QuietHandler
    server = make_server(host, port, create_app(settings), threaded=True, request_handler=handler)
    thread = threading.Thread(target=server.serve_forever, name="bonedetect-api", daemon=True)
    thread.start()
    return ApiServer(server, thread)


def start_worker(settings: Settings, name: str = "worker", log_path: Path | None = None, app: str = "worker.app",
                 **env: str) -> subprocess.Popen:
    """One real Celery worker process (pool by WORKER_CONCURRENCY: bonedetect.queue.worker_pool), reading
    `settings` from its environment; `app`: the Celery app module (the benchmark's stand-in device wraps
    the worker's own: bench/standin.py)."""
    from bonedetect.cli import worker_argv

    settings.ensure_home()
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(
        worker_argv(settings, name=f"{name}@%h", loglevel="INFO", app=app),
        env=settings_env(settings, **env),
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
