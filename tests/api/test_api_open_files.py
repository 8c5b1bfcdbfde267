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
    import logging, resource, sys
    from pathlib import Path
    soft, hard, tmp, files = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    from tests.api.conftest import build_api
    warnings = []
    handler = logging.Handler(); handler.emit = lambda r: warnings.append(r.getMessage())
    logging.getLogger("api.uploads").addHandler(handler)
    api = build_api(tmp, f"sqlite:///{tmp / 'db.sqlite'}", MAX_FILES_PER_JOB="400")
    status, accepted = None, None
    if files:
        resp = api.submit([(f"{i}.png", b"\\x89PNG\\r\\n\\x1a\\n" + bytes([i % 256]) * 600_000) for i in range(files)])
        status, accepted = resp.status_code, resp.json.get("accepted")
    api.close()
    print(status, resource.getrlimit(resource.RLIMIT_NOFILE)[0], accepted, warnings)
    """
)


def run(soft: int, hard: int, tmp: Path, files: int) -> str:
    """In a fresh process with that open-file limit: an API, and a submission of `files` files of 600 KB."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(soft), str(hard), str(tmp), str(files)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_a_job_of_more_radiographs_than_the_soft_limit_is_accepted(tmp_path):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4 * 400 + 1024:
        pytest.skip(f"this machine's hard open-file limit is {hard}")
    # 300 files of 600 KB, each holding a handle until the request ends, under a soft limit of 256
    status, soft, accepted, warnings = run(256, 4 * 400 + 1024, tmp_path, files=300).split(" ", 3)
    assert (status, soft, accepted, warnings) == ("202", str(4 * 400 + 1024), "300", "[]")


def test_a_hard_limit_below_the_job_size_is_said_at_start(tmp_path):
    status, soft, accepted, warnings = run(256, 256, tmp_path, files=0).split(" ", 3)
    assert soft == "256" and "open-file limit 256 is below MAX_FILES_PER_JOB=400" in warnings
