"""Runs that refuse to report garbage: signals that always checkpoint, one
run per work folder, non-finite numbers refused, NaN never saved.
(Bad data: tests/test_data.py and test_recipes.py; strict loading:
test_lora.py, test_checkpoints.py; exports: test_export.py.)"""

import json
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from recipes import attentive_probe, pretrain
from tests.conftest import to_numpy

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--config", "tiny", "--steps", "4", "--checkpoint-every", "2",
         "--batch-size", "8", "--verbose", "0"]


def _steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) \
        if folder.is_dir() else []


def _line(child, selector, prefix: str, deadline: float) -> str:
    """The child's next stdout line starting with `prefix`."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not selector.select(timeout=left):
            child.kill()
            pytest.fail(f"no {prefix!r} line from the child in time")
        line = child.stdout.readline()
        if not line:
            pytest.fail(f"the child ended before printing {prefix!r} "
                        f"(exit code {child.wait()})")
        if line.startswith(prefix):
            return line


def test_ten_signalled_runs_all_checkpoint_and_exit_130_or_143(tmp_path):
    """Ctrl-C and SIGTERM, sent from outside at a random moment of a
    training run, 10 runs in a row in one child process: each run stops
    after a step, writes a checkpoint of exactly that step and exits with
    130 (SIGINT) or 143 (SIGTERM). The recipe used to raise
    KeyboardInterrupt from its handler into framework code: of 4 tries,
    2 were ignored and 1 ended with a TypeError and no checkpoint."""
    runs = 10
    flags = ["--config", "tiny", "--steps", "100000", "--checkpoint-every", "100000",
             "--batch-size", "8", "--verbose", "0"]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.signal_child", str(tmp_path), str(runs), *flags],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1,
        )
        selector = selectors.DefaultSelector()
        selector.register(child.stdout, selectors.EVENT_READ)
        delays = random.Random(0)
        outcomes = []
        try:
            for run in range(runs):
                _line(child, selector, f"started {run}", time.monotonic() + 240)
                time.sleep(delays.uniform(0.0, 0.3))
                number = signal.SIGINT if run % 2 == 0 else signal.SIGTERM
                child.send_signal(number)
                _, _, code, step = _line(child, selector, f"exit {run} ",
                                         time.monotonic() + 120).split()
                outcomes.append((number, int(code), int(step), _steps(tmp_path / str(run))))
        finally:
            child.kill() if child.poll() is None else None
            child.wait()
    log = (tmp_path / "stderr.txt").read_text()
    for number, code, step, saved in outcomes:
        assert code == {signal.SIGINT: 130, signal.SIGTERM: 143}[number], (outcomes, log[-2000:])
        assert step >= 1 and saved == [step], (outcomes, log[-2000:])


def test_a_second_run_on_a_work_folder_is_refused_at_once(tmp_path, capsys):
    """Two runs on one folder used to both start; the second died later on
    a raw checkpoint error, with two headers in log.csv. A live lock is
    refused before anything is touched; a dead process's is taken over."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    lock = workdir / ".run.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "started": "now"}))
    assert pretrain.main(SHORT + ["--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err
    assert f"{workdir} is in use by another run (process {os.getpid()} on " in err
    assert sorted(p.name for p in workdir.iterdir()) == [".run.lock"]

    probe_out = tmp_path / "probe"
    probe_out.mkdir()
    (probe_out / ".run.lock").write_text(lock.read_text())
    trunk = tmp_path / "trunk"
    import keras_aim

    keras_aim.AIMBackbone(image_shape=(16, 16, 3), patch_size=4, hidden_dim=16,
                          num_layers=1, num_heads=2).save_to_preset(str(trunk))
    probe = ["--backbone", str(trunk), "--epochs", "1", "--probe-layers", "0",
             "--verbose", "0", "--out", str(probe_out)]
    assert attentive_probe.main(probe) == 1
    assert "is in use by another run" in capsys.readouterr().err
    assert sorted(p.name for p in probe_out.iterdir()) == [".run.lock"]

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    lock.write_text(json.dumps({"pid": int(finished.stdout), "host": socket.gethostname()}))
    assert pretrain.main(SHORT + ["--workdir", str(workdir)]) == 0
    assert f"taking over the lock of process {int(finished.stdout)}" in capsys.readouterr().out
    assert not lock.exists() and _steps(workdir) == [2, 4]


def test_a_refused_mesh_or_data_leaves_no_work_folder(tmp_path, capsys):
    """--mesh 3x3 on one device was refused only after run.json and an
    empty checkpoints/ were written."""
    workdir = tmp_path / "run"
    assert pretrain.main(SHORT + ["--workdir", str(workdir), "--mesh", "3x3"]) == 1
    assert "error:" in capsys.readouterr().err
    assert pretrain.main(SHORT + ["--workdir", str(workdir),
                                  "--data", f"folder:{tmp_path / 'missing'}"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not workdir.exists()


@pytest.mark.parametrize("flag,value", [
    ("--learning-rate", "nan"), ("--learning-rate", "inf"), ("--learning-rate", "-1"),
    ("--coordinator-timeout", "nan"),
])
def test_non_finite_numbers_are_refused_when_parsed(flag, value, capsys):
    """`--learning-rate nan` used to train a NaN probe, save it and print
    a top-1 of 50%, with exit code 0."""
    with pytest.raises(SystemExit) as stop:
        attentive_probe.main(["--backbone", "unused", flag, value])
    assert stop.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--workdir", "unused", "--max-bad-images", value])
    with pytest.raises(ValueError, match="learning_rate must be a finite number"):
        from keras_aim.training.optimizers import adamw_warmup_cosine

        adamw_warmup_cosine(float(value), 10)


class Poison(keras.callbacks.Callback):
    """Turns a weight to NaN after step `at` (a diverging run)."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def on_train_batch_end(self, batch, logs=None):
        if int(to_numpy(self.model.optimizer.iterations)) == self.at:
            weight = self.model.backbone.weights[0]
            weight.assign(keras.ops.full(weight.shape, float("nan"), weight.dtype))


@pytest.mark.parametrize("at", [3, 4])
def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        tmp_path, capsys, at):
    """NaN weights after step 3: the loss of step 4 is NaN and the run
    stops there. After step 4 (the end of a checkpoint interval, loss
    still finite): the checkpoint of step 4 is refused. Either way the
    newest checkpoint is step 2's, no trunk is exported, the exit code is
    1, and a resume starts from good weights."""
    workdir = tmp_path / "run"
    run = ["--config", "tiny", "--steps", "6", "--checkpoint-every", "2",
           "--batch-size", "8", "--verbose", "0", "--workdir", str(workdir)]
    assert pretrain.main(run, [Poison(at)]) == 1
    err = capsys.readouterr().err
    expected = "The loss became nan at step 4" if at == 3 else \
        "variables hold NaN or infinite values"
    assert expected in err and ("nothing was saved" in err or "was not saved" in err), err
    assert _steps(workdir) == [2]
    assert not (workdir / "backbone").exists()
    assert not (workdir / ".run.lock").exists()


def test_a_diverging_probe_saves_and_reports_nothing(tmp_path, capsys):
    """A learning rate that makes the probe diverge ends with an error
    naming the step: no probe file, no top-1 line."""
    import keras_aim

    trunk = tmp_path / "trunk"
    keras_aim.AIMBackbone(image_shape=(16, 16, 3), patch_size=4, hidden_dim=16,
                          num_layers=1, num_heads=2).save_to_preset(str(trunk))
    out = tmp_path / "probe"
    code = attentive_probe.main(["--backbone", str(trunk), "--epochs", "3", "--probe-layers",
                                 "0", "--verbose", "0", "--learning-rate", "1e38",
                                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1, captured
    assert "top-1" not in captured.out
    assert "error: " in captured.err and ("The loss became" in captured.err
                                          or "NaN or infinite" in captured.err)
    assert not (out / "probe.weights.h5").exists()


def test_check_finite_weights_names_the_broken_variables():
    from keras_aim.training.interrupts import NonFiniteError, check_finite_weights

    layer = keras.layers.Dense(2)
    model = keras.Sequential([keras.Input((3,)), layer])
    check_finite_weights(model, "the model")
    layer.kernel.assign(np.full((3, 2), np.inf, "float32"))
    with pytest.raises(NonFiniteError, match=r"1 variables hold NaN.*kernel.*the model was not saved"):
        check_finite_weights(model, "the model")


def test_a_signal_during_a_probe_fit_stops_at_the_epoch_end_with_its_backup(tmp_path):
    """The probe and LoRA recipes' stop: a real SIGTERM mid-epoch ends the
    fit at that epoch's end with `Interrupted` (exit code 143), its backup
    kept (Keras deletes it when a fit ends normally), and the resumed fit
    runs only the epochs left."""
    from keras_aim.training import probing
    from keras_aim.training.checkpointing import backup_epoch, fit_callbacks
    from keras_aim.training.interrupts import Interrupted, Interrupts

    features = np.random.RandomState(0).normal(size=(40, 4, 8)).astype("float32")
    labels = np.arange(40) % 3

    class Terminate(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(to_numpy(self.model.optimizer.iterations)) == 6:  # epoch 2 of 4
                os.kill(os.getpid(), signal.SIGTERM)

    with Interrupts() as interrupts, pytest.raises(Interrupted) as stop:
        probing.train_attentive_probe(
            features, labels, 3, 2, epochs=4, batch_size=10,
            callbacks=[*fit_callbacks(str(tmp_path)), Terminate(), interrupts.callback("epoch")],
        )
    assert stop.value.exit_code == 143 and backup_epoch(str(tmp_path)) == 2
    model = probing.train_attentive_probe(
        features, labels, 3, 2, epochs=4, batch_size=10,
        callbacks=fit_callbacks(str(tmp_path), True),
    )
    assert int(to_numpy(model.optimizer.iterations)) == 16
