"""Recipes: kill-and-resume of pre-training, config errors, the demo."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

from recipes import pretrain
from recipes.configs import load

from tests.conftest import once_in_jax_pass  # noqa: E402

RUN = ["--config", "tiny", "--steps", "40", "--checkpoint-every", "10",
       "--batch-size", "32", "--verbose", "0"]


def pretrain_process(workdir, *extra):
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(
        [sys.executable, "-m", "recipes.pretrain", *RUN,
         "--workdir", str(workdir), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def final_state(workdir):
    path = workdir / "checkpoints" / "ckpt-000000040.npz"
    with np.load(path) as stored:
        return {k: stored[k] for k in stored.files}


@pytest.mark.slow
@once_in_jax_pass
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    straight = pretrain_process(tmp_path / "straight")
    interrupted = pretrain_process(tmp_path / "killed")
    first = tmp_path / "killed" / "checkpoints" / "ckpt-000000010.npz"
    deadline = time.time() + 240
    while not first.exists() and interrupted.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.exists(), interrupted.communicate()[1][-3000:]
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait()
    assert not (tmp_path / "killed" / "backbone").exists()  # it did not finish

    resumed = pretrain_process(tmp_path / "killed", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed from" in out
    out, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-3000:]

    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "killed")
    assert a.keys() == b.keys() and len(a) > 50
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)
    assert (tmp_path / "killed" / "backbone" / "config.json").exists()


def test_existing_run_needs_resume(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "ckpt-000000010.npz").write_bytes(b"")
    with pytest.raises(SystemExit, match="pass --resume"):
        pretrain.main(RUN + ["--workdir", str(tmp_path)])


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(image_size=18), r"image_size 18 is not a multiple of the patch size 4 \(nearest valid sizes: 16 or 20\)"),
        (dict(batch_size=30), "batch size 30 is not divisible by the 8 batch-axis devices"),
        (dict(total_steps=1), "total_steps must be >= 2"),
    ],
)
def test_invalid_configs_are_named(changes, message):
    config = {**load("tiny"), **changes}
    with pytest.raises(ValueError, match=message):
        pretrain.validate(config, "8x1")


def test_paper_configs_follow_the_spec():
    config = load("aim_7b")
    assert (config["hidden_dim"], config["num_layers"], config["num_heads"]) == (4096, 32, 32)
    assert config["batch_size"] == 4096 and config["total_steps"] == 1_200_000
    assert config["precision"] == "mixed_bfloat16"
    assert load("aim_600m")["total_steps"] == 500_000
    pretrain.validate(config, "8x1")


@pytest.mark.slow
@once_in_jax_pass
def test_demo_runs_and_writes_its_summary(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    summary = tmp_path / "summary.json"
    run = subprocess.run(
        [sys.executable, "-m", "recipes.demo", "--steps", "50",
         "--summary", str(summary)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(summary.read_text())
    for key in ("pretrained_probe_accuracy", "random_probe_accuracy",
                "raw_pixel_baseline_accuracy", "first_loss", "last_loss", "seconds"):
        assert key in figures
    assert figures["last_loss"] < figures["first_loss"]
    assert 0.1 < figures["pretrained_probe_accuracy"] <= 1.0
    assert (tmp_path / "demo_loss.png").stat().st_size > 1000


def test_attentive_probe_recipe_on_a_saved_trunk(tmp_path, capsys):
    from recipes import attentive_probe

    import keras_aim

    backbone = keras_aim.AIMBackbone(
        image_shape=(16, 16, 3), patch_size=4, hidden_dim=32, num_layers=2, num_heads=2
    )
    backbone.save_to_preset(str(tmp_path / "trunk"))
    code = attentive_probe.main(
        ["--backbone", str(tmp_path / "trunk"), "--epochs", "2", "--probe-layers", "0,1"]
    )
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("attentive probe on blocks (0, 1): top-1 ")
    assert ", top-5 " in line and line.endswith("(359 images)")


def test_finetune_lora_recipe_saves_adapters_probe_and_merged(tmp_path, capsys):
    from recipes import finetune_lora

    import keras_aim

    backbone = keras_aim.AIMBackbone(
        image_shape=(16, 16, 3), patch_size=4, hidden_dim=32, num_layers=2, num_heads=2
    )
    backbone.save_to_preset(str(tmp_path / "trunk"))
    out = tmp_path / "lora"
    code = finetune_lora.main([
        "--backbone", str(tmp_path / "trunk"), "--out", str(out), "--epochs", "1",
        "--rank", "4", "--probe-layers", "0,1", "--merge",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    # Adapters: per block q+v (2 x (32*4 + 4*32)) + proj (32*4 + 4*32).
    assert "adapters 1,536 = " in printed
    assert "LoRA r=4 fine-tuned probe: top-1 " in printed
    assert {p.name for p in out.iterdir()} == {
        "adapters.lora.h5", "probe.weights.h5", "merged_backbone", "log.csv", "tensorboard"
    }  # no backup: the run finished
    merged = keras_aim.AIMBackbone.from_preset(str(out / "merged_backbone"))
    assert not merged.blocks[0].attn.qkv.lora_enabled


def test_attentive_probe_recipe_on_image_folders(tmp_path, capsys):
    from recipes import attentive_probe
    from PIL import Image

    import keras_aim

    rng = np.random.RandomState(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.randint(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(
                tmp_path / "images" / label / f"{i}.png")
    keras_aim.AIMBackbone(
        image_shape=(16, 16, 3), patch_size=4, hidden_dim=32, num_layers=2, num_heads=2
    ).save_to_preset(str(tmp_path / "trunk"))
    folder = f"folder:{tmp_path / 'images'}"
    assert attentive_probe.main(["--backbone", str(tmp_path / "trunk"), "--data", folder,
                                 "--val", folder, "--epochs", "1",
                                 "--probe-layers", "0,1"]) == 0
    assert capsys.readouterr().out.strip().endswith("(6 images)")
