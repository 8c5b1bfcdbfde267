"""Fixtures for the operations tests: a real S3-protocol server (moto in server
mode, its own process on loopback) and the real system in its scale-out shape
(PostgreSQL, Redis, the S3 blob store, the API on a socket, a Celery worker
process).

moto missing skips the S3 tests outside CI; with BONEDETECT_REQUIRE_SERVICES=1
(.ci/run) it fails them, as a missing PostgreSQL or Redis does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from tests.api.conftest import api, sqlite_url  # noqa: F401  (fixtures: the API on a migrated SQLite file)
from tests.integration.conftest import pg_url, redis_url, start_system  # noqa: F401  (fixtures)

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "bonedetect-test",
    "AWS_SECRET_ACCESS_KEY": "bonedetect-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def missing(what: str) -> None:
    if os.environ.get("BONEDETECT_REQUIRE_SERVICES"):
        pytest.fail(what)
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a moto S3 server process on 127.0.0.1, for the whole session."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as err:
        missing(f"the S3 tests need boto3 and moto[server] installed ({err})")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start on port {port}")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> str:
    """Credentials and S3_ENDPOINT_URL in this process's environment (and so in any worker it starts)."""
    for key, value in {**S3_ENV, "S3_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A new, empty bucket on the moto server."""
    import boto3

    name = f"bd-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return name
