"""The worker's Celery app (entry point: `celery -A worker.app worker`).

One worker process per GPU. It holds WORKER_CONCURRENCY chunks at once
(auto: two on a GPU, one on a CPU), all served by its one model: Celery's
`solo` pool for one, `threads` for more (bonedetect.queue.worker_pool).
Neither forks, so CUDA is never initialised before a fork.
"""

from bonedetect.openmp import prefer_passive_wait

prefer_passive_wait()  # before anything imports torch (bonedetect/openmp.py)

from bonedetect.queue import make_celery, worker_pool  # noqa: E402
from bonedetect.settings import Settings  # noqa: E402


def default_concurrency() -> int:
    """WORKER_CONCURRENCY=auto. On a GPU, two chunks at once: the network runs one chunk's batches while the
    other's images are decoded, finished and written, so it is not left idle between chunks (with a stand-in
    device that uses no CPU, 2-core host: the pipeline 0.85 -> 0.97 of the device, the system 0.68 -> 0.80,
    docs/benchmarks.md). On a CPU, one: the network already keeps every core busy, and a second chunk's
    decoding and finishing only compete with it (system/model 0.84-0.90 with one, 0.71-0.85 with two)."""
    import torch

    return 2 if torch.cuda.is_available() else 1


settings = Settings.from_env()
app = make_celery(settings)
app.conf.update(worker_pool(settings.worker_concurrency or default_concurrency()))
app.conf.include = ["worker.tasks", "worker.callbacks"]

# Heartbeat row, JSON logs with job and image ids, one log line per image (worker/heartbeat.py).
from worker import heartbeat  # noqa: E402

heartbeat.connect(app)
