"""AIM's pre-training objective: next-patch prediction of normalized pixels.

Shapes: images `(B, H, W, C)` (as fed to the model, i.e. already
mean/std-normalized), predictions `(B, N, p*p*C)` with `N = H/p * W/p` in
raster order; the output at position k predicts patch k+1.
"""

from __future__ import annotations

import keras
from keras import ops

PATCH_NORM_EPSILON = 1e-6


def patchify(images, patch_size: int):
    """`(B, H, W, C)` -> `(B, N, p*p*C)`: patches in raster order, each
    flattened in (row-in-patch, column-in-patch, channel) order."""
    batch, height, width, channels = ops.shape(images)
    rows, cols = height // patch_size, width // patch_size
    x = ops.reshape(images, (batch, rows, patch_size, cols, patch_size, channels))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (batch, rows * cols, patch_size * patch_size * channels))


def unpatchify(patches, patch_size: int, grid: tuple[int, int], channels: int = 3):
    """Inverse of `patchify`: `(B, N, p*p*C)` -> `(B, rows*p, cols*p, C)`."""
    rows, cols = grid
    batch = ops.shape(patches)[0]
    x = ops.reshape(patches, (batch, rows, cols, patch_size, patch_size, channels))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (batch, rows * patch_size, cols * patch_size, channels))


def patch_statistics(patches, epsilon: float = PATCH_NORM_EPSILON):
    """Per-patch `(mean, std)` of `(B, N, p*p*C)` patches, each `(B, N, 1)`:
    the mean of the p*p*C values and `sqrt(unbiased variance + epsilon)`."""
    count = patches.shape[-1]
    mean = ops.mean(patches, axis=-1, keepdims=True)
    variance = ops.sum(ops.square(patches - mean), axis=-1, keepdims=True) / (count - 1)
    return mean, ops.sqrt(variance + epsilon)


def normalized_patch_targets(images, patch_size: int, epsilon=PATCH_NORM_EPSILON):
    """Per-patch normalized pixels `(B, N, p*p*C)`: each patch minus its mean,
    divided by `sqrt(unbiased variance + epsilon)`."""
    patches = ops.cast(patchify(images, patch_size), "float32")
    mean, std = patch_statistics(patches, epsilon)
    return (patches - mean) / std


def next_patch_errors(images, predictions, patch_size: int, normalize_targets: bool = True):
    """`(B, N-1)` mean squared error of each next-patch prediction:
    `predictions[:, k]` against patch `k + 1`, per-patch normalized (AIM's
    target) or, with `normalize_targets=False`, its pixels as they are."""
    if normalize_targets:
        targets = normalized_patch_targets(images, patch_size)
    else:
        targets = ops.cast(patchify(images, patch_size), "float32")
    return ops.mean(
        ops.square(ops.cast(predictions[:, :-1], "float32") - targets[:, 1:]), axis=-1
    )


def next_patch_target_mask(prefix_lengths, num_patches: int):
    """`(B, N-1)` float mask of the targets that count: target position
    j in [1, N-1] counts iff `j >= prefix_length` (prefix targets count 0)."""
    positions = ops.arange(1, num_patches, dtype="int32")[None, :]
    prefix = ops.cast(prefix_lengths, "int32")[:, None]
    return ops.cast(ops.greater_equal(positions, prefix), "float32")


def next_patch_pixel_loss(
    images, predictions, prefix_lengths, patch_size: int, normalize_targets: bool = True
):
    """The AIM pre-training loss (scalar).

    Mean squared error between `predictions[:, :-1]` and the normalized
    targets `[:, 1:]`, averaged over the p*p*C values and over the
    non-prefix target positions of the whole batch.

    Args:
        images: `(B, H, W, C)` model inputs.
        predictions: `(B, N, p*p*C)` pixel-head outputs.
        prefix_lengths: `(B,)` ints, the prefix length S of each image.
        patch_size: p.
        normalize_targets: `False` compares with the patches' pixels as
            they are instead of per-patch normalized ones (an ablation).
    """
    error_sum, count = next_patch_pixel_loss_terms(
        images, predictions, prefix_lengths, patch_size, normalize_targets
    )
    return error_sum / ops.maximum(count, 1.0)


def next_patch_pixel_loss_terms(
    images, predictions, prefix_lengths, patch_size: int, normalize_targets: bool = True
):
    """The numerator and denominator of `next_patch_pixel_loss`: the summed
    per-position errors of the counted targets, and their number (scalars).
    Data-parallel replicas add both up across the global batch."""
    errors = next_patch_errors(images, predictions, patch_size, normalize_targets)
    mask = next_patch_target_mask(prefix_lengths, ops.shape(predictions)[1])
    return ops.sum(errors * mask), ops.sum(mask)


@keras.saving.register_keras_serializable(package="keras_aim")
class NormalizedPixelLoss(keras.losses.Loss):
    """`next_patch_pixel_loss` as a Keras loss.

    `loss(images, predictions, sample_weight=next_patch_target_mask(S, N))`
    equals `next_patch_pixel_loss(images, predictions, S, patch_size)`;
    without `sample_weight` every target position counts.
    """

    def __init__(self, patch_size: int, name="normalized_pixel_loss", **kwargs):
        kwargs.setdefault("reduction", "mean_with_sample_weight")
        super().__init__(name=name, **kwargs)
        self.patch_size = patch_size

    def call(self, y_true, y_pred):
        return next_patch_errors(y_true, y_pred, self.patch_size)

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size}
