"""Unit tests of the AIM layers against the spec's formulas."""

import math

import keras
import numpy as np
import pytest

from keras_aim import layers
from tests.conftest import PARITY_ATOL, needs_torch_backend, to_numpy


from tests.conftest import PARITY_ATOL, make_tiny_backbone, to_numpy


def numpy_sincos(height, width, dim):
    """The spec's formula, written out plainly."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    out = np.zeros((height, width, dim))
    for r in range(height):
        for c in range(width):
            out[r, c] = np.concatenate(
                [np.sin(c * omega), np.cos(c * omega),
                 np.sin(r * omega), np.cos(r * omega)]
            )
    return out


@pytest.mark.parametrize("height,width", [(4, 4), (3, 5), (1, 7)])
def test_sincos_matches_spec_formula(height, width):
    got = to_numpy(layers.sincos_2d_position_embedding(height, width, 16))
    np.testing.assert_allclose(got, numpy_sincos(height, width, 16), atol=1e-5)


def test_sincos_rejects_width_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        layers.sincos_2d_position_embedding(2, 2, 18)


def test_position_embedding_layer_adds_grid_embedding():
    tokens = np.zeros((2, 3, 5, 8), "float32")
    got = to_numpy(layers.AIMSinCosPositionEmbedding()(tokens))
    np.testing.assert_allclose(got[1], numpy_sincos(3, 5, 8), atol=1e-5)


def test_prefix_causal_mask_rule():
    mask = to_numpy(layers.prefix_causal_mask(np.array([1, 3]), 4))
    assert mask.shape == (2, 1, 4, 4)
    for b, prefix in enumerate([1, 3]):
        for i in range(4):
            for j in range(4):
                assert mask[b, 0, i, j] == (j <= i or j < prefix), (b, i, j)


def test_attention_without_mask_equals_all_true_mask():
    attn = layers.AIMAttention(16, 4)
    x = np.random.RandomState(0).randn(2, 5, 16).astype("float32")
    full = np.ones((2, 1, 5, 5), bool)
    np.testing.assert_allclose(
        to_numpy(attn(x)), to_numpy(attn(x, attention_mask=full)), atol=1e-6
    )


def test_attention_matches_manual_multihead_softmax():
    attn = layers.AIMAttention(8, 2)
    x = np.random.RandomState(1).randn(1, 3, 8).astype("float32")
    out = to_numpy(attn(x))
    qkv = x @ to_numpy(attn.qkv.kernel)  # (1, 3, 24) ordered (3, heads, hd)
    qkv = qkv.reshape(1, 3, 3, 2, 4)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(4)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    heads = (weights @ v).transpose(0, 2, 1, 3).reshape(1, 3, 8)
    np.testing.assert_allclose(
        out, heads @ to_numpy(attn.proj.kernel), atol=1e-5
    )


@pytest.mark.parametrize("batch,queries", [(1, 1), (3, 1), (2, 5)])
def test_scaled_dot_product_attention_matches_numpy_with_and_without_mask(batch, queries):
    """The rank-3 TensorFlow path (and Keras' own elsewhere) against NumPy,
    including the shapes with a dimension of 1 (one image, one query) at
    which TensorFlow's oneDNN rank-4 products corrupt the heap."""
    from keras_aim.layers.attention import scaled_dot_product_attention

    rng = np.random.RandomState(2)
    q = rng.randn(batch, queries, 2, 4).astype("float32")
    k, v = (rng.randn(batch, 6, 2, 4).astype("float32") for _ in range(2))
    mask = rng.rand(batch, 1, queries, 6) > 0.3
    mask[..., 0] = True
    for given in (None, mask):
        logits = np.einsum("bthd,bshd->bhts", q, k) / 2.0
        if given is not None:
            logits = np.where(given, logits, -1e30)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        expected = np.einsum("bhts,bshd->bthd", weights, v)
        got = to_numpy(scaled_dot_product_attention(q, k, v, mask=given))
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_attention_rejects_bad_head_count():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        layers.AIMAttention(10, 4)


def test_mlp_is_bias_free_with_exact_gelu():
    mlp = layers.AIMMLP(4, 16)
    x = np.random.RandomState(2).randn(3, 4).astype("float32")
    out = to_numpy(mlp(x))
    assert len(mlp.weights) == 2  # fc1 and fc2 kernels, no biases
    h = x @ to_numpy(mlp.fc1.kernel)
    erf = np.vectorize(math.erf)
    gelu = 0.5 * h * (1 + erf(h / math.sqrt(2)))
    np.testing.assert_allclose(out, gelu @ to_numpy(mlp.fc2.kernel), atol=1e-5)


def test_block_is_pre_norm_residual():
    block = layers.AIMTransformerBlock(8, 2)
    x = np.random.RandomState(3).randn(2, 4, 8).astype("float32")
    out = to_numpy(block(x))
    h = x + to_numpy(block.attn(block.norm_1(x)))
    expected = h + to_numpy(block.mlp(block.norm_2(h)))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_patch_embedding_shapes_and_xavier_fans():
    layer = layers.AIMPatchEmbedding(32, 4)
    out = layer(np.zeros((2, 8, 12, 3), "float32"))
    assert tuple(out.shape) == (2, 2, 3, 32)
    # Xavier-uniform over the (p*p*C, D) = (48, 32) matrix.
    limit = math.sqrt(6 / (48 + 32))
    kernel = to_numpy(layer.proj.kernel)
    assert np.abs(kernel).max() <= limit
    assert np.abs(kernel).max() > 0.9 * limit


def test_probe_shapes_and_batchnorm_modes():
    probe = layers.AIMAttentionProbe(16, 5, 4)
    x = np.random.RandomState(4).randn(3, 6, 16).astype("float32") * 3 + 1
    assert tuple(probe(x).shape) == (3, 5)
    # Only trainable weights: cls_token, k, v, linear (no bias, no BN affine).
    assert len(probe.trainable_weights) == 4
    assert sum(int(np.prod(w.shape)) for w in probe.trainable_weights) == (
        2 * 16 * 16 + 16 + 5 * 16
    )
    inference = to_numpy(probe(x, training=False))
    training = to_numpy(probe(x, training=True))
    assert not np.allclose(inference, training)


def test_swiglu_mlp_gates_fc1_with_silu_times_fc3():
    mlp = layers.AIMSwiGLUMLP(4, 6)
    x = np.random.RandomState(5).randn(3, 4).astype("float32")
    out = to_numpy(mlp(x))
    assert len(mlp.weights) == 3  # fc1, fc3, fc2 kernels, no biases
    gate = x @ to_numpy(mlp.fc1.kernel)
    up = x @ to_numpy(mlp.fc3.kernel)
    hidden = gate / (1 + np.exp(-gate)) * up
    np.testing.assert_allclose(out, hidden @ to_numpy(mlp.fc2.kernel), atol=1e-5)


def numpy_rms_norm(x, scale, epsilon=1e-5):
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + epsilon) * scale


def test_v2_block_is_pre_rms_norm_residual_with_eps_1e5():
    block = layers.AIMv2TransformerBlock(8, 2, 12)
    x = np.random.RandomState(6).randn(2, 4, 8).astype("float32") * 1e-3
    out = to_numpy(block(x))
    assert block.norm_1.epsilon == 1e-5 and block.norm_2.epsilon == 1e-5
    scale = np.random.RandomState(7).uniform(0.5, 1.5, 8).astype("float32")
    block.norm_1.scale.assign(scale)
    out = to_numpy(block(x))
    normed = numpy_rms_norm(x, scale)
    np.testing.assert_allclose(to_numpy(block.norm_1(x)), normed, rtol=1e-4, atol=1e-6)
    h = x + to_numpy(block.attn(normed))
    expected = h + to_numpy(block.mlp(block.norm_2(h)))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_causal_v2_block_ignores_later_tokens():
    block = layers.AIMv2TransformerBlock(8, 2, 12, causal=True)
    x = np.random.RandomState(8).randn(1, 5, 8).astype("float32")
    changed = x.copy()
    changed[:, 3:] = np.random.RandomState(9).randn(1, 2, 8)
    out, out_changed = to_numpy(block(x)), to_numpy(block(changed))
    np.testing.assert_allclose(out[:, :3], out_changed[:, :3], atol=1e-6)
    assert not np.allclose(out[:, 3:], out_changed[:, 3:])
    bidirectional = layers.AIMv2TransformerBlock(8, 2, 12)
    bidirectional.build(x.shape)
    bidirectional.set_weights(block.get_weights())
    assert not np.allclose(to_numpy(bidirectional(x))[:, :3], out[:, :3])


@pytest.mark.parametrize("in_size,out_size", [(4, 4), (4, 6), (6, 4), (16, 24), (16, 9)])
def test_bicubic_weights_rows_sum_to_one_and_identity_at_same_size(in_size, out_size):
    weights = to_numpy(layers.bicubic_resize_weights(in_size, out_size))
    assert weights.shape == (out_size, in_size)
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-6)
    if in_size == out_size:
        np.testing.assert_allclose(weights, np.eye(in_size), atol=1e-7)


@needs_torch_backend
@pytest.mark.parametrize("grid,new_grid", [((4, 4), (6, 5)), ((4, 6), (2, 3)), ((16, 16), (24, 32))])
def test_position_table_resampling_matches_torch_antialiased_bicubic(grid, new_grid):
    import torch

    dim = 8
    layer = layers.AIMLearnedPositionEmbedding(grid, resample=True)
    tokens = np.zeros((1, *new_grid, dim), "float32")
    got = to_numpy(layer(tokens))[0]
    table = to_numpy(layer.position_embedding).reshape(*grid, dim)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(table).permute(2, 0, 1)[None],
        size=new_grid, mode="bicubic", antialias=True, align_corners=False,
    )[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_learned_position_table_adds_rows_in_raster_order():
    layer = layers.AIMLearnedPositionEmbedding((2, 3))
    tokens = np.random.RandomState(10).randn(2, 2, 3, 4).astype("float32")
    got = to_numpy(layer(tokens))
    table = to_numpy(layer.position_embedding)  # (1, 6, 4)
    assert table.shape == (1, 6, 4)
    np.testing.assert_allclose(got, tokens + table.reshape(1, 2, 3, 4), atol=1e-6)


def test_learned_position_table_refuses_another_grid_without_resampling():
    layer = layers.AIMLearnedPositionEmbedding((2, 3))
    layer(np.zeros((1, 2, 3, 4), "float32"))
    with pytest.raises(ValueError, match=r"2x3 patch grid but the images give a 4x3 grid.*resample"):
        layer(np.zeros((1, 4, 3, 4), "float32"))


def test_patch_embedding_rms_norm_variant_round_trips():
    layer = layers.AIMPatchEmbedding(8, 2, 1e-5, normalization="rms_norm")
    out = to_numpy(layer(np.random.RandomState(11).rand(1, 4, 4, 3).astype("float32")))
    conv = to_numpy(layer.proj(np.zeros((1, 4, 4, 3), "float32")))
    assert isinstance(layer.norm, keras.layers.RMSNormalization)
    assert out.shape == conv.shape
    clone = layers.AIMPatchEmbedding.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    with pytest.raises(ValueError, match="normalization must be one of"):
        layers.AIMPatchEmbedding(8, 2, normalization="batch_norm")


def test_attention_pool_without_batch_norm_with_biased_linear():
    pool = layers.AIMAttentionProbe(16, 16, 4, use_batch_norm=False, use_bias=True)
    x = np.random.RandomState(12).randn(2, 5, 16).astype("float32")
    out = to_numpy(pool(x))
    assert pool.bn is None and out.shape == (2, 16)
    names = sorted(w.path.split("/", 1)[1] for w in pool.weights)
    assert names == ["cls_token", "k/kernel", "linear/bias", "linear/kernel", "v/kernel"]
    np.testing.assert_allclose(to_numpy(pool(x, training=True)), out, atol=1e-6)
    clone = layers.AIMAttentionProbe.from_config(pool.get_config())
    assert clone.get_config() == pool.get_config()


# Every layer class of keras_aim.layers, with an input to call it on.
ROUND_TRIP_CASES = {
    "AIMPatchEmbedding": (lambda: layers.AIMPatchEmbedding(16, 4, 1e-5), (2, 8, 8, 3)),
    "AIMSinCosPositionEmbedding": (lambda: layers.AIMSinCosPositionEmbedding(), (2, 2, 3, 16)),
    "AIMFusedQKV": (lambda: layers.AIMFusedQKV(48, use_bias=False), (2, 5, 16)),
    "AIMAttention": (lambda: layers.AIMAttention(16, 4), (2, 5, 16)),
    "AIMMLP": (lambda: layers.AIMMLP(16, 32), (2, 5, 16)),
    "AIMTransformerBlock": (lambda: layers.AIMTransformerBlock(16, 4, 2.0, 1e-5), (2, 5, 16)),
    "AIMAttentionProbe": (lambda: layers.AIMAttentionProbe(16, 3, 4, epsilon=1e-5), (2, 5, 16)),
    "AIMPixelHeadBlock": (lambda: layers.AIMPixelHeadBlock(16, 2.0, 1e-5), (2, 4, 16)),
    "AIMPixelHead": (
        lambda: layers.AIMPixelHead(2, 3, width=16, depth=2, mlp_ratio=2.0, remat=True),
        (2, 4, 16),
    ),
    "AIMPrefixSampler": (lambda: layers.AIMPrefixSampler(16, seed=3, eval_seed=7), (5, 8, 8, 3)),
    "AIMSwiGLUMLP": (lambda: layers.AIMSwiGLUMLP(16, 24), (2, 5, 16)),
    "AIMv2TransformerBlock": (
        lambda: layers.AIMv2TransformerBlock(16, 4, 24, 1e-5, causal=True), (2, 5, 16)
    ),
    "AIMLearnedPositionEmbedding": (
        lambda: layers.AIMLearnedPositionEmbedding((2, 2), resample=True), (2, 3, 2, 16)
    ),
}


def test_round_trip_cases_cover_every_layer_class():
    classes = {
        name for name in layers.__all__
        if isinstance(getattr(layers, name), type)
        and issubclass(getattr(layers, name), keras.layers.Layer)
    }
    assert classes == set(ROUND_TRIP_CASES)


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_CASES))
def test_layer_round_trips_through_config_and_keras_file(name, tmp_path):
    make, shape = ROUND_TRIP_CASES[name]
    layer = make()
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config

    inputs = keras.Input(shape[1:], batch_size=shape[0])
    model = keras.Model(inputs, layer(inputs))
    x = np.random.RandomState(0).normal(size=shape).astype("float32")
    expected = to_numpy(model(x, training=False))
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.layers[-1]) is type(layer)
    assert loaded.layers[-1].get_config() == config
    np.testing.assert_allclose(to_numpy(loaded(x, training=False)), expected, atol=1e-6)


def test_prefix_attention_matches_reference(tiny_backbone, reference):
    tokens = keras.ops.convert_to_tensor(reference["patch_tokens_with_pos"])
    mask = layers.prefix_causal_mask(reference["prefix_lengths"], 16)
    got = to_numpy(tiny_backbone.blocks[0].attn(tokens, attention_mask=mask))
    np.testing.assert_allclose(
        got, reference["prefix_attention_block0_out"], atol=PARITY_ATOL
    )


@pytest.mark.parametrize(
    "build,name",
    [
        (lambda: layers.AIMAttention(64, 0), "AIMAttention: num_heads"),
        (lambda: layers.AIMAttentionProbe(64, 10, 0), "AIMAttentionProbe: num_heads"),
        (lambda: layers.AIMAttentionProbe(64, 0, 4), "AIMAttentionProbe: num_classes"),
        (lambda: layers.AIMMLP(64, 0), "AIMMLP: intermediate_dim"),
        (lambda: layers.AIMPatchEmbedding(64, 0), "AIMPatchEmbedding: patch_size"),
        (lambda: layers.AIMPixelHead(8, width=0), "AIMPixelHead: width"),
        (lambda: layers.AIMPixelHead(8, depth=-1), "AIMPixelHead: depth"),
    ],
)
def test_zero_or_negative_sizes_are_named_not_divided_by(build, name):
    with pytest.raises(ValueError, match=f"{name} must be a positive int; received"):
        build()


def test_zero_image_sizes_are_refused():
    import keras_aim

    with pytest.raises(ValueError, match="AIMImageConverter: height must be a positive int"):
        keras_aim.AIMImageConverter(image_size=(0, 0))
    with pytest.raises(ValueError, match="positive multiple of 8; got 0"):
        keras_aim.data.digits(0)


def test_patch_embedding_output_spec_of_numpy_images():
    """keras-hub's precision check asks a functional model for
    `compute_output_spec(numpy_images)`: the first layer then sees the NumPy
    array itself (Keras read its shape as None before the fix)."""
    layer = layers.AIMPatchEmbedding(16, 4, dtype="mixed_bfloat16")
    spec = layer.compute_output_spec(np.zeros((2, 8, 12, 3), "float32"))
    assert tuple(spec.shape) == (2, 2, 3, 16)
    assert spec.dtype == "bfloat16"
    backbone = make_tiny_backbone(dtype="mixed_bfloat16")
    spec = backbone.compute_output_spec(np.zeros((2, 32, 32, 3), "float32"))
    assert tuple(spec.shape) == (2, 16, 64)
    assert spec.dtype == "bfloat16"
    with pytest.raises(ValueError, match="batch, height, width, channels"):
        layer.compute_output_shape((8, 12, 3))
