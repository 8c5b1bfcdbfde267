"""bonedetect.allocator: freed memory stays in the process, so the next image's
blocks of the same size cost no page faults (what the worker does per image)."""

import subprocess
import sys

import pytest

from bonedetect import allocator

PROBE = """
import resource, sys
import numpy as np
from bonedetect import allocator
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_reuses_freed_blocks_where_the_default_maps_them_again():
    kept, kept_faults = faults("keep")
    took, system_faults = faults("system")
    assert kept and not took
    # glibc's defaults map (or trim and regrow) most of ~90 MiB a round again: 15,000-20,000 faults here
    assert system_faults > 5_000, system_faults
    assert kept_faults < system_faults / 20, (kept_faults, system_faults)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="allocator must be one of"):
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
