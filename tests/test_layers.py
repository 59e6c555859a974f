"""Unit tests of the AIM layers against the spec's formulas."""

import math

import keras
import numpy as np
import pytest

from keras_aim import layers
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
