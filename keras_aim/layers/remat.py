"""Rematerialization (gradient checkpointing) of whole transformer blocks."""

from __future__ import annotations

import contextlib

import keras


def block_remat_scope(enabled: bool, block_names: list[str]):
    """A scope to create blocks in: with `enabled`, each layer named in
    `block_names` recomputes its forward pass during backpropagation instead
    of keeping its intermediate activations (`keras.RematScope`); only the
    block inputs stay in memory. A no-op scope otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    return keras.RematScope(mode="list_of_layers", layer_names=list(block_names))
