"""What the recipes share: building the pre-training model from a config, and
the distribution options (--mesh, --multi-host, --accumulate, --remat).

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
from dataclasses import dataclass


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
        help="multi-process run: calls keras.distribution.initialize() from "
        "KERAS_DISTRIBUTION_JOB_ADDRESSES / _NUM_PROCESSES / _PROCESS_ID "
        "(JAX); every host runs the same command, tf.data input is sharded "
        "per host",
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

    @property
    def micro_batch_size(self) -> int:
        """Global images per step (per `fit` batch)."""
        return self.global_batch_size // self.accumulate

    @property
    def gradient_accumulation_steps(self) -> int | None:
        """For the optimizer (`None`: no accumulation)."""
        return self.accumulate if self.accumulate > 1 else None

    def scope(self):
        """Build, compile, restore and fit the model inside this."""
        from keras_aim.distribution import distribution_scope

        return distribution_scope(self.mesh)


def setup_distribution(args: argparse.Namespace, global_batch_size: int) -> DistributedTraining:
    """Validates the distribution options against the batch size and the
    backend and prepares the devices; call it before anything computes.

    Raises ValueError (bad mesh, batch not divisible, bad --accumulate) or
    `keras_aim.distribution.DistributionUnavailableError` (the backend cannot
    run the mesh, e.g. PyTorch with more than one device).
    """
    import keras

    from keras_aim import distribution

    mesh = distribution.parse_mesh(args.mesh)
    if args.accumulate < 1:
        raise ValueError(f"--accumulate must be >= 1; received {args.accumulate}.")
    distribution.check_backend_supports(mesh)
    if args.multi_host:
        distribution.initialize_multi_host()  # before any device is touched
    distribution.check_batch_divisible(global_batch_size, mesh, args.accumulate)
    if keras.config.backend() == "tensorflow" and mesh.batch > 1:
        from keras_aim import distribution_tf
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            distribution_tf.split_cpu(mesh.batch)
    return DistributedTraining(mesh, args.accumulate, args.remat, global_batch_size)


def build_pretrainer(
    config: dict,
    seed: int,
    remat: bool = False,
    gradient_accumulation_steps: int | None = None,
):
    """An `AIMPretrainer` for a recipe config, compiled with the paper's
    optimizer over `config["total_steps"]` (in steps; see
    `pretraining_optimizer`)."""
    import keras_aim

    backbone = keras_aim.AIMBackbone(
        image_shape=(config["image_size"], config["image_size"], 3),
        patch_size=config["patch_size"],
        hidden_dim=config["hidden_dim"],
        num_layers=config["num_layers"],
        num_heads=config["num_heads"],
        layer_norm_epsilon=1e-5,  # the training code's value
        remat=remat,
    )
    pretrainer = keras_aim.AIMPretrainer(
        backbone,
        pixel_head_width=config["pixel_head_width"],
        pixel_head_depth=config["pixel_head_depth"],
        seed=seed,
    )
    pretrainer.compile(
        optimizer=keras_aim.pretraining_optimizer(
            config["total_steps"],
            config["learning_rate"],
            gradient_accumulation_steps=gradient_accumulation_steps,
        )
    )
    return pretrainer
