"""Real multi-process runs of the recipes on this machine: two JAX processes
of 4 CPU devices each (jax.distributed on 127.0.0.1, Gloo collectives) and
two TensorFlow workers (MultiWorkerMirroredStrategy, TF_CONFIG). Each test
has hard time limits and ends every process it started (tests/multi_process.py).
They spawn their own processes, so they run once, in the JAX pass."""

import numpy as np
import pytest

from keras_aim.training.checkpointing import read_checkpoint
from tests.conftest import once_in_jax_pass
from tests.multi_process import Job, environment, free_ports

PRETRAIN = ["-m", "recipes.pretrain", "--config", "tiny", "--steps", "6",
            "--checkpoint-every", "2", "--batch-size", "32", "--verbose", "0"]

pytestmark = [pytest.mark.slow, once_in_jax_pass]


def assert_same_final_state(reference_dir, run_dir, step):
    reference_step, expected = read_checkpoint(str(reference_dir / "checkpoints"))
    run_step, actual = read_checkpoint(str(run_dir / "checkpoints"))
    assert reference_step == run_step == step
    for group in expected:
        assert expected[group].keys() == actual[group].keys()
        for key, value in expected[group].items():
            np.testing.assert_allclose(actual[group][key], value, atol=1e-5, err_msg=key)
    assert len(expected["model"]) > 50


def digit_folder(root) -> str:
    """The first 160 embedded digits as PNG files in class folders."""
    from PIL import Image

    from keras_aim.data import digits

    (images, labels), _ = digits(16)
    for i, (image, label) in enumerate(zip(images[:160], labels[:160])):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    return str(root)


def test_two_jax_processes_killed_then_resumed_on_another_mesh_equal_one_process(tmp_path):
    """From an image folder: each process reads its share of every batch."""
    work, single = tmp_path / "two_processes", tmp_path / "one_process"
    data = ["--data", f"folder:{digit_folder(tmp_path / 'images')}"]
    with Job(tmp_path) as job:
        reference = job.start(PRETRAIN + data + ["--workdir", str(single)],
                              environment("jax"), "single")
        first = job.start_jax(PRETRAIN + data + ["--workdir", str(work), "--multi-host",
                                                 "--mesh", "2x4"], "first")
        job.wait_for(lambda: (work / "checkpoints" / "2").is_dir(), first, 420,
                     "first checkpoint")
        first[1].kill()  # SIGKILL one process mid-run
        first[0].kill()  # its partner would wait for it in the next collective
        job.wait(first, 60)
        assert not (work / "backbone").exists()  # it did not finish

        # Both restart with --resume, on a data-parallel mesh this time.
        resumed = job.start_jax(PRETRAIN + data + ["--workdir", str(work), "--multi-host",
                                                   "--mesh", "8x1", "--resume"], "resumed")
        outputs = job.wait(resumed + [reference], 600)
    for process in resumed + [reference]:
        assert process.returncode == 0, job.tail(process)
    assert "resumed from" in outputs[0] and "at step " in outputs[0]
    assert "done: 6 steps" in outputs[0] and "done:" not in outputs[1]  # one process reports
    assert_same_final_state(single, work, 6)
    assert (work / "backbone" / "config.json").exists()
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["4", "6"]


def test_processes_started_differently_are_refused_before_training(tmp_path):
    with Job(tmp_path) as job:
        processes = job.start_jax(
            PRETRAIN + ["--workdir", str(tmp_path / "run"), "--multi-host", "--mesh", "8x1"],
            "mismatch", per_process=[[], ["--batch-size", "64"]],
        )
        outputs = job.wait(processes, 300)
    for process, output in zip(processes, outputs):
        assert process.returncode == 1, job.tail(process)
        assert "error: The processes of this run were started with different settings" in output
        assert "process 1: batch_size = 64 (process 0: 32)" in output
        assert "Start every process with the same command" in output
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_two_tensorflow_workers_equal_one_worker(tmp_path):
    work, single = tmp_path / "two_workers", tmp_path / "one_worker"
    run = ["-m", "recipes.pretrain", "--config", "tiny", "--steps", "4",
           "--checkpoint-every", "2", "--batch-size", "32", "--verbose", "0"]
    with Job(tmp_path) as job:
        reference = job.start(run + ["--workdir", str(single)], environment("tensorflow"), "single")
        workers = job.start_tensorflow(run + ["--workdir", str(work), "--multi-host",
                                              "--mesh", "2x1"], "workers")
        job.wait(workers + [reference], 600)
    for process in workers + [reference]:
        assert process.returncode == 0, job.tail(process)
    assert_same_final_state(single, work, 4)
    assert (work / "backbone" / "config.json").exists()


def _tiny_trunk(path):
    import keras_aim

    keras_aim.AIMBackbone(
        image_shape=(16, 16, 3), patch_size=4, hidden_dim=32, num_layers=2, num_heads=2
    ).save_to_preset(str(path))


def test_attentive_probe_recipe_on_two_processes_equals_one(tmp_path, capsys):
    from recipes import attentive_probe

    _tiny_trunk(tmp_path / "trunk")
    args = ["-m", "recipes.attentive_probe", "--backbone", str(tmp_path / "trunk"),
            "--epochs", "2", "--probe-layers", "0,1", "--verbose", "0"]
    with Job(tmp_path) as job:
        processes = job.start_jax(args + ["--multi-host", "--mesh", "8x1",
                                          "--out", str(tmp_path / "probe")], "probe")
        assert attentive_probe.main(args[2:]) == 0  # one process, meanwhile
        expected = capsys.readouterr().out.strip().splitlines()[-1]
        outputs = job.wait(processes, 600)
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, job.tail(process)
        assert expected in output  # the same probe, on both processes
    assert expected.startswith("attentive probe on blocks (0, 1): top-1 ")
    assert sorted(p.name for p in (tmp_path / "probe").iterdir()) == [
        "log.csv", "probe.weights.h5", "run.json", "tensorboard"]


def test_lora_recipe_on_two_processes(tmp_path):
    _tiny_trunk(tmp_path / "trunk")
    with Job(tmp_path) as job:
        processes = job.start_jax(
            ["-m", "recipes.finetune_lora", "--backbone", str(tmp_path / "trunk"),
             "--out", str(tmp_path / "lora"), "--epochs", "1", "--rank", "2",
             "--probe-layers", "0,1", "--batch-size", "64", "--verbose", "0",
             "--multi-host", "--mesh", "8x1", "--merge"], "lora")
        outputs = job.wait(processes, 600)
    for process in processes:
        assert process.returncode == 0, job.tail(process)
    results = [[line for line in output.splitlines() if line.startswith("LoRA r=2")]
               for output in outputs]
    assert len(results[0]) == 1 and results[0] == results[1]
    assert "saved to" in outputs[0] and "saved to" not in outputs[1]
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [
        "adapters.lora.h5", "log.csv", "merged_backbone", "probe.weights.h5", "run.json",
        "tensorboard"]


def test_an_unreachable_coordinator_is_named_not_waited_for(monkeypatch, capsys, tmp_path):
    from recipes import pretrain

    (port,) = free_ports(1)  # nothing listens there
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", f"127.0.0.1:{port}")
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "1")
    code = pretrain.main(PRETRAIN[2:] + ["--workdir", str(tmp_path), "--multi-host",
                                         "--coordinator-timeout", "2"])
    assert code == 1
    error = capsys.readouterr().err
    assert f"The coordinator at 127.0.0.1:{port} (process 0) did not answer within 2 s" in error
    assert "KERAS_DISTRIBUTION_JOB_ADDRESSES" in error
