"""AIM pre-training with `fit`, on any Keras backend.

    python -m recipes.pretrain --config tiny --workdir runs/tiny
    python -m recipes.pretrain --config tiny --workdir runs/tiny --resume
    python -m recipes.pretrain --config aim_600m --workdir runs/a --data tfds:imagenet2012
    python -m recipes.pretrain --config aim_7b --mesh 16x8 --multi-host --remat ...

Configs live in recipes/configs/ (one per experiment). The run directory
gets checkpoints (every `checkpoint_every` steps and on Ctrl-C / SIGTERM),
log.csv, tensorboard/ and, at the end, the trained trunk as a keras-hub
preset in backbone/. `--resume` continues from the newest checkpoint with
the same step, optimizer state, learning-rate schedule, random state and
data order, so the result equals an uninterrupted run (with the same
--mesh and --accumulate).

--mesh BATCHxMODEL splits the global batch over BATCH and the large
kernels over MODEL devices (keras.distribution on JAX; MirroredStrategy
data parallelism on TensorFlow). With --accumulate N each weight update
averages the gradients of N micro-batches of batch_size/N images; --steps
and checkpoints count weight updates.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from recipes.common import (
    add_distribution_arguments,
    add_verbosity_argument,
    build_pretrainer,
    claim_run_folder,
    fit_logging,
    positive_int,
    quiet,
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
        "--data", help="digits | tfds:NAME[:SPLIT] | folder:PATH (override)"
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
    """uint8 images from a data spec (see --data): an array, or a dataset
    of images of any size (labels, where the data has them, are dropped)."""
    from keras_aim.data.sources import labeled_images

    images = labeled_images(spec, "train", seed)
    if images.labels is not None:
        return images.images
    return images.images.map(lambda image, label: image)


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

    from keras_aim.training.distribution import parse_mesh

    validate(config, parse_mesh(args.mesh), args.accumulate)
    training = setup_distribution(args, config["batch_size"])
    # With --accumulate N, fit sees N micro-batches per optimizer update;
    # steps and checkpoints count updates, the learning-rate schedule counts
    # micro-batches (as Keras' optimizer does).
    config["batch_size"] = training.micro_batch_size
    micro = training.accumulate
    if training.mesh.num_devices > 1:
        print(f"mesh {training.mesh}: {training.micro_batch_size // training.mesh.batch} "
              "images per batch-axis device per step", flush=True)

    from keras_aim import data
    from keras_aim.training import checkpointing

    claim_run_folder(args.workdir, "pretrain", args.resume)
    checkpoints = os.path.join(args.workdir, "checkpoints")
    existing = checkpointing.list_checkpoints(checkpoints)
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

    # Variables are created (and restored) already sharded in the scope;
    # fit runs under it too.
    with training.scope():
        pretrainer = build_pretrainer(
            {**config, "total_steps": config["total_steps"] * micro}, args.seed,
            training.remat, training.gradient_accumulation_steps,
        )
        step = 0
        if existing:
            step = checkpointing.restore_checkpoint(pretrainer, existing[-1])
            print(f"resumed from {existing[-1]} at step {step}")
        images = image_source(config["data"], args.seed)

        # SIGTERM (preemption) behaves like Ctrl-C: checkpoint, then stop.
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        total, every = config["total_steps"], config["checkpoint_every"]
        verbose, progress = fit_logging(args, total * micro, "pre-training", step * micro)
        callbacks = [
            keras.callbacks.CSVLogger(os.path.join(args.workdir, "log.csv"), append=True),
            keras.callbacks.TensorBoard(os.path.join(args.workdir, "tensorboard")),
            *progress,
            *extra_callbacks,
        ]
        log = progress[0].bar.write if progress else print
        start = time.perf_counter()
        try:
            while step < total:
                chunk = min(every - step % every, total - step)
                stream = data.pretraining_dataset(
                    images, config["batch_size"], config["image_size"],
                    config["augmentation"], seed=args.seed, start_step=step * micro,
                )
                pretrainer.fit(
                    stream, steps_per_epoch=chunk * micro, initial_epoch=step // every,
                    epochs=step // every + 1, verbose=verbose, callbacks=callbacks,
                    shuffle=False,  # the stream is shuffled by its pipeline
                )
                step += chunk
                path = checkpointing.save_checkpoint(pretrainer, checkpoints)
                if args.verbose:
                    log(f"step {step}/{total}: checkpoint {path}")
        except KeyboardInterrupt:
            path = checkpointing.save_checkpoint(pretrainer, checkpoints)
            print(f"\ninterrupted: checkpoint {path}; rerun with --resume", flush=True)
            return 130
        finally:
            for bar in progress:
                bar.close()
        pretrainer.backbone.save_to_preset(os.path.join(args.workdir, "backbone"))
        print(f"done: {total} steps in {time.perf_counter() - start:.0f} s; trunk "
              f"saved to {os.path.join(args.workdir, 'backbone')}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
