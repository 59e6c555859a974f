"""keras_aim.distribution on any backend (the 8-device runs are in
test_multi_device.py), remat, the recipe options and the memory planner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_aim
from keras_aim.training import distribution
from keras_aim.training.memory_plan import PretrainingShape, parameter_counts, plan_memory
from tests.conftest import (
    assert_same_training,
    make_tiny_backbone,
    make_tiny_classifier,
    once_in_jax_pass,
    to_numpy,
    training_record,
)

ROOT = Path(__file__).resolve().parents[1]

from recipes import common
from recipes import plan

TINY_HEAD = dict(pixel_head_width=32, pixel_head_depth=2)
TINY_SHAPE = PretrainingShape(
    hidden_dim=64, num_layers=4, num_heads=4, image_size=32, patch_size=8, **TINY_HEAD
)


def _mesh(batch, model):
    # Device names are only labels here: a LayoutMap lookup needs no device.
    names = [f"cpu:{i}" for i in range(batch * model)]
    return keras.distribution.DeviceMesh((batch, model), ("batch", "model"), names)


def test_layout_map_splits_large_kernels_megatron_style():
    pretrainer = keras_aim.AIMPretrainer(make_tiny_backbone(), **TINY_HEAD)
    classifier = make_tiny_classifier()
    layouts = keras_aim.AIMPretrainer.get_layout_map(_mesh(2, 4))
    axes = {
        v.path: tuple(layouts[v.path].axes) if layouts[v.path] else None
        for v in pretrainer.weights + classifier.weights
    }
    for path in ("block_3/attn/qkv/kernel", "block_0/mlp/fc1/kernel",
                 "pixel_head/block_1/mlp/fc1/kernel", "probe/k/kernel", "probe/v/kernel"):
        assert axes[path] == (None, "model"), path  # output dimension
    for path in ("block_3/attn/proj/kernel", "block_0/mlp/fc2/kernel",
                 "pixel_head/block_1/mlp/fc2/kernel", "pixel_head/input_proj/kernel",
                 "pixel_head/output_proj/kernel", "probe/linear/kernel"):
        assert axes[path] == ("model", None), path  # input dimension
    assert axes["patch_embedding/conv/kernel"] == (None, None, None, "model")
    for variable in pretrainer.weights + classifier.weights:
        if int(np.prod(variable.shape)) > 1024:
            assert axes[variable.path] is not None, variable.path
        elif variable.path.endswith(("gamma", "beta", "bias", "cls_token")):
            assert axes[variable.path] is None, variable.path
    # The same map on every class, with custom axis names.
    mesh = keras.distribution.DeviceMesh((2, 2), ("data", "tensor"), [0, 1, 2, 3])
    custom = keras_aim.AIMImageClassifier.get_layout_map(mesh, "tensor", "data")
    assert tuple(custom["block_0/attn/qkv/kernel"].axes) == (None, "tensor")


def test_layout_map_rejects_unknown_axes():
    with pytest.raises(ValueError, match="model_dim='tensor' is not an axis"):
        distribution.layout_map(_mesh(2, 2), model_dim="tensor")
    with pytest.raises(TypeError, match="DeviceMesh"):
        distribution.layout_map((2, 4))


@pytest.mark.parametrize("spec,expected", [("8x1", (8, 1)), ("2X4", (2, 4)), (" 1x8 ", (1, 8))])
def test_parse_mesh(spec, expected):
    mesh = distribution.parse_mesh(spec)
    assert (mesh.batch, mesh.model, str(mesh)) == (*expected, f"{expected[0]}x{expected[1]}")


@pytest.mark.parametrize("spec", ["8", "2x0", "axb", "2x4x2"])
def test_bad_mesh_is_named(spec):
    with pytest.raises(ValueError, match="write it BATCHxMODEL"):
        distribution.parse_mesh(spec)


def test_batch_not_divisible_by_batch_axis_names_the_fix():
    distribution.check_batch_divisible(32, distribution.parse_mesh("8x4"), accumulate=4)
    with pytest.raises(ValueError, match="batch size 12 is not divisible by the 8 batch-axis "
                       "devices of mesh 8x1 .= 8.; use a batch size that is a multiple of 8, "
                       "e.g. 8 or 16"):
        distribution.check_batch_divisible(12, distribution.parse_mesh("8x1"))
    with pytest.raises(ValueError, match="x 4 accumulation steps .= 8."):
        distribution.check_batch_divisible(12, distribution.parse_mesh("2x1"), accumulate=4)


def test_a_mesh_that_misses_the_devices_of_the_processes_is_refused(monkeypatch):
    """What every process computes from the others' device counts (the
    exchange itself runs in tests/test_multi_process.py)."""
    from keras_aim.training import distribution_jax

    counts = np.array([[4], [4]], np.int32)  # two processes of 4 devices
    monkeypatch.setattr(distribution_jax, "_allgather", lambda values: counts)
    distribution_jax.check_devices(8, "2x4")
    with pytest.raises(ValueError, match=r"Mesh 4x1 uses 4 devices, but the 2 processes "
                       r"have 4 \+ 4 = 8. Use a mesh whose BATCH x MODEL is 8, e.g. 8x1"):
        distribution_jax.check_devices(4, "4x1")


def test_processes_that_disagree_are_named_setting_by_setting(monkeypatch):
    from keras_aim.training import distribution_jax

    theirs = json.dumps({"batch_size": 64, "mesh": "8x1", "seed": 0}, sort_keys=True)

    def allgather(values):  # this process, then one started with --batch-size 64
        if values.shape == (1,):
            return np.array([values, [len(theirs)]], np.int32)
        other = np.zeros_like(values)
        other[: len(theirs)] = np.frombuffer(theirs.encode(), np.uint8)
        return np.stack([values, other])

    monkeypatch.setattr(distribution_jax, "_allgather", allgather)
    with pytest.raises(ValueError) as error:
        distribution_jax.check_same_on_every_process(
            {"batch_size": 32, "mesh": "8x1", "seed": 0, "remat": False})
    assert str(error.value).splitlines() == [
        "The processes of this run were started with different settings:",
        "  process 1: batch_size = 64 (process 0: 32)",
        "  process 1: remat = None (process 0: False)",
        "Start every process with the same command and config.",
    ]


def _args(**overrides):
    parser = common.argparse.ArgumentParser()
    common.add_distribution_arguments(parser)
    argv = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return parser.parse_args(argv)


def test_backends_without_the_mesh_raise_what_to_use_instead():
    backend = keras.config.backend()
    if backend == "torch":
        with pytest.raises(distribution.DistributionUnavailableError,
                           match="not available with the 'torch' backend.*KERAS_BACKEND=jax"):
            common.setup_distribution(_args(mesh="2x1"), 32)
        with pytest.raises(distribution.DistributionUnavailableError, match="JAX"):
            common.setup_distribution(_args(mesh="1x1", multi_host=True), 32)
    elif backend == "tensorflow":
        with pytest.raises(distribution.DistributionUnavailableError,
                           match="model parallelism.*KERAS_BACKEND=jax.*8x1"):
            distribution.check_backend_supports(distribution.parse_mesh("2x4"))
        with pytest.raises(distribution.DistributionUnavailableError, match="JAX backend only"):
            distribution.distribution_for_mesh("2x1")
    else:
        distribution.check_backend_supports(distribution.parse_mesh("2x4"))
    # A 1x1 mesh runs anywhere, without a distribution.
    training = common.setup_distribution(_args(accumulate=2, remat=True), 32)
    assert (training.micro_batch_size, training.gradient_accumulation_steps) == (16, 2)
    assert training.remat and keras.distribution.distribution() is None
    with training.scope():
        assert keras.distribution.distribution() is None


def test_remat_changes_memory_not_results():
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype("float32")
    records, initial = [], None
    for remat in (False, True):
        backbone = make_tiny_backbone(remat=remat, num_layers=2)  # compiles faster
        pretrainer = keras_aim.AIMPretrainer(backbone, seed=0, **TINY_HEAD)
        assert pretrainer.pixel_head.remat is remat
        if initial is None:
            initial = pretrainer.get_weights()
        pretrainer.set_weights(initial)
        pretrainer.compile(optimizer=keras_aim.pretraining_optimizer(learning_rate=1e-3))
        records.append(training_record(pretrainer, images))
    assert_same_training(*records)
    config = make_tiny_backbone(remat=True).get_config()
    assert config["remat"] is True and make_tiny_backbone().get_config()["remat"] is False
    restored = keras_aim.AIMBackbone.from_config(config)
    assert restored.remat and restored.blocks[0]._remat_mode is not None


def test_gradient_accumulation_updates_every_n_steps():
    pretrainer = keras_aim.AIMPretrainer(make_tiny_backbone(), seed=0, **TINY_HEAD)
    pretrainer.compile(optimizer=keras_aim.pretraining_optimizer(
        learning_rate=1e-3, gradient_accumulation_steps=2))
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype("float32")
    kernel = pretrainer.backbone.blocks[0].attn.qkv.kernel
    before = to_numpy(kernel)
    pretrainer.train_on_batch(images)
    np.testing.assert_array_equal(to_numpy(kernel), before)
    pretrainer.train_on_batch(images)
    assert np.abs(to_numpy(kernel) - before).max() > 0


# --- The memory planner ------------------------------------------------------


def test_parameter_counts_match_the_model_and_its_layout():
    pretrainer = keras_aim.AIMPretrainer(make_tiny_backbone(), **TINY_HEAD)
    layouts = distribution.layout_map(_mesh(1, 2))
    sizes = {v.path: int(np.prod(v.shape)) for v in pretrainer.trainable_weights}
    split = sum(n for path, n in sizes.items() if layouts[path] is not None)
    assert parameter_counts(TINY_SHAPE) == (split, sum(sizes.values()) - split)


def test_plan_arithmetic_by_hand():
    # Tiny: D=64, 4 blocks, 4 heads, N=16 tokens, p*p*C=192, W=32, 2 head blocks.
    split, replicated = parameter_counts(TINY_SHAPE)
    assert (split, replicated) == (
        4 * 12 * 64 * 64 + 192 * 64 + 2 * 2 * 32 * 128 + 64 * 32 + 32 * 192,
        4 * 4 * 64 + 5 * 64 + 2 * 4 * 32 + 3 * 32 + 192,
    )
    fp32 = plan_memory(TINY_SHAPE, batch_axis=2, model_axis=4, global_batch=16, precision="fp32")
    params = split / 4 + replicated
    assert fp32.micro_batch_per_device == 8
    assert (fp32.parameters, fp32.optimizer_state, fp32.gradients) == (4 * params, 8 * params, 4 * params)
    per_block = 6 * 64 + (16 * 64 + 3 * 4 * 16) / 4
    per_head_block = 5 * 32 + 12 * 32 / 4
    once = 4 * 192 + 6 * 64 + 4 * 32
    assert fp32.activations == 4 * 8 * 16 * (4 * per_block + 2 * per_head_block + once)
    bf16 = plan_memory(TINY_SHAPE, 2, 4, 16, "bf16", remat=True, accumulate=2)
    assert (bf16.parameters, bf16.optimizer_state, bf16.gradients) == (2 * params, 12 * params, 8 * params)
    kept = 4 * 64 + 2 * 32 + max(per_block, per_head_block)
    assert bf16.activations == 2 * 4 * 16 * (kept + once)
    assert bf16.total == bf16.parameters + bf16.optimizer_state + bf16.gradients + bf16.activations
    assert bf16.fits(bf16.total / 0.9) and not bf16.fits(bf16.total / 0.9 - 1)


def test_plan_matches_measured_parameter_and_optimizer_bytes():
    pretrainer = keras_aim.AIMPretrainer(make_tiny_backbone(), **TINY_HEAD)
    pretrainer.compile(optimizer=keras_aim.pretraining_optimizer())
    pretrainer.optimizer.build(pretrainer.trainable_variables)
    nbytes = lambda variables: sum(to_numpy(v).nbytes for v in variables)  # noqa: E731
    moments = [v for v in pretrainer.optimizer.variables if len(v.shape) > 0]
    fp32 = plan_memory(TINY_SHAPE, 1, 1, 8, "fp32")
    assert fp32.parameters == nbytes(pretrainer.trainable_variables)
    assert fp32.optimizer_state == nbytes(moments)


def test_plan_errors_are_named():
    with pytest.raises(ValueError, match="not divisible by batch axis 8 x accumulate 1"):
        plan_memory(TINY_SHAPE, 8, 1, 12)
    with pytest.raises(ValueError, match="model axis .3. must divide the hidden_dim .64."):
        plan_memory(TINY_SHAPE, 1, 3, 12)
    with pytest.raises(ValueError, match="Unknown precision 'fp8'"):
        plan_memory(TINY_SHAPE, 1, 1, 8, "fp8")


def test_plan_recipe_prints_the_aim_7b_table(capsys):
    plan.main(["--preset", "aim_7b", "--mesh", "16x8", "64x2", "--batch", "4096",
               "--remat", "--device-memory", "80", "16"])
    out = capsys.readouterr().out
    assert "aim_7b: global batch 4096, bf16, remat on" in out
    rows = [line for line in out.splitlines() if line.startswith("| 16x8") or line.startswith("| 64x2")]
    assert len(rows) == 2 and rows[0].endswith("| yes | no |")
    with pytest.raises(SystemExit, match="not divisible by batch axis 3"):
        plan.main(["--preset", "aim_7b", "--mesh", "3x8", "--batch", "4096"])


# --- TensorFlow MirroredStrategy ----------------------------------------------


@pytest.mark.slow
@once_in_jax_pass
def test_the_multi_device_pass_fails_without_its_devices():
    """Without the XLA flag the pass must fail, not skip every test."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "multi_device", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "test_multi_device.py")],
        cwd=ROOT, env={**env, "KERAS_BACKEND": "jax"},
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode != 0
    assert "The multi-device pass needs 8 devices and found 1" in run.stdout + run.stderr


@pytest.mark.slow
@once_in_jax_pass
def test_mirrored_strategy_clipped_steps_match_a_single_device():
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "mirrored_step.py")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["gradient_norm"] > 2 * result["clip"]  # clipping changed the step
    np.testing.assert_allclose(result["mirrored_loss"], result["single_loss"], rtol=1e-5)
    assert result["max_relative_gradient_difference"] < 1e-5
    assert len(result["single_step_losses"]) == 3
    np.testing.assert_allclose(result["mirrored_step_losses"], result["single_step_losses"],
                               rtol=1e-5)
    assert result["max_weight_difference"] < 1e-5
