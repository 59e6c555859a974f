"""Attentive probe on a frozen AIM trunk; reports top-1 on held-out data.

    python recipes/attentive_probe.py --backbone runs/tiny/backbone --data digits
    python recipes/attentive_probe.py --backbone aim_600m --probe-layers best \
        --data folder:/data/train --val folder:/data/val

The trunk runs once over the (non-augmented) images; the probe trains on
the cached averaged block features (see keras_aim.probing).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_layers(text: str):
    if text in ("last", "best"):
        return text
    return tuple(int(i) for i in text.split(","))


def load_split(spec: str, image_size: int, seed: int, train: bool):
    """Batches of (normalized images, labels) from a data spec."""
    from keras_aim import AIMImageConverter, data

    if spec == "digits":
        train_split, test_split = data.digits(16, seed=seed)
        images, labels = train_split if train else test_split
        return data.classification_dataset(images, labels, 256, image_size, False)
    kind, _, path = spec.partition(":")
    if kind != "folder":
        raise ValueError(f"Unknown data {spec!r}: use digits or folder:PATH.")
    ds, _, skipped = data.image_folder(path)
    if skipped:
        print(f"skipped {len(skipped)} unreadable files in {path}")
    converter = AIMImageConverter(image_size=(image_size, image_size))
    return ds.map(lambda image, label: (converter(image), label)).batch(64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", required=True, help="preset name or directory")
    parser.add_argument("--data", default="digits", help="digits | folder:PATH")
    parser.add_argument("--val", default=None, help="folder:PATH (digits: held-out split)")
    parser.add_argument("--probe-layers", type=parse_layers, default="last")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import keras_aim
    from keras_aim import probing
    from keras_aim.classifier import resolve_probe_layers

    backbone = keras_aim.AIMBackbone.from_preset(args.backbone)
    layers = resolve_probe_layers(args.probe_layers, backbone)
    image_size = backbone.image_shape[0] or 224
    train = load_split(args.data, image_size, args.seed, train=True)
    val = load_split(args.val or args.data, image_size, args.seed, train=False)
    # One pass over each split: features and labels together.
    features, train_labels = probing.probe_features(
        backbone, train, layers, return_labels=True
    )
    val_features, val_labels = probing.probe_features(
        backbone, val, layers, return_labels=True
    )
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    model = probing.train_attentive_probe(
        features, train_labels, num_classes, backbone.num_heads,
        epochs=args.epochs, seed=args.seed,
    )
    logits = model.predict(val_features, verbose=0)
    top1 = probing.topk_accuracy(logits, val_labels, 1)
    top5 = probing.topk_accuracy(logits, val_labels, 5)
    print(f"attentive probe on blocks {layers}: top-1 {top1:.2%}, top-5 "
          f"{top5:.2%} ({len(val_labels)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
