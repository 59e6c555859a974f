"""`AIMv2Backbone`: the AIMv2 vision encoder as a keras-hub `Backbone`."""

from __future__ import annotations

import os

import keras
from keras_hub.models import Backbone

from keras_aim.layers import (
    AIMLearnedPositionEmbedding,
    AIMPatchEmbedding,
    AIMSinCosPositionEmbedding,
    AIMv2TransformerBlock,
)
from keras_aim.layers.remat import make_blocks
from keras_aim.loading import preset_cache
from keras_aim.loading.lean_loading import (
    limit_heap_fragmentation,
    variables_to_be_overwritten,
    zeros_while_loading,
)
from keras_aim.loading.preset_dtype import saved_policy_map
from keras_aim.loading.strict_weights import StrictWeights, preset_weights
from keras_aim.models.aim.aim_backbone import AIMBackbone, _check_config
from keras_aim.models.aimv2 import aimv2_presets
from keras_aim.models.aimv2.aimv2_image_classifier_preprocessor import (
    AIMv2ImageClassifierPreprocessor,
)
from keras_aim.models.aimv2.aimv2_image_converter import AIMv2ImageConverter
from keras_aim.models.aimv2.convert_aimv2 import check_release_file, load_aimv2_weights
from keras_aim.models.intermediates import TrunkIntermediates
from keras_aim.training.lora import LoRAFiles
from keras_aim.utils.class_properties import classproperty

POSITION_EMBEDDINGS = ("learned", "sincos")


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMv2Backbone(TrunkIntermediates, StrictWeights, LoRAFiles, Backbone):
    """The AIMv2 vision encoder: a ViT without class token.

    images `(B, H, W, C)` -> patch conv (with bias) + RMSNorm
    `(B, H/p, W/p, D)` -> + position embedding (a learned table, or 2-D
    sin-cos computed for the actual grid) -> raster-order tokens `(B, N, D)`
    -> `num_layers` pre-norm blocks (RMSNorm, fused bias-free qkv, SwiGLU)
    -> `post_trunk_norm` (RMSNorm) -> `(B, N, D)`.

    The feature API is AIM-v1's (`AIMBackbone`): a call returns the
    post_trunk_norm tokens, `forward_intermediates()` (timm's feature API,
    `keras_aim.models.intermediates`) block outputs as tokens or a grid,
    `block_outputs()` the outputs of blocks (before the final norm, Apple's
    `output_features`), `extract_features()` tokens or their mean, from the
    final norm or averaged blocks.

    Image sizes: with `position_embedding="sincos"` (the native-resolution
    model) any multiple of `patch_size` works. A learned table covers one
    grid (`position_grid`, by default `image_shape`'s); another size is an
    error unless `resample_position_embedding=True`, which resamples the
    table to each input's grid (antialiased bicubic, as timm does; this
    changes the outputs, see docs/aimv2.md).

    Args:
        image_shape: `(height, width, channels)`; height and width may be
            `None` (any size: sin-cos, or a resampled table).
        patch_size: side of the square patches.
        hidden_dim: token width D.
        num_layers: number of blocks.
        num_heads: attention heads per block.
        intermediate_dim: SwiGLU hidden width.
        position_embedding: `"learned"` or `"sincos"`.
        position_grid: `(rows, cols)` of the learned table; defaults to
            `image_shape`'s grid.
        resample_position_embedding: resample the learned table to other
            grids instead of raising.
        norm_epsilon: epsilon of every RMSNorm (1e-5).
        remat: recompute each block in the backward pass.
        dtype: dtype policy of the layers.

    Example:
    ```python
    backbone = keras_aim.AIMv2Backbone.from_preset("aimv2_large_patch14_224")
    tokens = backbone(images)                           # (B, 256, 1024)
    pooled = backbone.extract_features(images, pooling="mean")  # (B, 1024)
    ```
    """

    def __init__(
        self,
        image_shape: tuple = (224, 224, 3),
        patch_size: int = 14,
        hidden_dim: int = 1024,
        num_layers: int = 24,
        num_heads: int = 8,
        intermediate_dim: int = 2816,
        position_embedding: str = "learned",
        position_grid: tuple | None = None,
        resample_position_embedding: bool = False,
        norm_epsilon: float = 1e-5,
        remat: bool = False,
        dtype=None,
        **kwargs,
    ):
        image_shape = tuple(image_shape)
        _check_config(image_shape, patch_size, hidden_dim, num_layers, num_heads)
        position_grid = _check_position_config(
            position_embedding, position_grid, image_shape, patch_size
        )

        # === Layers ===
        self.patch_embedding = AIMPatchEmbedding(
            hidden_dim,
            patch_size,
            norm_epsilon,
            normalization="rms_norm",
            dtype=dtype,
            name="patch_embedding",
        )
        if position_embedding == "learned":
            self.position_embedding = AIMLearnedPositionEmbedding(
                position_grid,
                resample=resample_position_embedding,
                dtype=dtype,
                name="position_embedding",
            )
        else:
            self.position_embedding = AIMSinCosPositionEmbedding(
                dtype=dtype, name="position_embedding"
            )
        self.flatten_grid = keras.layers.Reshape(
            (-1, hidden_dim), dtype=dtype, name="flatten_grid"
        )
        self.blocks = make_blocks(
            num_layers,
            remat,
            lambda name: AIMv2TransformerBlock(
                hidden_dim, num_heads, intermediate_dim, norm_epsilon,
                dtype=dtype, name=name,
            ),
        )
        self.post_trunk_norm = keras.layers.RMSNormalization(
            epsilon=norm_epsilon, dtype=dtype, name="post_trunk_norm"
        )

        # === Config ===
        self.image_shape = image_shape
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.position_embedding_type = position_embedding
        self.position_grid = position_grid
        self.resample_position_embedding = resample_position_embedding
        self.norm_epsilon = norm_epsilon
        self.remat = remat

        # === Functional Model ===
        inputs = keras.Input(shape=image_shape, name="images")
        trunk_layers = [self.patch_embedding, *self.blocks, self.post_trunk_norm]
        with zeros_while_loading(trunk_layers):  # builds them
            tokens, blocks = self._run_trunk(
                inputs, None, range(num_layers), final_norm=True
            )
        super().__init__(inputs=inputs, outputs=tokens, dtype=dtype, **kwargs)
        self.block_output_tensors = blocks

    # The trunk runs and the feature API are AIM-v1's, word for word: they
    # use only the attributes both backbones share (patch_embedding,
    # position_embedding, flatten_grid, blocks, post_trunk_norm, config).
    trunk_intermediates = AIMBackbone.trunk_intermediates
    final_norm = AIMBackbone.final_norm
    _run_trunk = AIMBackbone._run_trunk
    default_lora_layer_names = AIMBackbone.default_lora_layer_names
    normalize_block_indices = AIMBackbone.normalize_block_indices
    block_outputs = AIMBackbone.block_outputs
    extract_features = AIMBackbone.extract_features
    encode = AIMBackbone.encode
    num_patches = AIMBackbone.num_patches
    get_layout_map = staticmethod(AIMBackbone.get_layout_map)

    def check_images(self, images, exact_size: bool = False) -> None:
        """Raises a `ValueError` naming the problem if `images` do not fit:
        rank, channels, multiples of the patch size, a learned table's grid
        (unless resampled) and, with `exact_size`, a fixed `image_shape`."""
        shape = tuple(images.shape)
        if (
            self.position_embedding_type == "learned"
            and len(shape) == 4
            and shape[1] is not None
            and shape[2] is not None
        ):
            self.position_embedding.check_grid(
                (shape[1] // self.patch_size, shape[2] // self.patch_size)
            )
        AIMBackbone.check_images(self, images, exact_size)

    def __call__(self, images, *args, **kwargs):
        if hasattr(images, "shape"):
            self.check_images(images, exact_size=True)
        return super().__call__(images, *args, **kwargs)

    @classproperty
    def presets(cls) -> dict:
        """Every released vision encoder `from_preset` takes by name, in
        keras-hub's format (`aimv2_presets.listing("vision")`)."""
        return aimv2_presets.listing("vision")

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_shape": self.image_shape,
                "patch_size": self.patch_size,
                "hidden_dim": self.hidden_dim,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "position_embedding": self.position_embedding_type,
                "position_grid": self.position_grid,
                "resample_position_embedding": self.resample_position_embedding,
                "norm_epsilon": self.norm_epsilon,
                "remat": self.remat,
            }
        )
        return config

    @classmethod
    def from_preset(
        cls, preset: str, load_weights: bool = True, checkpoint=None,
        allow_partial: bool = False, **kwargs
    ):
        """Builds an AIMv2 vision encoder from a preset.

        `preset` is one of `keras_aim.AIMV2_PRESETS` (e.g.
        `aimv2_large_patch14_224`, `aimv2_large_patch14_native`): Apple's
        `model.safetensors` is downloaded at the pinned revision, checked,
        converted and cached on first use, then loaded from the cache. It
        may also be a local keras-hub preset directory or a `kaggle://` /
        `hf://` handle of one.

        `checkpoint`: with a preset name, a local checkpoint (a
        `model.safetensors` file, or a dict of arrays) with Apple's or
        transformers' key names to load instead of the release, e.g. a
        checkpoint saved with transformers. Keyword arguments override the
        config (e.g. `dtype="bfloat16"`, `image_shape=(None, None, 3),
        resample_position_embedding=True`).

        Loading a preset directory is strict both ways (see
        `AIMBackbone.from_preset`); `allow_partial=True` accepts weights
        holding more variables than the config describes.
        """
        if not aimv2_presets.is_preset_name(preset):
            return keras_hub_preset(
                super().from_preset, preset, load_weights, allow_partial, **kwargs
            )
        return from_release(
            cls, preset, "vision", lambda entry, **kw: cls(**{**entry["config"], **kw}),
            load_weights, checkpoint, **kwargs,
        )

    @classmethod
    def release_preprocessors(cls, name: str, progress: bool = True) -> list:
        """What the cached preset of release `name` holds besides the model:
        its evaluation preprocessor."""
        return [evaluation_preprocessor(name)]


AIMv2ImageConverter.backbone_cls = AIMv2Backbone
AIMv2ImageClassifierPreprocessor.backbone_cls = AIMv2Backbone


def evaluation_converter(name: str, pipeline: str = "clip") -> AIMv2ImageConverter:
    """Preset `name`'s evaluation image converter (no resize for the native
    model)."""
    size = aimv2_presets.get_preset(name)["image_size"]
    return AIMv2ImageConverter(
        image_size=(size, size) if size else None, pipeline=pipeline
    )


def evaluation_preprocessor(name: str) -> AIMv2ImageClassifierPreprocessor:
    """The evaluation preprocessing of preset `name` (the "clip" pipeline)."""
    return AIMv2ImageClassifierPreprocessor(evaluation_converter(name))


def keras_hub_preset(
    from_preset, preset, load_weights: bool, allow_partial: bool = False, **kwargs
):
    """keras-hub's `from_preset` (the bound base method) for preset
    directories and handles, loading lean (see `loading.lean_loading`), with
    a quantized preset's saved dtype policies (see `loading.preset_dtype`),
    strictly unless `allow_partial` (see `loading.strict_weights`)."""
    limit_heap_fragmentation()
    if kwargs.get("dtype") is None and saved_policy_map(preset) is not None:
        kwargs["dtype"] = saved_policy_map(preset)
    if not load_weights:
        return from_preset(preset, load_weights=False, **kwargs)
    with variables_to_be_overwritten(), preset_weights(preset, allow_partial, kwargs):
        return from_preset(preset, load_weights=True, **kwargs)


WRONG_KIND = {
    "vision": "{name} is the LiT image-text model; load it with "
              "keras_aim.AIMv2LiT.from_preset (its vision encoder is .vision_encoder).",
    "lit": "{name} is a vision encoder; load it with keras_aim.AIMv2Backbone.from_preset. "
           "The LiT preset is aimv2_large_patch14_224_lit.",
}


def from_release(cls, name: str, kind: str, build, load_weights: bool, checkpoint, **kwargs):
    """Model class `cls` of release `name` (a `kind` preset): built by
    `build(entry, **kwargs)` without weights; filled from `checkpoint`; or
    loaded from the cache (converted into it first if needed)."""
    entry = aimv2_presets.get_preset(name)
    if entry["kind"] != kind:
        raise ValueError(WRONG_KIND[kind].format(name=name))
    if not load_weights:
        return build(entry, **kwargs)
    if checkpoint is not None:
        limit_heap_fragmentation()
        with variables_to_be_overwritten():
            model = build(entry, **kwargs)
        load_aimv2_weights(model, checkpoint)
        return model
    preset_dir = cached_release_preset(cls, name, kwargs.get("dtype"))
    return cls.from_preset(preset_dir, **kwargs)


def release_checkpoint(name: str, progress: bool = True) -> str:
    """Local path of preset `name`'s released `model.safetensors`: from the
    download cache, or downloaded at the pinned revision and checked (its
    SHA-256 once recorded; its size if recorded; always its header's keys,
    dtypes and shapes against the architecture)."""
    entry = aimv2_presets.get_preset(name)
    shapes = aimv2_presets.state_dict_shapes(entry)

    def verify(path: str) -> None:
        if entry["file_size"] is not None and os.path.getsize(path) != entry["file_size"]:
            raise ValueError(
                f"it has {os.path.getsize(path)} bytes, the release "
                f"{entry['file_size']}."
            )
        check_release_file(path, shapes)

    return preset_cache.url_file(
        aimv2_presets.download_path(entry),
        aimv2_presets.hub_url(
            entry["repo_id"], entry["revision"], aimv2_presets.CHECKPOINT_FILENAME
        ),
        entry["sha256"],
        verify=verify,
        progress=progress,
    )


def cached_release_preset(cls, name: str, dtype=None, progress: bool = True) -> str:
    """The keras-hub preset folder of release `name` for model class `cls`
    (`AIMv2Backbone` or `AIMv2LiT`), converting the release into the cache
    first if no usable cached preset exists."""

    def write(staging: str, target_dtype: str) -> None:
        source = release_checkpoint(name, progress)
        extras = cls.release_preprocessors(name, progress)
        limit_heap_fragmentation()  # before building: keeps conversion near 1x
        with variables_to_be_overwritten():  # the strict load fills every one
            model = cls.from_preset(name, load_weights=False, dtype=target_dtype)
        load_aimv2_weights(model, source)
        model.save_to_preset(staging, max_shard_size=preset_cache.SHARD_SIZE_GB)
        for extra in extras:
            extra.save_to_preset(staging)

    return preset_cache.cached_preset(name, dtype, write)


def _check_position_config(kind, grid, image_shape, patch_size):
    """The learned table's grid (or `None` for sin-cos), with clear errors."""
    if kind not in POSITION_EMBEDDINGS:
        raise ValueError(
            f"position_embedding must be one of {POSITION_EMBEDDINGS}; "
            f"received {kind!r}."
        )
    if kind == "sincos":
        return None
    if grid is None:
        height, width = image_shape[:2]
        if height is None or width is None:
            raise ValueError(
                "A learned position table needs its grid: pass position_grid="
                "(rows, cols) (e.g. (16, 16) for a 224 model with patch 14) "
                "when image_shape has no fixed size."
            )
        grid = (height // patch_size, width // patch_size)
    grid = tuple(grid)
    if len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid):
        raise ValueError(f"position_grid must be two positive ints; received {grid!r}.")
    return grid
