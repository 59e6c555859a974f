"""Checkpoints that make an interrupted `fit` resumable: exact step
checkpoints for pre-training, and epoch backups for probes and fine-tuning
(`fit_callbacks`).

A checkpoint is one `.npz` holding every model variable (weights, BatchNorm
statistics, random-generator states) and every optimizer variable (step
count, moments), keyed by variable path, plus the step. It is written to a
temporary file and renamed, so a kill at any moment leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import glob
import os
import re

import keras
import numpy as np

from keras_aim.utils.atomic_files import atomic_file

_NAME = "ckpt-{step:09d}.npz"
_PATTERN = re.compile(r"ckpt-(\d{9})\.npz$")


def _state(model) -> dict[str, object]:
    state = {f"model/{v.path}": v for v in model.variables}
    state.update({f"optimizer/{v.path}": v for v in model.optimizer.variables})
    return state


def save_checkpoint(model, directory: str, keep: int = 2) -> str:
    """Writes the model + optimizer state at the optimizer's current step;
    keeps the newest `keep` checkpoints. Returns the path."""
    step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, _NAME.format(step=step))
    arrays = {k: keras.ops.convert_to_numpy(v) for k, v in _state(model).items()}
    with atomic_file(path) as staging:
        np.savez(staging, **arrays)
    for old in list_checkpoints(directory)[:-keep]:
        os.remove(old)
    return path


def list_checkpoints(directory: str) -> list[str]:
    """Complete checkpoints in `directory`, oldest first."""
    paths = glob.glob(os.path.join(directory, "ckpt-*.npz"))
    return sorted(p for p in paths if _PATTERN.search(p))


def restore_checkpoint(model, path: str) -> int:
    """Loads a checkpoint into a compiled, built model; returns its step.

    Every variable must be present with the same shape (a checkpoint of a
    different config is refused, naming the differences)."""
    if model.optimizer is None:
        raise ValueError("Compile the model before restoring a checkpoint.")
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    state = _state(model)
    with np.load(path) as stored:
        missing = sorted(set(state) - set(stored.files))
        mismatched = sorted(
            k for k in state if k in stored.files
            and tuple(stored[k].shape) != tuple(state[k].shape)
        )
        if missing or mismatched:
            raise ValueError(
                f"Checkpoint {path} does not fit this model: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"shape mismatches {mismatched[:5]}. Resume with the config "
                "that wrote it, or start a new run directory."
            )
        for key, variable in state.items():
            variable.assign(stored[key])
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


class StepCheckpoint(keras.callbacks.Callback):
    """Saves a checkpoint at the end of every `fit` epoch; use
    `steps_per_epoch` = the checkpoint interval."""

    def __init__(self, directory: str, keep: int = 2):
        super().__init__()
        self.directory = directory
        self.keep = keep

    def on_epoch_end(self, epoch, logs=None):
        save_checkpoint(self.model, self.directory, self.keep)


def fit_callbacks(workdir: str | None, resume: bool = False) -> list:
    """Keras callbacks that make a `fit` of whole epochs observable and
    resumable in `workdir`: TensorBoard logs (`tensorboard/`), a CSV log
    (`log.csv`) and an end-of-epoch backup of the model and optimizer
    (`keras.callbacks.BackupAndRestore` in `backup/`, kept in two copies so
    a kill while writing leaves the previous one; removed when `fit`
    completes). A backup left by an interrupted run is continued only with
    `resume=True`, so a run is never resumed or overwritten by accident.
    No `workdir`: no callbacks.
    """
    if workdir is None:
        if resume:
            raise ValueError("resume needs the output directory of the run to resume.")
        return []
    backup = os.path.join(workdir, "backup")
    interrupted = os.path.isdir(backup) and bool(os.listdir(backup))
    if interrupted and not resume:
        raise ValueError(
            f"{workdir} holds an interrupted run; pass --resume to continue "
            "it, or choose another output directory."
        )
    if resume and not interrupted:
        raise ValueError(
            f"Nothing to resume in {workdir}: it holds no interrupted run "
            "(runs that finished remove their backup). Drop --resume."
        )
    os.makedirs(workdir, exist_ok=True)
    return [
        keras.callbacks.BackupAndRestore(backup, double_checkpoint=True),
        keras.callbacks.CSVLogger(os.path.join(workdir, "log.csv"), append=resume),
        keras.callbacks.TensorBoard(os.path.join(workdir, "tensorboard")),
    ]
