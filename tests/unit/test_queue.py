"""The Celery app's broker connection (bonedetect/queue.py)."""

from __future__ import annotations

import pytest
from kombu.transport import sqlalchemy as kombu_sqlalchemy

from bonedetect.queue import EMBEDDED_POLL_S, make_celery
from bonedetect.settings import Settings


def test_the_embedded_broker_carries_a_message_and_polls_often(tmp_path):
    """An idle worker of the embedded broker looks for work every EMBEDDED_POLL_S, not kombu's 1 s (a new job's
    first chunk waited up to that long), and the setting does not reach create_engine, which would refuse it."""
    settings = Settings.from_env({"BONEDETECT_HOME": str(tmp_path)})
    assert settings.embedded
    app = make_celery(settings)
    with app.connection_for_write() as conn:
        queue = conn.SimpleQueue("poll-test")
        queue.put({"image_ids": ["a", "b"]})
        message = queue.get(timeout=5)
        message.ack()
        assert message.payload == {"image_ids": ["a", "b"]}
        assert isinstance(conn.transport, kombu_sqlalchemy.Transport)
        assert conn.transport.polling_interval == EMBEDDED_POLL_S < 1.0
        queue.close()


def test_redis_options_stay_off_the_embedded_broker(tmp_path):
    """kombu's SQLAlchemy transport hands its options to create_engine: only Redis gets visibility_timeout."""
    embedded = make_celery(Settings.from_env({"BONEDETECT_HOME": str(tmp_path)}))
    assert embedded.conf.broker_transport_options == {}
    redis = make_celery(Settings.from_env({"BONEDETECT_HOME": str(tmp_path), "BROKER_URL": "redis://127.0.0.1:6379/0",
                                           "VISIBILITY_TIMEOUT_S": "9000"}))
    assert redis.conf.broker_transport_options == {"visibility_timeout": 9000}


def test_worker_concurrency_picks_a_pool_that_never_forks():
    """WORKER_CONCURRENCY: one chunk at a time runs in Celery's solo pool, more in its threads pool, whose
    tasks share the process's one model; never prefork, which would start CUDA before a fork."""
    from bonedetect.local import settings_env
    from bonedetect.queue import worker_pool

    assert worker_pool(1) == {"worker_pool": "solo", "worker_concurrency": 1}
    assert worker_pool(2) == {"worker_pool": "threads", "worker_concurrency": 2}
    with pytest.raises(ValueError, match="at least one chunk"):
        worker_pool(0)
    assert Settings.from_env({}).worker_concurrency is None  # auto: worker.app.default_concurrency
    assert Settings.from_env({"WORKER_CONCURRENCY": " Auto "}).worker_concurrency is None
    assert Settings.from_env({"WORKER_CONCURRENCY": "2"}).worker_concurrency == 2
    assert settings_env(Settings.from_env({}))["WORKER_CONCURRENCY"] == "auto"
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError, match="WORKER_CONCURRENCY"):
            Settings.from_env({"WORKER_CONCURRENCY": bad})


def test_auto_is_two_chunks_where_the_driver_shows_a_gpu_that_is_not_hidden(tmp_path):
    """WORKER_CONCURRENCY=auto without importing torch: an NVIDIA device node or ROCm's /dev/kfd means a GPU,
    unless CUDA_VISIBLE_DEVICES hides every device."""
    from worker.app import default_concurrency

    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "nvidiactl").touch()  # the driver without a device: no GPU
    assert default_concurrency({}, str(devices)) == 1
    (devices / "nvidia0").touch()
    assert default_concurrency({}, str(devices)) == 2
    assert default_concurrency({"CUDA_VISIBLE_DEVICES": "0"}, str(devices)) == 2
    assert default_concurrency({"CUDA_VISIBLE_DEVICES": ""}, str(devices)) == 1
    assert default_concurrency({"CUDA_VISIBLE_DEVICES": "-1"}, str(devices)) == 1
    (devices / "nvidia0").unlink()
    (devices / "kfd").touch()
    assert default_concurrency({}, str(devices)) == 2


def test_the_worker_app_holds_one_chunk_at_a_time_on_a_cpu_unless_told(tmp_path):
    """worker.app reads WORKER_CONCURRENCY (auto: 2 on a GPU, 1 here) into the pool Celery starts."""
    import json
    import os
    import subprocess
    import sys

    from worker.app import default_concurrency

    auto = ["threads", 2] if default_concurrency() == 2 else ["solo", 1]
    probe = "import json, worker.app as w; print(json.dumps([w.app.conf.worker_pool, w.app.conf.worker_concurrency]))"
    env = {**os.environ, "BONEDETECT_HOME": str(tmp_path)}
    for value, expected in (("auto", auto), ("3", ["threads", 3])):
        out = subprocess.run([sys.executable, "-c", probe], env={**env, "WORKER_CONCURRENCY": value},
                             capture_output=True, text=True, check=True).stdout
        assert json.loads(out.strip().splitlines()[-1]) == expected


def _start_like_a_worker(home: str, start, errors) -> None:
    """A child process: make the Celery app, then declare its queues on the broker as a worker's consumer does
    at start (kombu's Queue.declare), all children at the same moment."""
    from kombu import Queue

    try:
        settings = Settings.from_env({"BONEDETECT_HOME": home})
        start.wait(30)
        app = make_celery(settings)
        with app.connection_for_write() as conn:
            for name in (settings.queue_name, settings.callback_queue):
                Queue(name, channel=conn.default_channel).declare()
    except BaseException as err:  # noqa: BLE001 - the parent reports it
        errors.put(f"{type(err).__name__}: {err}")
        raise


def test_workers_started_together_on_a_fresh_embedded_broker_all_start(tmp_path):
    """kombu's SQLAlchemy transport makes its tables and a queue's row by looking, then inserting: two processes
    that start at once on a new broker file can both insert, and the loser's worker stopped with "Unrecoverable
    error: IntegrityError: UNIQUE constraint failed: kombu_queue.name" (one of two benchmark workers started
    together sat out a whole run). make_celery prepares the embedded broker's queues so that none of them do."""
    import multiprocessing
    import sqlite3

    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch's threads
    for attempt in range(4):
        home = tmp_path / f"home{attempt}"
        start, errors = ctx.Barrier(6), ctx.Queue()
        children = [ctx.Process(target=_start_like_a_worker, args=(str(home), start, errors), daemon=True)
                    for _ in range(6)]
        for child in children:
            child.start()
        for child in children:
            child.join(120)
            if child.is_alive():  # hung: fail, and do not leave it behind
                child.terminate()
        failures = []
        while not errors.empty():
            failures.append(errors.get())
        assert not failures, failures
        assert [child.exitcode for child in children] == [0] * 6
        with sqlite3.connect(home / "broker.sqlite") as db:
            names = sorted(name for (name,) in db.execute("SELECT name FROM kombu_queue"))
        assert names == ["segment", "segment-callbacks"]
