"""A job of more radiographs than the soft open-file limit a container starts with."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

resource = pytest.importorskip("resource")

ROOT = Path(__file__).parents[2]

SCRIPT = textwrap.dedent(
    """
    import logging, resource, sys, tempfile
    from pathlib import Path
    soft, hard = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    from tests.api.conftest import build_api
    tmp = Path(tempfile.mkdtemp())
    warnings = []
    handler = logging.Handler(); handler.emit = lambda r: warnings.append(r.getMessage())
    logging.getLogger("api.uploads").addHandler(handler)
    api = build_api(tmp, f"sqlite:///{tmp / 'db.sqlite'}", MAX_FILES_PER_JOB="400")
    files = [(f"{i}.png", b"\\x89PNG\\r\\n\\x1a\\n" + bytes([i % 256]) * 600_000) for i in range(300)]
    resp = api.submit(files)
    print(resp.status_code, resource.getrlimit(resource.RLIMIT_NOFILE)[0], resp.json.get("accepted"), warnings)
    """
)


def run(soft: int, hard: int) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(soft), str(hard)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_a_job_of_more_radiographs_than_the_soft_limit_is_accepted():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4 * 400 + 1024:
        pytest.skip(f"this machine's hard open-file limit is {hard}")
    # 300 files of 600 KB, each holding a handle until the request ends, under a soft limit of 256
    status, soft, accepted, warnings = run(256, 4 * 400 + 1024).split(" ", 3)
    assert (status, soft, accepted, warnings) == ("202", str(4 * 400 + 1024), "300", "[]")


def test_a_hard_limit_below_the_job_size_is_said_at_start():
    status, soft, accepted, warnings = run(256, 256).split(" ", 3)
    assert soft == "256" and "open-file limit 256 is below MAX_FILES_PER_JOB=400" in warnings
