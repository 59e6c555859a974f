"""Orbax step checkpoints (keras_aim.training.checkpointing) on every
backend: exact round trip, the newest k kept, refusals that name what
differs, incomplete checkpoints skipped, gs:// paths. Restoring under other
meshes is in test_multi_device.py."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import keras_aim
from keras_aim.training import checkpointing
from keras_aim.training.checkpointing import TrainingCheckpoints, read_checkpoint
from tests.conftest import make_tiny_backbone, once_in_jax_pass, to_numpy

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"hidden_dim": 64, "batch_size": 4, "seed": 0}


def pretrainer(hidden_dim=64, **compile_kwargs):
    model = keras_aim.AIMPretrainer(
        make_tiny_backbone(hidden_dim=hidden_dim), pixel_head_width=32,
        pixel_head_depth=1, seed=0,
    )
    model.compile(optimizer=keras_aim.pretraining_optimizer(learning_rate=1e-3, **compile_kwargs))
    return model


def images(seed):
    return np.random.default_rng(seed).normal(size=(4, 32, 32, 3)).astype("float32")


def state(model):
    variables = checkpointing.training_variables(model)
    return {g: {k: to_numpy(v) for k, v in m.items()} for g, m in variables.items()}


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for group in a:
        assert a[group].keys() == b[group].keys()
        for key in a[group]:
            np.testing.assert_array_equal(a[group][key], b[group][key], err_msg=key)


def test_restore_is_exact_and_continues_like_an_uninterrupted_run(tmp_path):
    model = pretrainer()
    model.train_on_batch(images(0))
    with TrainingCheckpoints(tmp_path / "ckpt", config=CONFIG) as checkpoints:
        path = checkpoints.save(model, 1)  # in the background
        saved = state(model)
        model.train_on_batch(images(1))  # training goes on meanwhile
        after_two = state(model)
    assert path == str(tmp_path / "ckpt" / "1")
    # Optimizer step and moments, weights and the prefix sampler's random
    # state are all in the checkpoint.
    assert {"iteration", "learning_rate"} <= set(saved["optimizer"])
    assert "prefix_sampler_seed_generator/seed_generator_state" in saved["model"]

    fresh = pretrainer()
    checkpoints = TrainingCheckpoints(tmp_path / "ckpt", config=CONFIG)
    assert checkpoints.latest_step == 1
    assert checkpoints.restore(fresh) == 1
    assert_states_equal(state(fresh), saved)
    fresh.train_on_batch(images(1))  # the same second step
    assert_states_equal(state(fresh), after_two)
    checkpoints.close()

    step, values = read_checkpoint(str(tmp_path / "ckpt"))
    assert step == 1
    assert_states_equal(values, saved)


def test_the_newest_k_are_kept(tmp_path):
    model = pretrainer()
    with TrainingCheckpoints(tmp_path, keep=2, config=CONFIG) as checkpoints:
        for step in (3, 6, 9, 12):
            checkpoints.save(model, step)
        checkpoints.wait()
        assert checkpoints.steps == [9, 12]
    assert sorted(os.listdir(tmp_path)) == ["12", "9"]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        TrainingCheckpoints(tmp_path, keep=0)


def test_a_checkpoint_of_another_configuration_is_refused_naming_what_differs(tmp_path):
    with TrainingCheckpoints(tmp_path, config=CONFIG) as checkpoints:
        checkpoints.save(pretrainer(), 5, wait=True)

    other = TrainingCheckpoints(tmp_path, config={**CONFIG, "hidden_dim": 32})
    with pytest.raises(ValueError) as info:
        other.restore(pretrainer(hidden_dim=32))
    message = str(info.value)
    assert "hidden_dim: 64 in the checkpoint, 32 here" in message
    assert "model block_0/attn/qkv/kernel: [[64, 192], 'float32'] in the checkpoint, " \
           "[[32, 96], 'float32'] here" in message
    assert "start a new run directory" in message
    other.close()

    accumulating = TrainingCheckpoints(tmp_path, config=CONFIG)
    with pytest.raises(ValueError, match="model optimizer variables not in the checkpoint: "
                       ".*gradient_accumulator"):
        accumulating.restore(pretrainer(gradient_accumulation_steps=2))
    accumulating.close()


def test_a_checkpoint_holding_more_than_the_model_is_refused_and_nothing_restored(tmp_path):
    # The same run config, but the checkpoint's trunk has 4 blocks and the
    # model 2: its extra variables are named, and the model keeps its own.
    with TrainingCheckpoints(tmp_path, config=CONFIG) as checkpoints:
        checkpoints.save(pretrainer(), 5, wait=True)
    shallow = keras_aim.AIMPretrainer(make_tiny_backbone(num_layers=2), pixel_head_width=32,
                                      pixel_head_depth=1, seed=1)
    shallow.compile(optimizer=keras_aim.pretraining_optimizer(learning_rate=1e-3))
    before = state(shallow)
    with TrainingCheckpoints(tmp_path, config=CONFIG) as checkpoints:
        with pytest.raises(ValueError) as info:
            checkpoints.restore(shallow)
    message = str(info.value)
    assert "checkpoint model variables not in this model: block_2/attn/proj/kernel" in message
    assert "model variables not in the checkpoint" not in message
    assert_states_equal(state(shallow), before)


def test_an_incomplete_checkpoint_is_skipped_logged_and_removed(tmp_path):
    model = pretrainer()
    with TrainingCheckpoints(tmp_path, config=CONFIG) as checkpoints:
        checkpoints.save(model, 10, wait=True)
    # What a kill while saving step 20 leaves (Orbax writes a temporary
    # folder and renames it when complete).
    (tmp_path / "20.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    (tmp_path / "20.orbax-checkpoint-tmp" / "state" / "manifest.ocdbt").write_bytes(b"\0")
    messages = []
    checkpoints = TrainingCheckpoints(tmp_path, config=CONFIG, log=messages.append)
    assert checkpoints.latest_step == 10
    assert len(messages) == 1 and "skipping incomplete checkpoint" in messages[0]
    assert "20.orbax-checkpoint-tmp" in messages[0]
    assert sorted(os.listdir(tmp_path)) == ["10"]
    assert checkpoints.restore(pretrainer()) == 10
    checkpoints.close()


@pytest.mark.slow
@once_in_jax_pass
def test_a_kill_while_saving_leaves_the_previous_checkpoint_in_use(tmp_path):
    code = f"""
import os, signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
from tests.test_checkpoints import pretrainer, CONFIG
from keras_aim.training.checkpointing import TrainingCheckpoints
model = pretrainer()
checkpoints = TrainingCheckpoints({str(tmp_path)!r}, config=CONFIG)
checkpoints.save(model, 1, wait=True)
big = model.backbone.blocks[0].attn.qkv.kernel
checkpoints.save(model, 2)  # in the background
os.kill(os.getpid(), signal.SIGKILL)
"""
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    messages = []
    checkpoints = TrainingCheckpoints(tmp_path, config=CONFIG, log=messages.append)
    assert checkpoints.latest_step == 1
    if (tmp_path / "2").exists():  # the save finished before the kill
        pytest.skip("the background save completed before the kill")
    assert messages and "skipping incomplete checkpoint" in messages[0]
    assert checkpoints.restore(pretrainer()) == 1
    checkpoints.close()


def test_gs_urls_go_through_orbax_and_epath_never_the_local_filesystem(
    tmp_path, monkeypatch
):
    from tests.fake_gcs import fake_gcs

    monkeypatch.chdir(tmp_path)
    model = pretrainer()
    model.train_on_batch(images(0))
    saved = state(model)
    url = "gs://bucket/runs/a/checkpoints"
    with fake_gcs(str(tmp_path / "gcs")):
        with TrainingCheckpoints(url, keep=2, config=CONFIG) as checkpoints:
            for step in (1, 2, 3):
                assert checkpoints.save(model, step) == f"{url}/{step}"
            checkpoints.wait()
            assert checkpoints.steps == [2, 3]
        # A step folder without its commit marker: what a kill leaves on GCS.
        (tmp_path / "gcs" / "bucket" / "runs" / "a" / "checkpoints" / "4").mkdir()
        messages = []
        checkpoints = TrainingCheckpoints(url + "/", config=CONFIG, log=messages.append)
        assert checkpoints.latest_step == 3
        assert messages == [f"skipping incomplete checkpoint {url}/4 (its save was "
                            "interrupted); removing it"]
        fresh = pretrainer()
        assert checkpoints.restore(fresh) == 3
        checkpoints.close()
        assert_states_equal(state(fresh), saved)
        assert read_checkpoint(url)[0] == 3
    stored = tmp_path / "gcs" / "bucket" / "runs" / "a" / "checkpoints"
    assert sorted(os.listdir(stored)) == ["2", "3"]
    assert (stored / "3" / "commit_success.txt").exists()  # Orbax's GCS protocol
    assert not (tmp_path / "gs:").exists()


def test_unsupported_urls_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="s3://.*mountpoint-s3 or s3fs"):
        TrainingCheckpoints("s3://bucket/run")
    assert checkpointing.checkpoint_directory("runs/a") == os.path.abspath("runs/a")
