"""The trunk and classifier under keras.distribution on 8 (virtual) devices.

Run with KERAS_BACKEND=jax and
XLA_FLAGS=--xla_force_host_platform_device_count=8 (`.ci/run` does); the
pass `-m multi_device` fails on fewer devices (tests/conftest.py).
"""

import contextlib

import keras
import numpy as np
import pytest

import keras_aim
from tests.conftest import (
    assert_same_training,
    fixture_path,
    make_tiny_classifier,
    to_numpy,
    training_record,
)


pytestmark = pytest.mark.multi_device


def _devices():
    if keras.config.backend() != "jax":
        return []
    return keras.distribution.list_devices("cpu")


@pytest.mark.skipif(
    len(_devices()) < 8,
    reason="needs JAX with XLA_FLAGS=--xla_force_host_platform_device_count=8",
)
def test_data_parallel_classifier_matches_single_device(reference):
    images = np.concatenate([reference["images_nhwc"]] * 3)[:8]
    single = make_tiny_classifier()
    keras_aim.load_official_weights(single, fixture_path("model.safetensors"))
    expected = to_numpy(single(images))

    distribution = keras.distribution.DataParallel(devices=_devices()[:8])
    with distribution.scope():
        parallel = make_tiny_classifier()
        keras_aim.load_official_weights(parallel, fixture_path("model.safetensors"))
        logits = parallel.predict(images, batch_size=8, verbose=0)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    np.testing.assert_allclose(logits, np.concatenate([reference["logits"]] * 3)[:8], atol=1e-4)


# --- keras_aim.distribution: layouts, training steps, presets -------------

needs_8_devices = pytest.mark.skipif(
    len(_devices()) < 8,
    reason="needs JAX with XLA_FLAGS=--xla_force_host_platform_device_count=8",
)
PIXEL_HEAD = dict(pixel_head_width=32, pixel_head_depth=2)


def _tiny_pretrainer(seed=0):
    from tests.conftest import make_tiny_backbone

    pretrainer = keras_aim.AIMPretrainer(make_tiny_backbone(), seed=seed, **PIXEL_HEAD)
    # The paper's AdamW, clipping and weight decay at a constant 1e-3. (Adam's
    # first step is ~lr * sign(gradient): near-zero gradients, summed in a
    # different order on a mesh, can move by up to lr * their relative noise.)
    pretrainer.compile(optimizer=keras_aim.pretraining_optimizer(learning_rate=1e-3))
    return pretrainer


def _partition(variable) -> tuple:
    """The mesh axis of each dimension of a variable's (JAX) array."""
    spec = tuple(variable.value.sharding.spec)
    return spec + (None,) * (len(variable.shape) - len(spec))


def _assert_sharded_as_promised(variables, layouts):
    sharded = 0
    for variable in variables:
        layout = layouts[variable.path]
        expected = tuple(layout.axes) if layout else (None,) * len(variable.shape)
        assert _partition(variable) == expected, variable.path
        if int(np.prod(variable.shape)) > 1024:  # nothing large is replicated
            assert "model" in expected, variable.path
            sharded += 1
    return sharded


@needs_8_devices
def test_every_large_variable_is_sharded_as_the_layout_map_promises(reference):
    distribution = keras_aim.distribution.distribution_for_mesh("2x4", _devices())
    layouts = distribution._layout_map
    with distribution.scope():
        pretrainer = _tiny_pretrainer()
        classifier = make_tiny_classifier()
        pretrainer.train_on_batch(np.random.default_rng(0).normal(size=(8, 32, 32, 3)))
    # trunk (4 x qkv, proj, fc1, fc2 + patch kernel) + pixel head (2 x fc1,
    # fc2 + in/out projections)
    assert _assert_sharded_as_promised(pretrainer.weights, layouts) == 4 * 4 + 1 + 2 * 2 + 2
    # trunk + probe k, v, linear is small (640) but sharded too
    assert _assert_sharded_as_promised(classifier.weights, layouts) == 4 * 4 + 1 + 2
    assert _partition(classifier.get_layer("probe").linear.kernel) == ("model", None)
    # AdamW's moments follow their variables' layouts.
    qkv = pretrainer.backbone.blocks[0].attn.qkv.kernel
    moments = [v for v in pretrainer.optimizer.variables if v.shape == qkv.shape]
    assert moments and all(_partition(m) == (None, "model") for m in moments)


_SINGLE_DEVICE = {}


def _single_device_training(images):
    """Initial weights and the training record on one device (computed once)."""
    if not _SINGLE_DEVICE:
        pretrainer = _tiny_pretrainer()
        _SINGLE_DEVICE["initial"] = pretrainer.get_weights()
        _SINGLE_DEVICE["record"] = training_record(pretrainer, images)
    return _SINGLE_DEVICE


@needs_8_devices
@pytest.mark.parametrize("mesh", ["8x1", "2x4", "1x8"])
def test_training_steps_match_a_single_device(mesh):
    """Gradients and three optimizer steps on the mesh equal those on one
    device."""
    images = np.random.default_rng(1).normal(size=(8, 32, 32, 3)).astype("float32")
    single = _single_device_training(images)
    distribution = keras_aim.distribution.distribution_for_mesh(mesh, _devices())
    expected_type = "DataParallel" if mesh == "8x1" else "ModelParallel"
    assert type(distribution).__name__ == expected_type
    with distribution.scope():
        parallel = _tiny_pretrainer()
        parallel.set_weights(single["initial"])
    record = training_record(parallel, images, scope=distribution.scope)
    assert_same_training(single["record"], record)


@needs_8_devices
def test_preset_loaded_in_the_scope_is_sharded(tmp_path, tiny_backbone):
    tiny_backbone.save_to_preset(str(tmp_path / "preset"))
    distribution = keras_aim.distribution.distribution_for_mesh("2x4", _devices())
    with distribution.scope():
        loaded = keras_aim.AIMBackbone.from_preset(str(tmp_path / "preset"))
    layouts = keras_aim.AIMBackbone.get_layout_map(distribution.device_mesh)
    assert _assert_sharded_as_promised(loaded.weights, layouts) == 4 * 4 + 1
    for weight, original in zip(loaded.weights, tiny_backbone.weights):
        np.testing.assert_array_equal(to_numpy(weight), to_numpy(original))


@needs_8_devices
def test_recipe_rejects_an_indivisible_batch_before_computing(monkeypatch, tmp_path, capsys):
    from recipes import pretrain

    monkeypatch.setattr(pretrain, "build_pretrainer", lambda *a: pytest.fail("built"))
    assert pretrain.main(["--config", "tiny", "--workdir", str(tmp_path),
                          "--mesh", "8x1", "--batch-size", "12"]) == 1
    assert "batch size 12 is not divisible by the 8 batch-axis" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@needs_8_devices
def test_lora_recipe_trains_on_a_2x4_mesh_with_accumulation(tmp_path, capsys):
    from recipes import finetune_lora

    backbone = keras_aim.AIMBackbone(
        image_shape=(16, 16, 3), patch_size=4, hidden_dim=32, num_layers=2, num_heads=2
    )
    backbone.save_to_preset(str(tmp_path / "trunk"))
    assert finetune_lora.main([
        "--backbone", str(tmp_path / "trunk"), "--out", str(tmp_path / "lora"),
        "--epochs", "1", "--rank", "2", "--probe-layers", "0,1", "--verbose", "0",
        "--mesh", "2x4", "--accumulate", "2", "--batch-size", "64",
    ]) == 0
    assert "LoRA r=2 fine-tuned probe: top-1 " in capsys.readouterr().out
    assert finetune_lora.main([
        "--backbone", str(tmp_path / "trunk"), "--out", str(tmp_path / "lora2"),
        "--mesh", "2x4", "--batch-size", "63",
    ]) == 1
    assert "63" in capsys.readouterr().err


# --- Orbax checkpoints of sharded state ---------------------------------------


def _trained_under(mesh, checkpoints_dir):
    """A tiny pretrainer built and stepped under `mesh`, saved at step 1."""
    from keras_aim.training.checkpointing import TrainingCheckpoints

    images = np.random.default_rng(2).normal(size=(8, 32, 32, 3)).astype("float32")
    with keras_aim.distribution.distribution_for_mesh(mesh, _devices()).scope():
        pretrainer = _tiny_pretrainer()
        pretrainer.train_on_batch(images)
        with TrainingCheckpoints(checkpoints_dir) as checkpoints:
            checkpoints.save(pretrainer, 1)
    return pretrainer


@needs_8_devices
def test_a_2x4_checkpoint_restores_on_8x1_1x8_and_one_device(tmp_path):
    from keras_aim.training.checkpointing import TrainingCheckpoints, training_variables

    saved = _trained_under("2x4", tmp_path)
    expected = {
        (group, key): to_numpy(v)
        for group, members in training_variables(saved).items() for key, v in members.items()
    }
    assert len(expected) > 100
    for mesh in ("8x1", "1x8", None):
        scope = (keras_aim.distribution.distribution_for_mesh(mesh, _devices()).scope()
                 if mesh else contextlib.nullcontext())
        with scope:
            pretrainer = _tiny_pretrainer()
            with TrainingCheckpoints(tmp_path) as checkpoints:
                assert checkpoints.restore(pretrainer) == 1
        restored = training_variables(pretrainer)
        for (group, key), value in expected.items():
            variable = restored[group][key]
            np.testing.assert_array_equal(to_numpy(variable), value, err_msg=f"{mesh} {key}")
        qkv = restored["model"]["block_0/attn/qkv/kernel"].value
        if mesh == "1x8":  # restored straight into the target layout
            assert _partition(pretrainer.backbone.blocks[0].attn.qkv.kernel) == (None, "model")
        if mesh is None:
            assert len(qkv.sharding.device_set) == 1


@needs_8_devices
def test_saving_a_sharded_state_never_gathers_an_array_on_the_host(tmp_path, monkeypatch):
    from jax._src import array as jax_array

    from keras_aim.training.checkpointing import TrainingCheckpoints

    gathered = []
    value = jax_array.ArrayImpl._value

    def recording_value(self):
        if len(self.sharding.device_set) > 1 and not self.is_fully_replicated:
            gathered.append(self.shape)  # a sharded array assembled on the host
        return value.fget(self)

    images = np.random.default_rng(2).normal(size=(8, 32, 32, 3)).astype("float32")
    with keras_aim.distribution.distribution_for_mesh("2x4", _devices()).scope():
        pretrainer = _tiny_pretrainer()
        pretrainer.train_on_batch(images)
        monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(recording_value))
        with TrainingCheckpoints(tmp_path) as checkpoints:
            checkpoints.save(pretrainer, 1, wait=True)
        assert gathered == []
        keras.ops.convert_to_numpy(pretrainer.backbone.blocks[0].attn.qkv.kernel)
        assert gathered == [(64, 192)]  # the check sees a full-array conversion
