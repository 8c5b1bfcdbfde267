"""bonedetect.allocator: freed memory stays in the process, so the next image's
blocks of the same size cost no page faults (what the worker does per image)."""

import subprocess
import sys

import pytest

from bonedetect import allocator

PROBE = """
import ctypes, resource, sys
import numpy as np
from bonedetect import allocator
# no transparent huge pages (numpy asks for them on large arrays): every 4 KiB page counts, on any kernel
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
took = allocator.apply(sys.argv[1])

def image():  # a network's pattern: blocks of falling sizes, each freed once the next two exist
    blocks = []
    for mib in (33, 16, 16, 8, 8, 4, 4, 2, 1):
        blocks.append(np.ones(mib * 1024 * 1024 - 4096, np.uint8))
        if len(blocks) > 2:
            blocks.pop(0)

image()  # a warm-up image first, as a worker has
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    image()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


GLIBC = allocator.is_glibc()


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_keep_reuses_freed_blocks_where_the_default_maps_them_again():
    kept, kept_faults = faults("keep")
    took, system_faults = faults("system")
    assert kept and not took
    # glibc's defaults map (or trim and regrow) most of the ~90 MiB of each round again
    assert system_faults > 20_000, system_faults
    assert kept_faults < system_faults / 20, (kept_faults, system_faults)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="ALLOCATOR must be one of keep, system, got 'jemalloc'"):
        allocator.apply("jemalloc")


def test_elsewhere_than_glibc_it_changes_nothing(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False


def test_workers_keep_freed_memory_unless_told_otherwise():
    from bonedetect.settings import Settings

    assert Settings.from_env({}).allocator == "keep"
    assert Settings.from_env({"ALLOCATOR": "system"}).allocator == "system"
    with pytest.raises(ValueError, match="ALLOCATOR"):
        Settings.from_env({"ALLOCATOR": "tcmalloc"})


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc_trim")
def test_a_worker_gives_kept_memory_back_after_a_chunk():
    probe = """
import os, numpy as np
from bonedetect import allocator
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
assert allocator.apply("keep")
blocks = [np.ones(16 * 2**20, np.uint8) for _ in range(16)]  # 256 MiB, then freed: kept by the process
del blocks
kept = rss_mib()
assert allocator.release_free_memory()
print(kept, rss_mib())
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    kept, released = float(out[0]), float(out[1])
    assert kept - released > 200, (kept, released)



def test_a_worker_gives_freed_memory_back_only_when_no_chunk_is_in_hand(monkeypatch):
    """ALLOCATOR=keep: what chunks freed goes back to the kernel after a chunk, but not while another chunk of
    the same worker is still running (WORKER_CONCURRENCY=2), whose threads would fault it straight back in."""
    import threading
    from types import SimpleNamespace

    from worker import tasks

    trims, started = [], threading.Semaphore(0)
    gates = {"a": threading.Event(), "b": threading.Event()}
    monkeypatch.setattr(tasks.allocator, "release_free_memory", lambda: trims.append(1) or True)
    monkeypatch.setattr(tasks, "worker_context", lambda: SimpleNamespace(settings=SimpleNamespace(allocator="keep")))

    def chunk(task, ctx, image_ids):
        started.release()
        assert gates[image_ids[0]].wait(10)
        return {"processed": 0}

    monkeypatch.setattr(tasks, "_segment_chunk", chunk)
    runs = {k: threading.Thread(target=tasks.segment_chunk, args=([k],)) for k in gates}
    for t in runs.values():
        t.start()
    assert started.acquire(timeout=10) and started.acquire(timeout=10)  # both chunks in hand
    gates["a"].set()
    runs["a"].join(10)
    assert trims == [], "memory given back while the other chunk ran"
    gates["b"].set()
    runs["b"].join(10)
    assert trims == [1]
    tasks.segment_chunk(["a"])  # one chunk at a time (solo): after each
    assert trims == [1, 1]
