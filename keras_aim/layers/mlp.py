"""The bias-free two-layer GELU MLP of AIM blocks."""

from __future__ import annotations

import contextlib
import math

import keras
from keras import ops

from keras_aim.utils.arguments import check_positive_ints


_GELU_WITH_ERF = False  # set by `gelu_written_with_erf` while exporting


def exact_gelu(x):
    """`x * (1 + erf(x / sqrt(2))) / 2`: the exact (not tanh) GELU.

    Written as `keras.activations.gelu(x, approximate=False)`, except on
    TensorFlow, and inside `gelu_written_with_erf()`, where it is written
    with `erf`. The two forms are the same function to float32 rounding; the
    choice is about what exporters can read: TensorFlow's GELU uses `erfc`,
    which ONNX lacks; JAX's `lax.erf` lowers to a StableHLO composite that
    the SavedModel's `XlaCallModule` cannot deserialize (so JAX keeps its own
    GELU, written with `erfc`), while the ONNX converter of JAX programs
    reads `lax.erf` but not JAX's GELU.
    """
    if _GELU_WITH_ERF or keras.backend.backend() == "tensorflow":
        return 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))
    return keras.activations.gelu(x, approximate=False)


@contextlib.contextmanager
def gelu_written_with_erf():
    """Within this context `exact_gelu` is written with `erf` on every
    backend (for tracing a model into ONNX from JAX)."""
    global _GELU_WITH_ERF
    previous, _GELU_WITH_ERF = _GELU_WITH_ERF, True
    try:
        yield
    finally:
        _GELU_WITH_ERF = previous


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
