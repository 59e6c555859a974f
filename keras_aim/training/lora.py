"""LoRA fine-tuning helpers on top of keras-hub's `Backbone.enable_lora`.

`backbone.enable_lora(8)` freezes the trunk and adds rank-8 adapters to the
q and v parts of every fused qkv and to every attention output projection
(Apple's release); `save_lora_weights` / `load_lora_weights` store only the
adapters. `merge_lora` folds them into plain weights for export.

An adapter file names its layers only by their position among the trunk's
layers with weights (keras-hub's format), so adapters of a deeper trunk
would load into a shallower one, in part. `save_lora_weights` therefore
also records the trunk's shape (`LORA_RECORD`: number of blocks, width,
rank, targeted layer names) and `load_lora_weights` refuses adapters of a
trunk of another shape before changing anything. The backbones'
`save_lora_weights` / `load_lora_weights` methods are these (`LoRAFiles`).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import NamedTuple

import keras
import numpy as np

from keras_aim.layers.attention import AIMFusedQKV
from keras_aim.training.optimizers import adamw_warmup_cosine
from keras_aim.utils.atomic_files import atomic_directory, atomic_file

# Root attribute of an adapter file: the JSON of `lora_record(backbone)`.
LORA_RECORD = "keras_aim_lora"
RECORD_KEYS = ("num_layers", "hidden_dim", "rank", "target_layer_names")


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


def lora_record(backbone) -> dict:
    """The shape of the trunk that `backbone`'s adapters belong to:
    `{"num_layers", "hidden_dim", "rank", "target_layer_names"}` (what
    `save_lora_weights` writes beside them)."""
    enabled = getattr(backbone, "_lora_enabled_layers", None)
    if not enabled:
        raise ValueError("This backbone has no LoRA adapters; call enable_lora(rank) first.")
    layers = _layers_with_weights(backbone)
    return _record(backbone, int(backbone._lora_rank), [layers[i] for i in enabled])


def save_lora_weights(backbone, path: str) -> None:
    """Writes `backbone`'s adapters (keras-hub's `.lora.h5` format) and
    their trunk's shape (`lora_record`, as the file's `LORA_RECORD`
    attribute), through a temporary file so a crash never leaves a
    partial file."""
    from keras_hub.models import Backbone

    if not str(path).endswith(".lora.h5"):
        raise ValueError(f"An adapter file's name must end in .lora.h5; received {path!r}.")
    record = lora_record(backbone)
    import h5py

    with atomic_file(path) as staging:
        Backbone.save_lora_weights(backbone, staging)  # keras-hub's own writer
        with h5py.File(staging, "a") as handle:
            handle.attrs[LORA_RECORD] = json.dumps(record)


class AdapterFile(NamedTuple):
    """What an adapter file holds: its trunk's shape (`None` for files
    written before it was recorded), rank, and the shapes `(a, b)` of the
    adapters by layer position."""

    record: dict | None
    rank: int
    shapes: dict


def read_adapter_file(path: str) -> AdapterFile:
    """The record, rank and adapter shapes of `.lora.h5` file `path` (its
    headers only)."""
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"{path} is not a readable LoRA adapter file ({error}).") from error
    with handle:
        if "lora/vars/rank" not in handle:
            raise ValueError(
                f"{path} is not a LoRA adapter file: it has no lora/vars/rank. Pass a "
                "file written by save_lora_weights."
            )
        record = handle.attrs.get(LORA_RECORD)
        shapes = {
            int(name): tuple(tuple(handle[f"lora/{name}/vars/{k}"].shape)
                             for k in ("lora_kernel_a", "lora_kernel_b"))
            for name in handle["lora"] if name.isdigit()
        }
        return AdapterFile(json.loads(record) if record is not None else None,
                           int(handle["lora/vars/rank"][()]), shapes)


def load_lora_weights(backbone, path: str) -> None:
    """Loads the adapters in `path` into `backbone` (enabling LoRA with the
    file's rank and targets if it has none yet), after checking that they
    belong to a trunk of its shape.

    A file that records its trunk (`save_lora_weights`) must match in
    number of blocks, width, rank and targeted layer names; a file written
    before (no record) must hold adapters for exactly this trunk's adapted
    layers, with the same shapes. Anything else raises a `ValueError`
    listing what differs, and `backbone` is left as it was.
    """
    stored = read_adapter_file(path)
    layers = _layers_with_weights(backbone)
    enabled = list(getattr(backbone, "_lora_enabled_layers", None) or [])
    if enabled:
        rank, indices = int(backbone._lora_rank), enabled
        targets = sorted({layers[i].name for i in enabled})
    else:
        rank = stored.rank
        targets = (stored.record or {}).get("target_layer_names") or list(
            backbone.default_lora_layer_names())
        indices = [i for i, layer in enumerate(layers)
                   if layer.name in targets and hasattr(layer, "enable_lora")]
    here = _record(backbone, rank, [layers[i] for i in indices])
    problems = _record_differences(stored, here)
    problems += _adapter_differences(stored.shapes, {
        i: _adapter_shapes(layers[i], rank) for i in indices})
    _refuse(problems, backbone, here, path, stored.record is None)
    if not enabled:
        backbone.enable_lora(rank, target_layer_names=targets)
    # Every layer's shapes once more (also those of kinds _adapter_shapes
    # does not know) before the first assignment.
    _refuse(_adapter_differences(stored.shapes, {
        i: (tuple(layers[i].lora_kernel_a.shape), tuple(layers[i].lora_kernel_b.shape))
        for i in indices}), backbone, here, path, stored.record is None)
    import h5py

    with h5py.File(path, "r") as handle:
        for i in indices:
            for name in ("lora_kernel_a", "lora_kernel_b"):
                getattr(layers[i], name).assign(np.asarray(handle[f"lora/{i}/vars/{name}"]))


class LoRAFiles:
    """Mixin for keras-hub backbones: their `save_lora_weights` records
    the trunk's shape and their `load_lora_weights` checks it (this
    module's functions)."""

    def save_lora_weights(self, filepath: str) -> None:
        """Writes the adapters to `filepath` (`.lora.h5`) with the trunk's shape."""
        save_lora_weights(self, filepath)

    def load_lora_weights(self, filepath: str) -> None:
        """Loads adapters of a trunk of this shape (else a `ValueError`)."""
        load_lora_weights(self, filepath)


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


def _layers_with_weights(backbone) -> list:
    """keras-hub's numbering of LoRA layers: positions in this list."""
    return [layer for layer in backbone._flatten_layers(include_self=False) if layer.weights]


def _record(backbone, rank: int, adapted: list) -> dict:
    num_layers = getattr(backbone, "num_layers", None)
    hidden_dim = getattr(backbone, "hidden_dim", None)
    return {
        "num_layers": None if num_layers is None else int(num_layers),
        "hidden_dim": None if hidden_dim is None else int(hidden_dim),
        "rank": int(rank),
        "target_layer_names": sorted({layer.name for layer in adapted}),
    }


def _record_differences(stored: AdapterFile, here: dict) -> list[str]:
    if stored.record is None:
        return [] if stored.rank == here["rank"] else [
            f"rank: {stored.rank} in the file, {here['rank']} here"]
    return [f"{key}: {stored.record.get(key)!r} in the file, {here[key]!r} here"
            for key in RECORD_KEYS if stored.record.get(key) != here[key]]


def _adapter_differences(found: dict, expected: dict) -> list[str]:
    """Adapters of layers the trunk lacks, adapted layers without adapters,
    and shape mismatches (`expected` values of `None` are not compared)."""
    problems = []
    extra = sorted(set(found) - set(expected))
    lacking = sorted(set(expected) - set(found))
    if extra:
        problems.append(f"{len(extra)} adapters for layers this trunk lacks: "
                        + _few([f"lora/{i}" for i in extra]))
    if lacking:
        problems.append(f"{len(lacking)} adapted layers of this trunk have no adapters in "
                        "the file: " + _few([f"lora/{i}" for i in lacking]))
    mismatched = [f"lora/{i} {found[i]} in the file, {expected[i]} here"
                  for i in sorted(set(found) & set(expected))
                  if expected[i] is not None and found[i] != expected[i]]
    if mismatched:
        problems.append(f"{len(mismatched)} adapter shape mismatches (a, b): "
                        + _few(mismatched, "; "))
    return problems


def _adapter_shapes(layer, rank: int):
    """The `(a, b)` shapes `layer.enable_lora(rank)` creates (its own
    variables' if it has them already); `None` for kinds not known here."""
    if getattr(layer, "lora_enabled", False):
        return tuple(layer.lora_kernel_a.shape), tuple(layer.lora_kernel_b.shape)
    if isinstance(layer, AIMFusedQKV):
        return (int(layer._kernel.shape[0]), 2 * rank), (2 * rank, layer.units // 3)
    if isinstance(layer, keras.layers.Dense):
        kernel = tuple(layer.kernel.shape)
        inputs = getattr(layer, "_orig_input_dim", kernel[0]) \
            if layer.quantization_mode == "int4" else kernel[0]
        return (int(inputs), rank), (rank, int(kernel[1]))
    if isinstance(layer, keras.layers.EinsumDense):
        kernel = tuple(layer.original_kernel_shape if layer.quantization_mode == "int4"
                       else layer.kernel.shape)
        return (*kernel[:-1], rank), (rank, kernel[-1])
    return None


def _refuse(problems: list[str], backbone, here: dict, path: str, legacy: bool) -> None:
    if not problems:
        return
    shape = ", ".join(f"{k}={here[k]!r}" for k in RECORD_KEYS)
    note = (" (written without a record of its trunk: its adapters must match this "
            "trunk's layers and shapes exactly)") if legacy else ""
    raise ValueError(
        f"Cannot load the LoRA adapters {path}{note} into this {type(backbone).__name__} "
        f"({shape}); nothing was loaded:\n  " + "\n  ".join(problems)
        + "\nLoad them into the trunk they were trained with (same preset or "
        "configuration, enable_lora with the same rank and targets), or train new "
        "adapters for this trunk."
    )


def _few(names: list[str], separator: str = ", ", most: int = 3) -> str:
    shown = separator.join(names[:most])
    return shown + (f"{separator}... ({len(names)} in all)" if len(names) > most else "")
