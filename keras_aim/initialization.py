"""Building models whose every variable is about to be overwritten.

Loading a checkpoint builds the model first, and building draws random
initial values for every variable; for a 600M-parameter trunk on a CPU the
draws take longer than reading the weights (about 2/3 of `from_preset`).
Inside `variables_to_be_overwritten()`, AIM models are built with
zero-filled variables instead. Use it only around a build that is followed
by a strict load (every variable assigned, or an error).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Iterator

import keras

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
