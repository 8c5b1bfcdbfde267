"""The worker's Celery app (entry point: `celery -A worker.app worker`).

One worker process per GPU. It holds WORKER_CONCURRENCY chunks at once
(auto: two on a GPU, one on a CPU), all served by its one model: Celery's
`solo` pool for one, `threads` for more (bonedetect.queue.worker_pool).
Neither forks, so CUDA is never initialised before a fork.
"""

import os
from pathlib import Path

from bonedetect.openmp import prefer_passive_wait

prefer_passive_wait()  # before anything imports torch (bonedetect/openmp.py)

from bonedetect.queue import make_celery, worker_pool  # noqa: E402
from bonedetect.settings import Settings  # noqa: E402


def default_concurrency(env: dict | None = None, devices: str = "/dev") -> int:
    """WORKER_CONCURRENCY=auto. On a GPU, two chunks at once: the network runs one chunk's batches while the
    other's images are decoded, finished and written, so it is not left idle between chunks (with a stand-in
    device that uses no CPU, 2-core host: the pipeline 0.85 -> 0.97 of the device, the system 0.68-0.76 ->
    0.77-0.83, docs/benchmarks.md). On a CPU, one: the network already keeps every core busy, and a second
    chunk's decoding and finishing only compete with it (system/model 0.84-0.90 with one, 0.71-0.85 with two).

    A GPU here is one the driver shows (an NVIDIA device node, or ROCm's /dev/kfd) that CUDA_VISIBLE_DEVICES
    does not hide: asked without importing torch, since the reconciler imports this app too (its callback
    sweep) and never runs a network."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 1
    root = Path(devices)
    return 2 if any(root.glob("nvidia[0-9]*")) or (root / "kfd").exists() else 1


settings = Settings.from_env()
app = make_celery(settings)
app.conf.update(worker_pool(settings.worker_concurrency or default_concurrency()))
app.conf.include = ["worker.tasks", "worker.callbacks"]

# Heartbeat row, JSON logs with job and image ids, one log line per image (worker/heartbeat.py).
from worker import heartbeat  # noqa: E402

heartbeat.connect(app)
