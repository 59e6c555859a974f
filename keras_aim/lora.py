"""LoRA fine-tuning helpers on top of keras-hub's `Backbone.enable_lora`.

`backbone.enable_lora(8)` freezes the trunk and adds rank-8 adapters to the
q and v parts of every fused qkv and to every attention output projection
(Apple's release); `save_lora_weights` / `load_lora_weights` store only the
adapters. `merge_lora` folds them into plain weights for export.
"""

from __future__ import annotations

import os
import tempfile

import keras


def lora_parameter_count(model) -> int:
    """Trainable parameters of a (LoRA-enabled) model."""
    return sum(int(keras.ops.size(w)) for w in model.trainable_weights)


def merge_lora(backbone):
    """A new backbone of the same config, without adapters, whose kernels
    include the LoRA updates (outputs equal the adapted backbone's)."""
    if not getattr(backbone, "_lora_enabled_layers", None):
        raise ValueError("This backbone has no LoRA adapters; call enable_lora first.")
    merged = type(backbone).from_config(backbone.get_config())
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "merged.weights.h5")
        backbone.save_weights(path)  # Keras layers save merged kernels
        merged.load_weights(path)
    return merged
