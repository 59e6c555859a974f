"""AIMv2 trunks downstream: the probe and LoRA recipes, the data pipelines'
normalization, the classifier task, LoRA targets and the families' entry
point."""

import keras
import numpy as np
import pytest

import keras_aim
from keras_aim.models import families
from keras_aim.models.aim.aim_image_classifier import resolve_probe_layers
from keras_aim.models.aim.aim_presets import preset_for_architecture
from keras_aim.models.aimv2 import aimv2_presets
from keras_aim.models.aimv2.aimv2_image_converter import CLIP_MEAN, CLIP_STD
from keras_aim.training.lora import lora_parameter_count
from tests import aimv2_tiny
from tests.conftest import to_numpy

SMALL_V2 = dict(image_shape=(56, 56, 3), patch_size=14, hidden_dim=16, num_layers=2,
                num_heads=2, intermediate_dim=24)


@pytest.fixture
def trunk_dir(tmp_path):
    path = str(tmp_path / "trunk")
    keras_aim.AIMv2Backbone(**SMALL_V2).save_to_preset(path)
    return path


def test_probe_recipe_trains_on_an_aimv2_trunk(trunk_dir, tmp_path, capsys):
    from recipes import attentive_probe

    out = tmp_path / "run"
    assert attentive_probe.main(["--backbone", trunk_dir, "--probe-layers", "0,1",
                                 "--epochs", "1", "--verbose", "0", "--out", str(out)]) == 0
    assert "attentive probe on blocks (0, 1): top-1 " in capsys.readouterr().out
    assert (out / "probe.weights.h5").exists()


def test_lora_recipe_adapts_qkv_and_proj_of_an_aimv2_trunk(trunk_dir, tmp_path, capsys):
    from recipes import finetune_lora

    out = tmp_path / "lora"
    assert finetune_lora.main(["--backbone", trunk_dir, "--out", str(out), "--epochs", "1",
                               "--rank", "2", "--probe-layers", "0,1", "--verbose", "0"]) == 0
    assert "LoRA r=2 fine-tuned probe: top-1 " in capsys.readouterr().out
    assert (out / "adapters.lora.h5").exists()


def test_lora_targets_are_qkv_and_proj():
    backbone = keras_aim.AIMv2Backbone(**SMALL_V2)
    backbone.enable_lora(2)
    adapted = sorted({w.path.rsplit("/", 2)[-2] for w in backbone.trainable_weights})
    assert adapted == ["proj", "qkv"]
    d, blocks = 16, 2
    # qkv: q and v parts (A (D, 2r), B (2r, D)); proj: A (D, r), B (r, D).
    assert lora_parameter_count(backbone) == blocks * (2 * (d * 4) + 2 * (d * 2))


def test_classification_data_uses_the_converters_normalization():
    converter = families.evaluation_converter(keras_aim.AIMv2Backbone(**SMALL_V2), 14)
    assert converter.pipeline == "clip"
    gray = np.full((4, 20, 20, 3), 128, "uint8")
    for training, augmentation in ((False, "none"), (True, "shift")):
        batch, _ = next(iter(keras_aim.data.classification_dataset(
            gray, np.zeros(4, "int32"), 4, 14, training=training,
            augmentation=augmentation, converter=converter,
        )))
        expected = (128 / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
        np.testing.assert_allclose(np.asarray(batch)[:, 7, 7], np.tile(expected, (4, 1)), atol=1e-4)


def test_classifier_task_on_aimv2_and_its_probe_layers():
    backbone = aimv2_tiny.fixed_backbone()
    classifier = keras_aim.AIMv2ImageClassifier(backbone, 5, probe_layers=2)
    assert classifier.probe_layers == (1, 2)
    images = aimv2_tiny.outputs("fixed")["images_nhwc"]
    assert tuple(classifier(images).shape) == (2, 5)
    clone = keras_aim.AIMv2ImageClassifier.from_config(classifier.get_config())
    assert isinstance(clone.backbone, keras_aim.AIMv2Backbone)
    with pytest.raises(ValueError, match="'best' is defined only for the released"):
        resolve_probe_layers("best", backbone)


def test_v1_best_blocks_are_never_given_to_an_aimv2_trunk():
    # aimv2-huge has aim_600m's width, depth, heads and patch.
    config = aimv2_presets.get_preset("aimv2_huge_patch14_224")["config"]
    assert preset_for_architecture(config) is None


def test_families_pick_the_class_of_a_preset(trunk_dir, tmp_path):
    assert families.backbone_class("aimv2_large_patch14_native") is keras_aim.AIMv2Backbone
    assert families.backbone_class("aim_600m") is keras_aim.AIMBackbone
    assert families.backbone_class(trunk_dir) is keras_aim.AIMv2Backbone
    with pytest.raises(ValueError, match="Unknown preset 'aimv2_tiny'.*aimv2_large_patch14_224"):
        families.backbone_class("aimv2_tiny")
    lit_dir = str(tmp_path / "lit")
    aimv2_tiny.lit_model(load=False).save_to_preset(lit_dir)
    with pytest.raises(ValueError, match="holds a AIMv2LiT, not an AIM or AIMv2 backbone"):
        families.backbone_class(lit_dir)


@pytest.mark.skipif(
    keras.config.backend() == "tensorflow",
    reason="a remat trunk called without a mask fails on TensorFlow (AIM-v1's too)",
)
def test_remat_gives_the_same_tokens():
    ref = aimv2_tiny.outputs("fixed")
    remat = aimv2_tiny.fixed_backbone(load=False, remat=True)
    remat.set_weights(aimv2_tiny.fixed_backbone().get_weights())
    np.testing.assert_allclose(to_numpy(remat(ref["images_nhwc"])), ref["final_tokens"], atol=1e-4)


def test_mixed_precision_forward_stays_close():
    ref = aimv2_tiny.outputs("fixed")
    plain = aimv2_tiny.fixed_backbone()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        half = aimv2_tiny.fixed_backbone(load=False)
    finally:
        keras.config.set_dtype_policy("float32")
    half.set_weights(plain.get_weights())
    assert half.blocks[0].mlp.fc3.compute_dtype == "bfloat16"
    tokens = to_numpy(keras.ops.cast(half(ref["images_nhwc"]), "float32"))
    assert np.isfinite(tokens).all()
    assert np.abs(tokens - ref["final_tokens"]).mean() < 0.1
