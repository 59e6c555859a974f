"""Loading large checkpoints lean: near one copy of the weights in memory,
and without drawing random initial values that are about to be overwritten.

Two independent pieces, both used by every `from_preset` and conversion:

- `limit_heap_fragmentation()`: loading allocates and frees one
  tensor-sized buffer per variable while the variables themselves stay
  alive. glibc's malloc raises its mmap threshold after the first such
  buffer is freed, so later buffers come from the heap, where the live
  variables fragment it and the freed space is never returned: peak memory
  grows by ~40% of the weights. Fixing the threshold keeps large buffers in
  their own mappings, which go back to the OS when freed.
- `variables_to_be_overwritten()` / `zeros_while_loading()`: building a
  model draws random initial values for every variable; for a
  600M-parameter trunk on a CPU the draws take longer than reading the
  weights (about 2/3 of `from_preset`). Inside
  `variables_to_be_overwritten()`, models built with `zeros_while_loading`
  get zero-filled variables instead. Use it only around a build that is
  followed by a strict load (every variable assigned, or an error).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading
from typing import Iterable, Iterator

import keras

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


_state = threading.local()
INITIALIZER_ATTRIBUTES = (
    "kernel_initializer",
    "bias_initializer",
    "gamma_initializer",
    "beta_initializer",
)


@contextlib.contextmanager
def variables_to_be_overwritten() -> Iterator[None]:
    """AIM models built inside get zeros instead of random initial values."""
    previous = getattr(_state, "active", False)
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous


@contextlib.contextmanager
def zeros_while_loading(layers: Iterable[keras.layers.Layer]) -> Iterator[None]:
    """Inside `variables_to_be_overwritten()`: gives `layers` and all their
    sublayers zeros initializers while they build, then restores the
    originals. Outside it: does nothing."""
    if not getattr(_state, "active", False):
        yield
        return
    saved = []
    zeros = keras.initializers.Zeros()
    for layer in _with_sublayers(layers):
        for name in INITIALIZER_ATTRIBUTES:
            if getattr(layer, name, None) is not None:
                saved.append((layer, name, getattr(layer, name)))
                setattr(layer, name, zeros)
    try:
        yield
    finally:
        for layer, name, initializer in saved:
            setattr(layer, name, initializer)


def _with_sublayers(layers) -> list[keras.layers.Layer]:
    found, pending = {}, list(layers)
    while pending:
        layer = pending.pop()
        if id(layer) in found:
            continue
        found[id(layer)] = layer
        for value in vars(layer).values():
            children = value if isinstance(value, (list, tuple)) else (value,)
            pending.extend(c for c in children if isinstance(c, keras.layers.Layer))
    return list(found.values())
