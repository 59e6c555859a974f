"""LoRA on the q/v parts of the fused qkv and on the attention projection."""

import json
import os

import h5py
import keras
import numpy as np
import pytest

from keras_aim.training.lora import (
    LORA_RECORD,
    load_lora_weights,
    lora_parameter_count,
    merge_lora,
    save_lora_weights,
)
from tests.conftest import make_tiny_backbone, to_numpy


def randomize_adapters(backbone, seed=0):
    rng = np.random.RandomState(seed)
    for weight in backbone.trainable_weights:
        weight.assign(rng.randn(*weight.shape).astype("float32") * 0.05)


def test_only_adapters_are_trainable_with_expected_counts(tiny_backbone):
    tiny_backbone.enable_lora(8)
    names = sorted({f"{w.path.split('/')[-2]}/{w.name}" for w in tiny_backbone.trainable_weights})
    assert names == ["proj/lora_kernel_a", "proj/lora_kernel_b",
                     "qkv/lora_kernel_a", "qkv/lora_kernel_b"]
    assert all("attn" in w.path for w in tiny_backbone.trainable_weights)
    # Per block: q and v adapters (2 x (64*8 + 8*64)) + proj (64*8 + 8*64).
    assert lora_parameter_count(tiny_backbone) == 4 * 3 * 1024


def test_adapters_start_as_identity_and_touch_only_q_and_v(tiny_backbone, reference):
    images = reference["images_nhwc"]
    before = to_numpy(tiny_backbone(images))
    base = to_numpy(tiny_backbone.blocks[0].attn.qkv._kernel).copy()
    tiny_backbone.enable_lora(8)
    np.testing.assert_allclose(to_numpy(tiny_backbone(images)), before, atol=1e-6)
    randomize_adapters(tiny_backbone)
    delta = to_numpy(tiny_backbone.blocks[0].attn.qkv.kernel) - base
    assert np.abs(delta[:, :64]).max() > 0  # q
    np.testing.assert_array_equal(delta[:, 64:128], 0)  # k untouched
    assert np.abs(delta[:, 128:]).max() > 0  # v
    assert not np.allclose(to_numpy(tiny_backbone(images)), before, atol=1e-4)


@pytest.mark.parametrize("alpha", [None, 4.0])
def test_adapted_kernel_is_w_plus_scaled_q_and_v_products(tiny_backbone, alpha):
    # W + alpha/r * [A_q B_q, 0, A_v B_v] (alpha defaults to r), in NumPy.
    qkv = tiny_backbone.blocks[0].attn.qkv
    base = to_numpy(qkv._kernel).copy()
    rank = 8
    qkv.enable_lora(rank, lora_alpha=alpha)
    randomize_adapters(tiny_backbone)
    a, b = to_numpy(qkv.lora_kernel_a), to_numpy(qkv.lora_kernel_b)
    scale = (alpha if alpha is not None else rank) / rank
    expected = base.copy()
    expected[:, :64] += scale * a[:, :rank] @ b[:rank]
    expected[:, 128:] += scale * a[:, rank:] @ b[rank:]
    np.testing.assert_allclose(to_numpy(qkv.kernel), expected, atol=1e-6)


def test_merged_weights_give_the_same_outputs(tiny_backbone, reference):
    tiny_backbone.enable_lora(8)
    randomize_adapters(tiny_backbone)
    images = reference["images_nhwc"]
    merged = merge_lora(tiny_backbone)
    assert not merged.blocks[0].attn.qkv.lora_enabled
    np.testing.assert_allclose(
        to_numpy(merged(images)), to_numpy(tiny_backbone(images)), atol=1e-5
    )
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(merged)


def test_adapter_weights_save_and_load_alone(tiny_backbone, reference, tmp_path):
    tiny_backbone.enable_lora(8)
    randomize_adapters(tiny_backbone)
    path = str(tmp_path / "adapters.lora.h5")
    tiny_backbone.save_lora_weights(path)
    assert (tmp_path / "adapters.lora.h5").stat().st_size < 200_000
    fresh = make_tiny_backbone()
    fresh.set_weights(  # the same base weights as tiny_backbone
        [to_numpy(w) for w in tiny_backbone.weights if "lora" not in w.name]
    )
    fresh.load_lora_weights(path)
    np.testing.assert_allclose(
        to_numpy(fresh(reference["images_nhwc"])),
        to_numpy(tiny_backbone(reference["images_nhwc"])),
        atol=1e-5,
    )


def test_classifier_fine_tuning_trains_only_adapters_and_probe(tiny_classifier, reference):
    tiny_classifier.backbone.enable_lora(8)
    trainable = tiny_classifier.trainable_weights
    assert {w.name for w in trainable} == {
        "lora_kernel_a", "lora_kernel_b", "cls_token", "kernel"
    }
    assert all("lora" in w.name or "probe" in w.path for w in trainable)
    base = to_numpy(tiny_classifier.backbone.blocks[1].mlp.fc1.kernel).copy()
    qkv = to_numpy(tiny_classifier.backbone.blocks[1].attn.qkv._kernel).copy()
    tiny_classifier.compile(optimizer=keras.optimizers.AdamW(1e-2))
    tiny_classifier.fit(reference["images_nhwc"], np.array([1, 2, 3]), epochs=1, verbose=0)
    np.testing.assert_array_equal(base, to_numpy(tiny_classifier.backbone.blocks[1].mlp.fc1.kernel))
    np.testing.assert_array_equal(qkv, to_numpy(tiny_classifier.backbone.blocks[1].attn.qkv._kernel))
    assert np.abs(to_numpy(tiny_classifier.backbone.blocks[1].attn.qkv.lora_kernel_b)).max() > 0


# --- Adapter files carry their trunk's shape ----------------------------------


def saved_adapters(backbone, path, rank=4, **enable):
    backbone.enable_lora(rank, **enable)
    randomize_adapters(backbone)
    backbone.save_lora_weights(str(path))  # the backbone's own method
    return str(path)


def assert_refused_untouched(backbone, path, *problems):
    weights = [(w.path, to_numpy(w)) for w in backbone.weights]
    trainable = len(backbone.trainable_weights)
    for load in (load_lora_weights, lambda b, p: b.load_lora_weights(p)):
        with pytest.raises(ValueError) as info:
            load(backbone, path)
        message = str(info.value)
        assert f"Cannot load the LoRA adapters {path}" in message
        assert "nothing was loaded" in message
        for problem in problems:
            assert problem in message, message
    assert [(w.path, to_numpy(w).tolist()) for w in backbone.weights] == [
        (p, v.tolist()) for p, v in weights]
    assert len(backbone.trainable_weights) == trainable


def test_adapter_file_records_its_trunk_shape_and_no_staging_file(tmp_path):
    path = saved_adapters(make_tiny_backbone(), tmp_path / "a.lora.h5")
    with h5py.File(path, "r") as handle:
        record = json.loads(handle.attrs[LORA_RECORD])
    assert record == {"num_layers": 4, "hidden_dim": 64, "rank": 4,
                      "target_layer_names": ["proj", "qkv"]}
    assert sorted(os.listdir(tmp_path)) == ["a.lora.h5"]
    with pytest.raises(ValueError, match="must end in .lora.h5"):
        save_lora_weights(make_tiny_backbone(num_layers=1), str(tmp_path / "a.h5"))


def test_adapters_of_a_deeper_trunk_are_refused_and_the_trunk_left_as_it_was(tmp_path):
    path = saved_adapters(make_tiny_backbone(), tmp_path / "deep.lora.h5")
    assert_refused_untouched(
        make_tiny_backbone(num_layers=2), path,
        "num_layers: 4 in the file, 2 here",
        "4 adapters for layers this trunk lacks: lora/27, lora/28, lora/36, ... (4 in all)",
    )
    assert_refused_untouched(make_tiny_backbone(num_layers=6), path,
                             "num_layers: 4 in the file, 6 here")


@pytest.mark.parametrize(
    "overrides,enable,problem",
    [
        ({"hidden_dim": 32}, None, "hidden_dim: 64 in the file, 32 here"),
        ({}, {"rank": 8}, "rank: 4 in the file, 8 here"),
        ({}, {"rank": 4, "target_layer_names": ["qkv"]},
         "target_layer_names: ['proj', 'qkv'] in the file, ['qkv'] here"),
    ],
)
def test_adapters_of_another_width_rank_or_targets_are_refused(
    tmp_path, overrides, enable, problem
):
    path = saved_adapters(make_tiny_backbone(), tmp_path / "a.lora.h5")
    trunk = make_tiny_backbone(**overrides)
    if enable:
        trunk.enable_lora(**enable)
    assert_refused_untouched(trunk, path, problem)


def test_adapter_files_without_a_record_load_only_into_the_same_trunk(tmp_path, reference):
    import keras_hub

    trained = make_tiny_backbone()
    trained.enable_lora(4)
    randomize_adapters(trained)
    path = str(tmp_path / "older.lora.h5")
    keras_hub.models.Backbone.save_lora_weights(trained, path)  # no record
    for overrides, problem in (
        ({"num_layers": 2}, "4 adapters for layers this trunk lacks"),
        ({"num_layers": 6}, "4 adapted layers of this trunk have no adapters in the file"),
        ({"hidden_dim": 32}, "8 adapter shape mismatches (a, b): lora/9 ((64, 4), (4, 64)) "
                             "in the file, ((32, 4), (4, 32)) here"),
    ):
        assert_refused_untouched(make_tiny_backbone(**overrides), path,
                                 "written without a record of its trunk", problem)
    same = make_tiny_backbone()
    same.set_weights([to_numpy(w) for w in trained.weights if "lora" not in w.name])
    load_lora_weights(same, path)
    images = reference["images_nhwc"]
    np.testing.assert_allclose(to_numpy(same(images)), to_numpy(trained(images)), atol=1e-5)
