"""The released AIMv2 models: architectures, pinned checkpoints, reported numbers.

The one source of every AIMv2 architecture number (the models, the CLI, the
benchmarks and `weights/manifest_aimv2.json` read it). Data, not code: no
Keras import. Everything comes from Apple's AIMv2 release (arXiv
2411.14402; apple/ml-aim, whose last commit pins each Hub repository to a
revision) and the Hub repositories' files:

- every checkpoint is `model.safetensors` (float32) in the Hub repository
  `apple/<model_id>` at the pinned `revision`. The repositories' main
  branches were later rewritten to transformers-format checkpoints, so the
  download always names the revision;
- the SHA-256 digests and exact sizes of those files are not recorded yet
  (`sha256`/`file_size` are `None`): a download is checked against the
  safetensors header (the header's tensors must end exactly at the end of
  the file) and every key, dtype and shape the architecture needs;
- `imagenet_top1`: Apple's README, frozen trunk with an attentive probe
  (the distilled models are reported on VQA only); `zero_shot_top1`: the
  LiT model's ImageNet-1k zero-shot accuracy.
"""

from __future__ import annotations

import os
from typing import Any

HUB_URL = "https://huggingface.co"
HUB_ORGANIZATION = "apple"
CHECKPOINT_FILENAME = "model.safetensors"
TOKENIZER_FILENAMES = ("vocab.json", "merges.txt")
LICENSE = "apple-amlr"  # the Hub model cards' licence tag
PATCH_SIZE = 14
NORM_EPSILON = 1e-5

# Trunk sizes: (width D, blocks L, heads, SwiGLU width Hm, README #params).
SIZES = {
    "large": (1024, 24, 8, 2816, "0.3B"),
    "huge": (1536, 24, 12, 4096, "0.6B"),
    "1b": (2048, 24, 16, 5632, "1.2B"),
    "3b": (3072, 24, 24, 8192, "2.7B"),
}

# The LiT text tower and heads (aimv2_large_lit).
LIT_TEXT = {
    "vocabulary_size": 49408,
    "sequence_length": 77,
    "hidden_dim": 768,
    "num_layers": 12,
    "num_heads": 6,
    "intermediate_dim": 2048,
    "end_token_id": 49407,
}
LIT_PROJECTION_DIM = 768
LIT_POOL_HEADS = 8
LIT_MAX_LOGIT_SCALE = 100.0
START_TOKEN_ID = 49406


def _vision_config(size: str, image_size: int | None) -> dict[str, Any]:
    width, depth, heads, hidden, _ = SIZES[size]
    return {
        "image_shape": (image_size, image_size, 3),
        "patch_size": PATCH_SIZE,
        "hidden_dim": width,
        "num_layers": depth,
        "num_heads": heads,
        "intermediate_dim": hidden,
        "position_embedding": "learned" if image_size else "sincos",
        "position_grid": (image_size // PATCH_SIZE,) * 2 if image_size else None,
        "norm_epsilon": NORM_EPSILON,
    }


def _preset(size, image_size, params, revision, top1=None, suffix="", **extra):
    model_id = f"aimv2-{size.replace('b', 'B')}-patch14-{image_size or 'native'}{suffix}"
    return {
        "family": "aimv2",
        "size": SIZES[size][4],
        "model_id": model_id,
        "repo_id": f"{HUB_ORGANIZATION}/{model_id}",
        "revision": revision,
        "sha256": None,
        "file_size": None,
        "license": LICENSE,
        "config": _vision_config(size, image_size),
        "params": params,
        "image_size": image_size,
        "imagenet_top1": top1,
        **extra,
    }


_PINNED = (  # size, image size, params, pinned revision, IN-1k top-1
    ("large", 224, 309_197_824, "ac764a25c832c7dc5e11871daa588e98e3cdbfb7", 86.6),
    ("huge", 224, 680_851_968, "9e0bab0e0abb7b20796d2d0b37f39b7c3b1c1af1", 87.5),
    ("1b", 224, 1_234_958_336, "4d24a422f71e87d327d476bc405030fe6593d8b1", 88.1),
    ("3b", 224, 2_720_658_432, "df1cbc288096c9742ec8bd6709ff82757972338c", 88.5),
    ("large", 336, 309_525_504, "639423ae9f07319d24a7fc431b61908110d08d3a", 87.6),
    ("huge", 336, 681_343_488, "21528bd53a2438a84162e79f1f9a46453b88004c", 88.2),
    ("1b", 336, 1_235_613_696, "5a15f23f6757776fdd487283353a018677621939", 88.7),
    ("3b", 336, 2_721_641_472, "d1adb39ee92dfd7ecf3114b1ee3aa7e9027ce98f", 89.2),
    ("large", 448, 309_984_256, "cefb13f21003bdadba65bfbee956c82b976cd23d", 87.9),
    ("huge", 448, 682_031_616, "44e6440a24a8ea966ad0deadf5399a22d852bcc0", 88.6),
    ("1b", 448, 1_236_531_200, "7f292735d3a07a911559c0fabb3ad3e9d141713f", 89.0),
    ("3b", 448, 2_723_017_728, "70810b618e4456b724bacc8ef4d2d038060ceda6", 89.5),
)

AIMV2_PRESETS: dict[str, dict[str, Any]] = {
    f"aimv2_{size}_patch14_{image}": _preset(size, image, params, revision, top1)
    for size, image, params, revision, top1 in _PINNED
}
AIMV2_PRESETS.update(
    {
        "aimv2_large_patch14_224_distilled": _preset(
            "large", 224, 309_197_824, "d6d09b071e8ba31735c5e05ccd4b2a393020ce90",
            suffix="-distilled", distilled_from="aimv2_3b_patch14_224",
        ),
        "aimv2_large_patch14_336_distilled": _preset(
            "large", 336, 309_525_504, "8fe1704e5cc1c80cefc99c194afcefe21dff1faa",
            suffix="-distilled", distilled_from="aimv2_3b_patch14_336",
        ),
        "aimv2_large_patch14_native": _preset(
            "large", None, 308_935_680, "cfe7bdbbc924a5f65272d5e2c27fe5f61771a629", 87.3,
        ),
        "aimv2_large_patch14_224_lit": _preset(
            "large", 224, 436_680_193, "c2cd59a786c4c06f39d199c50d08cc2eab9f8605",
            suffix="-lit", kind="lit", zero_shot_top1=77.0,
            text_config=dict(LIT_TEXT),
            projection_dim=LIT_PROJECTION_DIM,
            pool_num_heads=LIT_POOL_HEADS,
            max_logit_scale=LIT_MAX_LOGIT_SCALE,
            tokenizer_files=TOKENIZER_FILENAMES,
        ),
    }
)
for _entry in AIMV2_PRESETS.values():
    _entry.setdefault("kind", "vision")

RELEASED_PRESETS = tuple(AIMV2_PRESETS)


def get_preset(name: str) -> dict[str, Any]:
    """The table entry of a released AIMv2 preset, or a ValueError listing
    the valid names."""
    if name not in AIMV2_PRESETS:
        raise ValueError(
            f"Unknown AIMv2 preset {name!r}. Valid presets: "
            f"{', '.join(AIMV2_PRESETS)}; or pass a local preset directory, a "
            "model.safetensors file or a kaggle:// / hf:// handle."
        )
    return AIMV2_PRESETS[name]


def is_preset_name(preset) -> bool:
    return isinstance(preset, str) and preset in AIMV2_PRESETS


def hub_url(repo_id: str, revision: str, filename: str) -> str:
    """Where a release file is: `$KERAS_AIM_HUB_URL` (a mirror with the
    Hub's layout) or huggingface.co, `<repo>/resolve/<revision>/<file>`."""
    base = os.environ.get("KERAS_AIM_HUB_URL") or HUB_URL
    return f"{base.rstrip('/')}/{repo_id}/resolve/{revision}/{filename}"


def download_path(entry: dict[str, Any], filename: str = CHECKPOINT_FILENAME) -> str:
    """The file's place under the download cache: every release file has
    the same name, so each lives under `<model_id>/<revision>/`."""
    return "/".join((entry["model_id"], entry["revision"], filename))


def download_paths(entry: dict[str, Any]) -> list[str]:
    """Every release file of a preset (checkpoint, and the LiT's tokenizer
    files), as places under the download cache."""
    names = (CHECKPOINT_FILENAME, *entry.get("tokenizer_files", ()))
    return [download_path(entry, name) for name in names]


def vision_parameter_count(
    hidden_dim: int,
    num_layers: int,
    intermediate_dim: int,
    patch_size: int = PATCH_SIZE,
    num_patches: int = 0,
    num_channels: int = 3,
) -> int:
    """Analytic parameter count of an AIMv2 vision trunk.

    Patch conv (with bias) + patch RMSNorm + learned position table
    (`num_patches` rows; 0 for the native model's sin-cos) + blocks (two
    RMSNorms, bias-free qkv, proj and SwiGLU) + final RMSNorm.
    """
    d = hidden_dim
    patch = patch_size * patch_size * num_channels * d + d + d
    block = 2 * d + 4 * d * d + 3 * d * intermediate_dim
    return patch + num_patches * d + num_layers * block + d


def text_parameter_count(
    vocabulary_size: int,
    sequence_length: int,
    hidden_dim: int,
    num_layers: int,
    intermediate_dim: int,
    **unused: Any,
) -> int:
    """Analytic parameter count of the LiT text tower: token and position
    tables, bias-free causal blocks, final RMSNorm."""
    d = hidden_dim
    block = 2 * d + 4 * d * d + 3 * d * intermediate_dim
    return (vocabulary_size + sequence_length) * d + num_layers * block + d


def lit_head_parameter_count(vision_dim: int, text_dim: int, projection_dim: int) -> int:
    """Attention pool (query, k, v, biased linear) + both projections +
    the logit scale."""
    pool = vision_dim + 3 * vision_dim * vision_dim + vision_dim
    return pool + (vision_dim + text_dim) * projection_dim + 1


def parameter_count(entry: dict[str, Any]) -> int:
    """Analytic parameter count of a preset's model (the whole LiT model
    for the LiT preset)."""
    config = entry["config"]
    height, width = config["image_shape"][:2]
    patches = 0
    if config["position_embedding"] == "learned":
        patches = (height // config["patch_size"]) * (width // config["patch_size"])
    count = vision_parameter_count(
        config["hidden_dim"], config["num_layers"], config["intermediate_dim"],
        config["patch_size"], patches, config["image_shape"][-1],
    )
    if entry["kind"] == "lit":
        text = entry["text_config"]
        count += text_parameter_count(**text) + lit_head_parameter_count(
            config["hidden_dim"], text["hidden_dim"], entry["projection_dim"]
        )
    return count


def vision_state_dict_shapes(config: dict[str, Any], prefix: str = "") -> dict[str, tuple]:
    """Every key of a released AIMv2 vision trunk and its (torch) shape."""
    d, hm = config["hidden_dim"], config["intermediate_dim"]
    p, channels = config["patch_size"], config["image_shape"][-1]
    shapes = {
        "preprocessor.patchifier.proj.weight": (d, channels, p, p),
        "preprocessor.patchifier.proj.bias": (d,),
        "preprocessor.patchifier.norm.weight": (d,),
        "trunk.post_trunk_norm.weight": (d,),
    }
    if config["position_embedding"] == "learned":
        height, width = config["image_shape"][:2]
        shapes["preprocessor.pos_embed"] = (1, (height // p) * (width // p), d)
    for i in range(config["num_layers"]):
        shapes.update(_block_shapes(f"trunk.blocks.{i}.", d, hm))
    return {prefix + key: shape for key, shape in shapes.items()}


def _block_shapes(prefix: str, d: int, hm: int) -> dict[str, tuple]:
    return {
        prefix + "norm_1.weight": (d,),
        prefix + "attn.qkv.weight": (3 * d, d),
        prefix + "attn.proj.weight": (d, d),
        prefix + "norm_2.weight": (d,),
        prefix + "mlp.fc1.weight": (hm, d),
        prefix + "mlp.fc3.weight": (hm, d),
        prefix + "mlp.fc2.weight": (d, hm),
    }


def state_dict_shapes(entry: dict[str, Any]) -> dict[str, tuple]:
    """Every key and shape of a preset's released `model.safetensors`."""
    if entry["kind"] != "lit":
        return vision_state_dict_shapes(entry["config"])
    d = entry["config"]["hidden_dim"]
    text, projection = entry["text_config"], entry["projection_dim"]
    td = text["hidden_dim"]
    shapes = vision_state_dict_shapes(entry["config"], "image_encoder.")
    shapes.update(
        {
            "image_encoder.head.cls_token": (1, 1, d),
            "image_encoder.head.k.weight": (d, d),
            "image_encoder.head.v.weight": (d, d),
            "image_encoder.head.linear.weight": (d, d),
            "image_encoder.head.linear.bias": (d,),
            "image_projector.weight": (projection, d),
            "text_encoder.preprocessor.text_embedding.weight": (text["vocabulary_size"], td),
            "text_encoder.preprocessor.positional_embedding": (text["sequence_length"], td),
            "text_encoder.trunk.post_trunk_norm.weight": (td,),
            "text_projector.weight": (projection, td),
            "log_logit_scale": (),
        }
    )
    for i in range(text["num_layers"]):
        shapes.update(
            _block_shapes(f"text_encoder.trunk.blocks.{i}.", td, text["intermediate_dim"])
        )
    return shapes
