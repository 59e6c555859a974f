"""`AIMPretrainer`: autoregressive pre-training of an AIM trunk with `fit`."""

from __future__ import annotations

import keras
from keras import ops
from keras_hub.models import Task

from keras_aim.backbone import AIMBackbone
from keras_aim.layers import AIMPixelHead, AIMPrefixSampler, prefix_causal_mask
from keras_aim.losses import (
    next_patch_pixel_loss_terms,
    patchify,
    unpatchify,
    PATCH_NORM_EPSILON,
)

# Variables without weight decay: biases, LayerNorm scale/offset (the fixed
# position embeddings have no variables).
NO_WEIGHT_DECAY = ["bias", "gamma", "beta"]


def pretraining_optimizer(
    total_steps: int | None = None,
    learning_rate: float = 1e-3,
    warmup_fraction: float = 0.025,
    warmup_start: float = 1e-6,
    weight_decay: float = 0.05,
    global_clipnorm: float = 1.0,
    gradient_accumulation_steps: int | None = None,
) -> keras.optimizers.Optimizer:
    """The paper's optimizer: AdamW (0.9, 0.95, eps 1e-8), weight decay 0.05
    except biases and norms, global-norm clipping 1.0; with `total_steps`,
    linear warmup from 1e-6 over the first 2.5% then cosine decay to 0,
    else a constant learning rate. With `gradient_accumulation_steps=n`
    (>= 2), the weights change every n-th step with the mean gradient of
    the last n batches (Keras' own accumulation); the schedule counts every
    step, so give `total_steps` in steps, not in updates."""
    schedule = learning_rate
    if total_steps:
        if total_steps < 2:
            raise ValueError(f"total_steps must be >= 2; received {total_steps}.")
        warmup = max(1, round(warmup_fraction * total_steps))
        schedule = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=warmup_start,
            decay_steps=max(1, total_steps - warmup),
            alpha=0.0,
            warmup_target=learning_rate,
            warmup_steps=warmup,
        )
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=weight_decay,
        beta_1=0.9,
        beta_2=0.95,
        epsilon=1e-8,
        global_clipnorm=global_clipnorm,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    optimizer.exclude_from_weight_decay(var_names=NO_WEIGHT_DECAY)
    return optimizer


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMPretrainer(Task):
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
            num_patches, seed=seed, name="prefix_sampler"
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
        )
        if keras.config.backend() == "tensorflow":
            # Under MirroredStrategy each replica sees part of the batch and
            # the gradients are summed: normalize by the global target count
            # so that the sum is the single-device loss.
            from keras_aim.distribution_tf import sum_over_replicas

            count = sum_over_replicas(ops.stop_gradient(count))
        loss = error_sum / ops.maximum(count, 1.0)
        if self.losses:
            loss = loss + ops.sum(ops.stack(self.losses))
        return loss

    def predicted_images(self, images, predictions):
        """Turns predicted next patches back into images for viewing.

        Each predicted (normalized) patch k+1 is mapped back to pixels with
        the true patch's own mean and standard deviation (the loss is blind
        to them); patch 0, which nothing predicts, is copied from the input.

        Args:
            images: `(B, H, W, C)` the model inputs.
            predictions: `(B, N, p*p*C)` from `predict(images)["predictions"]`.

        Returns:
            `(B, H, W, C)` images in the input's value range.
        """
        p = self.backbone.patch_size
        patches = patchify(ops.cast(images, "float32"), p)
        mean = ops.mean(patches, axis=-1, keepdims=True)
        count = patches.shape[-1]
        std = ops.sqrt(
            ops.sum(ops.square(patches - mean), axis=-1, keepdims=True) / (count - 1)
            + PATCH_NORM_EPSILON
        )
        predicted = ops.cast(predictions[:, :-1], "float32") * std[:, 1:] + mean[:, 1:]
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
            }
        )
        return config
