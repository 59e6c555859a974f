"""AIMv2Backbone against Apple's outputs (fixtures/aimv2_tiny/fixed, native),
its feature API, image-size rules and the presets' architecture numbers."""

import keras
import numpy as np
import pytest

import keras_aim
from keras_aim.models.aimv2 import aimv2_presets
from tests import aimv2_tiny
from tests.conftest import PARITY_ATOL, once_in_jax_pass, to_numpy


@pytest.fixture(scope="module")
def fixed():
    return aimv2_tiny.fixed_backbone(), aimv2_tiny.outputs("fixed")


@pytest.fixture(scope="module")
def native():
    return aimv2_tiny.native_backbone(), aimv2_tiny.outputs("native")


def test_fixed_size_model_matches_every_reference_output(fixed):
    backbone, ref = fixed
    images = ref["images_nhwc"]
    np.testing.assert_allclose(to_numpy(backbone(images)), ref["final_tokens"], atol=PARITY_ATOL)
    blocks = backbone.block_outputs(images)
    assert len(blocks) == 3
    for got, want in zip(blocks, ref["block_outputs"]):
        np.testing.assert_allclose(to_numpy(got), want, atol=PARITY_ATOL)
    embedded = backbone.flatten_grid(
        backbone.position_embedding(backbone.patch_embedding(images))
    )
    np.testing.assert_allclose(to_numpy(embedded), ref["embedded_tokens"], atol=PARITY_ATOL)


@pytest.mark.parametrize("size", ["a", "b"])
def test_native_model_matches_reference_at_both_sizes(native, size):
    backbone, ref = native
    images = ref[f"images_{size}_nhwc"]  # 28x42 (grid 4x6) and 49x21 (7x3)
    np.testing.assert_allclose(
        to_numpy(backbone(images)), ref[f"final_tokens_{size}"], atol=PARITY_ATOL
    )
    for got, want in zip(backbone.block_outputs(images), ref[f"block_outputs_{size}"]):
        np.testing.assert_allclose(to_numpy(got), want, atol=PARITY_ATOL)
    grid = backbone.patch_embedding(images)
    np.testing.assert_allclose(
        to_numpy(backbone.position_embedding(keras.ops.zeros_like(grid)))[0].reshape(
            -1, 48
        ),
        ref[f"pos_embed_{size}"],
        atol=1e-5,
    )
    np.testing.assert_allclose(
        to_numpy(backbone.flatten_grid(backbone.position_embedding(grid))),
        ref[f"embedded_tokens_{size}"],
        atol=PARITY_ATOL,
    )


def test_feature_api_is_v1s(fixed):
    backbone, ref = fixed
    images = ref["images_nhwc"]
    pooled = to_numpy(backbone.extract_features(images, pooling="mean"))
    np.testing.assert_allclose(pooled, ref["final_tokens"].mean(1), atol=PARITY_ATOL)
    averaged = to_numpy(backbone.extract_features(images, block_indices=[-2, -1]))
    np.testing.assert_allclose(
        averaged, ref["block_outputs"][1:].mean(0), atol=PARITY_ATOL
    )
    assert backbone.num_patches == 16
    assert backbone.default_lora_layer_names() == ["qkv", "proj"]
    assert len(backbone.block_output_tensors) == 3


def test_native_model_rejects_size_not_multiple_of_patch(native):
    backbone, _ = native
    with pytest.raises(ValueError, match=r"height 30 is not a multiple of the patch size 7"):
        backbone(np.zeros((1, 30, 28, 3), "float32"))


def test_fixed_model_rejects_another_size_without_resampling(fixed):
    backbone, _ = fixed
    images = np.zeros((1, 42, 42, 3), "float32")
    for call in (backbone, backbone.block_outputs, backbone.extract_features):
        with pytest.raises(ValueError, match=r"4x4 patch grid .* 6x6 grid.*resample_position_embedding=True"):
            call(images)


def test_resampled_table_takes_any_size_and_keeps_the_native_grid(fixed):
    backbone, ref = fixed
    resampling = aimv2_tiny.fixed_backbone(
        load=False, image_shape=(None, None, 3), position_grid=(4, 4),
        resample_position_embedding=True,
    )
    resampling.set_weights(backbone.get_weights())
    images = ref["images_nhwc"]
    # At the table's own grid the resampling is the identity.
    np.testing.assert_allclose(to_numpy(resampling(images)), ref["final_tokens"], atol=1e-5)
    larger = np.random.RandomState(0).randn(2, 42, 35, 3).astype("float32")
    assert tuple(resampling(larger).shape) == (2, 30, 48)


def test_config_round_trip_and_keras_file(fixed, tmp_path):
    backbone, ref = fixed
    clone = keras_aim.AIMv2Backbone.from_config(backbone.get_config())
    assert clone.get_config() == backbone.get_config()
    path = str(tmp_path / "aimv2.keras")
    backbone.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, keras_aim.AIMv2Backbone)
    np.testing.assert_allclose(
        to_numpy(loaded(ref["images_nhwc"])), ref["final_tokens"], atol=PARITY_ATOL
    )


def test_bad_configs_get_clear_errors():
    with pytest.raises(ValueError, match="position_embedding must be one of"):
        keras_aim.AIMv2Backbone(**{**aimv2_tiny.TINY_FIXED, "position_embedding": "rope"})
    with pytest.raises(ValueError, match="needs its grid: pass position_grid"):
        keras_aim.AIMv2Backbone(**{**aimv2_tiny.TINY_FIXED, "image_shape": (None, None, 3)})


@pytest.mark.parametrize("name", aimv2_presets.RELEASED_PRESETS)
def test_analytic_parameter_counts_equal_the_release(name):
    entry = aimv2_presets.get_preset(name)
    assert aimv2_presets.parameter_count(entry) == entry["params"]
    shapes = aimv2_presets.state_dict_shapes(entry)
    assert sum(int(np.prod(s)) for s in shapes.values()) == entry["params"]


def test_sixteen_presets_with_pinned_revisions(monkeypatch):
    monkeypatch.delenv("KERAS_AIM_HUB_URL")
    presets = aimv2_presets.AIMV2_PRESETS
    assert len(presets) == 16
    assert all(len(e["revision"]) == 40 for e in presets.values())
    assert presets["aimv2_3b_patch14_448"]["model_id"] == "aimv2-3B-patch14-448"
    assert presets["aimv2_large_patch14_native"]["config"]["position_embedding"] == "sincos"
    url = aimv2_presets.hub_url("apple/aimv2-large-patch14-224", "ac76", "model.safetensors")
    assert url == "https://huggingface.co/apple/aimv2-large-patch14-224/resolve/ac76/model.safetensors"


def test_built_tiny_model_has_the_analytic_count():
    backbone = aimv2_tiny.fixed_backbone(load=False)
    assert backbone.count_params() == aimv2_presets.vision_parameter_count(48, 3, 128, 7, 16)
    lit = aimv2_tiny.lit_model(load=False)
    text = aimv2_presets.text_parameter_count(**aimv2_tiny.TINY_LIT_TEXT)
    heads = aimv2_presets.lit_head_parameter_count(48, 32, 32)
    vision = aimv2_presets.vision_parameter_count(48, 2, 128, 7, 16)
    assert lit.count_params() == vision + text + heads


@pytest.mark.slow
@once_in_jax_pass
def test_real_build_of_aimv2_large_224_has_the_released_count():
    backbone = keras_aim.AIMv2Backbone.from_preset("aimv2_large_patch14_224", load_weights=False)
    assert backbone.count_params() == 309_197_824
