"""Keep freed memory in the process instead of handing it back to the kernel.

glibc's malloc serves every block above its mmap threshold (128 KiB to
32 MiB, adaptive) with a fresh ``mmap`` and returns it with ``munmap`` on
free, and trims the heap's free top back to the kernel. A worker allocates
and frees the same large blocks for every image: the network's activations
(the full-size network's first level alone is 32 x 512 x 512 floats, 32 MiB,
just over the largest threshold), a 3000x2500 radiograph's probability map
(30 MB) and mask. So every image pays for the kernel mapping and zeroing
those pages again: measured on the 2-core CPU machine (2026-11-27, the
full-size network at 512, batch 1, two threads), about 100,000 minor page
faults per forward pass, 12-18% of the CPU time in the kernel, 676-810 ms
per forward; with freed memory kept, no page faults and 569-575 ms.

``keep_freed_memory()`` turns both off with ``mallopt``: no ``mmap`` for
large blocks (they come from the heap and go back to it), and the heap is
trimmed only when more than 1 GiB at its top is free. The process's resident
memory then stays at its high-water mark rather than breathing with every
image; a worker gives what is free back after each chunk
(``release_free_memory``), so its memory between chunks does not keep the
largest image's peak (``python -m bench --memory`` measures it). It changes allocations made after
the call; the numbers computed do not change.

PyTorch's CPU performance guide suggests jemalloc or tcmalloc via
``LD_PRELOAD`` for the same reason; this needs neither a library nor a
change to how the process is started. Settings: ``ALLOCATOR=keep`` (the
default) or ``system`` (glibc's defaults).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

from bonedetect.settings import ALLOCATOR_MODES, choose

log = logging.getLogger(__name__)

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # bytes free at the heap's top before glibc gives them back


def is_glibc() -> bool:
    """Whether this process's C library is glibc (not macOS's, not musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):  # a C library without that name (musl)
        return False


def _glibc(name: str, argtypes: tuple):
    """glibc's function ``name`` (returning a C int), or None where the C library is not glibc."""
    if not is_glibc():
        return None
    try:
        function = getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError, ValueError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (module docstring).

    Returns True when it took effect; False where the C library is not glibc
    (macOS, musl), which is left as it is."""
    mallopt = _glibc("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None:
        return False
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the allocator settings; freed memory goes back to the kernel")
    return ok


def apply(mode: str) -> bool:
    """``ALLOCATOR``'s value: "keep" calls ``keep_freed_memory()``; "system" changes nothing."""
    return keep_freed_memory() if choose("ALLOCATOR", mode, ALLOCATOR_MODES) == "keep" else False


def apply_from_env() -> bool:
    """``apply`` with the ``ALLOCATOR`` environment variable (default keep): for the training commands."""
    from bonedetect.settings import Settings

    return apply(Settings.from_env().allocator)


def release_free_memory() -> bool:
    """Give the free memory kept so far back to the kernel (glibc's ``malloc_trim(0)``).

    A worker calls it after each chunk: its resident memory then returns to
    what it holds between chunks, instead of staying at the largest image's
    high-water mark, and only each chunk's first images pay page faults
    again. False where the C library is not glibc."""
    trim = _glibc("malloc_trim", (ctypes.c_size_t,))
    if trim is None:
        return False
    trim(0)
    return True
