"""The worker's Celery app (entry point: `celery -A worker.app worker -P solo`).

One worker process per GPU, pool `solo`: CUDA is initialised in the task's
process after start-up, never before a fork.
"""

from bonedetect.openmp import prefer_passive_wait

prefer_passive_wait()  # before anything imports torch (bonedetect/openmp.py)

from bonedetect.queue import make_celery  # noqa: E402
from bonedetect.settings import Settings  # noqa: E402

app = make_celery(Settings.from_env())
app.conf.include = ["worker.tasks", "worker.callbacks"]

# Heartbeat row, JSON logs with job and image ids, one log line per image (worker/heartbeat.py).
from worker import heartbeat  # noqa: E402

heartbeat.connect(app)
