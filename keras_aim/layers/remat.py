"""Rematerialization (gradient checkpointing) of whole transformer blocks."""

from __future__ import annotations

import contextlib
from typing import Callable

import keras


def make_blocks(count: int, remat: bool, make_block: Callable[[str], keras.layers.Layer]) -> list:
    """`count` blocks `make_block("block_0")`, `make_block("block_1")`, ...

    With `remat`, each block recomputes its forward pass during
    backpropagation instead of keeping its intermediate activations
    (`keras.RematScope`); only the block inputs stay in memory.
    """
    names = [f"block_{i}" for i in range(count)]
    scope = (
        keras.RematScope(mode="list_of_layers", layer_names=names)
        if remat
        else contextlib.nullcontext()
    )
    with scope:
        return [make_block(name) for name in names]
