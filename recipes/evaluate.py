"""Top-1 / top-5 of a classifier preset (e.g. a released head) on an image
folder with one sub-folder per class, in class-index order (for ImageNet-1k
validation: the 1,000 synset folders, which sort into the class order).

    python recipes/evaluate.py --preset aim_7b --probe best --data /imagenet/val

prints the ImageNet-1k top-1 that the release reports (84.0% for aim_7b,
best blocks) when given ImageNet; images go through the preset's
evaluation preprocessing.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def evaluate(classifier, directory: str, batch_size: int = 64, limit: int | None = None):
    """(top-1, top-5, number of images) of `classifier` on a class folder."""
    from keras_aim import data
    from keras_aim.probing import classifier_logits, topk_accuracy

    ds, classes, skipped = data.image_folder(directory)
    if len(classes) != classifier.num_classes:
        raise ValueError(
            f"{directory} has {len(classes)} class folders but the classifier "
            f"predicts {classifier.num_classes} classes; point --data at a "
            "folder with one sub-folder per class of this head."
        )
    if skipped:
        print(f"skipped {len(skipped)} unreadable files")
    if limit:
        ds = ds.take(limit)
    converter = classifier.preprocessor.image_converter
    ds = ds.map(lambda image, label: (converter(image), label)).batch(batch_size)
    logits, labels = classifier_logits(classifier, ds)
    return topk_accuracy(logits, labels, 1), topk_accuracy(logits, labels, 5), len(labels)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, help="preset name or directory")
    parser.add_argument("--probe", choices=["best", "last"], default="best")
    parser.add_argument("--data", required=True, help="folder of class folders")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16")
    args = parser.parse_args(argv)

    import keras_aim

    options = {"probe_layers": args.probe}
    if args.dtype:
        options["dtype"] = args.dtype
    classifier = keras_aim.AIMImageClassifier.from_preset(args.preset, **options)
    try:
        top1, top5, count = evaluate(classifier, args.data, args.batch_size, args.limit)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.preset} ({args.probe} head): top-1 {top1:.2%}, top-5 {top5:.2%} "
          f"on {count} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
