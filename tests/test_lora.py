"""LoRA on the q/v parts of the fused qkv and on the attention projection."""

import keras
import numpy as np
import pytest

from keras_aim.training.lora import lora_parameter_count, merge_lora
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
