"""Checkpoints that make an interrupted `fit` resumable: exact step
checkpoints for pre-training (`TrainingCheckpoints`, on Orbax), and epoch
backups for probes and fine-tuning (`fit_callbacks`).

A step checkpoint holds every model variable (weights, random-generator
states) and every optimizer variable (step count, moments, accumulators),
keyed by variable path, and the input pipeline's position (the next
batch: the data order is a pure function of it). It is written
with Orbax (`orbax.checkpoint.v1.training.Checkpointer`, the API behind
`keras.callbacks.OrbaxCheckpoint`) on every backend:

- with JAX, each process writes the shards its devices hold (no process
  gathers a sharded array), and restoring places every value directly in
  the sharding of the model it is restored into, so a checkpoint written
  under one mesh restores under any other (or on one device);
- with TensorFlow and PyTorch the values are host arrays (one process holds
  all of them; under a multi-worker strategy only worker 0 writes);
- saving runs in the background while training continues; the newest
  `keep` checkpoints are kept;
- a checkpoint appears only once complete (Orbax renames a temporary folder,
  or on gs:// writes a commit marker last); an incomplete one, left by a
  kill while saving, is skipped with a message and removed;
- the directory is a local path (a mounted network filesystem included) or
  a `gs://` URL (Orbax's TensorStore GCS driver); every access goes through
  `etils.epath`, never `os.path`.

Why not the `keras.callbacks.OrbaxCheckpoint` callback itself: it closes its
checkpointer at the end of every `fit` (the pre-training loop calls `fit`
once per checkpoint interval, and saves on Ctrl-C / SIGTERM outside `fit`),
it has no restore, and it neither checks a checkpoint against the model
(configuration, variable shapes) nor reports incomplete checkpoints. This
module keeps its format choices (Orbax v1, one pytree per step) and adds
those.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable

import keras

from keras_aim.utils import remote_paths

DEFAULT_KEEP = 2
_STEP = re.compile(r"^(\d+)")


def checkpoint_directory(path: str) -> str:
    """`path` as Orbax needs it: an absolute local path, or a gs:// URL.

    Raises ValueError for other URLs (Orbax 0.12 writes arrays with
    TensorStore's local-file and GCS drivers only), naming the fix.
    """
    if not remote_paths.is_url(path):
        return os.path.abspath(os.path.expanduser(str(path)))
    scheme = str(path).split("://")[0]
    if scheme == "gs":
        return str(path).rstrip("/")
    raise ValueError(
        f"Checkpoints cannot be written to {path}: Orbax writes them to local "
        "paths (mounted network filesystems included) and to gs:// only. "
        f"Mount the {scheme}:// bucket (e.g. mountpoint-s3 or s3fs for "
        "s3://) and pass its local path, or use gs:// or a shared filesystem."
    )


def _orbax():
    if keras.config.backend() != "jax":
        # Orbax runs on JAX; with another Keras backend it only moves host
        # arrays, so keep JAX off any accelerator the model uses.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import orbax.checkpoint as ocp

    return ocp.v1


def _optimizer_key(optimizer, variable) -> str:
    # Optimizer variable paths start with the optimizer's own name (e.g.
    # "adam_w_1/"), which depends on how many optimizers a process created.
    prefix = optimizer.name + "/"
    path = variable.path
    return path[len(prefix):] if path.startswith(prefix) else path


def training_variables(model) -> dict[str, dict[str, object]]:
    """`{"model": {path: variable}, "optimizer": {path: variable}}`: what a
    checkpoint of a compiled, built model holds."""
    if model.optimizer is None:
        raise ValueError("Compile the model before checkpointing it.")
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    state = {"model": {}, "optimizer": {}}
    for group, variables, key in (
        ("model", model.variables, lambda v: v.path),
        ("optimizer", model.optimizer.variables,
         lambda v: _optimizer_key(model.optimizer, v)),
    ):
        for variable in variables:
            name = key(variable)
            if name in state[group]:
                raise ValueError(
                    f"Two {group} variables share the path {name!r}; give "
                    "their layers distinct names to checkpoint the model."
                )
            state[group][name] = variable
    return state


def _value(variable):
    """What Orbax saves for a variable: with JAX the (possibly sharded)
    array itself, never gathered; otherwise a host copy."""
    if keras.config.backend() == "jax":
        return variable.value
    # Through a tensor: NumPy cannot read scalar tf.distribute variables
    # (e.g. the optimizer's step) directly inside a multi-worker scope.
    return keras.ops.convert_to_numpy(keras.ops.convert_to_tensor(variable))


def _signature(variables: dict) -> dict:
    return {
        group: {k: [list(v.shape), str(v.dtype)] for k, v in members.items()}
        for group, members in variables.items()
    }


def _differences(stored: dict, current: dict, what: str) -> list[str]:
    lines = []
    for group in sorted(set(stored) | set(current)):
        old, new = stored.get(group, {}), current.get(group, {})
        missing = sorted(set(new) - set(old))
        extra = sorted(set(old) - set(new))
        changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
        if missing:
            lines.append(f"{what} {group} variables not in the checkpoint: {_few(missing)}")
        if extra:
            lines.append(f"checkpoint {group} variables not in this {what}: {_few(extra)}")
        lines += [f"{group} {k}: {old[k]} in the checkpoint, {new[k]} here"
                  for k in changed[:5]]
    return lines


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")


def _is_primary() -> bool:
    if keras.config.backend() == "jax":
        import jax

        return jax.process_index() == 0
    if keras.config.backend() == "tensorflow":
        from keras_aim.training import distribution_tf

        return distribution_tf.is_chief()
    return True


def _refuse_older_format(directory: str) -> None:
    """Raises ValueError if `directory` holds the `.npz` checkpoints that
    keras_aim wrote before it used Orbax (which would otherwise be taken
    for an empty directory: a new run would start from step 0 beside them)."""
    if remote_paths.is_url(directory) or not os.path.isdir(directory):
        return
    older = sorted(n for n in os.listdir(directory) if n.startswith("ckpt-") and n.endswith(".npz"))
    if older:
        raise ValueError(
            f"{directory} holds checkpoints of an older keras_aim ({older[-1]}), "
            "which this version cannot resume: finish that run with the version "
            "that wrote it, or start this one in a new --workdir."
        )


class TrainingCheckpoints:
    """Step checkpoints of a compiled model's whole training state in one
    directory (see the module docstring).

        checkpoints = TrainingCheckpoints("runs/a/checkpoints", config=config)
        with distribution.scope():
            model = build_and_compile()
            step = checkpoints.restore(model) if checkpoints.latest_step else 0
            ...
            checkpoints.save(model, step)   # in the background
        checkpoints.close()                 # waits for the last save

    Every process of a multi-process JAX run makes the same calls (Orbax
    coordinates them); the directory must then be shared (gs://, or a
    filesystem every host mounts).

    Args:
        directory: local path or gs:// URL.
        keep: how many of the newest checkpoints to keep.
        config: JSON-serializable settings the run depends on (architecture,
            optimizer, batch, seed, ...); `restore` refuses a checkpoint
            written with other values, naming them.
        log: where messages go (skipped incomplete checkpoints), e.g.
            `print`; only the first process logs.
    """

    def __init__(
        self,
        directory: str,
        keep: int = DEFAULT_KEEP,
        config: dict | None = None,
        log: Callable[[str], None] | None = print,
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1; received {keep}.")
        self.directory = checkpoint_directory(directory)
        _refuse_older_format(self.directory)
        self.config = json.loads(json.dumps(config or {}))  # plain JSON values
        self._log = log if log is not None and _is_primary() else (lambda _: None)
        v1 = _orbax()
        self._writer = keras.config.backend() == "jax" or _is_primary()
        self._checkpointer = v1.training.Checkpointer(
            self.directory,
            preservation_policy=v1.training.preservation_policies.LatestN(keep),
        )
        if self._writer:
            self._remove_incomplete()

    def _remove_incomplete(self) -> None:
        """Logs and removes the step entries Orbax does not list as complete:
        a kill while saving leaves a temporary folder (or, on gs://, a step
        folder without its commit marker, which would block a new save of
        that step)."""
        from etils import epath

        root = epath.Path(self.directory)
        if not root.exists():
            return
        complete = {c.path.name for c in self._checkpointer.checkpoints}
        for entry in sorted(root.iterdir()):
            if _STEP.match(entry.name) and entry.name not in complete:
                self._log(f"skipping incomplete checkpoint {entry} (its save "
                          "was interrupted); removing it")
                if _is_primary():
                    entry.rmtree()

    @property
    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return [c.step for c in self._checkpointer.checkpoints]

    @property
    def latest_step(self) -> int | None:
        latest = self._checkpointer.latest
        return None if latest is None else latest.step

    def save(self, model, step: int, wait: bool = False, data_state: dict | None = None) -> str:
        """Starts writing the state of `model` as checkpoint `step` and
        returns its path; the writing finishes in the background (or before
        returning, with `wait`). A save waits for the previous one.
        `data_state`: the input pipeline's position (JSON values, e.g.
        `{"next_batch": 1200}`), stored with the state and given back by
        `data_state(step)`."""
        variables = training_variables(model)
        path = f"{self.directory}/{step}"
        # Every process reads the values (under a TensorFlow multi-worker
        # strategy, reading some variables is a collective); writers write.
        state = {g: {k: _value(v) for k, v in m.items()} for g, m in variables.items()}
        if not self._writer:
            return path
        metadata = {"config": self.config, "variables": _signature(variables),
                    "data": json.loads(json.dumps(data_state or {}))}
        response = self._checkpointer.save_async(
            step, state, force=True, custom_metadata=metadata
        )
        if wait and response is not None:
            response.result()
        return path

    def restore(self, model, step: int | None = None) -> int:
        """Loads checkpoint `step` (default: the newest) into a compiled
        model and returns its step. Each value goes straight to the layout
        of the variable it fills (any mesh, or one device).

        Raises ValueError, naming the differences, if the checkpoint was
        written with another config or for variables of other paths or
        shapes; FileNotFoundError if there is no checkpoint.
        """
        if step is None:
            step = self.latest_step
            if step is None:
                raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
        self._checkpointer.wait()
        variables = training_variables(model)
        custom = self._checkpointer.metadata(step).custom_metadata or {}
        problems = [
            f"{key}: {custom.get('config', {}).get(key)!r} in the checkpoint, "
            f"{self.config.get(key)!r} here"
            for key in sorted(set(custom.get("config", {})) | set(self.config))
            if custom.get("config", {}).get(key) != self.config.get(key)
        ]
        problems += _differences(custom.get("variables", {}), _signature(variables), "model")
        if problems:
            raise ValueError(
                f"Checkpoint {self.directory}/{step} does not fit this run:\n  "
                + "\n  ".join(problems)
                + "\nResume with the settings that wrote it, or start a new "
                "run directory."
            )
        restored = self._checkpointer.load(step, _abstract_state(variables))
        for group, members in variables.items():
            for key, variable in members.items():
                variable.assign(restored[group][key])
        return step

    def data_state(self, step: int) -> dict:
        """The input pipeline's position saved with checkpoint `step` (`{}`
        for a checkpoint written without one)."""
        self._checkpointer.wait()
        custom = self._checkpointer.metadata(step).custom_metadata or {}
        return dict(custom.get("data") or {})

    def wait(self) -> None:
        """Blocks until the background saves are written."""
        self._checkpointer.wait()

    def close(self) -> None:
        """Waits for the background saves, then releases Orbax's threads."""
        self._checkpointer.close()

    def __enter__(self) -> "TrainingCheckpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _abstract_state(variables: dict) -> dict:
    """The restore target: each leaf's shape, dtype and sharding (the
    variable's own with JAX; the host CPU otherwise)."""
    import jax

    if keras.config.backend() == "jax":
        def leaf(v):
            return jax.ShapeDtypeStruct(v.shape, v.value.dtype, sharding=v.value.sharding)
    else:
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])

        def leaf(v):
            return jax.ShapeDtypeStruct(
                v.shape, keras.backend.standardize_dtype(v.dtype), sharding=cpu
            )

    return {g: {k: leaf(v) for k, v in m.items()} for g, m in variables.items()}


def read_checkpoint(directory: str, step: int | None = None) -> tuple[int, dict]:
    """`(step, {"model": {path: array}, "optimizer": {...}})`: a checkpoint's
    values as host NumPy arrays, on any backend and device count (for
    inspection and tests; it holds the whole state in memory)."""
    import jax
    import numpy as np

    v1 = _orbax()
    directory = checkpoint_directory(directory)
    with v1.training.Checkpointer(directory) as checkpointer:
        if step is None:
            if checkpointer.latest is None:
                raise FileNotFoundError(f"No complete checkpoint in {directory}.")
            step = checkpointer.latest.step
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        tree = checkpointer.metadata(step).metadata
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), tree
        )
        restored = checkpointer.load(step, abstract)
    return step, jax.tree.map(np.asarray, restored)


class StepCheckpoint(keras.callbacks.Callback):
    """Saves a checkpoint at the end of every `fit` epoch (use
    `steps_per_epoch` = the checkpoint interval) through `checkpoints`,
    with the data position `data_state(step)` (JSON values) when given.
    Weights holding a NaN or infinity are never saved: `NonFiniteError`
    names them and the newest checkpoint stays the last good one."""

    def __init__(self, checkpoints: TrainingCheckpoints,
                 data_state: Callable[[int], dict] | None = None,
                 on_save: Callable[[int, str], None] | None = None):
        super().__init__()
        self.checkpoints = checkpoints
        self.data_state = data_state
        self.on_save = on_save
        self.last_step: int | None = None  # the step of the newest save

    def on_epoch_end(self, epoch, logs=None):
        from keras_aim.training.interrupts import check_finite_weights

        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        check_finite_weights(self.model, f"the checkpoint of step {step}")
        state = self.data_state(step) if self.data_state else None
        path = self.checkpoints.save(self.model, step, data_state=state)
        self.last_step = step
        if self.on_save:
            self.on_save(step, path)


def _backup_folder(workdir: str, process_index: int) -> str:
    return os.path.join(workdir, "backup" if process_index == 0 else f"backup-process{process_index}")


def backup_epoch(workdir: str | None, process_index: int = 0) -> int:
    """The epoch an interrupted `fit` with `fit_callbacks(workdir, ...)`
    resumes at (0 without a backup): what `BackupAndRestore` will restore,
    read before `fit`, so that a stream whose order is a function of the
    position can start at that epoch's first batch."""
    if workdir is None:
        return 0
    folder = _backup_folder(workdir, process_index)
    for name in ("training_metadata.json", "training_metadata.json.bkp"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as handle:
                return int(json.load(handle)["epoch"])
    return 0


def fit_callbacks(workdir: str | None, resume: bool = False, process_index: int = 0) -> list:
    """Keras callbacks that make a `fit` of whole epochs observable and
    resumable in `workdir`: TensorBoard logs (`tensorboard/`), a CSV log
    (`log.csv`) and an end-of-epoch backup of the model and optimizer
    (`keras.callbacks.BackupAndRestore` in `backup/`, kept in two copies so
    a kill while writing leaves the previous one; removed when `fit`
    completes). A backup left by an interrupted run is continued only with
    `resume=True`, so a run is never resumed or overwritten by accident.
    No `workdir`: no callbacks.

    In a multi-process run, process 0 writes the logs; every other process
    keeps only its own backup (`backup-process<i>/`), which it restores from.
    """
    if workdir is None:
        if resume:
            raise ValueError("resume needs the output directory of the run to resume.")
        return []
    backup = _backup_folder(workdir, process_index)
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
    callbacks = [keras.callbacks.BackupAndRestore(backup, double_checkpoint=True)]
    if process_index == 0:
        callbacks += [
            keras.callbacks.CSVLogger(os.path.join(workdir, "log.csv"), append=resume),
            keras.callbacks.TensorBoard(os.path.join(workdir, "tensorboard")),
        ]
    return callbacks
