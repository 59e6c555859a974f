"""Fixed 2-D sine-cosine position embedding, computed for the actual patch grid."""

from __future__ import annotations

import keras
from keras import ops


def sincos_2d_position_embedding(height, width, dim: int, dtype="float32"):
    """Returns the AIM/MAE 2-D sin-cos embedding of a `height x width` grid.

    Channels `[0, dim/2)` encode the column, `[dim/2, dim)` the row; each half
    is `[sin(pos * omega), cos(pos * omega)]` with
    `omega = 1 / 10000 ** (arange(dim/4) / (dim/4))`.

    Args:
        height, width: grid size in patches (Python ints or scalar tensors).
        dim: embedding width, a multiple of 4.
        dtype: output dtype.

    Returns:
        Tensor of shape `(height, width, dim)`.
    """
    if dim % 4 != 0:
        raise ValueError(
            f"The 2-D sin-cos position embedding needs a width divisible by 4; "
            f"received dim={dim}. Use a hidden_dim that is a multiple of 4."
        )
    quarter = dim // 4
    # `arange(0, n)`, never `arange(n)`: jax2onnx (ONNX export on JAX)
    # cannot convert the one-argument form.
    omega = 1.0 / ops.power(
        10000.0, ops.arange(0, quarter, dtype="float32") / float(quarter)
    )

    def encode(positions):  # (n,) -> (n, dim / 2)
        angles = ops.cast(positions, "float32")[:, None] * omega[None, :]
        return ops.concatenate([ops.sin(angles), ops.cos(angles)], axis=-1)

    col = encode(ops.arange(0, width))  # (w, dim/2)
    row = encode(ops.arange(0, height))  # (h, dim/2)
    col = ops.broadcast_to(col[None, :, :], (height, width, dim // 2))
    row = ops.broadcast_to(row[:, None, :], (height, width, dim // 2))
    return ops.cast(ops.concatenate([col, row], axis=-1), dtype)


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMSinCosPositionEmbedding(keras.layers.Layer):
    """Adds the fixed 2-D sin-cos position embedding to patch-grid tokens.

    The embedding has no weights; it is computed for the grid of the input,
    so any number of patch rows and columns works.

    Call arguments:
        inputs: `(batch, grid_height, grid_width, dim)` tokens.

    Returns:
        `(batch, grid_height, grid_width, dim)`: inputs plus the embedding.
    """

    def call(self, inputs):
        shape = ops.shape(inputs)
        embedding = sincos_2d_position_embedding(
            shape[1], shape[2], inputs.shape[-1], dtype=inputs.dtype
        )
        return inputs + embedding[None]

    def compute_output_shape(self, input_shape):
        return input_shape


def bicubic_resize_weights(in_size: int, out_size, dtype="float32"):
    """The `(out_size, in_size)` matrix of antialiased bicubic resampling.

    Row `i` holds the weights output sample `i` takes from the `in_size`
    input samples, as `torch.nn.functional.interpolate(mode="bicubic",
    antialias=True, align_corners=False)` (and PIL) compute them: sample
    centers at `(i + 0.5) * in_size / out_size`, the Keys cubic with
    `a = -0.5`, stretched by the scale when shrinking (antialiasing),
    clipped to the input and normalized to sum 1. This is how timm resamples
    a learned position table to another grid. Written out with `keras.ops`
    (rather than `keras.ops.image.resize`) because the backends' bicubic
    kernels differ (`a = -0.5` or `-0.75`, antialiasing or not): this gives
    the same numbers on every backend. `out_size` may be a tensor.
    """
    out_float = ops.cast(out_size, "float32")
    scale = float(in_size) / out_float
    stretch = ops.maximum(scale, 1.0)  # > 1 when shrinking: wider kernel
    centers = (ops.cast(ops.arange(out_size), "float32") + 0.5) * scale  # (out,)
    taps = ops.cast(ops.arange(in_size), "float32") + 0.5  # (in,)
    t = ops.abs(taps[None, :] - centers[:, None]) / stretch
    a = -0.5
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0  # |t| <= 1
    far = ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a  # 1 < |t| < 2
    weights = ops.where(t <= 1.0, near, ops.where(t < 2.0, far, 0.0))
    weights = weights / ops.sum(weights, axis=1, keepdims=True)
    return ops.cast(weights, dtype)


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMLearnedPositionEmbedding(keras.layers.Layer):
    """Adds a learned position table (AIMv2's `pos_embed`) to grid tokens.

    The table `position_embedding` has shape `(1, grid_h * grid_w, D)`,
    rows in raster order, as released. An input grid of another size is an
    error unless `resample=True`: then the table, viewed as a
    `(grid_h, grid_w, D)` image, is resampled to the input grid with
    antialiased bicubic interpolation (`bicubic_resize_weights`, as timm's
    dynamic image size does). Resampling changes the model's outputs: the
    released models never saw a resampled table.

    Args:
        grid_size: `(grid_h, grid_w)` of the table, in patches.
        resample: resample the table to other grids instead of raising.

    Call arguments:
        inputs: `(batch, h, w, D)` patch tokens.

    Returns:
        `(batch, h, w, D)`: inputs plus the (resampled) table.
    """

    def __init__(self, grid_size, resample: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = tuple(int(s) for s in grid_size)
        self.resample = bool(resample)

    def build(self, input_shape):
        height, width = self.grid_size
        self.position_embedding = self.add_weight(
            name="position_embedding",
            shape=(1, height * width, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )
        self.built = True

    def check_grid(self, grid) -> None:
        """Raises a `ValueError` if `grid` (h, w; `None` for unknown) differs
        from the table's and resampling is off."""
        if self.resample:
            return
        known = [(got, want) for got, want in zip(grid, self.grid_size) if got is not None]
        if any(got != want for got, want in known):
            raise ValueError(
                f"The learned position table covers a {self.grid_size[0]}x"
                f"{self.grid_size[1]} patch grid but the images give a "
                f"{grid[0]}x{grid[1]} grid. Resize the images to the model's "
                "size (its image converter does), or build the model with "
                "resample_position_embedding=True to resample the table "
                "(bicubic; this changes the outputs)."
            )

    def table(self, height, width):
        """The `(height, width, D)` table for a grid (resampled if needed)."""
        grid_h, grid_w = self.grid_size
        table = ops.reshape(
            ops.cast(self.position_embedding, self.compute_dtype), (grid_h, grid_w, -1)
        )
        if not self.resample:
            return table
        rows = bicubic_resize_weights(grid_h, height, self.compute_dtype)  # (h, gh)
        cols = bicubic_resize_weights(grid_w, width, self.compute_dtype)  # (w, gw)
        return ops.einsum("ih,jw,hwd->ijd", rows, cols, table)

    def call(self, inputs):
        self.check_grid(tuple(inputs.shape[1:3]))
        shape = ops.shape(inputs)
        return inputs + self.table(shape[1], shape[2])[None]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"grid_size": self.grid_size, "resample": self.resample})
        return config
