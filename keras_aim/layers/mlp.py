"""The bias-free two-layer GELU MLP of AIM blocks."""

from __future__ import annotations

import math

import keras
from keras import ops


def exact_gelu(x):
    """`x * (1 + erf(x / sqrt(2))) / 2`, written with `erf`.

    The same function as `keras.activations.gelu(x, approximate=False)`,
    but TensorFlow computes that one with `erfc`, an op ONNX does not have:
    a graph exported from TensorFlow to ONNX would not load.
    """
    return 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))

from keras_aim.utils.arguments import check_positive_ints


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMMLP(keras.layers.Layer):
    """`fc2(gelu(fc1(x)))` with exact (erf) GELU and no biases.

    Args:
        hidden_dim: input and output width D.
        intermediate_dim: width of the hidden layer (D * mlp_ratio).

    Call arguments:
        x: `(..., D)`.

    Returns:
        `(..., D)`.
    """

    def __init__(self, hidden_dim: int, intermediate_dim: int, **kwargs):
        super().__init__(**kwargs)
        check_positive_ints(type(self).__name__, hidden_dim=hidden_dim,
                            intermediate_dim=intermediate_dim)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.fc1 = keras.layers.Dense(
            intermediate_dim, use_bias=False, dtype=self.dtype_policy, name="fc1"
        )
        self.fc2 = keras.layers.Dense(
            hidden_dim, use_bias=False, dtype=self.dtype_policy, name="fc2"
        )

    def build(self, input_shape):
        self.fc1.build(input_shape)
        self.fc2.build((*input_shape[:-1], self.intermediate_dim))
        self.built = True

    def call(self, x):
        return self.fc2(exact_gelu(self.fc1(x)))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
            }
        )
        return config



@keras.saving.register_keras_serializable(package="keras_aim")
class AIMSwiGLUMLP(AIMMLP):
    """The bias-free SwiGLU MLP of AIMv2 blocks: `fc2(silu(fc1(x)) * fc3(x))`.

    `fc1` is the gate (it gets the SiLU), `fc3` the linear "up" projection,
    `fc2` the "down" projection: the released key names. Same arguments as
    `AIMMLP`; `intermediate_dim` is the gated width Hm (given explicitly in
    the released models, not as a ratio).

    Call arguments:
        x: `(..., D)`.

    Returns:
        `(..., D)`.
    """

    def __init__(self, hidden_dim: int, intermediate_dim: int, **kwargs):
        super().__init__(hidden_dim, intermediate_dim, **kwargs)
        self.fc3 = keras.layers.Dense(
            intermediate_dim, use_bias=False, dtype=self.dtype_policy, name="fc3"
        )

    def build(self, input_shape):
        super().build(input_shape)
        self.fc3.build(input_shape)

    def call(self, x):
        return self.fc2(keras.activations.silu(self.fc1(x)) * self.fc3(x))
