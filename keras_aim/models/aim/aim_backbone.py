"""`AIMBackbone`: the AIM trunk as a keras-hub `Backbone` (any backend)."""

from __future__ import annotations

from typing import Sequence

import keras
from keras_hub.models import Backbone

from keras_aim.layers import (
    AIMPatchEmbedding,
    AIMSinCosPositionEmbedding,
    AIMTransformerBlock,
)
from keras_aim.layers.remat import make_blocks
from keras_aim.loading import preset_cache, preset_folder
from keras_aim.loading.lean_loading import (
    limit_heap_fragmentation,
    variables_to_be_overwritten,
    zeros_while_loading,
)
from keras_aim.loading.preset_dtype import saved_policy_map
from keras_aim.loading.strict_weights import StrictWeights, preset_weights
from keras_aim.models.aim import aim_presets
from keras_aim.models.aim.aim_image_classifier_preprocessor import (
    AIMImageClassifierPreprocessor,
)
from keras_aim.models.aim.aim_image_converter import AIMImageConverter
from keras_aim.models.aim.convert_aim import load_official_weights
from keras_aim.models.intermediates import TrunkIntermediates
from keras_aim.training import distribution
from keras_aim.training.lora import LoRAFiles
from keras_aim.utils import image_inputs
from keras_aim.utils.arguments import check_positive_ints
from keras_aim.utils.class_properties import classproperty
from keras_aim.utils.image_shapes import check_image_shape, check_patch_multiple


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMBackbone(TrunkIntermediates, StrictWeights, LoRAFiles, Backbone):
    """The AIM-v1 trunk: a ViT without class token.

    Inputs are ImageNet-normalized float images (`AIMImageConverter` makes
    them from pixels in [0, 255]: resize, center crop, `(x / 255 - mean) /
    std`); uint8 pixels are warned about once.

    images `(B, H, W, C)` -> patch embedding + LayerNorm `(B, H/p, W/p, D)`
    -> + fixed 2-D sin-cos position embedding -> raster-order tokens
    `(B, N, D)` with `N = H/p * W/p` -> `num_layers` pre-norm blocks ->
    `post_trunk_norm` -> `(B, N, D)`.

    Calling the backbone returns the post_trunk_norm tokens. Use
    `forward_intermediates()` (timm's feature API) for the outputs of
    individual blocks as tokens or a `(B, h, w, D)` grid, with or without
    the final norm, and the embedding (the first block's input);
    `block_outputs()` is its short form. `encode()` runs the trunk with an
    attention mask.

    Args:
        image_shape: `(height, width, channels)`; height and width may be
            `None`, then any multiple of `patch_size` works.
        patch_size: side of the square patches.
        hidden_dim: token width D.
        num_layers: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of D.
        layer_norm_epsilon: epsilon of every LayerNorm (1e-6 for the released
            weights; the training code uses 1e-5).
        remat: recompute each transformer block in the backward pass instead
            of storing its activations (saves memory in training; same
            results).
        dtype: dtype policy of the layers, e.g. `"bfloat16"`.

    Example:
    ```python
    backbone = keras_aim.AIMBackbone.from_preset("aim_600m", load_weights=False)
    tokens = backbone(images)                          # (B, 256, 1536)
    blocks = backbone.block_outputs(images, [22, 23])  # 2 x (B, 256, 1536)
    grids = backbone.forward_intermediates(images, 4, output_fmt="NHWC")
    grids["intermediates"]                             # 4 x (B, 16, 16, 1536)
    ```
    """

    def __init__(
        self,
        image_shape: tuple = (224, 224, 3),
        patch_size: int = 14,
        hidden_dim: int = 1536,
        num_layers: int = 24,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        layer_norm_epsilon: float = 1e-6,
        remat: bool = False,
        dtype=None,
        **kwargs,
    ):
        image_shape = tuple(image_shape)
        _check_config(image_shape, patch_size, hidden_dim, num_layers, num_heads)

        # === Layers ===
        self.patch_embedding = AIMPatchEmbedding(
            hidden_dim,
            patch_size,
            layer_norm_epsilon,
            dtype=dtype,
            name="patch_embedding",
        )
        self.position_embedding = AIMSinCosPositionEmbedding(
            dtype=dtype, name="position_embedding"
        )
        self.flatten_grid = keras.layers.Reshape(
            (-1, hidden_dim), dtype=dtype, name="flatten_grid"
        )
        self.blocks = make_blocks(
            num_layers,
            remat,
            lambda name: AIMTransformerBlock(
                hidden_dim, num_heads, mlp_ratio, layer_norm_epsilon, dtype=dtype, name=name
            ),
        )
        self.post_trunk_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="post_trunk_norm"
        )

        # === Config ===
        # Set before the functional graph is built: `encode` reads them.
        self.image_shape = image_shape
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.layer_norm_epsilon = layer_norm_epsilon
        self.remat = remat

        # === Functional Model ===
        inputs = keras.Input(shape=image_shape, name="images")
        trunk_layers = [self.patch_embedding, *self.blocks, self.post_trunk_norm]
        with zeros_while_loading(trunk_layers):  # builds them
            tokens, blocks = self._run_trunk(
                inputs, None, range(num_layers), final_norm=True
            )
        super().__init__(inputs=inputs, outputs=tokens, dtype=dtype, **kwargs)
        # Symbolic per-block outputs, for tasks that wire probes on them
        # (like keras-hub's `pyramid_outputs`).
        self.block_output_tensors = blocks

    # --- Running the trunk -------------------------------------------------

    def trunk_intermediates(self, images, last_block: int, attention_mask=None):
        """`(embedding, outputs)`: the input of the first block (patch
        embedding + position embedding) `(B, N, D)` and the outputs of
        blocks `0..last_block` (a list of `(B, N, D)`); no later block runs."""
        if self.remat and attention_mask is not None:
            # TensorFlow's remat (recompute_grad) differentiates every input
            # and takes none by keyword: the mask goes positionally, as 0/1
            # floats (the attention casts it back).
            attention_mask = keras.ops.cast(attention_mask, "float32")
        x = self.position_embedding(self.patch_embedding(images))
        embedding = x = self.flatten_grid(x)
        outputs = []
        for i in range(last_block + 1):
            x = self.blocks[i](x, attention_mask)
            outputs.append(x)
        return embedding, outputs

    def final_norm(self, tokens):
        """`post_trunk_norm`: the norm after the last block."""
        return self.post_trunk_norm(tokens)

    def _run_trunk(self, images, attention_mask, block_indices, final_norm):
        last = max(block_indices, default=-1)
        if final_norm:
            last = self.num_layers - 1
        _, outputs = self.trunk_intermediates(images, last, attention_mask)
        picked = [outputs[i] for i in block_indices]
        return (self.post_trunk_norm(outputs[-1]) if final_norm else None), picked

    def default_lora_layer_names(self) -> list[str]:
        """LoRA targets of `enable_lora(rank)`, as in Apple's release: the
        q and v parts of every fused qkv and the attention output projection."""
        return ["qkv", "proj"]

    def check_images(self, images, exact_size: bool = False) -> None:
        """Raises a `ValueError` naming the problem if `images` do not fit.

        With `exact_size`, height and width must also equal a fixed
        `image_shape` (the functional model's input); otherwise any multiple
        of the patch size is accepted.
        """
        shape = tuple(images.shape)
        where = type(self).__name__
        check_image_shape(shape, self.patch_size, self.image_shape[-1], where)
        if not exact_size:
            return
        for axis, name in ((0, "height"), (1, "width")):
            built, got = self.image_shape[axis], shape[axis + 1]
            if built is not None and got is not None and built != got:
                raise ValueError(
                    f"{where} was built for images of shape "
                    f"{self.image_shape} but received shape {shape} "
                    f"({name} {got} != {built}). Resize the images, use "
                    "block_outputs()/encode() (any multiple of the patch "
                    "size), or build the model with image_shape="
                    f"(None, None, {self.image_shape[-1]})."
                )

    def normalize_block_indices(
        self, indices: Sequence[int] | None
    ) -> list[int]:
        """Turns block indices (negative allowed) into non-negative ints."""
        if indices is None:
            return list(range(self.num_layers))
        result = []
        for index in indices:
            if not isinstance(index, int) or isinstance(index, bool):
                raise TypeError(
                    f"Block indices must be ints; received {index!r} in "
                    f"{indices!r}."
                )
            if not -self.num_layers <= index < self.num_layers:
                raise ValueError(
                    f"Block index {index} is out of range for a trunk with "
                    f"{self.num_layers} blocks; use 0..{self.num_layers - 1} "
                    "(or negative indices from the end)."
                )
            result.append(index % self.num_layers)
        return result

    def block_outputs(self, images, indices: Sequence[int] | None = None):
        """Outputs of transformer blocks, before `post_trunk_norm`.

        Args:
            images: `(B, H, W, C)` ImageNet-normalized floats, H and W
                multiples of `patch_size`.
            indices: block indices (negative count from the end); all
                blocks when `None`.

        Returns:
            A list of `(B, N, D)` tensors, one per index, in the given order.
        """
        self.check_images(images)
        indices = self.normalize_block_indices(indices)
        _, outputs = self._run_trunk(images, None, indices, final_norm=False)
        return outputs

    def extract_features(
        self,
        images,
        block_indices: Sequence[int] | None = None,
        pooling: str | None = None,
    ):
        """Features for downstream use, at any size divisible by the patch.

        Args:
            images: `(B, H, W, C)` ImageNet-normalized float images.
            block_indices: `None` for the post_trunk_norm tokens; otherwise
                the average of these blocks' outputs (before the final norm,
                as the attentive probe uses them).
            pooling: `None` for per-token features, `"mean"` for the mean
                over tokens.

        Returns:
            `(B, N, D)` with `N = H/p * W/p`, or `(B, D)` with `"mean"`.
        """
        if pooling not in (None, "mean"):
            raise ValueError(f"pooling must be None or 'mean'; received {pooling!r}.")
        if block_indices is None:
            self.check_images(images)
            features, _ = self._run_trunk(images, None, (), final_norm=True)
        else:
            if len(block_indices) == 0:
                raise ValueError("block_indices is empty; name at least one block.")
            blocks = self.block_outputs(images, block_indices)
            features = blocks[0]
            for block in blocks[1:]:
                features = features + block
            features = features / len(blocks)
        if pooling == "mean":
            features = keras.ops.mean(features, axis=1)
        return features

    def encode(self, images, attention_mask=None):
        """Runs the trunk, optionally with an attention mask.

        Args:
            images: `(B, H, W, C)` ImageNet-normalized floats.
            attention_mask: boolean, broadcastable to `(B, heads, N, N)`
                (see `keras_aim.layers.prefix_causal_mask`); `None` for full
                bidirectional attention.

        Returns:
            `(B, N, D)` post_trunk_norm tokens.
        """
        self.check_images(images)
        tokens, _ = self._run_trunk(images, attention_mask, (), final_norm=True)
        return tokens

    def __call__(self, images, *args, **kwargs):
        if hasattr(images, "shape"):
            self.check_images(images, exact_size=True)
            image_inputs.warn_if_wrong_scale(images, type(self).__name__, False)
        return super().__call__(images, *args, **kwargs)

    def predict(self, x, batch_size=None, *args, **kwargs):
        """`keras.Model.predict` on normalized images `(n, H, W, C)`; zero
        images and batches too large for memory raise errors that say so."""
        return checked_predict(self, x, batch_size, False, super().predict, *args, **kwargs)

    @property
    def num_patches(self) -> int | None:
        """Tokens per image at `image_shape`, or `None` if it is dynamic."""
        height, width = self.image_shape[:2]
        if height is None or width is None:
            return None
        return (height // self.patch_size) * (width // self.patch_size)

    # --- Serialization ----------------------------------------------------

    @classproperty
    def presets(cls) -> dict:
        """Every preset `from_preset` takes by name, in keras-hub's format:
        `{name: {"metadata": {"description", "params", "image_size",
        "source", "license", ...}}}` (from `aim_presets.listing`)."""
        return aim_presets.listing("backbone")

    @staticmethod
    def get_layout_map(
        device_mesh,
        model_parallel_dim_name: str = "model",
        data_parallel_dim_name: str = "batch",
    ):
        """`keras_aim.distribution.layout_map` (keras-hub's convention): the
        `keras.distribution.LayoutMap` that splits the large kernels of the
        trunk, pixel head and probe over `model_parallel_dim_name`."""
        return distribution.layout_map(
            device_mesh, model_parallel_dim_name, data_parallel_dim_name
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_shape": self.image_shape,
                "patch_size": self.patch_size,
                "hidden_dim": self.hidden_dim,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "remat": self.remat,
            }
        )
        return config

    @classmethod
    def from_preset(
        cls, preset: str, load_weights: bool = True, allow_partial: bool = False, **kwargs
    ):
        """Builds an AIM trunk from a preset.

        `preset` is one of `keras_aim.AIM_PRESETS` (`aim_600m`, `aim_1b`,
        `aim_3b`, `aim_7b`): Apple's released weights are downloaded,
        verified, converted and cached on first use (see
        `keras_aim.loading.preset_cache`), then loaded from the cache. It may
        also be a directory holding the released `.pth` files, a local
        keras-hub preset directory, or a `kaggle://` / `hf://` handle.
        Keyword arguments override the config (e.g. `dtype="bfloat16"`,
        `image_shape=(None, None, 3)`).

        Loading is strict both ways: weights lacking variables of the model
        its config describes, or with other shapes, are refused, and so are
        weights holding more (e.g. a 4-block trunk's under a config of 2
        blocks), unless `allow_partial=True`, which loads only the variables
        the model has (see `keras_aim.loading.strict_weights`).
        """
        with preset_weights(preset, allow_partial, kwargs):
            return cls._from_preset(preset, load_weights, **kwargs)

    @classmethod
    def _from_preset(cls, preset, load_weights: bool, **kwargs):
        name, release_dir = aim_presets.resolve_release(preset)
        if name is not None:
            if not load_weights:
                return cls(**{**aim_presets.get_preset(name)["config"], **kwargs})
            preset = cached_release_preset(cls, name, kwargs.get("dtype"), release_dir)
        if preset_folder.is_local_path(preset):
            preset_folder.check_preset_folder(preset, load_weights)
        limit_heap_fragmentation()  # keeps loading near 1x the weights
        if kwargs.get("dtype") is None and saved_policy_map(preset) is not None:
            kwargs["dtype"] = saved_policy_map(preset)  # a quantized preset
        if not load_weights:
            return super().from_preset(preset, load_weights=False, **kwargs)
        # Loading is strict (a variable the file lacks is an error), so no
        # random initial value survives: skip drawing them.
        with variables_to_be_overwritten():
            return super().from_preset(preset, load_weights=True, **kwargs)


# keras-hub picks a preset's converter and preprocessor classes by the
# backbone class they belong to.
AIMImageConverter.backbone_cls = AIMBackbone
AIMImageClassifierPreprocessor.backbone_cls = AIMBackbone


def evaluation_preprocessor(name: str) -> AIMImageClassifierPreprocessor:
    """The released evaluation preprocessing of preset `name`."""
    height, width = aim_presets.get_preset(name)["config"]["image_shape"][:2]
    return AIMImageClassifierPreprocessor(AIMImageConverter(image_size=(height, width)))


def cached_release_preset(
    cls, name: str, dtype=None, release_dir: str | None = None, progress: bool = True
) -> str:
    """The keras-hub preset folder of released preset `name`'s trunk (and
    its evaluation preprocessor), converting the released file into the
    cache first if no usable cached preset exists."""
    entry = aim_presets.get_preset(name)

    def write(staging: str, target_dtype: str) -> None:
        filename, sha256 = entry["files"]["backbone"]
        source = preset_cache.release_file(
            filename, sha256, aim_presets.RELEASE_BASE_URL, release_dir, progress
        )
        limit_heap_fragmentation()  # before building: keeps conversion near 1x
        with variables_to_be_overwritten():  # the strict load fills every one
            backbone = cls(**entry["config"], dtype=target_dtype)
        load_official_weights(backbone, backbone_file=source)
        backbone.save_to_preset(staging, max_shard_size=preset_cache.SHARD_SIZE_GB)
        evaluation_preprocessor(name).save_to_preset(staging)

    return preset_cache.cached_preset(name, dtype, write)


def checked_predict(model, x, batch_size, expects_pixels: bool, predict, *args, **kwargs):
    """`predict(x, batch_size, ...)` of `model` after checking `x` (not
    empty; a warning if it looks on the wrong scale), with an allocation
    failure explained as a `MemoryError`."""
    where = f"{type(model).__name__}.predict"
    image_inputs.check_not_empty(x, where)
    image_inputs.warn_if_wrong_scale(x, where, expects_pixels)
    with image_inputs.out_of_memory_explained(where, x, batch_size):
        return predict(x, batch_size, *args, **kwargs)


def _check_config(image_shape, patch_size, hidden_dim, num_layers, num_heads):
    check_positive_ints("AIMBackbone", patch_size=patch_size, hidden_dim=hidden_dim,
                        num_layers=num_layers, num_heads=num_heads)
    if len(image_shape) != 3:
        raise ValueError(
            "image_shape must be (height, width, channels); received "
            f"{image_shape}."
        )
    check_patch_multiple(
        image_shape[:2], patch_size, f"image_shape {tuple(image_shape)}",
        "Use a multiple of the patch size, or None for any size.",
    )
    if hidden_dim % num_heads or hidden_dim % 4:
        raise ValueError(
            f"hidden_dim={hidden_dim} must be divisible by num_heads="
            f"{num_heads} and by 4 (for the 2-D sin-cos position embedding)."
        )
