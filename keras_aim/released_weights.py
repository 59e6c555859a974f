"""Apple's released checkpoints as cached keras-hub presets.

The first `from_preset("aim_600m")` downloads the released `.pth` file(s),
verifies their SHA-256, converts them with `load_official_weights` and saves
a standard keras-hub preset directory; later calls load that directory and
never touch the network.

Cache layout (`$KERAS_AIM_HOME`, default `~/.keras/keras_aim`):

    downloads/<released file>.pth          verified released files
    presets/<preset>[-<dtype>]/            keras-hub preset: config.json,
        metadata.json, model.weights.h5 (sharded when large),
        preprocessor.json, image_converter.json
        heads/probe_{best,last}.weights.h5 released heads (task weights)

Every file and directory appears by an atomic rename once complete, so an
interrupted run leaves nothing half-written behind.
"""

from __future__ import annotations

import os

import keras

from keras_aim.atomic_files import atomic_directory, atomic_file
from keras_aim.conversion import load_official_weights
from keras_aim.download import download_file, verify_sha256
from keras_aim.initialization import variables_to_be_overwritten
from keras_aim.memory import limit_heap_fragmentation
from keras_aim.presets import AIM_PRESETS, RELEASE_BASE_URL, get_preset

SHARD_SIZE_GB = 5.0  # keras-hub shards model.weights.h5 above this size


def keras_aim_home() -> str:
    return os.path.expanduser(
        os.environ.get("KERAS_AIM_HOME") or os.path.join("~", ".keras", "keras_aim")
    )


def release_url(filename: str) -> str:
    base = os.environ.get("KERAS_AIM_BASE_URL") or RELEASE_BASE_URL
    return base.rstrip("/") + "/" + filename


def downloaded_path(filename: str) -> str:
    return os.path.join(keras_aim_home(), "downloads", filename)


def release_file(
    name: str, role: str, release_dir: str | None = None, progress: bool = True
) -> str:
    """Local path of a released file (`role`: backbone, head_best,
    head_last), from `release_dir`, the download cache, or the network."""
    entry = get_preset(name)
    if role not in entry["files"]:
        raise ValueError(
            f"Preset {name!r} has no released {role.replace('_', ' ')} file; "
            f"it has: {', '.join(entry['files'])}."
        )
    filename, sha256 = entry["files"][role]
    if release_dir is not None:
        candidate = os.path.join(release_dir, filename)
        if os.path.exists(candidate):
            verify_sha256(candidate, sha256, candidate, delete=False)
            return candidate
    cached = downloaded_path(filename)
    if os.path.exists(cached):
        return cached
    return download_file(release_url(filename), cached, sha256, progress=progress)


def variable_dtype(dtype) -> str:
    """The dtype variables get under `dtype` (a policy name or None)."""
    policy = keras.dtype_policies.get(dtype or keras.config.dtype_policy())
    return policy.variable_dtype


def backbone_cache_dir(name: str, dtype: str = "float32") -> str:
    suffix = "" if dtype == "float32" else f"-{dtype}"
    return os.path.join(keras_aim_home(), "presets", name + suffix)


def find_cached_backbone(name: str, dtype=None) -> str | None:
    """A cached preset usable for `dtype`: float32 serves every dtype."""
    for candidate_dtype in dict.fromkeys(("float32", variable_dtype(dtype))):
        path = backbone_cache_dir(name, candidate_dtype)
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    return None


def cached_backbone_preset(
    name: str, dtype=None, release_dir: str | None = None, progress: bool = True
) -> str:
    """The keras-hub preset directory of `name`'s trunk, converting the
    released file first if no usable cache exists.

    Conversion happens in `dtype`'s variable dtype (bfloat16 halves the
    memory it needs) and is cached under that dtype.
    """
    cached = find_cached_backbone(name, dtype)
    if cached is not None:
        return cached
    from keras_aim.backbone import AIMBackbone
    from keras_aim.preprocessing import (
        AIMImageClassifierPreprocessor,
        AIMImageConverter,
    )

    source = release_file(name, "backbone", release_dir, progress)
    limit_heap_fragmentation()  # before building: keeps conversion near 1x
    target_dtype = variable_dtype(dtype)
    config = get_preset(name)["config"]
    with variables_to_be_overwritten():  # the strict load fills every one
        backbone = AIMBackbone(**config, dtype=target_dtype)
    load_official_weights(backbone, backbone_file=source)
    preprocessor = AIMImageClassifierPreprocessor(
        AIMImageConverter(image_size=tuple(config["image_shape"][:2]))
    )
    target = backbone_cache_dir(name, target_dtype)
    with atomic_directory(target) as staging:
        backbone.save_to_preset(staging, max_shard_size=SHARD_SIZE_GB)
        preprocessor.save_to_preset(staging)
    del backbone
    return target


def head_cache_path(backbone_dir: str, kind: str) -> str:
    return os.path.join(backbone_dir, "heads", f"probe_{kind}.weights.h5")


def load_released_head(
    classifier,
    name: str,
    kind: str,
    backbone_dir: str,
    release_dir: str | None = None,
    progress: bool = True,
) -> None:
    """Fills `classifier`'s probe with the released `kind` head ("best" or
    "last"), converting and caching it on first use."""
    cached = head_cache_path(backbone_dir, kind)
    if os.path.exists(cached):
        classifier.load_task_weights(cached)
        return
    source = release_file(name, f"head_{kind}", release_dir, progress)
    load_official_weights(classifier, head_file=source)
    with atomic_file(cached) as staging:
        classifier.save_task_weights(staging)


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
    from keras_aim.presets import builtin_preset

    if builtin_preset(preset) is not None:
        return preset, None
    name = preset_in_release_dir(preset)
    return (name, os.fspath(preset)) if name else (None, None)


def cache_status(name: str) -> str:
    """One line on what is on disk for `name`."""
    entry = get_preset(name)
    parts = []
    for dtype in ("float32", "bfloat16", "float16"):
        path = backbone_cache_dir(name, dtype)
        if os.path.isfile(os.path.join(path, "config.json")):
            heads = [k for k in ("best", "last") if os.path.exists(head_cache_path(path, k))]
            parts.append(
                f"{dtype} ({_size_gb(path):.1f} GB"
                + (f", heads: {'/'.join(heads)}" if heads else "")
                + ")"
            )
    downloaded = [
        f for f, _ in entry["files"].values() if os.path.exists(downloaded_path(f))
    ]
    if downloaded:
        parts.append(f"{len(downloaded)} released file(s) downloaded")
    return "; ".join(parts) if parts else "not cached"


def _size_gb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 1e9
