"""Fixtures for the fault tests: real PostgreSQL, a private Redis per test
(bench/services.py), real worker, API and reconciler processes.

The scenarios themselves live in bench/chaos.py, which also prints the chaos
report; these tests run them with small batches, short leases
(LEASE_S=3) and a fast reconciler (every 1 s), and assert on what they saw.
"""

from __future__ import annotations

import os
import shutil

import pytest

from bench.chaos import Env
from bench.services import PrivateRedis, postgres_binaries_present
from tests.integration.conftest import pg_url  # noqa: F401  (fixture: a fresh PostgreSQL database per test)


def require(ok: bool, what: str) -> None:
    if ok:
        return
    if os.environ.get("BONEDETECT_REQUIRE_SERVICES"):
        pytest.fail(what)
    pytest.skip(what)


@pytest.fixture
def chaos_env(tmp_path, pg_url):  # noqa: F811
    require(shutil.which("redis-server") is not None, "redis-server is not installed")
    return Env(tmp_path, lambda: pg_url)


@pytest.fixture
def private_postgres_available():
    require(postgres_binaries_present(), "PostgreSQL's initdb and pg_ctl are not installed")


@pytest.fixture
def private_redis(tmp_path):
    require(shutil.which("redis-server") is not None, "redis-server is not installed")
    with PrivateRedis(tmp_path / "redis") as redis:
        yield redis
