"""Idle OpenMP threads sleep instead of spinning: ``OMP_WAIT_POLICY=PASSIVE``.

PyTorch's CPU wheels use GNU OpenMP (libgomp). By default a libgomp thread
that finishes its share of a parallel region spins for a while before it
sleeps, holding its core. In a worker the network's threads share the cores
with the pipeline's own (decoding the next images, finishing the last ones):
a spinning thread keeps one of those from running, and the other network
thread then waits at the next barrier. With ``PASSIVE`` the waiting thread
gives its core up at once.

Measured on the 2-core CPU machine (docs/benchmarks.md, 2026-11-27): the
network alone 4.5-5% slower in a one-off loop (a sleeping thread takes
longer to wake), but each CPU-second of post-processing on a third thread
cost it 0.41-0.45 s of wall time instead of 0.55-0.63 (decoding: no
change), and the whole system (`python -m bench --full --images 200`) was
faster in each of three alternating pairs of runs: 1.01, 0.97, 1.09
images/s against 0.96, 0.96, 0.95 with libgomp's default.

libgomp reads the variable once, when it is loaded (when torch is first
imported), so ``prefer_passive_wait()`` must run before that: the worker's
Celery app module and the benchmark call it first thing. A value already in
the environment is kept: empty gives libgomp's own default back (with a
warning about the value), ``ACTIVE`` a far longer spin than that default.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("bonedetect")


def prefer_passive_wait() -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the environment has a value; returns the value in force.

    Warns (and changes nothing that matters) if torch is already imported:
    the OpenMP runtime has read its settings by then."""
    if "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        log.warning("OMP_WAIT_POLICY set after torch was imported: the OpenMP runtime keeps its default")
    return os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
