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
