"""The README's main job: a tiny AIM pre-training on an embedded dataset
(scikit-learn's digits, no download), then attentive probes of the
pre-trained trunk and of a random trunk with the same architecture, and
LoRA fine-tuning of the pre-trained trunk from its probe.

    python -m recipes.demo [--steps 600] [--seed 0] [--summary out.json]
                           [--batch-size 128] [--probe-epochs 60] [--lora-epochs 10]

Shows a progress bar with the loss, then prints the loss curve, the probe and LoRA accuracies, a raw-pixel logistic
regression baseline for context and the wall time; saves the loss curve as
a PNG next to the summary (or in the working directory) and, with
--summary, the pre-trained trunk as a keras-hub preset in `backbone/` beside
it (input for `recipes.attentive_probe` and `recipes.finetune_lora`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from keras_aim.utils.arguments import positive_int
from recipes.common import add_verbosity_argument, build_pretrainer, fit_logging, quiet
from recipes.configs import load

# The tiny pre-training config plus the probe's settings.
CONFIG = dict(
    load("tiny"),
    probe_layers=(1, 2, 3),
    probe_epochs=60,
    lora_rank=8,
    lora_epochs=10,
    lora_learning_rate=1e-3,
    log_every=25,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=CONFIG["total_steps"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=CONFIG["batch_size"],
                        help="pre-training batch size")
    parser.add_argument("--probe-epochs", type=positive_int, default=CONFIG["probe_epochs"],
                        help="epochs of each attentive probe")
    parser.add_argument("--lora-epochs", type=positive_int, default=CONFIG["lora_epochs"],
                        help="epochs of LoRA fine-tuning")
    parser.add_argument("--summary", default=None, help="write the figures as JSON")
    parser.add_argument("--plot", default=None, help="loss curve PNG path")
    add_verbosity_argument(parser)
    args = parser.parse_args(argv)
    if args.steps < 2 * CONFIG["log_every"]:
        parser.error(f"--steps must be at least {2 * CONFIG['log_every']}")
    if min(args.batch_size, args.probe_epochs, args.lora_epochs) < 1:
        parser.error("--batch-size, --probe-epochs and --lora-epochs must be at least 1")
    quiet(args)

    import keras
    from sklearn.linear_model import LogisticRegression

    from keras_aim import data
    from keras_aim.models.aim.aim_backbone import AIMBackbone
    from keras_aim.models.aim.aim_image_classifier import AIMImageClassifier
    from keras_aim.training import probing
    from keras_aim.training.lora import fit_lora
    from keras_aim.utils.atomic_files import atomic_directory

    start = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    c = dict(CONFIG, batch_size=args.batch_size, probe_epochs=args.probe_epochs,
             lora_epochs=args.lora_epochs)
    (x_train, y_train), (x_test, y_test) = data.digits(c["image_size"], seed=args.seed)
    print(f"digits: {len(x_train)} train / {len(x_test)} test images, "
          f"{c['image_size']}x{c['image_size']}, backend {keras.backend.backend()}")

    # Context: logistic regression on raw pixels.
    flat = lambda x: x[..., 0].reshape(len(x), -1) / 255.0  # noqa: E731
    baseline = LogisticRegression(max_iter=2000).fit(flat(x_train), y_train)
    raw_accuracy = float(baseline.score(flat(x_test), y_test))

    c["total_steps"] = args.steps
    pretrainer = build_pretrainer(c, args.seed)
    stream = data.pretraining_dataset(
        x_train, c["batch_size"], c["image_size"], c["augmentation"], seed=args.seed
    )
    epochs = args.steps // c["log_every"]
    verbose, progress = fit_logging(args, epochs * c["log_every"], "pre-training")
    history = pretrainer.fit(
        stream,
        steps_per_epoch=c["log_every"],
        epochs=epochs,
        verbose=verbose,
        callbacks=progress,
        shuffle=False,  # the stream is shuffled by its pipeline
    )
    for bar in progress:
        bar.close()
    curve = history.history["loss"]
    if args.verbose:
        print("loss every", c["log_every"], "steps:",
              " ".join(f"{value:.3f}" for value in curve))
    pretrain_seconds = time.perf_counter() - start
    if args.summary:  # the trunk, for the probe / LoRA recipes
        trunk = os.path.join(os.path.dirname(os.path.abspath(args.summary)), "backbone")
        with atomic_directory(trunk, replace=True) as staging:
            pretrainer.backbone.save_to_preset(staging)

    # Attentive probes on frozen trunks: pre-trained vs random.
    test = data.classification_dataset(x_test, y_test, 256, c["image_size"], training=False)

    def probe(backbone):
        train = data.classification_dataset(
            x_train, y_train, 256, c["image_size"], training=False
        )
        features = probing.probe_features(backbone, train, c["probe_layers"])
        test_features = probing.probe_features(backbone, test, c["probe_layers"])
        model = probing.train_attentive_probe(
            features, y_train, 10, c["num_heads"], epochs=c["probe_epochs"], seed=args.seed
        )
        logits = probing.probe_logits(model, test_features)
        return model, probing.topk_accuracy(logits, y_test, 1)

    trained_probe, pretrained_accuracy = probe(pretrainer.backbone)
    keras.utils.set_random_seed(args.seed + 1000)
    _, random_accuracy = probe(AIMBackbone.from_config(pretrainer.backbone.get_config()))

    # LoRA fine-tuning of the pre-trained trunk, starting from its probe.
    classifier = AIMImageClassifier(pretrainer.backbone, 10, c["probe_layers"])
    classifier.probe.set_weights(trained_probe.get_layer("probe").get_weights())
    classifier.backbone.enable_lora(c["lora_rank"])
    # The probe's own (evaluation) preprocessing, reshuffled every epoch.
    train = data.classification_dataset(
        x_train, y_train, 64, c["image_size"], training=True, augmentation="none",
        seed=args.seed,
    )
    fit_lora(classifier, train, c["lora_epochs"], len(train), c["lora_learning_rate"])
    logits, labels = probing.classifier_logits(classifier, test)
    lora_accuracy = probing.topk_accuracy(logits, labels, 1)
    seconds = time.perf_counter() - start

    summary = {
        "pretrained_probe_accuracy": pretrained_accuracy,
        "random_probe_accuracy": random_accuracy,
        "lora_accuracy": lora_accuracy,
        "raw_pixel_baseline_accuracy": raw_accuracy,
        "first_loss": float(curve[0]),
        "last_loss": float(curve[-1]),
        "seconds": seconds,
        "pretraining_seconds": pretrain_seconds,
        "steps": args.steps,
        "batch_size": c["batch_size"],
        "probe_epochs": c["probe_epochs"],
        "lora_epochs": c["lora_epochs"],
        "seed": args.seed,
        "backend": keras.backend.backend(),
        "loss_curve": [float(v) for v in curve],
    }
    print(f"\nattentive probe, pre-trained trunk: {pretrained_accuracy:.2%}")
    print(f"attentive probe, random trunk:      {random_accuracy:.2%}")
    print(f"LoRA r={c['lora_rank']} fine-tuning + probe:      {lora_accuracy:.2%}")
    print(f"raw-pixel logistic regression:      {raw_accuracy:.2%} (context)")
    print(f"loss {curve[0]:.4f} -> {curve[-1]:.4f}; wall time {seconds:.0f} s "
          f"(pre-training {pretrain_seconds:.0f} s)")

    plot = args.plot or os.path.join(
        os.path.dirname(args.summary) if args.summary else ".", "demo_loss.png"
    )
    _plot(curve, c["log_every"], plot)
    print(f"loss curve: {plot}")
    if args.summary:
        _write_json(args.summary, summary)
        print(f"summary: {args.summary}; pre-trained trunk: {trunk}")
    return 0


def _plot(curve, every, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_aim.utils.atomic_files import atomic_file

    steps = [every * (i + 1) for i in range(len(curve))]
    figure, axis = plt.subplots(figsize=(5, 3.2))
    axis.plot(steps, curve)
    axis.set_xlabel("step")
    axis.set_ylabel("normalized-pixel loss")
    axis.set_title("AIM pre-training on digits")
    figure.tight_layout()
    with atomic_file(path) as staging:
        figure.savefig(staging, dpi=120)
    plt.close(figure)


def _write_json(path, payload):
    from keras_aim.utils.atomic_files import atomic_file

    with atomic_file(path) as staging, open(staging, "w") as handle:
        json.dump(payload, handle, indent=2)


if __name__ == "__main__":
    sys.exit(main())
