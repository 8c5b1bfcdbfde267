"""A stand-in accelerator: what the system does with a network that runs off the CPU, measured on a CPU.

``python -m bench --standin-device RATE`` replaces the network, in every
stage, by a device that takes ``1 / RATE`` seconds per image of wall-clock
time and no CPU: ``submit`` queues a batch behind the ones before it and
returns at once, and ``Planes.result()`` sleeps until the device would be
done, as a CUDA batch is launched and read (``Segmenter.submit``). What it
hands back are real probabilities: the real network's on frames of the
bench's own images, computed before the clock starts
(``reference_planes``), in turn. So decoding, finishing, statistics, PNGs,
uploads, the broker and the database do all their real work, on masks of
the real network, and only the network's arithmetic is missing.

It answers what no CPU-only run can: with the network off the CPU, as on a
GPU host, how much of the device's time the rest of the system keeps it
busy (system / model, the model stage being the device's own rate), and
what it loses between chunks. A 2-core machine is a small GPU host, so
RATE is chosen below what its cores can decode and finish (about 50-100
images/s for the shipped model on 3000x2500 JPEGs): the ratio, not the
rate, carries over. Never for masks or scores: each image gets another
image's probabilities, and the rows' model version says "+stand-in".

Workers use it through this module as their Celery app
(``celery -A bench.standin``): the worker's own app, tasks and signals,
with ``worker.tasks.warm_segmenter`` wrapped; BENCH_STANDIN_RATE and
BENCH_STANDIN_PLANES (an .npy of reference planes) say what to stand in,
and BENCH_STANDIN_SHARED a file through which the workers' stand-ins are
one device, as a GPU host's worker processes share its GPU: each batch
queues behind every process's batches before it (the device's queue time
kept in the file, under an flock), so K workers get the device's rate
between them, not K times it.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import struct
import threading
import time
from pathlib import Path

import numpy as np

from model.inference import Planes, Segmenter

RATE_ENV, PLANES_ENV, SHARED_ENV = "BENCH_STANDIN_RATE", "BENCH_STANDIN_PLANES", "BENCH_STANDIN_SHARED"


class _Deadline:
    """Stands in for the CUDA event ``Planes`` waits on: done at a ``time.monotonic`` time (CLOCK_MONOTONIC:
    one clock for every process of the host)."""

    def __init__(self, at: float):
        self.at = at

    def query(self) -> bool:
        return time.monotonic() >= self.at

    def synchronize(self) -> None:
        time.sleep(max(0.0, self.at - time.monotonic()))


class StandInDevice(Segmenter):
    """``segmenter`` with its network replaced by a device of ``rate`` images/s that uses no CPU (module
    docstring); ``planes``: (k, S, S) float32 probabilities handed out in turn. ``shared``: a file that makes
    every StandInDevice given it, in any process of this host, one device (its queue time in the file)."""

    def __init__(self, segmenter: Segmenter, rate: float, planes: np.ndarray, shared: str | Path | None = None):
        if rate <= 0:
            raise ValueError(f"a stand-in device needs a positive rate, got {rate!r}")
        size = segmenter.preprocessor.size
        if planes.ndim != 3 or planes.shape[1:] != (size, size) or not len(planes):
            raise ValueError(f"reference planes must be (k, {size}, {size}), got {planes.shape}")
        self.__dict__.update(segmenter.__dict__)  # batch size, preprocessing, postprocessing, TTA mode
        self.rate = float(rate)
        self.version = f"{segmenter.version}+stand-in"
        self._planes = np.ascontiguousarray(planes, dtype=np.float32)
        self._turn = itertools.cycle(range(len(planes)))
        self._free_at = 0.0  # when the device finishes what it has queued (unless ``shared``: in the file)
        self._lock = threading.Lock()
        self._shared = None if shared is None else os.open(shared, os.O_RDWR | os.O_CREAT, 0o600)

    def _queue(self, seconds: float) -> float:
        """Queue ``seconds`` of work behind what the device holds; returns when it will be done."""
        now = time.monotonic()
        if self._shared is None:
            self._free_at = max(now, self._free_at) + seconds
            return self._free_at
        fcntl.flock(self._shared, fcntl.LOCK_EX)
        try:
            held = os.pread(self._shared, 8, 0)
            done = max(now, struct.unpack("d", held)[0] if len(held) == 8 else 0.0) + seconds
            os.pwrite(self._shared, struct.pack("d", done), 0)
            return done
        finally:
            fcntl.flock(self._shared, fcntl.LOCK_UN)

    def submit(self, frames: list) -> Planes:
        n = len(frames)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"submit takes 1 to {self.batch_size} frames, got {n}")
        host = [f for f in frames if isinstance(f, np.ndarray)]  # frames prepared on a GPU are stacked there
        if host:
            np.stack(host)  # the host's part: the batch assembled, as on CUDA
        with self._lock:
            done = self._queue(n / self.rate)
            planes = self._planes[[next(self._turn) for _ in range(n)]]
            return Planes(planes, _Deadline(done))

    def warmup(self, batch_size: int | None = None) -> None:
        pass


def reference_planes(segmenter: Segmenter, frames: list[np.ndarray]) -> np.ndarray:
    """The real network's probabilities on ``frames`` (what the stand-in hands out)."""
    return segmenter.forward(frames)


def save_reference(segmenter: Segmenter, frames: list[np.ndarray], path: Path) -> Path:
    np.save(path, reference_planes(segmenter, frames))
    return path


# -- as the workers' Celery app (celery -A bench.standin) --------------------------------------

if os.environ.get(RATE_ENV):
    import worker.tasks as _tasks
    from worker.app import app  # noqa: F401  (the app Celery finds here: the worker's own)

    _warm_segmenter = _tasks.warm_segmenter

    def _stand_in(loaded, settings, cuda):
        """The worker's own warm-up, then the stand-in in the network's place."""
        segmenter = _warm_segmenter(loaded, settings, cuda)
        return StandInDevice(segmenter, float(os.environ[RATE_ENV]), np.load(os.environ[PLANES_ENV]),
                             shared=os.environ.get(SHARED_ENV) or None)

    _tasks.warm_segmenter = _stand_in
