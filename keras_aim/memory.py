"""Keeping peak memory near one copy of the weights while loading.

Loading a checkpoint allocates and frees one tensor-sized buffer per
variable while the variables themselves stay alive. glibc's malloc raises
its mmap threshold after the first such buffer is freed, so later buffers
come from the heap, where the live variables fragment it and the freed
space is never returned: peak memory grows by ~40% of the weights. Fixing
the threshold keeps large buffers in their own mappings, which go back to
the OS when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20
_done = False


def limit_heap_fragmentation() -> bool:
    """Makes glibc serve allocations above 1 MiB with their own mappings.

    Process-wide and idempotent; a no-op off Linux/glibc or when
    `KERAS_AIM_MALLOC_TUNING=0`. Returns whether the setting is active.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get("KERAS_AIM_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc
        return False
    return _done
