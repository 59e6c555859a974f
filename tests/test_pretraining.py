"""Pre-training: the objective against the released training code's values,
the pixel head, prefix sampling, the optimizer and fit on every backend."""

import keras
import numpy as np
import pytest

import keras_aim
from keras_aim.training import losses
from keras_aim.layers import AIMPixelHead, AIMPrefixSampler
from tests.conftest import make_tiny_backbone, to_numpy


def tiny_pretrainer(seed=0, **backbone_overrides):
    backbone = make_tiny_backbone(layer_norm_epsilon=1e-5, **backbone_overrides)
    return keras_aim.AIMPretrainer(
        backbone, pixel_head_width=32, pixel_head_depth=2, seed=seed
    )


def test_loss_matches_released_training_code(reference):
    loss = losses.next_patch_pixel_loss(
        reference["loss_images_nhwc"],
        reference["loss_predictions"],
        reference["loss_prefix_lengths"],
        patch_size=8,
    )
    np.testing.assert_allclose(to_numpy(loss), reference["loss_value"], atol=1e-5)


def test_normalized_targets_match_released_training_code(reference):
    targets = losses.normalized_patch_targets(reference["loss_images_nhwc"], 8)
    np.testing.assert_allclose(
        to_numpy(targets), reference["loss_normalized_targets"], atol=1e-5
    )


def test_loss_class_with_target_mask_equals_function(reference):
    mask = losses.next_patch_target_mask(reference["loss_prefix_lengths"], 16)
    loss = losses.NormalizedPixelLoss(patch_size=8)(
        reference["loss_images_nhwc"], reference["loss_predictions"], sample_weight=mask
    )
    np.testing.assert_allclose(to_numpy(loss), reference["loss_value"], atol=1e-5)


def test_target_mask_excludes_prefix_targets():
    mask = to_numpy(losses.next_patch_target_mask(np.array([1, 3, 4]), 5))
    # Targets are positions 1..4; position j counts iff j >= S.
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])


def test_patchify_order_and_round_trip():
    images = np.arange(2 * 4 * 6 * 3, dtype="float32").reshape(2, 4, 6, 3)
    patches = to_numpy(losses.patchify(images, 2))
    assert patches.shape == (2, 6, 12)
    # Patch 1 is rows 0-1, columns 2-3, flattened (row, column, channel).
    np.testing.assert_array_equal(patches[0, 1], images[0, 0:2, 2:4].reshape(-1))
    np.testing.assert_array_equal(
        to_numpy(losses.unpatchify(patches, 2, (2, 3))), images
    )


def test_pixel_head_shapes_and_output_init():
    head = AIMPixelHead(patch_size=4, width=64, depth=2)
    out = head(np.zeros((2, 9, 16), "float32"), grid=(3, 3))
    assert tuple(out.shape) == (2, 9, 48)
    kernel = to_numpy(head.output_proj.kernel)
    # Keras' truncated normal is rescaled to keep variance scale / fan_in.
    expected_std = np.sqrt(1.0 / 13 / 64)
    assert abs(kernel.std() / expected_std - 1) < 0.1
    # Truncated at 2 stddev (Keras' torch backend redraws only 4 times, so
    # about 1 value in 250,000 may lie outside).
    bound = 2 * np.sqrt(1.0 / 13 / 64) / 0.87962566 + 1e-6
    assert np.mean(np.abs(kernel) <= bound) >= 0.999
    np.testing.assert_array_equal(to_numpy(head.output_proj.bias), 0)


def test_pixel_head_block_is_identity_attention_residual():
    head = AIMPixelHead(patch_size=2, width=8, depth=1, layer_norm_epsilon=1e-5)
    x = np.random.RandomState(0).randn(1, 4, 8).astype("float32")
    out = to_numpy(head(x, grid=(2, 2)))
    block = head.blocks[0]
    h = to_numpy(head.input_proj(x)) + to_numpy(
        keras_aim.layers.sincos_2d_position_embedding(2, 2, 8)
    ).reshape(1, 4, 8)
    h = h + to_numpy(block.norm_1(h))
    h = h + to_numpy(block.mlp(block.norm_2(h)))
    np.testing.assert_allclose(
        out, to_numpy(head.output_proj(head.final_norm(h))), atol=1e-5
    )


def test_prefix_sampler_range_seed_and_fixed_evaluation():
    images = np.zeros((4000, 1, 1, 1), "float32")
    draws = to_numpy(AIMPrefixSampler(16, seed=3)(images, training=True))
    assert draws.min() == 1 and draws.max() == 15
    again = to_numpy(AIMPrefixSampler(16, seed=3)(images, training=True))
    np.testing.assert_array_equal(draws, again)  # reproducible
    sampler = AIMPrefixSampler(16, seed=3)
    first = to_numpy(sampler(images[:8], training=False))
    np.testing.assert_array_equal(first, to_numpy(sampler(images[:8], training=False)))
    with pytest.raises(ValueError, match="at least 2 patches"):
        AIMPrefixSampler(1)


def test_optimizer_defaults_follow_the_paper():
    optimizer = keras_aim.pretraining_optimizer(total_steps=1000)
    assert optimizer.beta_1 == 0.9 and optimizer.beta_2 == 0.95
    assert optimizer.epsilon == 1e-8 and optimizer.weight_decay == 0.05
    assert optimizer.global_clipnorm == 1.0
    schedule = optimizer._learning_rate  # the schedule object
    lr = [float(to_numpy(schedule(step))) for step in (0, 25, 500, 1000)]
    np.testing.assert_allclose(lr[0], 1e-6, rtol=1e-4)
    np.testing.assert_allclose(lr[1], 1e-3, rtol=1e-4)  # warmup: 2.5% of 1000
    assert 1e-6 < lr[2] < 1e-3
    assert lr[3] < 1e-8
    pretrainer = tiny_pretrainer()
    decayed = {v.path for v in pretrainer.trainable_variables
               if optimizer._use_weight_decay(v)}
    assert decayed and all(v.endswith("kernel") for v in decayed), decayed
    assert any("qkv" in v for v in decayed)


def test_pretrainer_needs_fixed_image_shape():
    backbone = make_tiny_backbone(image_shape=(None, None, 3))
    with pytest.raises(ValueError, match="fixed image_shape"):
        keras_aim.AIMPretrainer(backbone)


def test_compile_refuses_a_loss():
    with pytest.raises(ValueError, match="computes its own loss"):
        tiny_pretrainer().compile(loss="mse")


def test_fit_evaluate_predict(reference):
    pretrainer = tiny_pretrainer()
    pretrainer.compile(total_steps=4)
    images = reference["loss_images_nhwc"]
    data = np.concatenate([images, images[::-1], images])[:8]
    before = to_numpy(pretrainer.backbone.blocks[0].attn.qkv.kernel).copy()
    history = pretrainer.fit(data, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(before, to_numpy(pretrainer.backbone.blocks[0].attn.qkv.kernel))
    first = pretrainer.evaluate(data, batch_size=4, verbose=0)
    assert first == pretrainer.evaluate(data, batch_size=4, verbose=0)
    outputs = pretrainer.predict(images, verbose=0)
    assert outputs["predictions"].shape == (3, 16, 192)
    assert outputs["prefix_lengths"].shape == (3,)
    picture = to_numpy(pretrainer.predicted_images(images, outputs["predictions"]))
    assert picture.shape == images.shape
    np.testing.assert_array_equal(picture[:, :8, :8], images[:, :8, :8])


def test_predicted_images_of_perfect_predictions_is_the_input(reference):
    pretrainer = tiny_pretrainer()
    images = reference["loss_images_nhwc"]
    targets = to_numpy(losses.normalized_patch_targets(images, 8))
    perfect = np.concatenate([targets[:, 1:], targets[:, :1]], axis=1)
    np.testing.assert_allclose(
        to_numpy(pretrainer.predicted_images(images, perfect)), images, atol=1e-4
    )


def test_trunk_after_pretraining_serves_the_classifier(reference):
    pretrainer = tiny_pretrainer()
    pretrainer.compile()
    pretrainer.fit(reference["loss_images_nhwc"], batch_size=3, epochs=1, verbose=0)
    classifier = keras_aim.AIMImageClassifier(pretrainer.backbone, 10, probe_layers=2)
    assert tuple(classifier(reference["images_nhwc"]).shape) == (3, 10)


def test_save_and_load_pretrainer(reference, tmp_path):
    pretrainer = tiny_pretrainer()
    images = reference["loss_images_nhwc"]
    expected = pretrainer.predict(images, verbose=0)["predictions"]
    path = str(tmp_path / "pretrainer.keras")
    pretrainer.save(path)
    restored = keras.saving.load_model(path, compile=False)
    np.testing.assert_allclose(
        restored.predict(images, verbose=0)["predictions"], expected, atol=1e-6
    )


def test_causal_baseline_uses_prefix_one_and_counts_every_target(reference):
    images = reference["loss_images_nhwc"]
    sampler = AIMPrefixSampler(16, seed=3, causal_only=True)
    for training in (True, False):
        np.testing.assert_array_equal(to_numpy(sampler(images, training=training)), [1, 1, 1])
    # Prefix length 1: the prefix-causal mask is the causal mask.
    mask = to_numpy(keras_aim.layers.prefix_causal_mask(np.ones(3, "int32"), 16))
    np.testing.assert_array_equal(mask[0, 0], np.tril(np.ones((16, 16), bool)))
    causal = keras_aim.AIMPretrainer(
        make_tiny_backbone(layer_norm_epsilon=1e-5), pixel_head_width=32,
        pixel_head_depth=2, seed=0, prefix_attention=False,
    )
    predictions = causal.predict(images, verbose=0)
    np.testing.assert_array_equal(predictions["prefix_lengths"], [1, 1, 1])
    # The loss is the plain mean over every next-patch target.
    expected = np.mean(to_numpy(losses.next_patch_errors(images, predictions["predictions"], 8)))
    y_pred = {k: keras.ops.convert_to_tensor(v) for k, v in predictions.items()}
    np.testing.assert_allclose(to_numpy(causal.compute_loss(images, None, y_pred)), expected,
                               rtol=1e-5)
    assert keras_aim.AIMPretrainer.from_config(causal.get_config()).prefix_attention is False


def test_raw_pixel_targets_are_the_patches_themselves(reference):
    images = reference["loss_images_nhwc"]
    predictions = reference["loss_predictions"]
    patches = to_numpy(losses.patchify(images, 8))
    expected = np.mean((predictions[:, :-1] - patches[:, 1:]) ** 2, axis=-1)
    raw = to_numpy(losses.next_patch_errors(images, predictions, 8, normalize_targets=False))
    np.testing.assert_allclose(raw, expected, rtol=1e-5)
    normalized = to_numpy(losses.next_patch_errors(images, predictions, 8))
    assert not np.allclose(raw, normalized)
    pretrainer = keras_aim.AIMPretrainer(
        make_tiny_backbone(layer_norm_epsilon=1e-5), pixel_head_width=32,
        pixel_head_depth=2, seed=0, normalized_targets=False,
    )
    # Raw predictions are pixels already: shown as they are.
    shown = to_numpy(pretrainer.predicted_images(images, np.concatenate(
        [patches[:, 1:], patches[:, :1]], axis=1)))
    np.testing.assert_allclose(shown, images, atol=1e-5)
    assert keras_aim.AIMPretrainer.from_config(pretrainer.get_config()).normalized_targets is False
