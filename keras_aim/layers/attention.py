"""Multi-head self-attention with one fused qkv projection, and AIM's masks."""

from __future__ import annotations

import keras
from keras import ops


def prefix_causal_mask(prefix_lengths, num_tokens: int):
    """Boolean prefix-causal attention mask.

    Query `i` may attend key `j` iff `j <= i` or `j < prefix_length`: the
    first `prefix_length` tokens see each other, the rest is causal.

    Args:
        prefix_lengths: `(batch,)` integers in `[0, num_tokens]`.
        num_tokens: sequence length N.

    Returns:
        `(batch, 1, N, N)` boolean mask, broadcastable over heads.
    """
    positions = ops.arange(num_tokens, dtype="int32")
    causal = positions[None, :] <= positions[:, None]  # (N, N): key <= query
    prefix = ops.cast(prefix_lengths, "int32")[:, None, None]
    in_prefix = positions[None, None, :] < prefix  # (B, 1, N) keys in prefix
    return ops.logical_or(causal[None], in_prefix)[:, None, :, :]


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMAttention(keras.layers.Layer):
    """Multi-head self-attention with a fused, bias-free qkv projection.

    The qkv output axis is ordered `(3, num_heads, head_dim)` as in the
    released weights. Attention runs through `keras.ops.dot_product_attention`
    so backends use their fused kernels.

    Args:
        hidden_dim: model width D, divisible by `num_heads`.
        num_heads: number of attention heads.

    Call arguments:
        x: `(batch, N, D)` tokens.
        attention_mask: optional boolean mask broadcastable to
            `(batch, num_heads, N, N)`; `True` means "may attend".

    Returns:
        `(batch, N, D)`.
    """

    def __init__(self, hidden_dim: int, num_heads: int, **kwargs):
        super().__init__(**kwargs)
        if hidden_dim % num_heads != 0:
            raise ValueError(
                f"hidden_dim={hidden_dim} is not divisible by "
                f"num_heads={num_heads}; choose a hidden_dim that is a "
                "multiple of num_heads."
            )
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.qkv = keras.layers.Dense(
            3 * hidden_dim, use_bias=False, dtype=self.dtype_policy, name="qkv"
        )
        self.proj = keras.layers.Dense(
            hidden_dim, use_bias=False, dtype=self.dtype_policy, name="proj"
        )

    def build(self, input_shape):
        self.qkv.build(input_shape)
        self.proj.build(input_shape)
        self.built = True

    def call(self, x, attention_mask=None):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        qkv = ops.reshape(
            self.qkv(x), (batch, length, 3, self.num_heads, self.head_dim)
        )
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, hd)
        out = ops.dot_product_attention(q, k, v, mask=attention_mask)
        return self.proj(ops.reshape(out, (batch, length, self.hidden_dim)))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {"hidden_dim": self.hidden_dim, "num_heads": self.num_heads}
        )
        return config
