"""Attentive probe on a frozen AIM trunk: train one, or evaluate a head.

    python recipes/attentive_probe.py --backbone runs/tiny/backbone --data digits
    python recipes/attentive_probe.py --backbone aim_600m --probe-layers best \
        --data tfds:imagenet2012 --cache-dir /scratch/features --out runs/probe
    python recipes/attentive_probe.py --backbone aim_7b --evaluate-only \
        --head best --val folder:/imagenet/val

The trunk runs once over each split (evaluation preprocessing); the probe
trains on the averaged block features with AdamW and warmup + cosine
(keras_aim.probing). `--cache-dir` keeps the features on disk, keyed by
checksums of the trunk weights and the data, for sweeps. `--out` keeps the
probe (`probe.weights.h5`, loadable with `--head`), TensorBoard and CSV logs
and epoch backups (`--resume` continues an interrupted run). Prints top-1
and top-5 on the validation split.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from common import add_distribution_arguments, setup_distribution  # noqa: E402

DATA_HELP = "digits | folder:PATH | tfds:NAME[:SPLIT]"


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
    parser.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity")
    add_distribution_arguments(parser)


def start_run(args):
    """Checks the output directory and the distribution options (before any
    work) and sets the dtype policy and seed; returns the fit callbacks and
    the `DistributedTraining` (build and fit inside its `scope()`)."""
    import keras

    from keras_aim.checkpointing import fit_callbacks

    if args.out and not args.resume and os.path.exists(os.path.join(args.out, "probe.weights.h5")):
        raise ValueError(
            f"{args.out} holds the results of a finished run; choose another --out."
        )
    training = setup_distribution(args, args.batch_size)
    callbacks = fit_callbacks(args.out, args.resume)
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


def features(backbone, images, layers, image_size: int, cache_dir: str | None):
    """Probe features and labels of a `LabeledImages` (cached if asked)."""
    from keras_aim import data, probing

    batches = data.classification_dataset(
        images.images, images.labels, 256, image_size, training=False,
        num_classes=images.num_classes,
    )
    if cache_dir:
        fingerprint = f"{images.fingerprint}|eval-preprocessing:{image_size}"
        return probing.cached_probe_features(
            backbone, batches, layers, cache_dir, fingerprint
        )
    return probing.probe_features(backbone, batches, layers, return_labels=True)


def classifier_with_head(args):
    """The classifier whose head `--evaluate-only` evaluates."""
    import keras_aim
    from keras_aim.classifier import head_num_classes, load_head

    if args.head in ("best", "last"):
        return keras_aim.AIMImageClassifier.from_preset(args.backbone, probe_layers=args.head)
    backbone = keras_aim.AIMBackbone.from_preset(args.backbone)
    classifier = keras_aim.AIMImageClassifier(
        backbone, head_num_classes(args.head), args.probe_layers
    )
    load_head(classifier, args.head)
    return classifier


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--cache-dir", default=None, help="on-disk feature cache")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate --head on --val instead of training")
    parser.add_argument("--head", default=None,
                        help="best | last (a preset's released head) or a head "
                             "file (.pth, .safetensors, .weights.h5)")
    args = parser.parse_args(argv)
    if args.evaluate_only != (args.head is not None):
        parser.error("--evaluate-only and --head go together")
    return run(args)


def run(args) -> int:
    return run_in_scope(args, train_or_evaluate)


def run_in_scope(args, body) -> int:
    """`body(args, callbacks, training)` inside the distribution scope; a bad
    input is printed as `error: ...` and gives exit code 1."""
    try:
        callbacks, training = start_run(args)
        with training.scope():
            return body(args, callbacks, training)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # RuntimeError: DistributionUnavailableError (e.g. --mesh on PyTorch).
        print(f"error: {error}", file=sys.stderr)
        return 1


def train_or_evaluate(args, callbacks, training) -> int:
    import keras_aim
    from keras_aim import probing

    if args.evaluate_only:
        classifier = classifier_with_head(args)
        backbone = classifier.backbone
        image_size = backbone.image_shape[0] or 224
        _, val_set = splits(args, image_size, train=False)
        if classifier.num_classes != val_set.num_classes:
            raise ValueError(
                f"The head {args.head} predicts {classifier.num_classes} classes "
                f"but {val_set.description} has {val_set.num_classes}; evaluate "
                "it on the data it was trained on."
            )
    else:
        backbone = keras_aim.AIMBackbone.from_preset(args.backbone, remat=training.remat)
        image_size = backbone.image_shape[0] or 224
        train_set, val_set = splits(args, image_size)
        classifier = keras_aim.AIMImageClassifier(
            backbone, val_set.num_classes, args.probe_layers
        )
    layers = classifier.probe_layers
    val_features, val_labels = features(backbone, val_set, layers, image_size, args.cache_dir)

    if not args.evaluate_only:
        train_features, train_labels = features(
            backbone, train_set, layers, image_size, args.cache_dir
        )
        model = probing.train_attentive_probe(
            train_features, train_labels, classifier.num_classes, backbone.num_heads,
            epochs=args.epochs, batch_size=training.micro_batch_size,
            gradient_accumulation_steps=training.gradient_accumulation_steps,
            learning_rate=args.learning_rate, seed=args.seed,
            verbose=args.verbose, callbacks=callbacks,
        )
        classifier.probe.set_weights(model.get_layer("probe").get_weights())
        if args.out:
            path = probing.save_probe(classifier, args.out)
            print(f"probe saved: {path} (evaluate it with --evaluate-only --head {path})")

    logits = probing.probe_logits(classifier.probe, val_features)
    top1 = probing.topk_accuracy(logits, val_labels, 1)
    top5 = probing.topk_accuracy(logits, val_labels, 5)
    what = f"head {args.head}" if args.evaluate_only else "attentive probe"
    print(f"{what} on blocks {layers}: top-1 {top1:.2%}, top-5 {top5:.2%} "
          f"({len(val_labels)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
