"""The released AIM-v1 models: architectures, checkpoints and reported numbers.

The one source of every AIM-v1 architecture number: the models, the recipes'
configs, the benchmarks and the release tooling (`weights/`) read this table.
It is data, not code (no Keras import): everything here comes from the AIM
paper and Apple's release (see `weights/manifest.json`, generated from it).
"""

from __future__ import annotations

import os
from typing import Any

from keras_aim.loading.download import check_digest

RELEASE_BASE_URL = "https://huggingface.co/apple/AIM/resolve/main/"
SOURCE_URL = "https://huggingface.co/apple/AIM"
LICENSE = "Apple's license of the AIM release (Hugging Face: 'other')"
LICENSE_URL = "https://github.com/apple/ml-aim/blob/main/LICENSE"
PROBE_NUM_BLOCKS = 6  # The released heads average 6 blocks.
IMAGENET_NUM_CLASSES = 1000
HEAD_KINDS = ("best", "last")

_COMMON = {
    "image_shape": (224, 224, 3),
    "patch_size": 14,
    "mlp_ratio": 4.0,
    "layer_norm_epsilon": 1e-6,
}


# The paper's pre-training setting for every released size: the pixel head
# (section 3.2) and the optimization (section 4, Table 10).
PAPER_PIXEL_HEAD = {"pixel_head_width": 2048, "pixel_head_depth": 12}
PAPER_PRETRAINING = {
    "batch_size": 4096,
    "learning_rate": 1e-3,
    "precision": "mixed_bfloat16",
    "total_steps": {"aim_600m": 500_000, "aim_1b": 1_200_000,
                    "aim_3b": 1_200_000, "aim_7b": 1_200_000},
}


def _preset(size, width, depth, heads, params, best, images, files, top1):
    return {
        "size": size,
        "config": {
            **_COMMON,
            "hidden_dim": width,
            "num_layers": depth,
            "num_heads": heads,
        },
        "trunk_params": params,
        "num_classes": IMAGENET_NUM_CLASSES,
        "best_probe_layers": tuple(range(best, best + PROBE_NUM_BLOCKS)),
        "last_probe_layers": tuple(range(depth - PROBE_NUM_BLOCKS, depth)),
        "pretraining_images": images,
        "files": files,
        "imagenet_top1": dict(zip(("last", "best", "lora_r8"), top1)),
    }


def _files(stem, backbone_sha, last_sha, best_sha):
    return {
        "backbone": (f"{stem}_attnprobe_backbone.pth", backbone_sha),
        "head_last": (f"{stem}_attnprobe_head_last_layers.pth", last_sha),
        "head_best": (f"{stem}_attnprobe_head_best_layers.pth", best_sha),
    }


AIM_PRESETS: dict[str, dict[str, Any]] = {
    "aim_600m": _preset(
        "0.6B", 1536, 24, 12, 680_535_552, 14, "2B",
        _files("aim_600m_2bimgs", "0d6f6b8f", "5ce5a341", "ebd45c05"),
        (78.5, 79.4, 81.0),
    ),
    "aim_1b": _preset(
        "1B", 2048, 24, 16, 1_209_370_624, 12, "5B",
        _files("aim_1b_5bimgs", "d254ecd3", "db3be2ad", "f1ed7852"),
        (80.6, 82.3, 83.6),
    ),
    "aim_3b": _preset(
        "3B", 3072, 24, 24, 2_720_025_600, 12, "5B",
        _files("aim_3b_5bimgs", "8475ce4e", "5c057b30", "ad380e16"),
        (82.2, 83.3, 85.5),
    ),
    "aim_7b": _preset(
        "7B", 4096, 32, 32, 6_445_404_160, 14, "5B",
        _files("aim_7b_5bimgs", "184ed94c", "1e5c99ba", "73ecd732"),
        (82.4, 84.0, 86.3),
    ),
}


RELEASED_PRESETS = tuple(AIM_PRESETS)


def pretraining_architecture(name: str) -> dict[str, Any]:
    """The `AIMPretrainer` of released preset `name` as in the paper: its
    trunk (`image_size`, `patch_size`, `hidden_dim`, `num_layers`,
    `num_heads`, `mlp_ratio`) and pixel head (`pixel_head_width`,
    `pixel_head_depth`), as flat numbers (recipes, planner, benchmarks)."""
    config = get_preset(name)["config"]
    return {
        "image_size": config["image_shape"][0],
        "patch_size": config["patch_size"],
        "hidden_dim": config["hidden_dim"],
        "num_layers": config["num_layers"],
        "num_heads": config["num_heads"],
        "mlp_ratio": config["mlp_ratio"],
        **PAPER_PIXEL_HEAD,
    }


def register_preset(
    name: str,
    config: dict[str, Any],
    files: dict[str, tuple[str, str]],
    best_probe_layers: tuple[int, ...],
    last_probe_layers: tuple[int, ...],
    num_classes: int = IMAGENET_NUM_CLASSES,
    **extra: Any,
) -> None:
    """Adds a preset in the released file format (e.g. a private mirror's
    checkpoint, or a test model) so that `from_preset(name)` can download,
    verify, convert and cache it like the released ones.

    Args:
        name: the preset name.
        config: `AIMBackbone` constructor arguments.
        files: `{"backbone": (filename, sha256 digest or a prefix of at
            least 8 hex digits; `keras-aim info` says which),
            "head_best": (...), "head_last": (...)}`; heads are optional.
            Files are fetched from `KERAS_AIM_BASE_URL` (default: Apple's
            release).
        best_probe_layers, last_probe_layers: the blocks each head averages.
        num_classes: classes of the heads.
    """
    if "backbone" not in files:
        raise ValueError(f"Preset {name!r} needs files['backbone'].")
    for role, (filename, sha256) in files.items():
        check_digest(sha256)  # a clear error now rather than at download
    AIM_PRESETS[name] = {
        "config": dict(config),
        "trunk_params": trunk_parameter_count(
            config["hidden_dim"],
            config["num_layers"],
            config["patch_size"],
            config.get("image_shape", (None, None, 3))[-1],
            config.get("mlp_ratio", 4.0),
        ),
        "num_classes": num_classes,
        "best_probe_layers": tuple(best_probe_layers),
        "last_probe_layers": tuple(last_probe_layers),
        "files": dict(files),
        **extra,
    }


def classifier_parameter_count(name: str) -> int:
    """Parameters of preset `name`'s classifier: trunk, attentive probe and
    the probe's BatchNormalization statistics (`2 * D`)."""
    entry = get_preset(name)
    width = entry["config"]["hidden_dim"]
    return (
        entry["trunk_params"]
        + probe_parameter_count(width, entry["num_classes"])
        + 2 * width
    )


def listing(kind: str = "backbone") -> dict[str, dict[str, Any]]:
    """Every preset in keras-hub's `presets` format, for `AIMBackbone.presets`
    (`kind="backbone"`), `AIMImageClassifier.presets` (`"classifier"`) and
    `keras-aim info`: `{name: {"metadata": {"description", "params",
    "image_size", "source", "license", "license_url", "path"}}}`.

    There is no `kaggle_handle`: `from_preset(name)` fetches Apple's released
    files and converts them (see `RELEASE_BASE_URL`).
    """
    if kind not in ("backbone", "classifier"):
        raise ValueError(f"kind must be 'backbone' or 'classifier'; received {kind!r}.")
    presets = {}
    for name, entry in AIM_PRESETS.items():
        config = entry["config"]
        description = (
            f"AIM-v1{' ' + entry['size'] if 'size' in entry else ''} trunk "
            f"(width {config['hidden_dim']}, {config['num_layers']} blocks, "
            f"{config['num_heads']} heads, patch {config['patch_size']})"
        )
        if "pretraining_images" in entry:
            description += (
                ", pre-trained by next-patch prediction on "
                f"{entry['pretraining_images']} images"
            )
        params = entry["trunk_params"]
        if kind == "classifier":
            best = entry["best_probe_layers"]
            description += (
                f", with the released {entry['num_classes']}-class attentive "
                f"probe (default: best blocks {best[0]}-{best[-1]}"
            )
            top1 = entry.get("imagenet_top1")
            description += f"; ImageNet-1k top-1 {top1['best']}% reported)" if top1 else ")"
            params = classifier_parameter_count(name)
        height, width = config.get("image_shape", (None, None))[:2]
        presets[name] = {
            "metadata": {
                "description": description + ".",
                "params": params,
                "image_size": (height, width),
                "source": entry.get("source", SOURCE_URL),
                "license": entry.get("license", LICENSE),
                "license_url": entry.get("license_url", LICENSE_URL),
                "path": "aim",
            }
        }
    return presets


def get_preset(name: str) -> dict[str, Any]:
    """Returns the table entry of a released preset, or raises a ValueError
    that lists the valid names."""
    if name not in AIM_PRESETS:
        raise ValueError(
            f"Unknown AIM preset {name!r}. Valid presets: "
            f"{', '.join(AIM_PRESETS)}; or pass a local preset directory or "
            "a kaggle:// / hf:// handle."
        )
    return AIM_PRESETS[name]


def builtin_preset(preset) -> dict[str, Any] | None:
    """The table entry if `preset` names a released preset, else `None`
    (paths and `kaggle://` / `hf://` handles go to keras-hub's loader).

    A bare name that is not a released preset raises the "unknown preset"
    error listing the valid names.
    """
    if not isinstance(preset, str):
        return None
    if preset not in AIM_PRESETS:
        if "://" in preset or os.path.exists(preset) or os.sep in preset:
            return None
        get_preset(preset)  # raises
    return AIM_PRESETS[preset]


def trunk_parameter_count(
    hidden_dim: int,
    num_layers: int,
    patch_size: int,
    num_channels: int = 3,
    mlp_ratio: float = 4.0,
) -> int:
    """Analytic parameter count of an AIM trunk.

    Patch conv (with bias) + patch LayerNorm + `num_layers` blocks (two
    LayerNorms, bias-free qkv/proj/fc1/fc2) + final LayerNorm.
    """
    d, hidden = hidden_dim, int(hidden_dim * mlp_ratio)
    patch = patch_size * patch_size * num_channels * d + d + 2 * d
    block = 4 * d + 3 * d * d + d * d + 2 * d * hidden
    return patch + num_layers * block + 2 * d


def probe_parameter_count(hidden_dim: int, num_classes: int) -> int:
    """Trainable parameters of the attentive probe: k, v, cls_token, linear."""
    return 2 * hidden_dim * hidden_dim + hidden_dim + num_classes * hidden_dim


def preset_for_architecture(config: dict[str, Any]) -> str | None:
    """Name of the released preset with this architecture, if any."""
    keys = ("hidden_dim", "num_layers", "num_heads", "patch_size")
    if "mlp_ratio" not in config:
        return None  # not an AIM-v1 trunk (AIMv2's shapes may coincide)
    for name, entry in AIM_PRESETS.items():
        if all(entry["config"][k] == config.get(k) for k in keys):
            return name
    return None


def preset_in_release_dir(path) -> str | None:
    """The preset whose released backbone file is in directory `path` (a
    folder of downloaded `.pth` files rather than a keras-hub preset)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return None
    if os.path.exists(os.path.join(path, "config.json")):
        return None  # a keras-hub preset directory
    for name, entry in AIM_PRESETS.items():
        if os.path.exists(os.path.join(path, entry["files"]["backbone"][0])):
            return name
    released = sorted(f for f in os.listdir(path) if f.endswith(".pth"))
    if released:
        known = ", ".join(e["files"]["backbone"][0] for e in AIM_PRESETS.values())
        raise ValueError(
            f"{path} holds {', '.join(released)} but no released AIM backbone "
            f"file; expected one of: {known}. Keep the released file names, "
            "or load the files with keras_aim.load_official_weights."
        )
    return None


def resolve_release(preset) -> tuple[str | None, str | None]:
    """`(preset name, release directory)` for a preset name or a directory
    of released files; `(None, None)` for keras-hub presets and handles."""
    if builtin_preset(preset) is not None:
        return preset, None
    name = preset_in_release_dir(preset)
    return (name, os.fspath(preset)) if name else (None, None)


def released_filenames(name: str) -> list[str]:
    """The released files of preset `name`."""
    return [filename for filename, _ in get_preset(name)["files"].values()]
