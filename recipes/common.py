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
import os
import sys
import tempfile
from dataclasses import dataclass

DATA_HELP = "digits | folder:PATH | tfds:NAME[:SPLIT]"


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
        "--coordinator-timeout", type=float, default=300.0, metavar="SECONDS",
        help="with --multi-host (JAX): how long a process waits for the "
        "coordinator and the other processes before failing (default 300)",
    )
    group.add_argument(
        "--accumulate", type=int, default=1, metavar="N",
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
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32",
                        help="Keras dtype policy, e.g. mixed_bfloat16")
    parser.add_argument("--out", default=None,
                        help="directory for weights, logs and epoch backups")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --out")
    add_verbosity_argument(parser)
    add_distribution_arguments(parser)


def start_run(args):
    """Checks the output directory and the distribution options (before any
    work) and sets the dtype policy and seed; returns the fit callbacks and
    the `DistributedTraining` (build and fit inside its `scope()`)."""
    import keras

    from keras_aim.training.checkpointing import fit_callbacks

    if args.out and not args.resume and os.path.exists(os.path.join(args.out, "probe.weights.h5")):
        raise ValueError(
            f"{args.out} holds the results of a finished run; choose another --out."
        )
    training = setup_distribution(args, args.batch_size, settings=vars(args))
    callbacks = fit_callbacks(args.out, args.resume, training.process_index)
    keras.config.set_dtype_policy(args.dtype)
    keras.utils.set_random_seed(args.seed)
    return callbacks, training


def splits(args, image_size: int, train: bool = True):
    """(train, val) `LabeledImages` for the --data / --val specs."""
    from keras_aim.data.sources import labeled_images

    def load(spec, split):
        return labeled_images(spec, split, args.seed, image_size, args.tfds_data_dir)

    train_set = load(args.data, "train") if train else None
    val_set = load(args.val or args.data, "val")
    if train_set is not None and train_set.num_classes != val_set.num_classes:
        raise ValueError(
            f"{train_set.description} has {train_set.num_classes} classes but "
            f"{val_set.description} has {val_set.num_classes}; use matching splits."
        )
    return train_set, val_set


def run_in_scope(args, body) -> int:
    """`body(args, callbacks, training)` inside the distribution scope; a bad
    input is printed as `error: ...` and gives exit code 1."""
    try:
        callbacks, training = start_run(args)
        with training.scope():
            return body(args, callbacks, training)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # RuntimeError: DistributionUnavailableError (e.g. --mesh on PyTorch).
        return report_error(args, error)


def report_error(args: argparse.Namespace, error: BaseException) -> int:
    """Prints `error: ...` (with the traceback at `--verbose 2`); returns
    the exit code 1."""
    if getattr(args, "verbose", 0) >= 2:
        import traceback

        traceback.print_exception(error)
    print(f"error: {error}", file=sys.stderr)
    return 1


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
