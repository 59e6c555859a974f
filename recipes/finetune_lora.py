"""LoRA fine-tuning of an AIM trunk with its attentive probe (paper Table 8).

    python recipes/finetune_lora.py --backbone runs/tiny/backbone --data digits --out runs/lora

Rank-r adapters on the q and v parts of every fused qkv and on the attention
output projection (as in Apple's release), the probe trainable, everything
else frozen. Saves only the adapters (`adapters.lora.h5`) and the probe
(`probe.weights.h5`); `--merge` also writes a plain keras-hub preset of the
trunk with the adapters folded in (`merged_backbone/`).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from attentive_probe import parse_layers  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", required=True, help="preset name or directory")
    parser.add_argument("--data", default="digits", choices=["digits"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--probe-layers", type=parse_layers, default="last")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", action="store_true")
    args = parser.parse_args(argv)

    import keras

    import keras_aim
    from keras_aim import data
    from keras_aim.lora import lora_parameter_count, merge_lora

    keras.utils.set_random_seed(args.seed)
    backbone = keras_aim.AIMBackbone.from_preset(args.backbone)
    size = backbone.image_shape[0]
    (x_train, y_train), (x_test, y_test) = data.digits(16, seed=args.seed)
    if size != 16:
        raise SystemExit(f"error: the digits are 16x16; this trunk takes {size}x{size}.")
    classifier = keras_aim.AIMImageClassifier(backbone, 10, args.probe_layers)
    trunk_params = backbone.count_params()
    backbone.enable_lora(args.rank)
    adapters = lora_parameter_count(backbone)
    print(f"trainable: {lora_parameter_count(classifier):,} parameters "
          f"(adapters {adapters:,} = {adapters / trunk_params:.2%} of the trunk, "
          f"plus the probe)")
    train = data.classification_dataset(
        x_train, y_train, args.batch_size, size, training=True,
        augmentation="shift", seed=args.seed, num_classes=10,
    )
    test = data.classification_dataset(x_test, y_test, 256, size, training=False)
    steps = args.epochs * len(train)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(1, steps - steps // 10), warmup_target=args.learning_rate,
        warmup_steps=max(1, steps // 10),
    )
    classifier.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.05))
    classifier.fit(train, epochs=args.epochs, verbose=2)
    _, accuracy = classifier.evaluate(test, verbose=0)
    print(f"LoRA r={args.rank} fine-tuned probe: top-1 {accuracy:.2%}")

    os.makedirs(args.out, exist_ok=True)
    backbone.save_lora_weights(os.path.join(args.out, "adapters.lora.h5"))
    classifier.save_task_weights(os.path.join(args.out, "probe.weights.h5"))
    if args.merge:
        merge_lora(backbone).save_to_preset(os.path.join(args.out, "merged_backbone"))
    print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
