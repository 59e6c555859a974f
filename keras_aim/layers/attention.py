"""Multi-head self-attention with one fused qkv projection, and AIM's masks."""

from __future__ import annotations

import contextlib

import keras
import numpy as np
from keras import ops

from keras_aim.utils.arguments import check_positive_ints


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
    positions = ops.arange(0, num_tokens, dtype="int32")  # see position_embedding
    # ops.* (not operators) so that symbolic prefix lengths work too.
    causal = ops.less_equal(positions[None, :], positions[:, None])  # key <= query
    prefix = ops.cast(prefix_lengths, "int32")[:, None, None]
    in_prefix = ops.less(positions[None, None, :], prefix)  # (B, 1, N)
    return ops.expand_dims(ops.logical_or(causal[None], in_prefix), 1)


def scaled_dot_product_attention(q, k, v, mask=None, flash_attention=None):
    """Multi-head attention of queries `(B, T, H, hd)` over keys and values
    `(B, S, H, hd)` -> `(B, T, H, hd)`, scaled by `hd ** -0.5`; `mask`
    (boolean, broadcastable to `(B, H, T, S)`) marks the keys a query sees.

    `keras.ops.dot_product_attention`, except on TensorFlow: Keras computes
    it there with `tf.einsum` on rank-4 tensors, and TensorFlow 2.21's
    oneDNN kernels for rank-4 products with a dimension of size 1 (one
    query, one image) corrupt the heap (tensorflow/tensorflow#117700,
    #123109): a native crash in some runs, with no error to catch. This
    path uses rank-3 `matmul`s over `B * H` instead (the same arithmetic;
    logits and softmax in float32, as Keras does). `flash_attention=True`
    always goes to Keras (which says where it cannot run)."""
    if keras.config.backend() != "tensorflow" or flash_attention:
        return ops.dot_product_attention(q, k, v, mask=mask, flash_attention=flash_attention)
    batch, length, heads, head_dim = ops.shape(q)
    keys = ops.shape(k)[1]

    def fold(x, order, shape):  # (B, ., H, hd) -> (B * H, ...)
        return ops.reshape(ops.transpose(x, order), shape)

    logits = ops.matmul(
        fold(q, (0, 2, 1, 3), (batch * heads, length, head_dim)),
        fold(k, (0, 2, 3, 1), (batch * heads, head_dim, keys)),
    )
    logits = ops.reshape(ops.cast(logits, "float32"), (batch, heads, length, keys))
    logits = logits * (1.0 / float(head_dim) ** 0.5)
    if mask is not None:
        logits = ops.where(mask, logits, -0.7 * float(np.finfo("float32").max))
    probs = ops.cast(ops.softmax(logits, axis=-1), v.dtype)
    out = ops.matmul(
        ops.reshape(probs, (batch * heads, length, keys)),
        fold(v, (0, 2, 1, 3), (batch * heads, keys, head_dim)),
    )
    return ops.transpose(ops.reshape(out, (batch, heads, length, head_dim)), (0, 2, 1, 3))


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMFusedQKV(keras.layers.Dense):
    """The fused `D -> 3D` qkv projection (outputs ordered q, k, v).

    Its LoRA (`enable_lora(rank)`, as keras-hub's `Backbone.enable_lora`
    calls it) adapts only the q and v parts, as Apple's release does:
    `lora_kernel_a` is `(D, 2r)` = `[A_q | A_v]`, `lora_kernel_b` is
    `(2r, D)` = `[B_q; B_v]`, and the kernel becomes
    `W + alpha/r * [A_q B_q, 0, A_v B_v]`. Saving merges the update into the
    kernel, like Keras' Dense.

    `quantize(mode)` (what `model.quantize` calls) quantizes it like a plain
    `Dense` (int8, int4 and float8 are tested), and LoRA works on the
    quantized kernel as on a quantized `Dense` (int8, int4): the frozen
    kernel stays quantized, the adapters are float32.
    """

    def enable_lora(
        self, rank, lora_alpha=None, a_initializer="he_uniform", b_initializer="zeros"
    ):
        if not self.built:
            raise ValueError("Build the layer before enabling LoRA.")
        if self.lora_enabled:
            raise ValueError("LoRA is already enabled on this layer.")
        if self.quantization_mode in ("gptq", "awq"):
            raise NotImplementedError(
                f"LoRA on a {self.quantization_mode}-quantized fused qkv is not "
                "supported (nor on a Keras Dense); quantize to int8 or int4 instead."
            )
        dim = self.units // 3
        self._tracker.unlock()
        # float32 adapters whatever the kernel's dtype, as Keras' Dense does.
        self.lora_kernel_a = self.add_weight(
            name="lora_kernel_a",
            shape=(self._kernel.shape[0], 2 * rank),
            initializer=keras.initializers.get(a_initializer),
            dtype="float32",
            regularizer=self.kernel_regularizer,
        )
        self.lora_kernel_b = self.add_weight(
            name="lora_kernel_b",
            shape=(2 * rank, dim),
            initializer=keras.initializers.get(b_initializer),
            dtype="float32",
            regularizer=self.kernel_regularizer,
        )
        self._kernel.trainable = False
        self._tracker.lock()
        self.lora_enabled = True
        self.lora_rank = rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else rank

    @contextlib.contextmanager
    def _as_dense_lora(self):
        """Shows the q/v adapters to Dense's own LoRA code as one plain pair.

        Dense adds `alpha/r * A @ B` to its kernel (float), to its outputs
        (int8, int4) and to the kernel it saves (merged and re-quantized).
        With `B` replaced by the `(2r, 3D)` block matrix
        `[[B_q, 0, 0], [0, 0, B_v]]`, `A @ B` is `[A_q B_q, 0, A_v B_v]`:
        every one of Dense's paths then computes this layer's update, so
        none of them is rewritten here. The variable is put back on exit.
        Re-entrant (Dense's saving hook reads `kernel`).
        """
        if getattr(self, "_lora_view_active", False):
            yield
            return
        variable = self.lora_kernel_b
        rank, dim = self.lora_rank, self.units // 3
        zeros = ops.zeros((rank, dim), variable.dtype)
        b_q, b_v = variable[:rank], variable[rank:]
        self.lora_kernel_b = ops.concatenate(
            [
                ops.concatenate([b_q, zeros, zeros], axis=1),
                ops.concatenate([zeros, zeros, b_v], axis=1),
            ],
            axis=0,
        )
        self._lora_view_active = True
        try:
            yield
        finally:
            self.lora_kernel_b = variable
            self._lora_view_active = False

    @property
    def kernel(self):
        if not self.lora_enabled:
            return super().kernel
        with self._as_dense_lora():
            return super().kernel

    def quantized_call(self, *args, **kwargs):
        if not self.lora_enabled:
            return super().quantized_call(*args, **kwargs)
        with self._as_dense_lora():
            return super().quantized_call(*args, **kwargs)

    def _get_kernel_with_merged_lora(self):
        # Dense's hook for saving: the kernel with the update merged in
        # (re-quantized for int8 and int4).
        if not self.lora_enabled:
            return super()._get_kernel_with_merged_lora()
        with self._as_dense_lora():
            return super()._get_kernel_with_merged_lora()

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes the kernel like Keras' `Dense.quantize`.

        Dense refuses its subclasses by default (`type_check`) because it
        cannot know how they compute; this one computes exactly as Dense
        does (its LoRA aside, handled by `_as_dense_lora`), so it opts in.
        """
        super().quantize(mode, type_check=False, config=config)


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
        check_positive_ints(type(self).__name__, hidden_dim=hidden_dim, num_heads=num_heads)
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
        out = scaled_dot_product_attention(
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


def _one_replica():
    return 0, 1


_replica_position = [_one_replica]


def replica_position() -> tuple[int, int]:
    """`(this replica's index, replicas in sync)` for a layer that draws one
    random value per image of the global batch: replica i holds rows
    `[i * b, (i + 1) * b)` of each global batch of `replicas * b`. `(0, 1)`
    unless a backend's distribution code set a way to find out
    (`set_replica_position`)."""
    return _replica_position[0]()


def set_replica_position(function) -> None:
    """Installs `function() -> (index, count)` as `replica_position`.

    Layers stay backend-agnostic: the distribution code of a backend whose
    replicas each run the model on a slice of the batch
    (`keras_aim.training.distribution_tf`, for tf.distribute) installs its
    own when it makes a strategy. JAX's keras.distribution traces one
    program for the global batch and needs none."""
    _replica_position[0] = function


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMPrefixSampler(keras.layers.Layer):
    """Samples each image's prefix length S uniformly from [1, N-1].

    In training, draws come from a `SeedGenerator` (a seeded run is
    reproducible; its state is saved with the model). Otherwise the draws
    use the fixed `eval_seed`, so evaluation sees the same prefix lengths
    every time and its loss is comparable across epochs.

    With `causal_only`, every prefix length is 1: the prefix-causal mask is
    then plain causal attention and every next-patch target counts (the
    paper's causal baseline).

    Call arguments:
        images: `(B, H, W, C)`; only the batch size is used.
        training: as usual.

    Returns:
        `(B,)` int32 prefix lengths.
    """

    def __init__(
        self,
        num_patches: int,
        seed=None,
        eval_seed: int = 1234,
        causal_only: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_patches < 2:
            raise ValueError(
                f"Pre-training needs at least 2 patches per image; got "
                f"num_patches={num_patches}. Use larger images or smaller patches."
            )
        self.num_patches = num_patches
        self.seed = seed
        self.eval_seed = eval_seed
        self.causal_only = causal_only
        # Named after the layer: the state's variable path stays the same
        # however many generators the process made before (checkpoints key
        # variables by path).
        self.seed_generator = keras.random.SeedGenerator(
            seed, name=f"{self.name}_seed_generator"
        )

    def call(self, images, training=None):
        batch = ops.shape(images)[0]
        if self.causal_only:
            return ops.ones((batch,), dtype="int32")
        seed = self.seed_generator if training else self.eval_seed
        # When each replica holds a slice of the global batch (TensorFlow's
        # tf.distribute): draw for the whole batch, keep this replica's rows,
        # as one device (or JAX's keras.distribution) would draw them.
        replica, replicas = replica_position()
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
                "causal_only": self.causal_only,
            }
        )
        return config
