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
    # ops.* (not operators) so that symbolic prefix lengths work too.
    causal = ops.less_equal(positions[None, :], positions[:, None])  # key <= query
    prefix = ops.cast(prefix_lengths, "int32")[:, None, None]
    in_prefix = ops.less(positions[None, None, :], prefix)  # (B, 1, N)
    return ops.expand_dims(ops.logical_or(causal[None], in_prefix), 1)


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMFusedQKV(keras.layers.Dense):
    """The fused `D -> 3D` qkv projection (outputs ordered q, k, v).

    Its LoRA (`enable_lora(rank)`, as keras-hub's `Backbone.enable_lora`
    calls it) adapts only the q and v parts, as Apple's release does:
    `lora_kernel_a` is `(D, 2r)` = `[A_q | A_v]`, `lora_kernel_b` is
    `(2r, D)` = `[B_q; B_v]`, and the kernel becomes
    `W + alpha/r * [A_q B_q, 0, A_v B_v]`. Saving merges the update into the
    kernel, like Keras' Dense.
    """

    def enable_lora(
        self, rank, lora_alpha=None, a_initializer="he_uniform", b_initializer="zeros"
    ):
        if not self.built:
            raise ValueError("Build the layer before enabling LoRA.")
        if self.lora_enabled:
            raise ValueError("LoRA is already enabled on this layer.")
        if self.quantization_mode is not None:
            raise NotImplementedError("LoRA on a quantized fused qkv is not supported.")
        dim = self.units // 3
        self._tracker.unlock()
        self.lora_kernel_a = self.add_weight(
            name="lora_kernel_a",
            shape=(self._kernel.shape[0], 2 * rank),
            initializer=keras.initializers.get(a_initializer),
            regularizer=self.kernel_regularizer,
        )
        self.lora_kernel_b = self.add_weight(
            name="lora_kernel_b",
            shape=(2 * rank, dim),
            initializer=keras.initializers.get(b_initializer),
            regularizer=self.kernel_regularizer,
        )
        self._kernel.trainable = False
        self._tracker.lock()
        self.lora_enabled = True
        self.lora_rank = rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else rank

    @property
    def kernel(self):
        if not self.lora_enabled:
            return super().kernel
        r = self.lora_rank
        a, b = self.lora_kernel_a, self.lora_kernel_b
        delta_q = ops.matmul(a[:, :r], b[:r])
        delta_v = ops.matmul(a[:, r:], b[r:])
        delta = ops.concatenate([delta_q, ops.zeros_like(delta_q), delta_v], axis=1)
        return ops.cast(
            self._kernel + (self.lora_alpha / r) * delta, self.compute_dtype
        )


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMAttention(keras.layers.Layer):
    """Multi-head self-attention with a fused, bias-free qkv projection.

    The qkv output axis is ordered `(3, num_heads, head_dim)` as in the
    released weights. Attention runs through `keras.ops.dot_product_attention`
    so backends use their fused kernels.

    Args:
        hidden_dim: model width D, divisible by `num_heads`.
        num_heads: number of attention heads.

    Attributes:
        flash_attention: passed to `keras.ops.dot_product_attention`:
            `None` (default) lets the backend pick its fused kernel where it
            can, `True` demands flash attention (an error where the backend,
            device or mask cannot), `False` forbids it. Not saved in the
            config; set it after building, e.g. for a benchmark on a GPU.

    Call arguments:
        x: `(batch, N, D)` tokens.
        attention_mask: optional boolean mask broadcastable to
            `(batch, num_heads, N, N)`; `True` (or 1) means "may attend".

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
        self.flash_attention = None
        self.qkv = AIMFusedQKV(
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
        if attention_mask is not None:
            attention_mask = ops.cast(attention_mask, "bool")  # may be 0/1
        out = ops.dot_product_attention(
            q, k, v, mask=attention_mask, flash_attention=self.flash_attention
        )
        return self.proj(ops.reshape(out, (batch, length, self.hidden_dim)))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {"hidden_dim": self.hidden_dim, "num_heads": self.num_heads}
        )
        return config


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMPrefixSampler(keras.layers.Layer):
    """Samples each image's prefix length S uniformly from [1, N-1].

    In training, draws come from a `SeedGenerator` (a seeded run is
    reproducible; its state is saved with the model). Otherwise the draws
    use the fixed `eval_seed`, so evaluation sees the same prefix lengths
    every time and its loss is comparable across epochs.

    Call arguments:
        images: `(B, H, W, C)`; only the batch size is used.
        training: as usual.

    Returns:
        `(B,)` int32 prefix lengths.
    """

    def __init__(self, num_patches: int, seed=None, eval_seed: int = 1234, **kwargs):
        super().__init__(**kwargs)
        if num_patches < 2:
            raise ValueError(
                f"Pre-training needs at least 2 patches per image; got "
                f"num_patches={num_patches}. Use larger images or smaller patches."
            )
        self.num_patches = num_patches
        self.seed = seed
        self.eval_seed = eval_seed
        # Named after the layer: the state's variable path stays the same
        # however many generators the process made before (checkpoints key
        # variables by path).
        self.seed_generator = keras.random.SeedGenerator(
            seed, name=f"{self.name}_seed_generator"
        )

    def call(self, images, training=None):
        batch = ops.shape(images)[0]
        seed = self.seed_generator if training else self.eval_seed
        replica, replicas = 0, 1
        if keras.config.backend() == "tensorflow":
            # Under tf.distribute each replica holds a slice of the global
            # batch: draw for the whole batch, keep this replica's rows (as
            # one device, or JAX's keras.distribution, would draw them).
            from keras_aim.layers import replicas_tf

            replica, replicas = replicas_tf.replica_position()
        draws = keras.random.randint(
            (batch * replicas,), minval=1, maxval=self.num_patches, dtype="int32", seed=seed
        )
        if replicas == 1:
            return draws
        return ops.slice(draws, (replica * batch,), (batch,))

    def compute_output_shape(self, input_shape):
        return (input_shape[0],)

    def compute_output_spec(self, images, training=None):
        return keras.KerasTensor((images.shape[0],), dtype="int32")

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_patches": self.num_patches,
                "seed": self.seed,
                "eval_seed": self.eval_seed,
            }
        )
        return config
