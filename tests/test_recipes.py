"""Recipes: interrupt-and-resume of pre-training, config errors, the demo.
(SIGKILL mid-run and resume: tests/test_multi_process.py, test_checkpoints.py.)"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

from recipes import pretrain
from recipes.configs import load

from tests.conftest import once_in_jax_pass, to_numpy  # noqa: E402

RUN = ["--config", "tiny", "--steps", "40", "--checkpoint-every", "10",
       "--batch-size", "32", "--verbose", "0"]


def test_existing_run_needs_resume(tmp_path, capsys):
    short = ["--config", "tiny", "--steps", "2", "--checkpoint-every", "2",
             "--batch-size", "8", "--verbose", "0", "--workdir", str(tmp_path)]
    assert pretrain.main(short) == 0
    assert pretrain.main(short) == 1
    assert "already has checkpoints; pass --resume" in capsys.readouterr().err


def test_checkpoints_of_the_older_format_are_named_not_ignored(tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "ckpt-000000010.npz").write_bytes(b"")
    for resume in ([], ["--resume"]):
        assert pretrain.main(RUN + ["--workdir", str(tmp_path), *resume]) == 1
        assert ("holds checkpoints of an older keras_aim (ckpt-000000010.npz)"
                in capsys.readouterr().err)


def test_resume_of_a_missing_or_empty_workdir_is_refused(tmp_path, capsys):
    """A mistyped --workdir with --resume used to train from step 0."""
    for workdir, why in ((tmp_path / "typo", "it does not exist"), (tmp_path, "it is empty")):
        assert pretrain.main(RUN + ["--workdir", str(workdir), "--resume"]) == 1
        err = capsys.readouterr().err
        assert f"error: Nothing to resume in {workdir}: {why}" in err
    assert not (tmp_path / "typo").exists() and not list(tmp_path.iterdir())


class StopAfter(keras.callbacks.Callback):
    """Counts the batches `fit` runs; sends this process SIGINT (a real
    Ctrl-C) after `stop_after` of them."""

    def __init__(self, stop_after=None):
        super().__init__()
        self.stop_after, self.batches = stop_after, 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        if self.batches == self.stop_after:
            os.kill(os.getpid(), signal.SIGINT)


def trained_trunk(workdir):
    import keras_aim

    return [to_numpy(w) for w in keras_aim.AIMBackbone.from_preset(str(workdir / "backbone")).weights]


@pytest.mark.parametrize("steps,every,stop_after", [(3, 3, 2), (5, 2, 3)])
def test_interrupted_run_resumes_at_its_step_and_runs_only_the_rest(
        tmp_path, capsys, steps, every, stop_after):
    """On every backend, from an image folder: a run stopped between
    checkpoints resumes at its step, runs only the rest, and ends with the
    weights of an uninterrupted run (a restore that assigned nothing, a
    resume at step 0 or at another data position would not). The second
    case ends mid-interval (5 steps, checkpoints every 2)."""
    folder = image_folders(tmp_path / "images", {"a": 7, "b": 6})
    run = ["--config", "tiny", "--steps", str(steps), "--checkpoint-every", str(every),
           "--batch-size", "8", "--verbose", "0", "--data", folder]
    straight = StopAfter()
    assert pretrain.main(run + ["--workdir", str(tmp_path / "straight")], [straight]) == 0
    assert straight.batches == steps
    assert sorted(int(p.name) for p in (tmp_path / "straight" / "checkpoints").iterdir())[-1] == steps

    stopped = StopAfter(stop_after=stop_after)
    assert pretrain.main(run + ["--workdir", str(tmp_path / "run")], [stopped]) == 130
    assert f"interrupted at step {stop_after}/{steps}: checkpoint" in capsys.readouterr().out
    assert not (tmp_path / "run" / "backbone").exists()

    resumed = StopAfter()
    assert pretrain.main(run + ["--workdir", str(tmp_path / "run"), "--resume"], [resumed]) == 0
    assert re.search(rf"resumed from \S+ at step {stop_after}\n", capsys.readouterr().out)
    assert resumed.batches == steps - stop_after
    for a, b in zip(trained_trunk(tmp_path / "straight"), trained_trunk(tmp_path / "run")):
        np.testing.assert_allclose(b, a, atol=1e-5)


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
    """The main job, shortened (300 steps of batch 32, 20-epoch probes, one
    LoRA epoch): the loss falls and the probe on the pre-trained trunk beats
    the one on a random trunk (with seed 0 by about 5 points; after 50 steps
    of batch 128 the two were level)."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    summary = tmp_path / "summary.json"
    run = subprocess.run(
        [sys.executable, "-m", "recipes.demo", "--steps", "300", "--batch-size", "32",
         "--probe-epochs", "20", "--lora-epochs", "1", "--summary", str(summary)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(summary.read_text())
    for key in ("pretrained_probe_accuracy", "random_probe_accuracy", "lora_accuracy",
                "raw_pixel_baseline_accuracy", "first_loss", "last_loss", "seconds"):
        assert key in figures
    assert (figures["steps"], figures["batch_size"], figures["probe_epochs"]) == (300, 32, 20)
    assert figures["last_loss"] < figures["first_loss"]
    assert figures["pretrained_probe_accuracy"] >= figures["random_probe_accuracy"] + 0.02, figures
    assert 0.5 < figures["lora_accuracy"] <= 1.0
    assert (tmp_path / "demo_loss.png").stat().st_size > 1000
    assert (tmp_path / "backbone" / "config.json").exists()


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
        "adapters.lora.h5", "probe.weights.h5", "merged_backbone", "log.csv", "tensorboard",
        "run.json",
    }  # no backup: the run finished
    merged = keras_aim.AIMBackbone.from_preset(str(out / "merged_backbone"))
    assert not merged.blocks[0].attn.qkv.lora_enabled


def image_folders(root, counts, seed=0):
    """`root/<class>/<i>.png` of random sizes: {class name: image count}."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    for label, count in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.randint(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(
                root / label / f"{i}.png")
    return f"folder:{root}"


@pytest.fixture
def small_trunk(tmp_path):
    import keras_aim

    keras_aim.AIMBackbone(
        image_shape=(16, 16, 3), patch_size=4, hidden_dim=32, num_layers=2, num_heads=2
    ).save_to_preset(str(tmp_path / "trunk"))
    return str(tmp_path / "trunk")


def test_probe_on_a_folder_without_val_holds_out_a_validation_part(tmp_path, small_trunk, capsys):
    """Accuracy is never measured on the training images: without --val a
    share of each class is held out (and said); --val naming the training
    folder and single-class data are refused."""
    from recipes import attentive_probe, finetune_lora

    folder = image_folders(tmp_path / "images", {"a": 5, "b": 5})
    args = ["--backbone", small_trunk, "--epochs", "1", "--probe-layers", "0,1", "--verbose", "0"]
    assert attentive_probe.main(args + ["--data", folder]) == 0
    out = capsys.readouterr().out
    assert f"no --val: validating on folder {tmp_path / 'images'}, val part" in out
    assert out.strip().endswith("(2 images)")  # 1 of 5 per class; the other 8 trained on

    assert attentive_probe.main(args + ["--data", folder, "--val", folder]) == 1
    assert f"--val {folder} is the training data" in capsys.readouterr().err
    one_class = image_folders(tmp_path / "one", {"only": 4})
    for main in (attentive_probe.main, finetune_lora.main):
        extra = ["--out", str(tmp_path / "lora")] if main is finetune_lora.main else []
        assert main(args + ["--data", one_class] + extra) == 1
        assert "has a single class ('only'); a classifier needs at least 2" in capsys.readouterr().err
    # Training classes {a, b}, validation classes {b, c}: the labels would
    # shift (b is 1 in one and 0 in the other); it used to report a top-1.
    shifted = image_folders(tmp_path / "shifted", {"b": 2, "c": 2})
    assert attentive_probe.main(args + ["--data", folder, "--val", shifted]) == 1
    assert "name different classes (labels would not match): [a, b] (2) against [b, c] (2)" \
        in capsys.readouterr().err


def test_a_run_folder_belongs_to_one_recipe(tmp_path, small_trunk, capsys):
    """--out at another recipe's run folder (or any non-empty folder) is
    refused before anything is written: it used to overwrite the run's
    log.csv."""
    from recipes import attentive_probe

    pretraining = tmp_path / "pretraining"
    (pretraining / "checkpoints").mkdir(parents=True)  # a pre-training run
    (pretraining / "log.csv").write_text("epoch,loss\n0,1.0\n")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep")
    args = ["--backbone", small_trunk, "--epochs", "1", "--probe-layers", "0,1", "--verbose", "0"]
    assert attentive_probe.main(args + ["--out", str(pretraining)]) == 1
    assert "is a run folder of recipes.pretrain" in capsys.readouterr().err
    assert attentive_probe.main(args + ["--out", str(other)]) == 1
    assert "is not empty and not a run folder of recipes.attentive_probe" in capsys.readouterr().err
    assert (pretraining / "log.csv").read_text() == "epoch,loss\n0,1.0\n"
    assert sorted(p.name for p in pretraining.iterdir()) == ["checkpoints", "log.csv"]
    assert sorted(p.name for p in other.iterdir()) == ["todo.txt"]

    assert attentive_probe.main(args + ["--out", str(tmp_path / "probe")]) == 0
    assert pretrain.main(RUN + ["--workdir", str(tmp_path / "probe")]) == 1
    assert "is a run folder of recipes.attentive_probe" in capsys.readouterr().err


@pytest.mark.skipif(keras.config.backend() != "jax", reason="tf.data input: one backend is enough")
def test_pretraining_on_an_image_folder(tmp_path):
    """Folder data of any image sizes, labels unused (it used to fail with
    `Expected int32, but got None`)."""
    folder = image_folders(tmp_path / "images", {"a": 3, "b": 2})
    assert pretrain.main(["--config", "tiny", "--steps", "2", "--checkpoint-every", "2",
                          "--batch-size", "4", "--verbose", "0", "--data", folder,
                          "--workdir", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "backbone" / "config.json").exists()


def test_recipe_errors_are_one_line(tmp_path, small_trunk, capsys):
    """Bad data, paths or numbers: `error: ...` (or argparse's usage error),
    exit code 1 (2), no traceback (unless --verbose 2)."""
    from recipes import finetune_lora

    missing = tmp_path / "missing"
    assert pretrain.main(RUN + ["--workdir", str(tmp_path / "w"), "--data", f"folder:{missing}"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: Image folder '{missing}' does not exist."
    assert pretrain.main(RUN + ["--workdir", str(tmp_path / "w2"), "--data", f"folder:{missing}",
                                "--verbose", "2"]) == 1
    assert "Traceback" in capsys.readouterr().err
    for main, option in ((pretrain.main, ["--workdir", str(tmp_path), "--batch-size", "0"]),
                         (pretrain.main, ["--workdir", str(tmp_path), "--accumulate", "0"]),
                         (finetune_lora.main, ["--backbone", small_trunk, "--out",
                                               str(tmp_path / "l"), "--rank", "0"])):
        with pytest.raises(SystemExit) as info:
            main(option)
        assert info.value.code == 2
        assert "must be >= 1, got 0" in capsys.readouterr().err
