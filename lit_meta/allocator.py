"""Keep freed memory in the process instead of handing it back to the OS (glibc ``malloc`` on Linux).

By default glibc serves every allocation above a threshold (128 KiB, rising to at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` when freed, so each meta-step's activations arrive as new pages that the
kernel faults in and zeroes again; on the 2-core VMs we measured on, that was 25-45% of a CPU training run's wall
time, as system time. ``train.py`` (:func:`lit_meta.cli.main`) calls :func:`keep_freed_memory` first; a script of
yours can too. Set ``LIT_META_KEEP_FREED_MEMORY=0`` to leave the allocator alone. The cost: the process's
resident memory stays at its peak (plus fragmentation) instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>


def keep_freed_memory() -> bool:
    """Serve all allocations from the heap (``M_MMAP_MAX`` 0) and never trim it below 2 GiB of free space
    (``M_TRIM_THRESHOLD``). Returns True if glibc accepted both, False where it does not apply (not Linux/glibc,
    or switched off with ``LIT_META_KEEP_FREED_MEMORY=0``). Affects the whole process, from the next allocation."""
    if os.environ.get("LIT_META_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
