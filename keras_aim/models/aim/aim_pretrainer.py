"""`AIMPretrainer`: autoregressive pre-training of an AIM trunk with `fit`."""

from __future__ import annotations

import keras
from keras import ops
from keras_hub.models import Task

from keras_aim.layers import AIMPixelHead, AIMPrefixSampler, prefix_causal_mask
from keras_aim.loading.strict_weights import StrictWeights
from keras_aim.models.aim.aim_backbone import AIMBackbone
from keras_aim.training.losses import (
    next_patch_pixel_loss_terms,
    patch_statistics,
    patchify,
    unpatchify,
)
from keras_aim.training.optimizers import pretraining_optimizer

@keras.saving.register_keras_serializable(package="keras_aim")
class AIMPretrainer(StrictWeights, Task):
    """AIM pre-training: prefix-causal trunk + pixel head + normalized-pixel
    loss, trained with `fit` on any backend.

    Inputs are images `(B, H, W, C)` already normalized like the model's
    evaluation inputs (see `keras_aim.data`). Per image a prefix length S is
    drawn from [1, N-1]; the trunk runs with the prefix-causal mask, the
    pixel head predicts every next patch, and the loss counts targets at
    positions >= S. Outputs (e.g. of `predict`) are
    `{"predictions": (B, N, p*p*C), "prefix_lengths": (B,)}`; `evaluate` and
    `predict` use a fixed, seeded set of prefix lengths.

    After training, `pretrainer.backbone` is the trunk for downstream use.

    Args:
        backbone: an `AIMBackbone` with a fixed `image_shape`.
        pixel_head_width, pixel_head_depth, pixel_head_mlp_ratio: the pixel
            head (paper: 2048, 12, 4).
        pixel_head_layer_norm_epsilon: its LayerNorm epsilon.
        seed: seed of the prefix-length draws.
        prefix_attention: `False` pre-trains with plain causal attention and
            counts every next-patch target (the paper's causal baseline).
        normalized_targets: `False` regresses the patches' pixels instead of
            per-patch normalized ones (the paper's raw-pixel ablation).
    """

    backbone_cls = AIMBackbone

    def __init__(
        self,
        backbone: AIMBackbone,
        pixel_head_width: int = 2048,
        pixel_head_depth: int = 12,
        pixel_head_mlp_ratio: float = 4.0,
        pixel_head_layer_norm_epsilon: float = 1e-5,
        seed: int | None = None,
        prefix_attention: bool = True,
        normalized_targets: bool = True,
        preprocessor=None,
        **kwargs,
    ):
        num_patches = backbone.num_patches
        if num_patches is None:
            raise ValueError(
                "AIMPretrainer needs a backbone with a fixed image_shape (its "
                f"image_shape is {backbone.image_shape}); build the backbone "
                "with e.g. image_shape=(224, 224, 3)."
            )
        height, width, channels = backbone.image_shape
        grid = (height // backbone.patch_size, width // backbone.patch_size)

        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.prefix_sampler = AIMPrefixSampler(
            num_patches, seed=seed, causal_only=not prefix_attention, name="prefix_sampler"
        )
        self.pixel_head = AIMPixelHead(
            backbone.patch_size,
            channels,
            width=pixel_head_width,
            depth=pixel_head_depth,
            mlp_ratio=pixel_head_mlp_ratio,
            layer_norm_epsilon=pixel_head_layer_norm_epsilon,
            remat=getattr(backbone, "remat", False),
            dtype=backbone.dtype_policy,
            name="pixel_head",
        )

        # === Functional Model ===
        images = backbone.input
        prefix_lengths = self.prefix_sampler(images)
        mask = prefix_causal_mask(prefix_lengths, num_patches)
        tokens = backbone.encode(images, attention_mask=mask)
        predictions = self.pixel_head(tokens, grid=grid)
        Task.__init__(
            self,
            inputs=images,
            outputs={"predictions": predictions, "prefix_lengths": prefix_lengths},
            **kwargs,
        )

        # === Config ===
        self.pixel_head_width = pixel_head_width
        self.pixel_head_depth = pixel_head_depth
        self.pixel_head_mlp_ratio = pixel_head_mlp_ratio
        self.pixel_head_layer_norm_epsilon = pixel_head_layer_norm_epsilon
        self.seed = seed
        self.prefix_attention = prefix_attention
        self.normalized_targets = normalized_targets
        self.grid = grid

    def compile(self, optimizer="auto", *, total_steps: int | None = None, **kwargs):
        """`optimizer="auto"` is `pretraining_optimizer(total_steps)`: the
        paper's AdamW, clipping and warmup + cosine schedule (constant
        learning rate when `total_steps` is not given). The loss is built
        in; `loss` must not be passed."""
        if kwargs.get("loss") is not None:
            raise ValueError(
                "AIMPretrainer computes its own loss (next_patch_pixel_loss); "
                "do not pass `loss` to compile()."
            )
        kwargs.pop("loss", None)
        if optimizer == "auto":
            optimizer = pretraining_optimizer(total_steps)
        super().compile(optimizer=optimizer, **kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kwargs):
        error_sum, count = next_patch_pixel_loss_terms(
            x,
            y_pred["predictions"],
            y_pred["prefix_lengths"],
            self.backbone.patch_size,
            self.normalized_targets,
        )
        if keras.config.backend() == "tensorflow":
            # Under MirroredStrategy each replica sees part of the batch and
            # the gradients are summed: normalize by the global target count
            # so that the sum is the single-device loss.
            from keras_aim.training.distribution_tf import sum_over_replicas

            count = sum_over_replicas(ops.stop_gradient(count))
        loss = error_sum / ops.maximum(count, 1.0)
        if self.losses:
            loss = loss + ops.sum(ops.stack(self.losses))
        return loss

    def predicted_images(self, images, predictions):
        """Turns predicted next patches back into images for viewing.

        Each predicted (normalized) patch k+1 is mapped back to pixels with
        the true patch's own mean and standard deviation (the loss is blind
        to them; with `normalized_targets=False` the predictions are pixels
        already); patch 0, which nothing predicts, is copied from the input.

        Args:
            images: `(B, H, W, C)` the model inputs.
            predictions: `(B, N, p*p*C)` from `predict(images)["predictions"]`.

        Returns:
            `(B, H, W, C)` images in the input's value range.
        """
        p = self.backbone.patch_size
        patches = patchify(ops.cast(images, "float32"), p)
        predicted = ops.cast(predictions[:, :-1], "float32")
        if self.normalized_targets:
            mean, std = patch_statistics(patches)
            predicted = predicted * std[:, 1:] + mean[:, 1:]
        patches = ops.concatenate([patches[:, :1], predicted], axis=1)
        return unpatchify(patches, p, self.grid, self.backbone.image_shape[-1])

    # The same LayoutMap covers the trunk and the pixel head.
    get_layout_map = staticmethod(AIMBackbone.get_layout_map)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "pixel_head_width": self.pixel_head_width,
                "pixel_head_depth": self.pixel_head_depth,
                "pixel_head_mlp_ratio": self.pixel_head_mlp_ratio,
                "pixel_head_layer_norm_epsilon": self.pixel_head_layer_norm_epsilon,
                "seed": self.seed,
                "prefix_attention": self.prefix_attention,
                "normalized_targets": self.normalized_targets,
            }
        )
        return config
