#!/usr/bin/env python3
"""Set up and run Bone Detect with nothing but Python 3.11 on the machine.

    python3 run.py demo     # the main job on the embedded default; serves until Ctrl-C
    python3 run.py test     # the test suite (what CI runs); extra arguments go to pytest

The first call creates .venv/ and installs the project into it (PyTorch CPU
build 2.13.0 plus pyproject.toml's dependencies); later calls reinstall only
when pyproject.toml changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
TORCH = os.environ.get("BONEDETECT_TORCH", "torch==2.13.0")


def sh(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def setup() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"Python 3.11 or newer is needed, this is {sys.version.split()[0]}")
    if not PY.exists():
        venv.create(VENV, with_pip=True)
    stamp = VENV / ".bonedetect-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    sh(str(PY), "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    sh(str(PY), "-m", "pip", "install", "--quiet", TORCH)
    sh(str(PY), "-m", "pip", "install", "--quiet", "-e", ".[dev]")
    stamp.write_text(digest)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    setup()
    if argv[0] == "demo":
        return subprocess.call([str(PY), "-m", "bonedetect.cli", "demo", *argv[1:]], cwd=ROOT)
    if argv[0] == "test":
        return subprocess.call([str(PY), "-m", "pytest", *argv[1:]], cwd=ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
