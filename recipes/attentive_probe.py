"""Attentive probe on a frozen AIM or AIMv2 trunk: train one, or evaluate a head.

    python -m recipes.attentive_probe --backbone runs/demo/backbone --data digits
    python -m recipes.attentive_probe --backbone aimv2_large_patch14_224 \
        --data folder:/data/flowers/train --val folder:/data/flowers/val
    python -m recipes.attentive_probe --backbone aim_600m --probe-layers best \
        --data tfds:imagenet2012 --cache-dir /scratch/features --out runs/probe
    python -m recipes.attentive_probe --backbone aim_7b --evaluate-only \
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
import sys

from recipes.common import (
    add_run_arguments,
    fit_logging,
    positive_int,
    quiet,
    results_folder,
    run_in_scope,
    splits,
)


def features(backbone, images, layers, image_size: int, cache_dir: str | None):
    """Probe features and labels of a `LabeledImages` (cached if asked)."""
    from keras_aim import data
    from keras_aim.models.families import evaluation_converter
    from keras_aim.training import probing

    batches = data.classification_dataset(
        images.images, images.labels, 256, image_size, training=False,
        num_classes=images.num_classes,
        converter=evaluation_converter(backbone, image_size),
    )
    if cache_dir:
        fingerprint = f"{images.fingerprint}|eval-preprocessing:{image_size}"
        return probing.cached_probe_features(
            backbone, batches, layers, cache_dir, fingerprint
        )
    return probing.probe_features(backbone, batches, layers, return_labels=True)


def classifier_with_head(args):
    """The classifier whose head `--evaluate-only` evaluates."""
    from keras_aim.models import families
    from keras_aim.models.aim.aim_image_classifier import AIMImageClassifier
    from keras_aim.models.aim.convert_aim import head_num_classes, load_head

    if args.head in ("best", "last"):
        return AIMImageClassifier.from_preset(args.backbone, probe_layers=args.head)
    backbone = families.backbone_from_preset(args.backbone)
    classifier = families.classifier_class(backbone)(
        backbone, head_num_classes(args.head), args.probe_layers
    )
    load_head(classifier, args.head)
    return classifier


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--epochs", type=positive_int, default=60)
    parser.add_argument("--cache-dir", default=None, help="on-disk feature cache")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate --head on --val instead of training")
    parser.add_argument("--head", default=None,
                        help="best | last (a preset's released head) or a head "
                             "file (.pth, .safetensors, .weights.h5)")
    args = parser.parse_args(argv)
    if args.evaluate_only != (args.head is not None):
        parser.error("--evaluate-only and --head go together")
    quiet(args)
    return run(args)


def run(args) -> int:
    return run_in_scope(args, train_or_evaluate, "attentive_probe")


def train_or_evaluate(args, callbacks, training) -> int:
    from keras_aim.models import families
    from keras_aim.training import probing

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
        backbone = families.backbone_from_preset(args.backbone, remat=training.remat)
        image_size = backbone.image_shape[0] or 224
        train_set, val_set = splits(args, image_size)
        classifier = families.classifier_class(backbone)(
            backbone, val_set.num_classes, args.probe_layers
        )
    layers = classifier.probe_layers
    val_features, val_labels = features(backbone, val_set, layers, image_size, args.cache_dir)

    if not args.evaluate_only:
        train_features, train_labels = features(
            backbone, train_set, layers, image_size, args.cache_dir
        )
        steps = args.epochs * -(-len(train_labels) // training.micro_batch_size)
        verbose, progress = fit_logging(args, steps, "attentive probe")
        model = probing.train_attentive_probe(
            train_features, train_labels, classifier.num_classes, backbone.num_heads,
            epochs=args.epochs, batch_size=training.micro_batch_size,
            gradient_accumulation_steps=training.gradient_accumulation_steps,
            learning_rate=args.learning_rate, seed=args.seed,
            verbose=verbose, callbacks=callbacks + progress,
        )
        for bar in progress:
            bar.close()
        classifier.probe.set_weights(model.get_layer("probe").get_weights())
        if args.out:
            with results_folder(args.out, training) as out:
                path = probing.save_probe(classifier, out)
            if training.is_primary:
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
