"""AIMv2 checkpoints -> `AIMv2Backbone` / `AIMv2LiT` variables.

Two naming schemes are accepted, told apart by their keys:

- Apple's (the `model.safetensors` of every Hub repository at the pinned
  revision, and Apple's own code): `preprocessor.*`, `trunk.*`, for the LiT
  model under `image_encoder.` / `text_encoder.` plus the head and
  projections;
- transformers' (the later `main` branches of the Hub repositories, and
  any checkpoint saved with transformers' `Aimv2*Model`): `embeddings.*`,
  `encoder.layers.*`, separate `q_proj` / `k_proj` / `v_proj`, ... They are
  read through `TransformersNames`, a view that presents them under Apple's
  names (q, k and v concatenated into the fused qkv, the position table
  given its batch axis back), so one variable map serves both.

Reading and the strict, all-or-nothing assignment are
`keras_aim.loading.state_dict`'s; checking a downloaded file's structure
is `keras_aim.loading.safetensors_file`'s.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from keras_aim.loading.safetensors_file import safetensors_header
from keras_aim.loading.state_dict import (
    StateDictLike,
    WeightLoadingError,
    assign_strictly,
    conv,
    identity,
    linear,
    open_state_dict,
)

__all__ = [
    "TransformersNames",
    "WeightLoadingError",
    "check_release_file",
    "is_transformers_format",
    "lit_variable_map",
    "load_aimv2_weights",
    "vision_variable_map",
]


# --- Apple's names -> Keras variables -------------------------------------


def vision_variable_map(backbone, prefix: str = "") -> dict[str, tuple[Any, Callable]]:
    """Apple key -> (Keras variable, layout transform) for an AIMv2Backbone."""
    pe = backbone.patch_embedding
    table = {
        "preprocessor.patchifier.proj.weight": (pe.proj.kernel, conv),
        "preprocessor.patchifier.proj.bias": (pe.proj.bias, identity),
        "preprocessor.patchifier.norm.weight": (pe.norm.scale, identity),
        "trunk.post_trunk_norm.weight": (backbone.post_trunk_norm.scale, identity),
    }
    if backbone.position_embedding_type == "learned":
        table["preprocessor.pos_embed"] = (
            backbone.position_embedding.position_embedding, identity
        )
    table.update(_blocks_map(backbone.blocks))
    return {prefix + key: value for key, value in table.items()}


def _blocks_map(blocks) -> dict[str, tuple[Any, Callable]]:
    table = {}
    for i, block in enumerate(blocks):
        prefix = f"trunk.blocks.{i}."
        table.update(
            {
                prefix + "norm_1.weight": (block.norm_1.scale, identity),
                prefix + "attn.qkv.weight": (block.attn.qkv.kernel, linear),
                prefix + "attn.proj.weight": (block.attn.proj.kernel, linear),
                prefix + "norm_2.weight": (block.norm_2.scale, identity),
                prefix + "mlp.fc1.weight": (block.mlp.fc1.kernel, linear),
                prefix + "mlp.fc3.weight": (block.mlp.fc3.kernel, linear),
                prefix + "mlp.fc2.weight": (block.mlp.fc2.kernel, linear),
            }
        )
    return table


def lit_variable_map(lit) -> dict[str, tuple[Any, Callable]]:
    """Apple key -> (Keras variable, transform) for an AIMv2LiT."""
    pool, text = lit.image_pool, lit.text_encoder
    table = vision_variable_map(lit.vision_encoder, "image_encoder.")
    table.update(
        {
            "image_encoder.head.cls_token": (pool.cls_token, identity),
            "image_encoder.head.k.weight": (pool.k.kernel, linear),
            "image_encoder.head.v.weight": (pool.v.kernel, linear),
            "image_encoder.head.linear.weight": (pool.linear.kernel, linear),
            "image_encoder.head.linear.bias": (pool.linear.bias, identity),
            "image_projector.weight": (lit.image_projection.kernel, linear),
            "text_projector.weight": (lit.text_projection.kernel, linear),
            "log_logit_scale": (lit.logit_scale.log_logit_scale, identity),
            "text_encoder.preprocessor.text_embedding.weight": (
                text.embedding.token_embedding.embeddings, identity
            ),
            "text_encoder.preprocessor.positional_embedding": (
                text.embedding.position_embedding.position_embeddings, identity
            ),
            "text_encoder.trunk.post_trunk_norm.weight": (
                text.post_trunk_norm.scale, identity
            ),
        }
    )
    table.update(
        {"text_encoder." + k: v for k, v in _blocks_map(text.blocks).items()}
    )
    return table


# --- transformers' names ---------------------------------------------------

# Renames inside one encoder (transformers -> Apple), applied in order.
_ENCODER_RENAMES = (
    ("embeddings.patch_embed.", "preprocessor.patchifier.proj."),
    ("embeddings.rms_norm.", "preprocessor.patchifier.norm."),
    ("embeddings.token_embedding.weight", "preprocessor.text_embedding.weight"),
    ("encoder.layers.", "trunk.blocks."),
    (".attention.out_proj.", ".attn.proj."),
    (".attention.proj_out.", ".attn.proj."),  # an earlier converter's name
    (".ffn.gate_proj.", ".mlp.fc1."),
    (".ffn.up_proj.", ".mlp.fc3."),
    (".ffn.down_proj.", ".mlp.fc2."),
    (".ffn.fc1.", ".mlp.fc1."),  # an earlier converter's names
    (".ffn.fc3.", ".mlp.fc3."),
    (".ffn.fc2.", ".mlp.fc2."),
    (".rms_norm1.", ".norm_1."),
    (".rms_norm2.", ".norm_2."),
    ("head.k_proj.", "head.k."),
    ("head.v_proj.", "head.v."),
    ("head.output_proj.", "head.linear."),
)
_TOP_RENAMES = {
    "visual_projection.weight": "image_projector.weight",
    "text_projection.weight": "text_projector.weight",
    "logit_scale": "log_logit_scale",
}
_ENCODER_PREFIXES = {"vision_model.": "image_encoder.", "text_model.": "text_encoder."}
_FUSED = ".attention.{}_proj.weight"


def is_transformers_format(keys) -> bool:
    """Whether state-dict `keys` use transformers' names (not Apple's)."""
    markers = ("embeddings.", "encoder.layers.", "rms_norm.weight", "vision_model.",
               "text_model.", "visual_projection.")
    return any(key.startswith(markers) for key in keys)


def _apple_name(key: str, lit: bool) -> tuple[str, str]:
    """(Apple name, kind): kind is "pos" for the vision position table
    (which gets a batch axis), "" otherwise. Unknown keys keep their name."""
    if key in _TOP_RENAMES:
        return _TOP_RENAMES[key], ""
    prefix, rest = "", key
    for old, new in _ENCODER_PREFIXES.items():
        if key.startswith(old):
            prefix, rest = new, key[len(old):]
    text = prefix == "text_encoder."
    if rest == "embeddings.position_embedding.weight":
        if text:
            return prefix + "preprocessor.positional_embedding", ""
        return prefix + "preprocessor.pos_embed", "pos"
    if rest == "rms_norm.weight":
        return prefix + "trunk.post_trunk_norm.weight", ""
    for old, new in _ENCODER_RENAMES:
        rest = rest.replace(old, new)
    if not prefix and lit and not rest.startswith(("trunk.", "preprocessor.", "head.")):
        return key, ""
    return prefix + rest, ""


class TransformersNames:
    """A transformers-format state dict seen under Apple's key names.

    `q_proj`, `k_proj` and `v_proj` of a block become one
    `attn.qkv.weight` (their rows stacked q, k, v: Apple's fused layout);
    the vision position table `(N, D)` becomes `(1, N, D)`. A key that does
    not fit keeps its own name (and is then reported as unexpected), as
    does a q/k/v group with a member missing. Same interface as the opened
    state dicts (`keys`, `shape`, `array`, `verify`, `close`, `name`).
    """

    def __init__(self, source, lit: bool):
        self._source = source
        self.name = f"{source.name} (transformers names)"
        self._single: dict[str, tuple[str, str]] = {}  # apple -> (key, kind)
        self._fused: dict[str, tuple[str, str, str]] = {}
        keys = set(source.keys())
        grouped = set()
        for key in sorted(keys):
            if key.endswith(_FUSED.format("q")):
                stem = key[: -len(_FUSED.format("q"))]
                group = tuple(stem + _FUSED.format(p) for p in "qkv")
                if all(k in keys for k in group):
                    apple, _ = _apple_name(stem + ".attn.qkv.weight", lit)
                    self._fused[apple] = group
                    grouped.update(group)
        for key in keys - grouped:
            apple, kind = _apple_name(key, lit)
            if any(key.endswith(_FUSED.format(p)) for p in "qkv"):
                apple, kind = key, ""  # a member of an incomplete q/k/v group
            if apple in self._single or apple in self._fused:
                apple, kind = key, ""  # two keys for one place: keep the name
            self._single[apple] = (key, kind)

    def keys(self) -> list[str]:
        return [*self._single, *self._fused]

    def shape(self, key: str) -> tuple:
        if key in self._fused:
            shapes = [self._source.shape(k) for k in self._fused[key]]
            if all(len(s) == 2 and s[1] == shapes[0][1] for s in shapes):
                return (sum(s[0] for s in shapes), shapes[0][1])
            return tuple(shapes)
        original, kind = self._single[key]
        shape = tuple(self._source.shape(original))
        return (1, *shape) if kind == "pos" else shape

    def array(self, key: str) -> np.ndarray:
        if key in self._fused:
            return np.concatenate([self._source.array(k) for k in self._fused[key]])
        original, kind = self._single[key]
        value = self._source.array(original)
        return value[None] if kind == "pos" else value

    def verify(self, keys) -> None:
        """Checks the data behind `keys` (Apple's names) in the source."""
        self._source.verify([
            original
            for key in keys
            for original in (self._fused[key] if key in self._fused else (self._single[key][0],))
        ])

    def close(self) -> None:
        self._source.close()


# --- loading ---------------------------------------------------------------


def _variable_map(model) -> dict[str, tuple[Any, Callable]]:
    """The variable map of an AIMv2Backbone or AIMv2LiT (recognized by their
    parts, so this module imports neither class)."""
    if hasattr(model, "text_encoder") and hasattr(model, "vision_encoder"):
        return lit_variable_map(model)
    if hasattr(model, "patch_embedding") and hasattr(model, "position_embedding_type"):
        return vision_variable_map(model)
    raise TypeError(
        "load_aimv2_weights expects an AIMv2Backbone or AIMv2LiT; received "
        f"{type(model).__name__}."
    )


def load_aimv2_weights(model, checkpoint: StateDictLike) -> None:
    """Loads an AIMv2 checkpoint into an `AIMv2Backbone` or `AIMv2LiT`.

    Args:
        model: the Keras model; its architecture must match the checkpoint.
        checkpoint: a `model.safetensors` (or `.pth`) file, or a dict of
            arrays, with Apple's key names or transformers' (see the module
            docstring).

    Loading is strict and all-or-nothing: every key and shape is checked
    before any variable changes; one `WeightLoadingError` lists every
    missing key, unexpected key and shape mismatch (under Apple's names).
    Variables are filled one tensor at a time.
    """
    expected = _variable_map(model)
    source = open_state_dict(checkpoint)
    lit = any(key.startswith("image_encoder.") for key in expected)
    transformers = is_transformers_format(source.keys())
    if transformers:
        source = TransformersNames(source, lit)
    naming = "transformers' names, shown here under Apple's" if transformers else "Apple's names"
    try:
        assign_strictly(
            expected,
            [source],
            type(model).__name__,
            unexpected_reason=lambda key: "not an AIMv2 key for this model",
            hint=(
                f"The checkpoint uses {naming}. Check that it belongs to this "
                "architecture (width, depth, image size: the 224/336/448 "
                "models differ in their position table; the native model has "
                "none; the LiT model loads into AIMv2LiT)."
            ),
        )
    finally:
        source.close()


def check_release_file(path: str, expected_shapes: Mapping[str, tuple]) -> None:
    """Raises a `ValueError` unless `path` is a complete float32 safetensors
    file holding exactly `expected_shapes` (key -> torch shape), checked
    from its header alone: the file is as long as the header says
    (`SafetensorsFormatError` otherwise), and every key, dtype and shape is
    the architecture's (`WeightLoadingError` otherwise)."""
    header = safetensors_header(path)
    problems = []
    for key, shape in expected_shapes.items():
        if key not in header:
            problems.append(f"missing {key} {tuple(shape)}")
        elif header[key] != ("F32", tuple(shape)):
            problems.append(
                f"{key}: expected F32 {tuple(shape)}, found {header[key][0]} "
                f"{header[key][1]}"
            )
    problems += [f"unexpected {key}" for key in header if key not in expected_shapes]
    if problems:
        shown = problems[:20] + ([f"... {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise WeightLoadingError(
            f"{path} is not the expected checkpoint: {len(problems)} problem(s): "
            + "; ".join(shown)
        )
