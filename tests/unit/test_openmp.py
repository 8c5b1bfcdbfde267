"""The worker and the benchmark start PyTorch's OpenMP runtime with idle threads sleeping
(OMP_WAIT_POLICY=PASSIVE, bonedetect/openmp.py), unless the environment says otherwise.

Read back from libgomp itself: OMP_DISPLAY_ENV=VERBOSE makes it print its settings when torch
loads it, and GOMP_SPINCOUNT (how long an idle thread spins) is 0 under PASSIVE and 300,000 by default."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def libgomp_settings(code: str, **env: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    environ.update(OMP_DISPLAY_ENV="VERBOSE", PYTHONPATH=str(ROOT), **env)
    out = subprocess.run([sys.executable, "-c", code], env=environ, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # "  GOMP_SPINCOUNT = '0'"; newer libgomp prefixes a device: "  [host] GOMP_SPINCOUNT = '0'"
    return dict(re.findall(r"^\s*(?:\[\w+\]\s*)?(\w+) = '([^']*)'", out.stderr, re.MULTILINE))


@pytest.fixture(scope="module")
def default():
    import torch

    settings = libgomp_settings("import torch; torch.ones(64, 64) @ torch.ones(64, 64)")
    if "GOMP_SPINCOUNT" not in settings:
        if list((Path(torch.__file__).parent / "lib").glob("libgomp*")):
            pytest.fail(f"torch ships libgomp, but its settings were not read back: {settings}")
        pytest.skip("torch does not use GNU OpenMP here")
    return settings


def test_libgomp_spins_by_default(default):
    assert int(default["GOMP_SPINCOUNT"]) > 0  # what the worker would get without bonedetect/openmp.py


@pytest.mark.parametrize("entry", ["worker.app", "bench.__main__"])
def test_worker_and_bench_start_openmp_passive(default, entry):
    settings = libgomp_settings(f"import {entry}, torch; torch.ones(64, 64) @ torch.ones(64, 64)")
    # libgomp prints OMP_WAIT_POLICY = 'PASSIVE' when it is unset too: the spin count is the evidence
    assert settings["GOMP_SPINCOUNT"] == "0"


def test_a_policy_in_the_environment_is_kept(default):
    settings = libgomp_settings("import worker.app, torch", OMP_WAIT_POLICY="ACTIVE")
    assert settings["OMP_WAIT_POLICY"] == "ACTIVE" and int(settings["GOMP_SPINCOUNT"]) > 0
    # an empty value: libgomp warns and keeps its own default (how docs/operations.md says to get it back)
    assert libgomp_settings("import worker.app, torch", OMP_WAIT_POLICY="")["GOMP_SPINCOUNT"] == default["GOMP_SPINCOUNT"]
