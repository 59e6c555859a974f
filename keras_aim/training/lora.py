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

from keras_aim.training.optimizers import adamw_warmup_cosine
from keras_aim.utils.atomic_files import atomic_directory, atomic_file


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


def save_lora_weights(backbone, path: str) -> None:
    """`backbone.save_lora_weights(path)` (adapters only, `.lora.h5`),
    through a temporary file so a crash never leaves a partial file."""
    with atomic_file(path) as staging:
        backbone.save_lora_weights(staging)


def save_merged_preset(backbone, directory: str) -> None:
    """Writes `merge_lora(backbone)` as a keras-hub preset folder
    (complete or not at all; an existing folder is replaced)."""
    merged = merge_lora(backbone)
    with atomic_directory(directory, replace=True) as staging:
        merged.save_to_preset(staging)


def fit_lora(
    classifier,
    train,
    epochs: int,
    steps_per_epoch: int,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.05,
    callbacks=(),
    verbose: int = 0,
    gradient_accumulation_steps: int | None = None,
):
    """Fits a classifier whose trunk has adapters (`backbone.enable_lora`:
    the trunk frozen but its adapters, the probe trainable) on `train`,
    batches of `(normalized images, labels)`, with AdamW and warmup +
    cosine. Returns the Keras `History`."""
    if not getattr(classifier.backbone, "_lora_enabled_layers", None):
        raise ValueError("The trunk has no adapters; call backbone.enable_lora(rank) first.")
    classifier.compile(
        optimizer=adamw_warmup_cosine(
            learning_rate, epochs * steps_per_epoch, weight_decay,
            gradient_accumulation_steps,
        )
    )
    # The batches come shuffled from their pipeline (see keras_aim.data).
    return classifier.fit(
        train, epochs=epochs, verbose=verbose, callbacks=list(callbacks), shuffle=False
    )
