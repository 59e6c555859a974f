"""AIMBackbone: parity with the released implementation, shapes, errors,
presets and saving."""

import os
import shutil

import keras
import keras_hub
import numpy as np
import pytest

import keras_aim
from keras_aim.loading.download import OfflineError
from keras_aim.models.aim.aim_presets import AIM_PRESETS, trunk_parameter_count
from tests.conftest import (
    PARITY_ATOL,
    TINY_CONFIG,
    fixture_path,
    make_tiny_backbone,
    to_numpy,
)


def test_final_tokens_match_reference(tiny_backbone, reference):
    got = to_numpy(tiny_backbone(reference["images_nhwc"]))
    assert got.shape == (3, 16, 64)
    np.testing.assert_allclose(
        got, reference["final_normed_tokens"], atol=PARITY_ATOL
    )


def test_every_block_output_matches_reference(tiny_backbone, reference):
    outputs = tiny_backbone.block_outputs(reference["images_nhwc"])
    assert len(outputs) == 4
    for i, (got, want) in enumerate(zip(outputs, reference["block_outputs"])):
        np.testing.assert_allclose(
            to_numpy(got), want, atol=PARITY_ATOL, err_msg=f"block {i}"
        )


def test_patch_tokens_with_position_match_reference(tiny_backbone, reference):
    b = tiny_backbone
    tokens = b.flatten_grid(
        b.position_embedding(b.patch_embedding(reference["images_nhwc"]))
    )
    np.testing.assert_allclose(
        to_numpy(tokens), reference["patch_tokens_with_pos"], atol=PARITY_ATOL
    )


def test_predict_matches_call(tiny_backbone, reference):
    images = reference["images_nhwc"]
    np.testing.assert_allclose(
        tiny_backbone.predict(images, verbose=0),
        to_numpy(tiny_backbone(images)),
        atol=1e-5,
    )


def test_block_outputs_index_order_and_negative_indices(tiny_backbone, reference):
    images = reference["images_nhwc"]
    picked = tiny_backbone.block_outputs(images, [3, -4, 1])
    for got, index in zip(picked, [3, 0, 1]):
        np.testing.assert_allclose(
            to_numpy(got), reference["block_outputs"][index], atol=PARITY_ATOL
        )


@pytest.mark.parametrize("bad", [[4], [-5]])
def test_block_outputs_out_of_range(tiny_backbone, bad):
    with pytest.raises(ValueError, match="out of range .* 4 blocks"):
        tiny_backbone.block_outputs(np.zeros((1, 32, 32, 3), "float32"), bad)


def test_encode_without_mask_equals_call(tiny_backbone, reference):
    images = reference["images_nhwc"]
    np.testing.assert_allclose(
        to_numpy(tiny_backbone.encode(images)),
        to_numpy(tiny_backbone(images)),
        atol=1e-5,
    )


def test_encode_with_prefix_mask_is_prefix_causal(tiny_backbone, reference):
    """With a prefix-causal mask, token i must not depend on later patches
    outside the prefix."""
    images = reference["images_nhwc"][:1].copy()
    mask = keras_aim.layers.prefix_causal_mask(np.array([4]), 16)
    before = to_numpy(tiny_backbone.encode(images, attention_mask=mask))
    images[:, 24:, 24:, :] += 1.0  # changes the last patch (index 15) only
    after = to_numpy(tiny_backbone.encode(images, attention_mask=mask))
    np.testing.assert_allclose(before[:, :15], after[:, :15], atol=1e-5)
    assert not np.allclose(before[:, 15], after[:, 15])


def test_dynamic_image_shape_any_multiple_of_patch(tiny_backbone, reference):
    dynamic = make_tiny_backbone(image_shape=(None, None, 3))
    dynamic.set_weights(tiny_backbone.get_weights())
    images = reference["images_nhwc"]
    np.testing.assert_allclose(
        to_numpy(dynamic(images)), to_numpy(tiny_backbone(images)), atol=1e-5
    )
    out = dynamic(np.zeros((2, 40, 24, 3), "float32"))
    assert tuple(out.shape) == (2, 15, 64)
    assert dynamic.predict(np.zeros((1, 16, 56, 3)), verbose=0).shape == (
        1, 14, 64
    )


def test_position_embedding_follows_the_actual_grid():
    """Rows of a 5x3 grid get the row code, columns the column code."""
    backbone = make_tiny_backbone(image_shape=(None, None, 3), num_layers=1)
    images = np.zeros((1, 40, 24, 3), "float32")
    embedded = backbone.position_embedding(backbone.patch_embedding(images))
    patches = backbone.patch_embedding(images)
    code = to_numpy(embedded) - to_numpy(patches)
    expected = to_numpy(keras_aim.layers.sincos_2d_position_embedding(5, 3, 64))
    np.testing.assert_allclose(code[0], expected, atol=1e-5)


@pytest.mark.parametrize(
    "shape,message",
    [
        ((32, 32, 3), r"rank 4.*received shape \(32, 32, 3\).*images\[None\]"),
        ((1, 32, 32, 4), r"3 channels.*received shape \(1, 32, 32, 4\)"),
        ((1, 30, 32, 3), r"height 30 is not a multiple of the patch size 8 "
                         r"\(nearest valid sizes: 24 or 32\)"),
        ((1, 32, 35, 3), r"width 35 .* \(nearest valid sizes: 32 or 40\)"),
        ((1, 4, 32, 3), r"height 4 .* \(nearest valid sizes: 8\)"),
    ],
)
def test_bad_image_shapes_raise_clear_errors(shape, message):
    dynamic = make_tiny_backbone(image_shape=(None, None, 3), num_layers=1)
    images = np.zeros(shape, "float32")
    for call in (dynamic, dynamic.block_outputs, dynamic.encode):
        with pytest.raises(ValueError, match=message):
            call(images)


def test_fixed_shape_mismatch_names_the_fix():
    backbone = make_tiny_backbone(num_layers=1)
    with pytest.raises(ValueError, match=r"built for images of shape \(32, 32, 3\)"
                       r".*image_shape=\(None, None, 3\)"):
        backbone(np.zeros((1, 40, 32, 3), "float32"))
    # block_outputs works at any valid size.
    (out,) = backbone.block_outputs(np.zeros((1, 40, 32, 3), "float32"), [0])
    assert tuple(out.shape) == (1, 20, 64)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(image_shape=(30, 32, 3)), r"height 30 is not a multiple .* 24 or 32"),
        (dict(image_shape=(32, 32)), "must be \\(height, width, channels\\)"),
        (dict(hidden_dim=66, num_heads=3), "divisible by num_heads=3 and by 4"),
        (dict(num_layers=0), "num_layers must be a positive int"),
    ],
)
def test_bad_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_tiny_backbone(**overrides)


def test_analytic_parameter_count_matches_built_model():
    backbone = make_tiny_backbone(mlp_ratio=3.0)
    assert backbone.count_params() == trunk_parameter_count(
        64, 4, 8, mlp_ratio=3.0
    )


@pytest.mark.parametrize("name", list(AIM_PRESETS))
def test_preset_parameter_counts_equal_the_spec(name):
    entry = AIM_PRESETS[name]
    config = entry["config"]
    assert trunk_parameter_count(
        config["hidden_dim"], config["num_layers"], config["patch_size"]
    ) == entry["trunk_params"]


SPEC_PARAMS = {
    "aim_600m": 680_535_552,
    "aim_1b": 1_209_370_624,
    "aim_3b": 2_720_025_600,
    "aim_7b": 6_445_404_160,
}


def test_preset_table_carries_the_spec_numbers():
    assert {k: v["trunk_params"] for k, v in AIM_PRESETS.items()} == SPEC_PARAMS
    assert AIM_PRESETS["aim_7b"]["best_probe_layers"] == tuple(range(14, 20))
    assert AIM_PRESETS["aim_1b"]["best_probe_layers"] == tuple(range(12, 18))


@pytest.mark.slow
@pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="builds 680M parameters; once (JAX) is enough for CI",
)
def test_aim_600m_really_built_has_spec_parameter_count():
    classifier = keras_aim.AIMImageClassifier.from_preset(
        "aim_600m", load_weights=False
    )
    backbone = classifier.backbone
    assert backbone.count_params() == SPEC_PARAMS["aim_600m"]
    assert backbone.num_patches == 256
    assert classifier.probe_layers == tuple(range(14, 20))
    assert classifier.preprocessor.image_converter.image_size == (224, 224)
    # Probe: 2D^2 + D + 1000 D trainable, plus BatchNorm's 2D running stats.
    d = 1536
    assert classifier.probe.count_params() == 2 * d * d + d + 1000 * d + 2 * d


def test_from_preset_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="aim_600m, aim_1b, aim_3b, aim_7b"):
        keras_aim.AIMBackbone.from_preset("aim_9b", load_weights=False)


def test_from_preset_offline_without_cache_names_the_file(monkeypatch):
    monkeypatch.setenv("KERAS_AIM_OFFLINE", "1")
    with pytest.raises(OfflineError, match=r"aim_1b_5bimgs_attnprobe_backbone\.pth"
                       r" is not on disk.*downloads"):
        keras_aim.AIMBackbone.from_preset("aim_1b")


def test_save_to_preset_round_trip(tiny_backbone, reference, tmp_path):
    images = reference["images_nhwc"]
    expected = to_numpy(tiny_backbone(images))
    preset = str(tmp_path / "tiny")
    tiny_backbone.save_to_preset(preset)
    assert {"config.json", "metadata.json", "model.weights.h5"} <= set(
        os.listdir(preset)
    )
    for loader in (keras_hub.models.Backbone, keras_aim.AIMBackbone):
        restored = loader.from_preset(preset)
        assert isinstance(restored, keras_aim.AIMBackbone)
        assert restored.get_config() == tiny_backbone.get_config()
        np.testing.assert_array_equal(to_numpy(restored(images)), expected)


def test_keras_file_round_trip(tiny_backbone, reference, tmp_path):
    images = reference["images_nhwc"]
    path = str(tmp_path / "backbone.keras")
    tiny_backbone.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, keras_aim.AIMBackbone)
    np.testing.assert_array_equal(
        to_numpy(restored(images)), to_numpy(tiny_backbone(images))
    )


def test_bfloat16_backbone_runs_with_released_weights(reference):
    backbone = make_tiny_backbone(dtype="bfloat16")
    keras_aim.load_official_weights(
        backbone, backbone_file=fixture_path("backbone.pth")
    )
    assert backbone.blocks[0].attn.qkv.kernel.dtype == "bfloat16"
    got = to_numpy(keras.ops.cast(backbone(reference["images_nhwc"]), "float32"))
    np.testing.assert_allclose(got, reference["final_normed_tokens"], atol=0.1)


def test_config_matches_constructor_arguments():
    config = make_tiny_backbone().get_config()
    for key, value in TINY_CONFIG.items():
        assert config[key] == value


def test_extract_features_at_two_sizes(tiny_backbone, reference):
    images = reference["images_nhwc"]
    final = to_numpy(tiny_backbone.extract_features(images))
    np.testing.assert_allclose(final, reference["final_normed_tokens"], atol=PARITY_ATOL)
    averaged = to_numpy(tiny_backbone.extract_features(images, [2, 3]))
    np.testing.assert_allclose(
        averaged, reference["block_outputs"][2:].mean(0), atol=PARITY_ATOL
    )
    pooled = to_numpy(tiny_backbone.extract_features(images, [2, 3], "mean"))
    np.testing.assert_allclose(pooled, averaged.mean(1), atol=1e-5)
    larger = np.zeros((2, 48, 40, 3), "float32")
    assert tuple(tiny_backbone.extract_features(larger).shape) == (2, 30, 64)
    assert tuple(tiny_backbone.extract_features(larger, [0], "mean").shape) == (2, 64)
    with pytest.raises(ValueError, match="nearest valid sizes"):
        tiny_backbone.extract_features(np.zeros((1, 36, 32, 3), "float32"))
    with pytest.raises(ValueError, match="pooling must be None or 'mean'"):
        tiny_backbone.extract_features(images, pooling="max")


# --- Local preset folders: one clear error per problem ------------------------


def damaged_copy(source, target, change):
    shutil.copytree(source, target)
    change(target)
    return str(target)


def test_damaged_or_incomplete_preset_folders_are_named(tiny_backbone, tmp_path):
    good = tmp_path / "good"
    tiny_backbone.save_to_preset(str(good))
    cases = {
        "config.json' is damaged (not valid JSON": damaged_copy(
            good, tmp_path / "cut_config",
            lambda p: open(p / "config.json", "r+").truncate(50)),
        "model.weights.h5' is damaged": damaged_copy(
            good, tmp_path / "cut_weights",
            lambda p: open(p / "model.weights.h5", "r+").truncate(5000)),
        "has config.json but no weights (model.weights.h5): it is incomplete": damaged_copy(
            good, tmp_path / "config_only", lambda p: os.remove(p / "model.weights.h5")),
        "is not a preset folder: it has no config.json (it holds metadata.json": damaged_copy(
            good, tmp_path / "no_config", lambda p: os.remove(p / "config.json")),
        "does not exist. Pass a released preset name": str(tmp_path / "nowhere"),
    }
    for problem, folder in cases.items():
        for load in (keras_aim.AIMBackbone.from_preset, keras_aim.AIMImageClassifier.from_preset):
            with pytest.raises((ValueError, FileNotFoundError)) as info:
                load(folder)
            message = str(info.value)
            assert problem in message and folder in message, (load, message)
            assert "bert_base_en" not in message


def test_trunk_preset_given_to_the_classifier(tiny_backbone, tmp_path):
    tiny_backbone.save_to_preset(str(tmp_path / "trunk"))
    with pytest.raises(ValueError, match="holds a trunk \\(no task.json\\), not a "
                       "classifier. Pass num_classes=N"):
        keras_aim.AIMImageClassifier.from_preset(str(tmp_path / "trunk"))
    classifier = keras_aim.AIMImageClassifier.from_preset(
        str(tmp_path / "trunk"), num_classes=3, probe_layers=(2, 3)
    )
    assert classifier.num_classes == 3 and classifier.preprocessor is None
    np.testing.assert_array_equal(
        to_numpy(classifier.backbone.blocks[1].mlp.fc1.kernel),
        to_numpy(tiny_backbone.blocks[1].mlp.fc1.kernel),
    )


# --- Strict loading both ways (keras_aim.loading.strict_weights) -------------


def edited_config(folder, **changes):
    """Rewrites `folder`'s config.json: a value of None removes the key."""
    import json

    path = os.path.join(folder, "config.json")
    with open(path) as handle:
        config = json.load(handle)
    for key, value in changes.items():
        config["config"].pop(key, None) if value is None else config["config"].update({key: value})
    with open(path, "w") as handle:
        json.dump(config, handle)


@pytest.mark.parametrize("max_shard_size", [None, 0.0002])  # one file; 5 shards
def test_preset_config_with_fewer_blocks_than_its_weights_is_refused(
    tiny_backbone, tmp_path, max_shard_size
):
    from keras_aim.models import families

    folder = str(tmp_path / "preset")
    tiny_backbone.save_to_preset(folder, max_shard_size=max_shard_size)
    edited_config(folder, num_layers=2)  # the weights hold 4 blocks
    loads = (
        keras_aim.AIMBackbone.from_preset,
        families.backbone_from_preset,
        keras_hub.models.Backbone.from_preset,
        lambda path, **kw: keras_aim.AIMImageClassifier.from_preset(
            path, num_classes=3, probe_layers=(0, 1), **kw),
    )
    for load in loads:
        with pytest.raises(ValueError) as info:
            load(folder)
        message = str(info.value)
        assert ("16 variables in the file that the model lacks: "
                "layers/aim_transformer_block_2/attn/proj/vars/0, ") in message
        assert ", ... (16 in all)" in message
        assert "the file holds 4 aim_transformer_block layers, the model 2" in message
        assert "pass allow_partial=True" in message
    message = str(info.value)
    assert f"{os.path.join(folder, 'config.json')} does not describe" in message
    for load in (loads[0], loads[1], loads[3]):  # asked for by name: the first 2 blocks
        model = load(folder, allow_partial=True)
        backbone = getattr(model, "backbone", model)
        assert backbone.num_layers == 2
        np.testing.assert_array_equal(
            to_numpy(backbone.blocks[1].attn.qkv.kernel),
            to_numpy(tiny_backbone.blocks[1].attn.qkv.kernel),
        )


def test_preset_config_with_more_blocks_or_a_lost_key_names_the_file(tmp_path):
    folder = str(tmp_path / "preset")
    make_tiny_backbone(mlp_ratio=2.0).save_to_preset(folder)
    config = os.path.join(folder, "config.json")
    edited_config(folder, num_layers=6)
    with pytest.raises(ValueError) as info:
        keras_aim.AIMBackbone.from_preset(folder, allow_partial=True)  # never lacking
    message = str(info.value)
    assert "16 variables of the model not in the file: layers/aim_transformer_block_4/" in message
    assert "the file holds 4 aim_transformer_block layers, the model 6" in message
    assert f"Fix: {config} does not describe the model that wrote these weights" in message
    assert "expected 1 variables" not in message  # not Keras' own list
    edited_config(folder, num_layers=4, mlp_ratio=None)
    with pytest.raises(ValueError) as info:
        keras_aim.AIMBackbone.from_preset(folder)
    message = str(info.value)
    assert "8 shape mismatches: layers/aim_transformer_block/mlp/fc1/vars/0 (64, 128) " \
           "in the file, (64, 256) in the model; " in message
    assert "config.json lacks mlp_ratio (default 4.0 used)" in message
    assert keras_aim.AIMBackbone.from_preset(folder, mlp_ratio=2.0).mlp_ratio == 2.0


def test_keras_file_and_weights_file_holding_more_blocks_are_refused(tiny_backbone, tmp_path):
    import json
    import zipfile

    from keras_aim.loading.keras_files import load_model_file

    path = str(tmp_path / "backbone.keras")
    tiny_backbone.save(path)
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    config["config"]["num_layers"] = 2
    files["config.json"] = json.dumps(config)
    shallow = str(tmp_path / "shallow.keras")
    with zipfile.ZipFile(shallow, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    with pytest.raises(ValueError, match=r"(?s)16 variables in the file that the model "
                       r"lacks: .*its config.json does not describe the model"):
        load_model_file(shallow)
    assert load_model_file(shallow, allow_partial=True).num_layers == 2
    restored = load_model_file(path)
    images = np.zeros((1, 32, 32, 3), "float32")
    np.testing.assert_array_equal(to_numpy(restored(images)), to_numpy(tiny_backbone(images)))

    weights = str(tmp_path / "trunk.weights.h5")
    tiny_backbone.save_weights(weights)
    shallow_model = make_tiny_backbone(num_layers=2)
    before = [to_numpy(w) for w in shallow_model.weights]
    with pytest.raises(ValueError, match="16 variables in the file that the model lacks"):
        shallow_model.load_weights(weights)
    for old, new in zip(before, shallow_model.weights):
        np.testing.assert_array_equal(old, to_numpy(new))  # left as it was
    shallow_model.load_weights(weights, allow_partial=True)
    np.testing.assert_array_equal(
        to_numpy(shallow_model.blocks[0].mlp.fc1.kernel),
        to_numpy(tiny_backbone.blocks[0].mlp.fc1.kernel),
    )
