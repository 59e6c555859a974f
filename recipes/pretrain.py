"""AIM pre-training with `fit`, on any Keras backend.

    python -m recipes.pretrain --config tiny --workdir runs/tiny
    python -m recipes.pretrain --config tiny --workdir runs/tiny --resume
    python -m recipes.pretrain --config aim_600m --workdir runs/a --data tfds:imagenet2012
    python -m recipes.pretrain --config aim_7b --mesh 16x8 --multi-host --remat ...

Configs live in recipes/configs/ (one per experiment). The run directory
(a local path, or gs://bucket/run) gets Orbax checkpoints (every
`checkpoint_every` steps, written in the background, and on Ctrl-C /
SIGTERM; the newest 2 are kept), log.csv, tensorboard/ and, at the end, the
trained trunk as a keras-hub preset in backbone/. `--resume` continues from
the newest complete checkpoint with the same step, optimizer state,
learning-rate schedule, random state and data order, so the result equals
an uninterrupted run; the --mesh may differ (values are restored into the
new layout), the config, --seed and --accumulate may not.

--mesh BATCHxMODEL splits the global batch over BATCH and the large
kernels over MODEL devices (keras.distribution on JAX; MirroredStrategy
data parallelism on TensorFlow). With --accumulate N each weight update
averages the gradients of N micro-batches of batch_size/N images; --steps
and checkpoints count weight updates. With --multi-host every host runs
the same command (see docs/distribution.md): the mesh spans the devices of
all processes and each process reads its part of every global batch.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from keras_aim.utils.arguments import share
from recipes.common import (
    add_distribution_arguments,
    add_verbosity_argument,
    build_pretrainer,
    fit_logging,
    positive_int,
    quiet,
    run_folder,
    run_reporting_errors,
    setup_distribution,
)
from recipes.configs import NAMES, load


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=NAMES, default="tiny")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=positive_int, help="override total_steps")
    parser.add_argument("--batch-size", type=positive_int, help="override batch_size")
    parser.add_argument("--checkpoint-every", type=positive_int, help="override")
    parser.add_argument(
        "--data", help="digits | folder:PATH | records:PATH | tfds:NAME[:SPLIT] (override)"
    )
    parser.add_argument(
        "--data-workers", type=positive_int, default=None, metavar="N",
        help="threads reading and augmenting images (default: all cores, autotuned)",
    )
    parser.add_argument(
        "--max-bad-images", type=share, default=0.01, metavar="SHARE",
        help="stop when more than this share of the images read were unreadable "
        "(default 0.01; each one is skipped and named until then)",
    )
    add_verbosity_argument(parser)
    add_distribution_arguments(parser)
    return parser.parse_args(argv)


def validate(config: dict, mesh, accumulate: int = 1) -> None:
    """Raises ValueError naming the bad setting and the fix; `mesh` is a
    `keras_aim.distribution.Mesh` (or its "BATCHxMODEL" string)."""
    from keras_aim.training.distribution import check_batch_divisible, parse_mesh
    from keras_aim.utils.image_shapes import check_patch_multiple

    size, patch = config["image_size"], config["patch_size"]
    check_patch_multiple((size,), patch, "The config", names=("image_size",))
    if (size // patch) ** 2 < 2:
        raise ValueError("Pre-training needs at least 2 patches per image.")
    if isinstance(mesh, str):
        mesh = parse_mesh(mesh)
    check_batch_divisible(config["batch_size"], mesh, accumulate)
    if config["total_steps"] < 2 or config["checkpoint_every"] < 1:
        raise ValueError("total_steps must be >= 2 and checkpoint_every >= 1.")


def image_source(spec: str, seed: int):
    """The random-access image source of a data spec (see --data); labels,
    where the data has them, are not used."""
    from keras_aim.data.sources import labeled_images

    return labeled_images(spec, "train", seed).source


def checkpoint_config(config: dict, args) -> dict:
    """What a checkpoint of this run must agree with to be resumed (every
    setting but the checkpoint interval; the mesh may change)."""
    settings = {k: v for k, v in config.items() if k != "checkpoint_every"}
    return {**settings, "seed": args.seed, "accumulate": args.accumulate}


def export_trunk(backbone, training, path: str) -> None:
    """Saves the trained trunk as a keras-hub preset at `path` (local or a
    URL) from the first process; with several JAX processes all take part
    (a trunk sharded across processes is gathered for the export)."""
    import keras

    from keras_aim.models.aim.aim_backbone import AIMBackbone
    from keras_aim.utils.remote_paths import written_directory

    if training.multi_host and keras.config.backend() == "jax":
        from keras_aim.training.distribution_jax import host_values

        values = host_values(backbone.weights)
        if not training.is_primary:
            return
        backbone = AIMBackbone.from_config(backbone.get_config())
        backbone.set_weights(values)
    elif not training.is_primary:
        return
    with written_directory(path) as staging:
        backbone.save_to_preset(staging)


def main(argv=None, callbacks=()) -> int:
    """Runs the recipe; `callbacks` are added to every `fit` (Keras
    callbacks: e.g. to watch or stop the run)."""
    args = parse_args(argv)
    quiet(args)
    return run_reporting_errors(args, lambda: pretrain(args, list(callbacks)))


def pretrain(args, extra_callbacks: list) -> int:
    import keras

    # Fresh Keras state: variable paths (the checkpoint's keys) restart
    # their numbering, also when a process runs the recipe twice.
    keras.backend.clear_session()
    config = load(args.config)
    for key in ("steps", "batch_size", "checkpoint_every", "data"):
        value = getattr(args, key)
        if value is not None:
            config["total_steps" if key == "steps" else key] = value

    from keras_aim.training.checkpointing import TrainingCheckpoints
    from keras_aim.training.distribution import parse_mesh
    from keras_aim.training.interrupts import Interrupts
    from keras_aim.utils.remote_paths import join

    validate(config, parse_mesh(args.mesh), args.accumulate)
    training = setup_distribution(
        args, config["batch_size"], settings=checkpoint_config(config, args)
    )
    say = print if training.is_primary else (lambda *a, **k: None)
    if training.mesh.num_devices > 1:
        say(f"mesh {training.mesh}: {training.micro_batch_size // training.mesh.batch} "
            "images per batch-axis device per step", flush=True)
    # Everything that can be refused is checked before the folder is
    # claimed: a run refused for its mesh or data leaves no trace.
    images = image_source(config["data"], args.seed)
    with contextlib.ExitStack() as stack:
        if training.is_primary or args.resume:
            # Process 0 locks the folder and writes its marker; with
            # --resume every process checks it.
            stack.enter_context(run_folder(
                args.workdir, "pretrain", args.resume, lock=training.is_primary))
        checkpoints = stack.enter_context(TrainingCheckpoints(
            join(args.workdir, "checkpoints"), config=checkpoint_config(config, args), log=say
        ))
        existing = checkpoints.latest_step is not None
        if existing and not args.resume:
            raise ValueError(
                f"{args.workdir} already has checkpoints; pass --resume to "
                "continue that run, or choose another --workdir."
            )
        if args.resume and not existing:
            raise ValueError(
                f"Nothing to resume in {args.workdir}: it holds no checkpoint. "
                "Check the path, or drop --resume to start a new run."
            )
        keras.mixed_precision.set_global_policy(config["precision"])
        keras.utils.set_random_seed(args.seed)
        interrupts = stack.enter_context(Interrupts(say=say, armed=True))
        start = time.perf_counter()
        # Variables are created (and restored) already sharded in the
        # scope; fit runs under it too.
        with training.scope():
            pretrainer = train(args, config, training, checkpoints, images, interrupts,
                               extra_callbacks, say)
        if pretrainer is None:
            return interrupts.exit_code
        trunk = join(args.workdir, "backbone")
        export_trunk(pretrainer.backbone, training, trunk)
    say(f"done: {config['total_steps']} steps in {time.perf_counter() - start:.0f} s "
        f"(global batch {config['batch_size']}); trunk saved to {trunk}")
    return 0


def train(args, config: dict, training, checkpoints, images, interrupts,
          extra_callbacks: list, say):
    """Builds (or restores) the pre-trainer and trains it to the config's
    last step; returns it, or `None` when a signal stopped the run (after a
    checkpoint of the step reached is written)."""
    import keras

    from keras_aim import data
    from keras_aim.training.callbacks import StopAtStep
    from keras_aim.training.checkpointing import StepCheckpoint
    from keras_aim.training.interrupts import StopOnNonFinite
    from keras_aim.utils.remote_paths import join

    # With --accumulate N, fit sees N micro-batches per optimizer update;
    # steps and checkpoints count updates, the learning-rate schedule counts
    # micro-batches (as Keras' optimizer does).
    micro_batch, micro = training.micro_batch_size, training.accumulate
    pretrainer = build_pretrainer(
        {**config, "batch_size": micro_batch, "total_steps": config["total_steps"] * micro},
        args.seed, training.remat, training.gradient_accumulation_steps,
    )
    step = 0
    if checkpoints.latest_step is not None:
        step = checkpoints.restore(pretrainer)
        say(f"resumed from {checkpoints.directory}/{step} at step {step}")
    shard = training.take_data_sharding()
    # The data position: micro-batches consumed (the optimizer's raw step
    # count, also mid-accumulation), saved with every checkpoint.
    next_batch = step * micro
    if step:
        next_batch = int(checkpoints.data_state(step).get("next_batch", next_batch))

    def stream_from(batch: int):
        """The run's stream from micro-batch `batch` on: O(1) to start."""
        return data.pretraining_dataset(
            images, micro_batch, config["image_size"], config["augmentation"],
            seed=args.seed, start_step=batch, shard=shard,
            workers=args.data_workers, max_bad_fraction=args.max_bad_images,
        )

    def data_state(_step: int) -> dict:
        consumed = pretrainer.optimizer._iterations  # micro-batches
        return {"next_batch": int(keras.ops.convert_to_numpy(consumed))}

    total, every = config["total_steps"], config["checkpoint_every"]
    verbose, progress = fit_logging(args, total * micro, "pre-training", step * micro) \
        if training.is_primary else (0, [])
    log = progress[0].bar.write if progress else say
    saver = StepCheckpoint(checkpoints, data_state, on_save=lambda at, path: (
        args.verbose and log(f"step {at}/{total}: checkpoint {path}")))
    non_finite = StopOnNonFinite("lower the config's learning_rate, then resume from "
                                 "the newest checkpoint (written before the loss broke)")
    callbacks = [
        non_finite,
        keras.callbacks.CSVLogger(join(args.workdir, "log.csv"), append=True),
        keras.callbacks.TensorBoard(join(args.workdir, "tensorboard")),
        *progress,
        *extra_callbacks,
    ] if training.is_primary else [non_finite, *extra_callbacks]
    across = training.multi_host and keras.config.backend() == "jax"
    callbacks += [saver, StopAtStep(total),
                  interrupts.callback(at="batch", across_processes=across)]
    try:
        # One fit per checkpoint interval ("epoch"), all on one stream; a
        # run resumed between two checkpoints first ends that interval.
        if step % every and step < total:
            chunk = min(every - step % every, total - step)
            pretrainer.fit(
                stream_from(next_batch), steps_per_epoch=chunk * micro,
                initial_epoch=step // every, epochs=step // every + 1,
                verbose=verbose, callbacks=callbacks, shuffle=False,
            )
            step = int(keras.ops.convert_to_numpy(pretrainer.optimizer.iterations))
            next_batch = data_state(step)["next_batch"]
        if step < total and not interrupts.received:
            pretrainer.fit(
                stream_from(next_batch), steps_per_epoch=every * micro,
                initial_epoch=step // every, epochs=-(-total // every),
                verbose=verbose, callbacks=callbacks,
                shuffle=False,  # the stream is shuffled by its pipeline
            )
        step = int(keras.ops.convert_to_numpy(pretrainer.optimizer.iterations))
        if interrupts.received and step < total:
            # The fit stopped after a step; its epoch end saved that step
            # (unless the signal came between two fits, after a save).
            path = f"{checkpoints.directory}/{step}"
            if saver.last_step != step:
                path = checkpoints.save(pretrainer, step, wait=True,
                                        data_state=data_state(step))
            checkpoints.wait()
            log(f"\ninterrupted at step {step}/{total}: checkpoint {path}; continue "
                f"with the same command and --resume")
            return None
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        newest = checkpoints.latest_step
        log("\nstopped at once, without a checkpoint; "
            + (f"the newest is step {newest}: continue with --resume" if newest
               else "no checkpoint was written yet"))
        raise
    finally:
        for bar in progress:
            bar.close()
    return pretrainer


if __name__ == "__main__":
    sys.exit(main())
