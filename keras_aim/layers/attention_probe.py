"""The attentive probe: attention pooling with one learned query, then a
linear classifier (the released `head`)."""

from __future__ import annotations

import keras
from keras import ops

from keras_aim.utils.arguments import check_positive_ints


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMAttentionProbe(keras.layers.Layer):
    """Attention-pooling classifier head of the released AIM checkpoints.

    1. `bn`: BatchNormalization over D without scale/center (eps 1e-6);
       absent with `use_batch_norm=False`.
    2. One learned query `cls_token` (1, 1, D), used as is (no projection);
       keys `k` and values `v` are bias-free Dense D -> D; multi-head
       attention with `num_heads` heads pools the tokens to `(batch, D)`.
    3. `linear`: Dense D -> num_classes, bias-free unless `use_bias`.

    The AIMv2 LiT image head is the same pooling without batch norm and
    with a biased `linear` D -> D.

    Args:
        hidden_dim: feature width D.
        num_classes: number of output logits.
        num_heads: attention heads (the trunk's).
        epsilon: BatchNormalization epsilon.
        activation: optional activation on the logits.
        use_batch_norm: normalize the features first (AIM-v1's heads).
        use_bias: give `linear` a bias (AIMv2's LiT head).

    Call arguments:
        x: `(batch, N, D)` features (the trunk's averaged block outputs).
        training: BatchNormalization uses batch statistics when `True`.

    Returns:
        `(batch, num_classes)`.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_classes: int,
        num_heads: int,
        epsilon: float = 1e-6,
        activation=None,
        use_batch_norm: bool = True,
        use_bias: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive_ints(type(self).__name__, hidden_dim=hidden_dim,
                            num_classes=num_classes, num_heads=num_heads)
        if hidden_dim % num_heads != 0:
            raise ValueError(
                f"Probe width hidden_dim={hidden_dim} is not divisible by "
                f"num_heads={num_heads}."
            )
        self.hidden_dim = hidden_dim
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.epsilon = epsilon
        self.activation = keras.activations.get(activation)
        self.use_batch_norm = use_batch_norm
        self.use_bias = use_bias
        self.bn = None
        if use_batch_norm:
            self.bn = keras.layers.BatchNormalization(
                center=False,
                scale=False,
                epsilon=epsilon,
                momentum=0.9,  # torch's momentum=0.1
                dtype=self.dtype_policy,
                name="bn",
            )
        self.k = keras.layers.Dense(
            hidden_dim, use_bias=False, dtype=self.dtype_policy, name="k"
        )
        self.v = keras.layers.Dense(
            hidden_dim, use_bias=False, dtype=self.dtype_policy, name="v"
        )
        self.linear = keras.layers.Dense(
            num_classes, use_bias=use_bias, dtype=self.dtype_policy, name="linear"
        )

    def build(self, input_shape):
        if self.bn is not None:
            self.bn.build(input_shape)
        self.k.build(input_shape)
        self.v.build(input_shape)
        self.cls_token = self.add_weight(
            name="cls_token",
            shape=(1, 1, self.hidden_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )
        self.linear.build((input_shape[0], self.hidden_dim))
        self.built = True

    def call(self, x, training=None):
        return self.activation(self.linear(self.pool(x, training=training)))

    def pool(self, x, training=None):
        """Steps 1-2: the pooled features before `linear`, `(batch, D)`
        (timm's `pre_logits`)."""
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        heads, head_dim = self.num_heads, self.hidden_dim // self.num_heads
        if self.bn is not None:
            x = self.bn(x, training=training)
        k = ops.reshape(self.k(x), (batch, length, heads, head_dim))
        v = ops.reshape(self.v(x), (batch, length, heads, head_dim))
        # One query: the attention is a softmax-weighted mean over the
        # tokens, computed elementwise (float32 logits, as Keras' attention
        # does). Not `dot_product_attention`: on TensorFlow its rank-4
        # product with a query length of 1 hits the oneDNN heap corruption
        # described at `scaled_dot_product_attention`.
        q = ops.reshape(ops.cast(self.cls_token, "float32"), (1, 1, heads, head_dim))
        logits = ops.sum(ops.cast(k, "float32") * q, axis=-1) / float(head_dim) ** 0.5
        weights = ops.softmax(logits, axis=1)  # over the tokens: (B, N, H)
        pooled = ops.sum(ops.cast(weights[..., None], v.dtype) * v, axis=1)  # (B, H, hd)
        return ops.reshape(pooled, (batch, self.hidden_dim))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "num_classes": self.num_classes,
                "num_heads": self.num_heads,
                "epsilon": self.epsilon,
                "activation": keras.activations.serialize(self.activation),
                "use_batch_norm": self.use_batch_norm,
                "use_bias": self.use_bias,
            }
        )
        return config
