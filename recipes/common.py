"""What the recipes share: the options of the downstream runs (trunk, data,
probe blocks, output folder), the distribution options (--mesh,
--multi-host, --accumulate, --remat), error reporting, and building the
pre-training model from a config.

Any recipe adds the distribution options with
`add_distribution_arguments(parser)`, then, first thing after parsing and
before building a model, calls
`training = setup_distribution(args, global_batch_size)`: it validates
everything (mesh, backend, batch divisibility) before any computation and
returns a `DistributedTraining` whose `scope()` the model is built, compiled
and fitted in; feed `training.micro_batch_size` images per step and pass
`training.remat` / `training.accumulate` to the model and optimizer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass

from keras_aim.utils.arguments import learning_rate, positive_float, positive_int

DATA_HELP = "digits | folder:PATH | tfds:NAME[:SPLIT]"
# Without --val, this share of each class of a folder is held out for
# validation (accuracy on the training images would say nothing).
HOLDOUT_FRACTION = 0.2
RUN_FILE = "run.json"  # names the recipe that owns a run folder



def add_distribution_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --mesh, --multi-host, --accumulate and --remat."""
    group = parser.add_argument_group("distribution and memory")
    group.add_argument(
        "--mesh", default="1x1",
        help="device mesh BATCHxMODEL: 8x1 = data parallel on 8 devices, "
        "2x4 = 2 data-parallel groups of 4 model-parallel devices (JAX; "
        "TensorFlow: data parallel only; PyTorch: 1x1 only)",
    )
    group.add_argument(
        "--multi-host", action="store_true",
        help="multi-process run, the same command on every host: JAX reads "
        "KERAS_DISTRIBUTION_JOB_ADDRESSES / _NUM_PROCESSES / _PROCESS_ID, "
        "TensorFlow TF_CONFIG (data parallel); each process feeds its part of "
        "every global batch",
    )
    group.add_argument(
        "--coordinator-timeout", type=positive_float, default=300.0, metavar="SECONDS",
        help="with --multi-host (JAX): how long a process waits for the "
        "coordinator and the other processes before failing (default 300)",
    )
    group.add_argument(
        "--accumulate", type=positive_int, default=1, metavar="N",
        help="gradient accumulation: each weight update averages the "
        "gradients of N micro-batches of batch_size/N images (the effective "
        "batch stays batch_size)",
    )
    group.add_argument(
        "--remat", action="store_true",
        help="recompute transformer blocks in the backward pass (less "
        "activation memory, ~1/3 more compute)",
    )


@dataclass(frozen=True)
class DistributedTraining:
    """The validated distribution settings of one run."""

    mesh: object  # keras_aim.distribution.Mesh
    accumulate: int
    remat: bool
    global_batch_size: int
    multi_host: bool = False

    @property
    def micro_batch_size(self) -> int:
        """Global images per step (per `fit` batch)."""
        return self.global_batch_size // self.accumulate

    @property
    def gradient_accumulation_steps(self) -> int | None:
        """For the optimizer (`None`: no accumulation)."""
        return self.accumulate if self.accumulate > 1 else None

    @property
    def process_index(self) -> int:
        """This process's number in a multi-process run (0: the one that
        writes the run's shared files, logs and results)."""
        import keras

        if not self.multi_host:
            return 0
        if keras.config.backend() == "tensorflow":
            from keras_aim.training import distribution_tf

            return distribution_tf.task_number()
        import jax

        return jax.process_index()

    @property
    def is_primary(self) -> bool:
        return self.process_index == 0

    def scope(self):
        """Build, compile, restore and fit the model inside this."""
        from keras_aim.training.distribution import distribution_scope

        return distribution_scope(self.mesh, multi_host=self.multi_host)

    def take_data_sharding(self) -> tuple[int, int]:
        """`(index, count)` for a pipeline that yields this process's part
        of every global batch itself (`pretraining_dataset(shard=...)`);
        Keras' own sharding of the input is turned off. Call inside
        `scope()`. One process: `(0, 1)`."""
        import keras

        distribution = keras.distribution.distribution() if (
            keras.config.backend() == "jax") else None
        if not self.multi_host or distribution is None:
            return 0, 1
        from keras_aim.training import distribution_jax

        distribution.auto_shard_dataset = False
        return distribution_jax.data_shard(distribution)


@contextlib.contextmanager
def results_folder(out: str, training: DistributedTraining):
    """Where this process writes the run's results: `out` on process 0; a
    temporary folder, removed afterwards, on the others. Every process must
    save: reading a sharded or adapted weight may compute across processes,
    so all of them take part; only process 0's files are kept."""
    if training.is_primary:
        yield out
        return
    with tempfile.TemporaryDirectory(prefix="keras_aim-process") as folder:
        yield folder


def setup_distribution(
    args: argparse.Namespace, global_batch_size: int, settings: dict | None = None
) -> DistributedTraining:
    """Validates the distribution options against the batch size and the
    backend and prepares the devices (with --multi-host: starts the
    multi-process runtime); call it before anything computes. In a
    multi-process JAX run, every process must pass equal `settings` (the
    run's config) and the mesh must cover all their devices.

    Raises ValueError (bad mesh, batch not divisible, bad --accumulate,
    processes that disagree) or
    `keras_aim.distribution.DistributionUnavailableError` (the backend cannot
    run the mesh, e.g. PyTorch with more than one device).
    """
    import keras

    from keras_aim.training import distribution

    mesh = distribution.parse_mesh(args.mesh)
    if args.accumulate < 1:
        raise ValueError(f"--accumulate must be >= 1; received {args.accumulate}.")
    distribution.check_backend_supports(mesh)
    backend = keras.config.backend()
    if args.multi_host and backend == "tensorflow":
        from keras_aim.training import distribution_tf

        distribution_tf.multi_worker_strategy(mesh.batch)  # before any TF op
    elif args.multi_host:
        distribution.initialize_multi_host(args.coordinator_timeout)  # JAX only
    distribution.check_batch_divisible(global_batch_size, mesh, args.accumulate)
    if args.multi_host:
        distribution.check_multi_host(mesh, {
            **(settings or {}), "batch_size": global_batch_size,
            "accumulate": args.accumulate, "remat": args.remat,
        })
    elif backend == "tensorflow" and mesh.batch > 1:
        from keras_aim.training import distribution_tf
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            distribution_tf.split_cpu(mesh.batch)
    return DistributedTraining(
        mesh, args.accumulate, args.remat, global_batch_size, args.multi_host
    )


def build_pretrainer(
    config: dict,
    seed: int,
    remat: bool = False,
    gradient_accumulation_steps: int | None = None,
):
    """An `AIMPretrainer` for a recipe config, compiled with the paper's
    optimizer over `config["total_steps"]` (in steps; see
    `pretraining_optimizer`)."""
    from keras_aim.models.aim.aim_backbone import AIMBackbone
    from keras_aim.models.aim.aim_pretrainer import AIMPretrainer
    from keras_aim.training.optimizers import pretraining_optimizer

    backbone = AIMBackbone(
        image_shape=(config["image_size"], config["image_size"], 3),
        patch_size=config["patch_size"],
        hidden_dim=config["hidden_dim"],
        num_layers=config["num_layers"],
        num_heads=config["num_heads"],
        mlp_ratio=config.get("mlp_ratio", 4.0),
        layer_norm_epsilon=1e-5,  # the training code's value
        remat=remat,
    )
    pretrainer = AIMPretrainer(
        backbone,
        pixel_head_width=config["pixel_head_width"],
        pixel_head_depth=config["pixel_head_depth"],
        seed=seed,
    )
    pretrainer.compile(
        optimizer=pretraining_optimizer(
            config["total_steps"],
            config["learning_rate"],
            gradient_accumulation_steps=gradient_accumulation_steps,
        )
    )
    return pretrainer


def parse_layers(text: str):
    if text in ("last", "best"):
        return text
    return tuple(int(i) for i in text.split(","))


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the downstream recipes."""
    parser.add_argument("--backbone", required=True, help="preset name or directory")
    parser.add_argument("--data", default="digits", help=f"training data: {DATA_HELP}")
    parser.add_argument("--val", default=None,
                        help=f"validation data: {DATA_HELP} (default: --data's "
                             "held-out / validation split)")
    parser.add_argument("--tfds-data-dir", default=None,
                        help="where tensorflow-datasets keeps prepared data")
    parser.add_argument("--probe-layers", type=parse_layers, default="last",
                        help="last | best | comma-separated block indices")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--learning-rate", type=learning_rate, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32",
                        help="Keras dtype policy, e.g. mixed_bfloat16")
    parser.add_argument("--out", default=None,
                        help="directory for weights, logs and epoch backups")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --out")
    add_verbosity_argument(parser)
    add_distribution_arguments(parser)


def start_run(args, recipe: str) -> DistributedTraining:
    """Checks that --out holds no finished run and the distribution options
    (before any work) and sets the dtype policy and seed; returns the
    `DistributedTraining` (build and fit inside its `scope()`). The output
    folder is claimed later, by `Run.callbacks()`, once the trunk and the
    data have loaded: a run refused for its data leaves no folder."""
    import keras

    if args.out and not args.resume and os.path.exists(os.path.join(args.out, "probe.weights.h5")):
        raise ValueError(
            f"{args.out} holds the results of a finished run; choose another --out."
        )
    training = setup_distribution(args, args.batch_size, settings=vars(args))
    keras.config.set_dtype_policy(args.dtype)
    keras.utils.set_random_seed(args.seed)
    return training


class Run:
    """A downstream run's output folder and signals, handed to a recipe's
    body. `callbacks()` claims and locks --out (on first use) and returns
    the `fit` callbacks: logs, epoch backups, and a stop at the end of the
    epoch in progress on Ctrl-C / SIGTERM (its backup saved; exit code 130
    / 143, `--resume` continues)."""

    def __init__(self, args, recipe: str, training: DistributedTraining,
                 stack: contextlib.ExitStack):
        self.args, self.recipe, self.training, self._stack = args, recipe, training, stack
        self._callbacks: list | None = None
        from keras_aim.training.interrupts import Interrupts

        self.interrupts = stack.enter_context(Interrupts())

    def callbacks(self) -> list:
        if self._callbacks is None:
            import keras

            from keras_aim.training.checkpointing import fit_callbacks

            args, training = self.args, self.training
            if args.out and (training.is_primary or args.resume):
                # Process 0 locks the folder and writes its marker; with
                # --resume every process checks it.
                self._stack.enter_context(run_folder(
                    args.out, self.recipe, args.resume, lock=training.is_primary))
            across = training.multi_host and keras.config.backend() == "jax"
            self._callbacks = [
                *fit_callbacks(args.out, args.resume, training.process_index),
                self.interrupts.callback(at="epoch", across_processes=across),
            ]
        return list(self._callbacks)


def claim_run_folder(folder: str, recipe: str, resume: bool) -> None:
    """Makes `folder` the run folder of `recipe` (`recipes.<recipe>`), or
    raises `ValueError` if it belongs to another recipe, is a non-empty
    folder of anything else, or (with `resume`) holds no run to resume.

    A run folder holds `run.json` naming its recipe; a recipe's own checks
    (finished or interrupted run, --resume) come after this one."""
    from keras_aim.utils import remote_paths

    if remote_paths.is_url(folder):  # gs://...: no os.path, no rename
        return _claim_remote_run_folder(folder, recipe, resume)
    from keras_aim.utils.run_lock import LOCK_FILE

    marker = os.path.join(folder, RUN_FILE)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder} is a file; the run needs a folder.")
    # The lock, and the backups of a multi-process run's other processes
    # (which may start before process 0 claims the folder), are the run's.
    contents = [name for name in (os.listdir(folder) if os.path.isdir(folder) else [])
                if name != LOCK_FILE and not re.fullmatch(r"backup-process\d+", name)]
    if resume and not contents:
        raise ValueError(
            f"Nothing to resume in {folder}: "
            + ("it is empty." if os.path.isdir(folder) else "it does not exist.")
            + " Check the path, or drop --resume to start a new run."
        )
    if contents:
        owner = _run_owner(folder, marker)
        if owner is None:
            raise ValueError(
                f"{folder} is not empty and not a run folder of recipes.{recipe} "
                f"(it holds {', '.join(sorted(contents)[:5])}"
                f"{', ...' if len(contents) > 5 else ''}). Choose a new or empty folder."
            )
        if owner != recipe:
            raise ValueError(
                f"{folder} is a run folder of recipes.{owner}; recipes.{recipe} "
                "would overwrite its logs. Choose another folder."
            )
        return
    os.makedirs(folder, exist_ok=True)
    from keras_aim.utils.atomic_files import atomic_file

    with atomic_file(marker) as staging, open(staging, "w") as handle:
        json.dump({"recipe": recipe}, handle)


@contextlib.contextmanager
def run_folder(folder: str, recipe: str, resume: bool, lock: bool = True):
    """Holds `folder` as the run folder of `recipe` for the `with` block:
    takes its lock (`keras_aim.utils.run_lock`; a second run on the folder
    is refused at once and changes nothing), then claims it
    (`claim_run_folder`). A folder this call created is removed again when
    the claim is refused. `lock=False` (the other processes of a
    multi-process run: process 0 holds the lock) only claims. A gs:// folder
    is claimed but not locked: an object store has no exclusive create here.
    """
    from keras_aim.utils import remote_paths
    from keras_aim.utils.run_lock import RunLock

    if remote_paths.is_url(folder) or not lock:
        claim_run_folder(folder, recipe, resume)
        yield
        return
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder} is a file; the run needs a folder.")
    created = not os.path.exists(folder)
    if created and resume:
        claim_run_folder(folder, recipe, resume)  # refuses: nothing to resume
    os.makedirs(folder, exist_ok=True)
    held = RunLock(folder)
    try:
        held.acquire()
        claim_run_folder(folder, recipe, resume)
    except BaseException:
        held.release()
        if created and not os.listdir(folder):
            os.rmdir(folder)
        raise
    try:
        yield
    finally:
        held.release()


def _claim_remote_run_folder(folder: str, recipe: str, resume: bool) -> None:
    """`claim_run_folder` for a URL, through etils.epath (an object store
    writes the small marker in one piece)."""
    from etils import epath

    path = epath.Path(folder)
    contents = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if resume and not contents:
        raise ValueError(
            f"Nothing to resume in {folder}: it holds nothing. Check the path, "
            "or drop --resume to start a new run."
        )
    if not contents:
        path.mkdir(parents=True, exist_ok=True)
        (path / RUN_FILE).write_text(json.dumps({"recipe": recipe}))
        return
    try:
        owner = str(json.loads((path / RUN_FILE).read_text())["recipe"])
    except (OSError, ValueError, KeyError, TypeError):
        owner = "pretrain" if "checkpoints" in contents else None
    if owner != recipe:
        raise ValueError(
            f"{folder} is not a run folder of recipes.{recipe} (it holds "
            f"{', '.join(contents[:5])}{', ...' if len(contents) > 5 else ''}). "
            "Choose a new or empty folder."
        )


def _run_owner(folder: str, marker: str) -> str | None:
    """The recipe named in a run folder's marker; pre-training runs written
    before markers existed are recognized by their checkpoints."""
    if os.path.isfile(marker):
        try:
            with open(marker) as handle:
                return str(json.load(handle)["recipe"])
        except (ValueError, KeyError, TypeError):
            return None
    if os.path.isdir(os.path.join(folder, "checkpoints")):
        return "pretrain"
    return None


def splits(args, image_size: int, train: bool = True):
    """(train, val) `LabeledImages` for the --data / --val specs.

    Training needs a validation split that is not the training data: a
    folder without --val gives up `HOLDOUT_FRACTION` of each class (said
    on stdout); --val naming the training folder is refused, and so is
    data with one class."""
    from keras_aim.data.sources import has_own_validation_split, labeled_images

    holdout = 0.0
    if train and not has_own_validation_split(args.data):
        if args.val is None:
            holdout = HOLDOUT_FRACTION
        elif args.val == args.data:
            raise ValueError(
                f"--val {args.val} is the training data: its accuracy would "
                "be measured on the training images. Give a separate "
                f"validation set, or leave --val out to hold out "
                f"{HOLDOUT_FRACTION:.0%} of each class of {args.data}."
            )

    def load(spec, split):
        return labeled_images(spec, split, args.seed, image_size, args.tfds_data_dir,
                              holdout=holdout if spec == args.data else 0.0)

    train_set = load(args.data, "train") if train else None
    val_set = load(args.val or args.data, "val")
    if holdout:
        print(f"no --val: validating on {val_set.description}, held out from training")
    if train_set is not None:
        if train_set.num_classes < 2:
            raise ValueError(
                f"{train_set.description} has a single class "
                f"({train_set.class_names[0]!r}); a classifier needs at least 2. "
                "Put each class's images in its own subfolder."
            )
        if train_set.class_names != val_set.class_names:
            raise ValueError(
                f"{train_set.description} and {val_set.description} name different "
                f"classes (labels would not match): {_names(train_set.class_names)} "
                f"against {_names(val_set.class_names)}. Give both the same class "
                "folders (the same names, so the same order)."
            )
    return train_set, val_set


def _names(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return f"[{shown}{', ...' if len(names) > most else ''}] ({len(names)})"


def run_in_scope(args, body, recipe: str) -> int:
    """`body(args, run, training)` inside the distribution scope of recipe
    `recipe`'s run, `run` a `Run`; any error is printed as one `error: ...`
    line (the traceback too at `--verbose 2`) and gives exit code 1."""

    def run():
        training = start_run(args, recipe)
        with contextlib.ExitStack() as stack:
            context = Run(args, recipe, training, stack)
            with training.scope():
                return body(args, context, training)

    return run_reporting_errors(args, run)


def run_reporting_errors(args: argparse.Namespace, run) -> int:
    """`run()`'s exit code; an exception becomes one `error: ...` line and
    exit code 1 (with the traceback at `--verbose 2`); a run stopped on a
    signal (`Interrupted`) says how to resume and gives 130 / 143, Ctrl-C
    elsewhere 130."""
    from keras_aim.training.interrupts import Interrupted

    try:
        return run()
    except Interrupted as stop:
        out = getattr(args, "out", None)
        print(f"interrupted: {stop}; "
              + (f"rerun with --resume --out {out} to continue" if out else
                 "nothing was kept (no --out)"), flush=True)
        return stop.exit_code
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 130
    except Exception as error:  # every failure: one line, not a traceback
        return report_error(args, error)


def report_error(args: argparse.Namespace, error: BaseException) -> int:
    """Prints `error: ...` (with the traceback at `--verbose 2`); returns
    the exit code 1."""
    from keras_aim.utils.quiet import report_error as report

    return report(error, with_traceback=getattr(args, "verbose", 0) >= 2)


def add_verbosity_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose", type=int, default=1, choices=(0, 1, 2),
        help="0: results only; 1: a progress bar with the loss (default); 2: "
        "Keras' per-epoch logs, framework logs, warnings and tracebacks",
    )


def quiet(args: argparse.Namespace) -> None:
    """Silences framework logs unless `--verbose 2`; call before importing
    keras_aim's models (which import the frameworks)."""
    from keras_aim.utils.quiet import quiet_frameworks

    quiet_frameworks(args.verbose >= 2)


def fit_logging(args: argparse.Namespace, total_steps: int, description: str,
                initial_step: int = 0) -> tuple[int, list]:
    """`(verbose for fit, callbacks)` for `--verbose`: a progress bar over
    `total_steps` at 1, Keras' per-epoch lines at 2, nothing at 0. Close
    the bar (`callbacks[0].close()`) when the run ends."""
    if args.verbose == 1:
        from keras_aim.training.callbacks import ProgressBar

        return 0, [ProgressBar(total_steps, description, initial_step)]
    return (2 if args.verbose >= 2 else 0), []
