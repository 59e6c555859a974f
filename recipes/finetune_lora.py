"""LoRA fine-tuning of an AIM or AIMv2 trunk with its attentive probe (paper Table 8).

    python -m recipes.finetune_lora --backbone runs/demo/backbone --data digits --out runs/lora
    python -m recipes.finetune_lora --backbone aimv2_large_patch14_224 --data digits --out runs/lora_v2
    python -m recipes.finetune_lora --backbone aim_600m --probe-layers best \
        --data tfds:imagenet2012 --dtype mixed_bfloat16 --out runs/lora_600m

Rank-r adapters on the q and v parts of every fused qkv and on the attention
output projection (as in Apple's release), the probe trainable, everything
else frozen. `--out` receives only the adapters (`adapters.lora.h5`) and the
probe (`probe.weights.h5`), TensorBoard and CSV logs and epoch backups
(`--resume` continues an interrupted run); `--merge` also writes a plain
keras-hub preset of the trunk with the adapters folded in
(`merged_backbone/`). `--init-probe` starts the probe from a trained one
(e.g. the attentive-probe recipe's `probe.weights.h5`).
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--rank", type=positive_int, default=8)
    parser.add_argument("--epochs", type=positive_int, default=20)
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--init-probe", default=None, help="probe weights to start from")
    parser.add_argument("--augmentation", choices=("aim", "shift", "none"), default=None,
                        help="training augmentation (default: aim; none for digits, "
                             "whose probes see the evaluation transform)")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out is required (adapters and probe are saved there)")
    quiet(args)
    return run_in_scope(args, finetune, "finetune_lora")


def finetune(args, run, training) -> int:
    from keras_aim import data
    from keras_aim.models import families
    from keras_aim.models.aim.convert_aim import load_head
    from keras_aim.training import probing
    from keras_aim.training.lora import (
        fit_lora,
        lora_parameter_count,
        save_lora_weights,
        save_merged_preset,
    )

    backbone = families.backbone_from_preset(args.backbone, remat=training.remat)
    size = backbone.image_shape[0] or 224
    converter = families.evaluation_converter(backbone, size)
    train_set, val_set = splits(args, size)
    classifier = families.classifier_class(backbone)(
        backbone, val_set.num_classes, args.probe_layers
    )
    if args.init_probe:
        load_head(classifier, args.init_probe)
    augmentation = args.augmentation or ("none" if args.data == "digits" else "aim")
    # Several processes split batches of one known size: no smaller last one.
    train = data.classification_dataset(
        train_set.images, train_set.labels, training.micro_batch_size, size, training=True,
        augmentation=augmentation, seed=args.seed, num_classes=train_set.num_classes,
        converter=converter, drop_remainder=training.multi_host,
    )
    val = data.classification_dataset(
        val_set.images, val_set.labels, 256, size, training=False,
        num_classes=val_set.num_classes, converter=converter,
    )
    trunk_params = backbone.count_params()
    backbone.enable_lora(args.rank)
    adapters = lora_parameter_count(backbone)
    print(f"trainable: {lora_parameter_count(classifier):,} parameters "
          f"(adapters {adapters:,} = {adapters / trunk_params:.2%} of the trunk, "
          "plus the probe)")
    steps = _batches_per_epoch(train_set, training.micro_batch_size, training.multi_host)
    verbose, progress = fit_logging(args, args.epochs * steps, "LoRA")
    fit_lora(classifier, train, args.epochs, steps, args.learning_rate,
             callbacks=run.callbacks() + progress, verbose=verbose,
             gradient_accumulation_steps=training.gradient_accumulation_steps)
    for bar in progress:
        bar.close()

    logits, labels = probing.classifier_logits(classifier, val)
    top1 = probing.topk_accuracy(logits, labels, 1)
    top5 = probing.topk_accuracy(logits, labels, 5)
    print(f"LoRA r={args.rank} fine-tuned probe: top-1 {top1:.2%}, top-5 {top5:.2%} "
          f"({len(labels)} images)")

    with results_folder(args.out, training) as out:
        save_lora_weights(backbone, os.path.join(out, "adapters.lora.h5"))
        probing.save_probe(classifier, out)
        if args.merge:
            save_merged_preset(backbone, os.path.join(out, "merged_backbone"))
    if training.is_primary:
        print(f"saved to {args.out}")
    return 0


def _batches_per_epoch(images, batch_size: int, drop_remainder: bool = False) -> int:
    if images.labels is not None:
        count = len(images.labels)
    else:
        count = int(images.images.cardinality())
        if count < 0:  # unknown: count once
            count = sum(1 for _ in images.images)
    return count // batch_size if drop_remainder else -(-count // batch_size)


if __name__ == "__main__":
    sys.exit(main())
