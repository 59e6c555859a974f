"""Apple's AIM-v1 checkpoints -> `AIMBackbone` / `AIMImageClassifier`.

Released files are PyTorch state dicts: `*_backbone.pth` with
`preprocessor.*` and `trunk.*` keys, `*_head_{best,last}_layers.pth` with
`head.*` keys; `.safetensors` files and in-memory dicts with the same key
names work too. This module names, for every released key, the Keras
variable it fills and the layout transform; reading and the strict,
all-or-nothing assignment are `keras_aim.loading.state_dict`'s.
"""

from __future__ import annotations

from typing import Any, Callable

from keras_aim.loading.state_dict import (
    StateDictLike,
    WeightLoadingError,
    assign_strictly,
    conv,
    identity,
    linear,
    open_state_dict,
)

# Keys in released files that carry no model state.
IGNORED_KEYS = frozenset({"head.bn.num_batches_tracked"})

__all__ = [
    "WeightLoadingError",
    "head_num_classes",
    "load_head",
    "load_official_weights",
    "probe_variable_map",
    "trunk_variable_map",
]


def trunk_variable_map(backbone) -> dict[str, tuple[Any, Callable]]:
    """Released key -> (Keras variable, layout transform) for an AIMBackbone."""
    pe = backbone.patch_embedding
    table = {
        "preprocessor.patchifier.proj.weight": (pe.proj.kernel, conv),
        "preprocessor.patchifier.proj.bias": (pe.proj.bias, identity),
        "preprocessor.patchifier.norm.weight": (pe.norm.gamma, identity),
        "preprocessor.patchifier.norm.bias": (pe.norm.beta, identity),
        "trunk.post_trunk_norm.weight": (backbone.post_trunk_norm.gamma, identity),
        "trunk.post_trunk_norm.bias": (backbone.post_trunk_norm.beta, identity),
    }
    for i, block in enumerate(backbone.blocks):
        prefix = f"trunk.blocks.{i}."
        table.update(
            {
                prefix + "norm_1.weight": (block.norm_1.gamma, identity),
                prefix + "norm_1.bias": (block.norm_1.beta, identity),
                prefix + "attn.qkv.weight": (block.attn.qkv.kernel, linear),
                prefix + "attn.proj.weight": (block.attn.proj.kernel, linear),
                prefix + "norm_2.weight": (block.norm_2.gamma, identity),
                prefix + "norm_2.bias": (block.norm_2.beta, identity),
                prefix + "mlp.fc1.weight": (block.mlp.fc1.kernel, linear),
                prefix + "mlp.fc2.weight": (block.mlp.fc2.kernel, linear),
            }
        )
    return table


def probe_variable_map(probe) -> dict[str, tuple[Any, Callable]]:
    """Released key -> (Keras variable, transform) for an AIMAttentionProbe."""
    return {
        "head.cls_token": (probe.cls_token, identity),
        "head.k.weight": (probe.k.kernel, linear),
        "head.v.weight": (probe.v.kernel, linear),
        "head.linear.weight": (probe.linear.kernel, linear),
        "head.bn.running_mean": (probe.bn.moving_mean, identity),
        "head.bn.running_var": (probe.bn.moving_variance, identity),
    }


def _model_parts(model):
    """(backbone, probe or None) of an AIMBackbone or AIMImageClassifier
    (recognized by their parts, so this module imports neither class)."""
    if hasattr(model, "probe") and hasattr(model, "backbone"):
        return model.backbone, model.probe
    if hasattr(model, "patch_embedding") and hasattr(model, "blocks"):
        return model, None
    raise TypeError(
        "load_official_weights expects an AIMBackbone or AIMImageClassifier; "
        f"received {type(model).__name__}."
    )


def load_official_weights(
    model,
    backbone_file: StateDictLike | None = None,
    head_file: StateDictLike | None = None,
) -> None:
    """Loads released AIM-v1 weights into an `AIMBackbone` or
    `AIMImageClassifier`.

    Args:
        model: the Keras model (its architecture must match the files).
        backbone_file: a released `*_backbone.pth`, a `.safetensors` file, or
            a dict of arrays with `preprocessor.*` / `trunk.*` keys. A file
            that also holds `head.*` keys fills the classifier's probe.
        head_file: a released `*_head_{last,best}_layers.pth` (or the same
            other forms) with `head.*` keys; classifiers only.

    Loading is strict and all-or-nothing: every key and shape is checked
    before any variable changes, and one `WeightLoadingError` lists every
    missing key, unexpected key and shape mismatch. Variables are then filled
    one tensor at a time, so no second full copy of the weights is held.
    """
    backbone, probe = _model_parts(model)
    if backbone_file is None and head_file is None:
        raise ValueError("load_official_weights needs backbone_file and/or head_file.")
    if head_file is not None and probe is None:
        raise ValueError(
            "head_file was given but the model is an AIMBackbone, which has "
            "no probe head. Load it into an AIMImageClassifier instead."
        )
    sources = [open_state_dict(s) for s in (backbone_file, head_file) if s is not None]
    try:
        keys = {key for source in sources for key in source.keys()}
        trunk_map = trunk_variable_map(backbone)
        head_map = probe_variable_map(probe) if probe is not None else {}
        expected = dict(trunk_map) if backbone_file is not None else {}
        if head_file is not None or any(k.startswith("head.") for k in keys - IGNORED_KEYS):
            expected.update(head_map)
        known = {**trunk_map, **head_map}

        def reason(key: str) -> str:
            if key in known or key.startswith("head."):
                return "head keys need an AIMImageClassifier"
            return "not an AIM-v1 key for this model"

        assign_strictly(
            expected,
            sources,
            type(model).__name__,
            ignored=IGNORED_KEYS,
            unexpected_reason=reason,
            hint=(
                "Check that the files belong to this architecture (e.g. "
                "aim_600m files for an aim_600m model, a head for the same "
                "num_classes) and that backbone and head files are passed as such."
            ),
        )
    finally:
        for source in sources:
            source.close()


def head_num_classes(path: str) -> int:
    """Number of classes of a probe head file: a released-format head
    (`.pth` / `.safetensors`, `head.linear.weight` of shape `(C, D)`) or a
    task-weights file written by `save_task_weights` (`.weights.h5`)."""
    if str(path).endswith(".weights.h5"):
        import h5py

        with h5py.File(path, "r") as handle:
            kernels = []
            handle.visititems(
                lambda name, item: kernels.append(item.shape[-1])
                if name.endswith("linear/vars/0") and "probe" in name
                else None
            )
        if len(kernels) != 1:
            raise ValueError(f"{path} holds no attentive-probe weights.")
        return int(kernels[0])
    state = open_state_dict(path)
    try:
        if "head.linear.weight" not in state.keys():
            raise ValueError(f"{path} holds no released probe head (head.* keys).")
        return int(state.shape("head.linear.weight")[0])
    finally:
        state.close()


def load_head(classifier, path: str) -> None:
    """Fills `classifier`'s probe from a head file (released format or
    `.weights.h5`), refusing a class-count mismatch with a clear error."""
    found = head_num_classes(path)
    if found != classifier.num_classes:
        raise ValueError(
            f"The head {path} predicts {found} classes but the data has "
            f"{classifier.num_classes}; use the data the head was trained on, "
            "or train a new probe."
        )
    if str(path).endswith(".weights.h5"):
        classifier.load_task_weights(path)
    else:
        load_official_weights(classifier, head_file=path)
