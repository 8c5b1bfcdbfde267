"""Fixtures that start the real system: PostgreSQL, Redis, the API on a real
socket and real Celery worker processes.

The machine's PostgreSQL (127.0.0.1:5432, trust auth) and Redis
(127.0.0.1:6379) must be running; .ci/run starts them. Outside CI a missing
service skips these tests; with BONEDETECT_REQUIRE_SERVICES=1 (set by
.ci/run) it fails them.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from bonedetect.client import Client
from bonedetect.local import serve_api, start_worker, stop_process
from bonedetect.settings import Settings

PG_ADMIN = os.environ.get("TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def need(host: str, port: int, what: str) -> None:
    if _reachable(host, port):
        return
    message = f"{what} is not reachable on {host}:{port}"
    if os.environ.get("BONEDETECT_REQUIRE_SERVICES"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    need("127.0.0.1", 5432, "PostgreSQL")
    from sqlalchemy import create_engine, text

    name = f"bd_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def redis_url():
    need(REDIS_HOST, REDIS_PORT, "Redis")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


def synthetic_jpegs(n: int, seed: int) -> tuple[list[tuple[str, bytes]], dict[str, np.ndarray]]:
    """n synthetic JPEGs img-000.jpg... and their drawn lesion masks."""
    from training.synthetic import synthetic_jpegs as make

    return make(n, seed, sides=(200, 520), name="img-{:03d}.jpg")


@dataclass
class System:
    settings: Settings
    api_url: str
    keys: dict[str, str] = field(default_factory=dict)
    workers: list = field(default_factory=list)

    def client(self, tenant: str) -> Client:
        return Client(self.api_url, self.keys[tenant])


@pytest.fixture
def start_system(tmp_path: Path):
    """start_system(database_url, broker_url, tenants=("a",), workers=1, worker_env=None) -> System; torn down
    after the test. ``worker_env``: more environment for the workers (WORKER_CONCURRENCY=2, say)."""
    started = []

    def start(database_url: str, broker_url: str, tenants=("a",), workers: int = 1, worker_env: dict | None = None) -> System:
        from db.migrate import upgrade
        from db.session import make_engine, make_sessionmaker
        from db.tenants import create_tenant

        settings = Settings.from_env(
            {
                **os.environ,
                "BONEDETECT_HOME": str(tmp_path / "var"),
                "DATABASE_URL": database_url,
                "BROKER_URL": broker_url,
                "BLOB_URL": f"file://{tmp_path / 'blobs'}",
                "QUEUE_NAME": f"segment-test-{uuid.uuid4().hex[:8]}",
                "CHUNK_SIZE": "8",
                "INFER_BATCH_SIZE": "8",
                "TORCH_THREADS": "1",
            }
        )
        settings.ensure_home()
        upgrade(settings.database_url)
        keys = {}
        engine = make_engine(settings.database_url)
        with make_sessionmaker(engine).begin() as session:
            for name in tenants:
                keys[name] = create_tenant(session, f"hospital-{name}")[1]
        engine.dispose()
        api = serve_api(settings)
        system = System(settings, api.url, keys)
        for i in range(workers):
            system.workers.append(start_worker(settings, name=f"w{i}-{uuid.uuid4().hex[:6]}", log_path=tmp_path / f"worker{i}.log",
                                               **(worker_env or {})))
        started.append((api, system))
        return system

    yield start
    for api, system in started:
        for proc in system.workers:
            stop_process(proc)
        api.stop()
    for log in tmp_path.glob("worker*.log"):
        text = log.read_text(errors="replace")
        if "Traceback" in text:
            print(f"--- {log.name} ---\n{text[-4000:]}")
