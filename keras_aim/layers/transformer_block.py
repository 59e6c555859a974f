"""The pre-norm transformer blocks of the AIM (v1) and AIMv2 trunks."""

from __future__ import annotations

import keras
from keras import ops

from keras_aim.layers.attention import AIMAttention, prefix_causal_mask
from keras_aim.layers.mlp import AIMMLP, AIMSwiGLUMLP


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMTransformerBlock(keras.layers.Layer):
    """`x = x + attn(norm_1(x)); x = x + mlp(norm_2(x))`.

    Args:
        hidden_dim: model width D.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of D.
        layer_norm_epsilon: epsilon of both LayerNorms.

    Call arguments:
        x: `(batch, N, D)` tokens.
        attention_mask: optional boolean mask broadcastable to
            `(batch, num_heads, N, N)` (see `prefix_causal_mask`).

    Returns:
        `(batch, N, D)`.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        layer_norm_epsilon: float = 1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.layer_norm_epsilon = layer_norm_epsilon
        self.norm_1 = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="norm_1"
        )
        self.attn = AIMAttention(
            hidden_dim, num_heads, dtype=self.dtype_policy, name="attn"
        )
        self.norm_2 = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="norm_2"
        )
        self.mlp = AIMMLP(
            hidden_dim,
            int(hidden_dim * mlp_ratio),
            dtype=self.dtype_policy,
            name="mlp",
        )

    def build(self, input_shape):
        for layer in (self.norm_1, self.attn, self.norm_2, self.mlp):
            layer.build(input_shape)
        self.built = True

    def call(self, x, attention_mask=None):
        x = x + self.attn(self.norm_1(x), attention_mask=attention_mask)
        return x + self.mlp(self.norm_2(x))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio,
                "layer_norm_epsilon": self.layer_norm_epsilon,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMv2TransformerBlock(keras.layers.Layer):
    """The AIMv2 block: `x = x + attn(norm_1(x)); x = x + mlp(norm_2(x))`
    with RMSNorm (scale only) and a SwiGLU MLP, no biases anywhere.

    The attention is `AIMAttention` (fused bias-free qkv, `(3, heads,
    head_dim)` order); with `causal=True` query `i` sees keys `j <= i` only
    (the LiT text tower).

    Args:
        hidden_dim: model width D.
        num_heads: attention heads.
        intermediate_dim: SwiGLU hidden width Hm.
        norm_epsilon: epsilon of both RMSNorms (1e-5 in the released models).
        causal: causal (lower-triangular) self-attention.

    Call arguments:
        x: `(batch, N, D)` tokens.
        attention_mask: optional boolean mask broadcastable to
            `(batch, num_heads, N, N)`; combined with the causal mask.

    Returns:
        `(batch, N, D)`.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        intermediate_dim: int,
        norm_epsilon: float = 1e-5,
        causal: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.norm_epsilon = norm_epsilon
        self.causal = causal
        self.norm_1 = keras.layers.RMSNormalization(
            epsilon=norm_epsilon, dtype=self.dtype_policy, name="norm_1"
        )
        self.attn = AIMAttention(
            hidden_dim, num_heads, dtype=self.dtype_policy, name="attn"
        )
        self.norm_2 = keras.layers.RMSNormalization(
            epsilon=norm_epsilon, dtype=self.dtype_policy, name="norm_2"
        )
        self.mlp = AIMSwiGLUMLP(
            hidden_dim, intermediate_dim, dtype=self.dtype_policy, name="mlp"
        )

    def build(self, input_shape):
        for layer in (self.norm_1, self.attn, self.norm_2, self.mlp):
            layer.build(input_shape)
        self.built = True

    def call(self, x, attention_mask=None):
        if self.causal:
            # A prefix of length 0 is plain causal attention.
            causal = prefix_causal_mask(ops.zeros((1,), "int32"), ops.shape(x)[1])
            attention_mask = (
                causal if attention_mask is None
                else ops.logical_and(causal, ops.cast(attention_mask, "bool"))
            )
        x = x + self.attn(self.norm_1(x), attention_mask=attention_mask)
        return x + self.mlp(self.norm_2(x))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "norm_epsilon": self.norm_epsilon,
                "causal": self.causal,
            }
        )
        return config
