"""Attentive probe on a frozen AIM or AIMv2 trunk: train one, or evaluate a head.

    python -m recipes.attentive_probe --backbone runs/demo/backbone --data digits
    python -m recipes.attentive_probe --backbone aimv2_large_patch14_224 \
        --data folder:/data/flowers/train --val folder:/data/flowers/val
    python -m recipes.attentive_probe --backbone aim_600m --probe-layers best \
        --data tfds:imagenet2012 --cache-dir /scratch/features --out runs/probe
    python -m recipes.attentive_probe --backbone aim_7b --evaluate-only \
        --head best --val folder:/imagenet/val
    python -m recipes.attentive_probe --backbone aim_600m --stream \
        --dtype bfloat16 --data folder:/imagenet/train --val folder:/imagenet/val

The trunk runs once over each split (evaluation preprocessing); the probe
trains on the averaged block features with AdamW and warmup + cosine
(keras_aim.probing). `--cache-dir` keeps the features on disk, keyed by
checksums of the trunk weights and the data, for sweeps (`--cache-dtype
bfloat16` halves them). The features need images x tokens x width numbers
per split: the run says how many bytes before computing them and refuses
when the disk (with --cache-dir) or the memory cannot hold them.

`--stream` keeps no features: the frozen trunk runs inside the training
step on an endless stream of augmented batches (`--augmentation`: aim;
none below 64 px), and evaluation counts correct predictions batch by
batch, so memory does not grow with the data (keras_aim.training.
streaming_probe). With `--evaluate-only` it streams the evaluation.

`--out` keeps the probe (`probe.weights.h5`, loadable with `--head`),
TensorBoard and CSV logs and epoch backups (`--resume` continues an
interrupted run). Prints top-1 and top-5 on the validation split.
"""

from __future__ import annotations

import argparse
import os
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


# Below this side, --stream trains without augmentation by default: a
# random resized crop cuts away most of a tiny image such as the 16-pixel
# digits, and even a 2-pixel shift costs the digits probe 13-18 points of
# top-1 (96.4-97.2% -> 78.8-83.8% on a pre-trained tiny trunk, 3 seeds).
SMALL_IMAGES_BELOW = 64


def features(backbone, images, layers, image_size: int, cache_dir: str | None,
             cache_dtype: str = "float32", checksum: str | None = None):
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
        return probing.cached_probe_features(
            backbone, batches, layers, cache_dir, _fingerprint(images, image_size),
            cache_dtype=cache_dtype, checksum=checksum,
        )
    return probing.probe_features(backbone, batches, layers, return_labels=True)


def _fingerprint(images, image_size: int) -> str:
    return f"{images.fingerprint}|eval-preprocessing:{image_size}"


def check_feature_space(backbone, sets, layers, image_size: int, cache_dir: str | None,
                        cache_dtype: str = "float32", checksum: str | None = None) -> None:
    """Says how many bytes the features of `sets` take and raises a
    `ValueError` naming --stream when they do not fit: on the disk of
    `cache_dir` (only the entries not cached yet count) or, without a
    cache, in memory (float32)."""
    from keras_aim.training import probing

    tokens = (image_size // backbone.patch_size) ** 2
    dtype = cache_dtype if cache_dir else "float32"
    sizes = [probing.feature_bytes(len(images), tokens, backbone.hidden_dim, dtype)
             for images in sets]
    counts = " + ".join(f"{len(images):,}" for images in sets)
    print(f"probe features: {counts} images x {tokens} tokens x {backbone.hidden_dim} "
          f"x {2 if dtype == 'bfloat16' else 4} bytes ({dtype}) = {_size(sum(sizes))}")
    if cache_dir:
        needed = sum(
            size for images, size in zip(sets, sizes)
            if not os.path.isdir(probing.feature_cache_entry(
                cache_dir, checksum, _fingerprint(images, image_size), layers, cache_dtype)[0])
        )
        free = probing.free_disk_bytes(cache_dir)
        if needed > free:
            raise ValueError(
                f"The feature cache needs {_size(needed)} but {cache_dir} has "
                f"{_size(free)} free. Train with --stream (no features kept), "
                + ("or choose a larger --cache-dir." if cache_dtype == "bfloat16" else
                   "use --cache-dtype bfloat16 (half the size), or choose a larger "
                   "--cache-dir.")
            )
        return
    available = probing.available_memory_bytes()
    if available is not None and sum(sizes) > available:
        raise ValueError(
            f"The probe features need {_size(sum(sizes))} of memory but "
            f"{_size(available)} is available. Train with --stream (no features "
            "kept), or keep them on disk with --cache-dir."
        )


def _size(count: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1000


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
    parser.add_argument("--cache-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="how --cache-dir stores the features (bfloat16: half the "
                             "disk; the probe trains on them as float32)")
    parser.add_argument("--stream", action="store_true",
                        help="keep no features: train (and evaluate) batch by batch on "
                             "the frozen trunk, with augmentation; memory does not grow "
                             "with the data")
    parser.add_argument("--augmentation", choices=("aim", "shift", "none"), default=None,
                        help=f"--stream's training augmentation (default: aim; none "
                             f"for images under {SMALL_IMAGES_BELOW} px, e.g. the digits)")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate --head on --val instead of training")
    parser.add_argument("--head", default=None,
                        help="best | last (a preset's released head) or a head "
                             "file (.pth, .safetensors, .weights.h5)")
    args = parser.parse_args(argv)
    if args.evaluate_only != (args.head is not None):
        parser.error("--evaluate-only and --head go together")
    if args.stream and args.cache_dir:
        parser.error("--cache-dir and --stream exclude each other: --stream keeps no "
                     "features to cache")
    if args.cache_dtype != "float32" and not args.cache_dir:
        parser.error("--cache-dtype needs --cache-dir")
    if args.augmentation and (not args.stream or args.evaluate_only):
        parser.error("--augmentation applies to training with --stream")
    quiet(args)
    return run(args)


def run(args) -> int:
    return run_in_scope(args, train_or_evaluate, "attentive_probe")


def train_or_evaluate(args, run, training) -> int:
    from keras_aim.models import families
    from keras_aim.training import probing

    if args.evaluate_only:
        classifier = classifier_with_head(args)
        backbone = classifier.backbone
        image_size = backbone.image_shape[0] or 224
        train_set, val_set = splits(args, image_size, train=False)
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
        # --stream trains a float32 probe (whatever the trunk's dtype): keep it so.
        classifier = families.classifier_class(backbone)(
            backbone, val_set.num_classes, args.probe_layers,
            **({"head_dtype": "float32"} if args.stream else {}),
        )
    layers = classifier.probe_layers
    if args.stream:
        return streamed(args, run, training, classifier, train_set, val_set, image_size)
    sets = [val_set] if args.evaluate_only else [train_set, val_set]
    checksum = probing.trunk_checksum(backbone) if args.cache_dir else None
    check_feature_space(backbone, sets, layers, image_size, args.cache_dir,
                        args.cache_dtype, checksum)
    cached = dict(cache_dtype=args.cache_dtype, checksum=checksum)
    val_features, val_labels = features(
        backbone, val_set, layers, image_size, args.cache_dir, **cached
    )

    if not args.evaluate_only:
        train_features, train_labels = features(
            backbone, train_set, layers, image_size, args.cache_dir, **cached
        )
        steps = args.epochs * -(-len(train_labels) // training.micro_batch_size)
        verbose, progress = fit_logging(args, steps, "attentive probe")
        model = probing.train_attentive_probe(
            train_features, train_labels, classifier.num_classes, backbone.num_heads,
            epochs=args.epochs, batch_size=training.micro_batch_size,
            gradient_accumulation_steps=training.gradient_accumulation_steps,
            learning_rate=args.learning_rate, seed=args.seed,
            verbose=verbose, callbacks=run.callbacks() + progress,
        )
        for bar in progress:
            bar.close()
        keep_probe(args, training, classifier, model.get_layer("probe"))

    logits = probing.probe_logits(classifier.probe, val_features)
    top1 = probing.topk_accuracy(logits, val_labels, 1)
    top5 = probing.topk_accuracy(logits, val_labels, 5)
    report(args, layers, top1, top5, len(val_labels))
    return 0


def keep_probe(args, training, classifier, probe) -> None:
    """Puts the trained `probe`'s weights into the classifier and saves
    them with --out."""
    from keras_aim.training import probing

    classifier.probe.set_weights(probe.get_weights())
    if args.out:
        with results_folder(args.out, training) as out:
            path = probing.save_probe(classifier, out)
        if training.is_primary:
            print(f"probe saved: {path} (evaluate it with --evaluate-only --head {path})")


def report(args, layers, top1: float, top5: float, count: int) -> None:
    what = f"head {args.head}" if args.evaluate_only else "attentive probe"
    print(f"{what} on blocks {layers}: top-1 {top1:.2%}, top-5 {top5:.2%} "
          f"({count} images)")


def streaming_augmentation(args, image_size: int) -> str:
    """--augmentation, else "aim" ("none" below `SMALL_IMAGES_BELOW` pixels)."""
    return args.augmentation or ("none" if image_size < SMALL_IMAGES_BELOW else "aim")


def streamed(args, run, training, classifier, train_set, val_set, image_size: int) -> int:
    """--stream: the probe trains on the frozen trunk batch by batch (no
    features kept) and is evaluated batch by batch.

    In a multi-process run every process reads its part of every global
    training batch; each evaluates the whole validation split itself (the
    same counts on every process)."""
    from keras_aim.data import pipelines
    from keras_aim.models.families import evaluation_converter
    from keras_aim.training import streaming_probe
    from keras_aim.training.checkpointing import backup_epoch

    backbone, layers = classifier.backbone, classifier.probe_layers
    converter = evaluation_converter(backbone, image_size)
    batch_size = training.micro_batch_size
    probe = classifier.probe
    if not args.evaluate_only:
        augmentation = streaming_augmentation(args, image_size)
        shard = training.take_data_sharding()
        steps_per_epoch = max(1, len(train_set) // batch_size)
        # A resumed run's stream starts at the first batch of the epoch that
        # its backup restores: the same batches as an uninterrupted run.
        epoch = backup_epoch(args.out, training.process_index) if args.resume else 0
        stream = pipelines.classification_stream(
            train_set.source, batch_size, image_size, augmentation, seed=args.seed,
            start_step=epoch * steps_per_epoch, shard=shard, converter=converter,
        )
        if training.is_primary:
            print(f"streaming probe: {len(train_set):,} images, {steps_per_epoch} steps "
                  f"of {batch_size} per epoch, augmentation {augmentation}, trunk "
                  f"{backbone.dtype_policy.name}")
        verbose, progress = fit_logging(args, args.epochs * steps_per_epoch,
                                        "attentive probe (streamed)")
        model = streaming_probe.train_streaming_probe(
            backbone, stream, layers, classifier.num_classes, steps_per_epoch,
            epochs=args.epochs, learning_rate=args.learning_rate, seed=args.seed,
            verbose=verbose, callbacks=run.callbacks() + progress,
            gradient_accumulation_steps=training.gradient_accumulation_steps,
        )
        for bar in progress:
            bar.close()
        probe = model.get_layer("probe")
        keep_probe(args, training, classifier, probe)
    batches = pipelines.evaluation_batches(val_set.source, batch_size, image_size,
                                           converter=converter)
    result = streaming_probe.evaluate_streaming_probe(backbone, probe, layers, batches)
    report(args, layers, result["top1"], result["top5"], result["count"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
