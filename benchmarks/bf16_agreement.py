"""How far bfloat16 inference of an AIM classifier strays from float32.

For each Keras backend, in a fresh process: an `aim_600m` classifier (the
best-layers attentive probe; random weights drawn with a fixed seed unless
`--weights` loads the released ones) classifies a fixed set of test images
under the `float32`, `bfloat16` and `mixed_bfloat16` dtype policies, all with
the same weights (the float32 model's, cast). Prints per backend and policy:
top-1 agreement with float32, the largest logit deviation (absolute, and
relative to the largest float32 logit), the mean deviation, and how many
disagreements had a float32 top-1 margin below the largest deviation (a
near tie, not a wrong answer).

The images: `--images` square crops (fixed positions and sizes, every other
one mirrored) of scikit-learn's two bundled photographs, passed through the
released evaluation preprocessing (resize, center crop 224, ImageNet
normalization) once, in float32, so every policy sees the same inputs.

    python benchmarks/bf16_agreement.py                   # jax tensorflow torch, 64 images
    python benchmarks/bf16_agreement.py --backends jax --images 128 --markdown-out F
    python benchmarks/bf16_agreement.py --weights         # the released aim_600m weights
                                                          # (downloaded or cached)

Random weights make near-uniform logits whose top-1 can flip on a tiny
deviation; the relative deviation is the sturdier figure there, and the
released weights (`--weights`) give the meaningful top-1 agreement.

A measurement, not a test: images/s of the same policies come from
`throughput.py` (`--cases aim_600m@4/inference/float32,bfloat16,mixed_bfloat16`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import throughput  # noqa: E402  (framework-free at import)

POLICIES = ("float32", "bfloat16", "mixed_bfloat16")


def test_images(count: int, seed: int = 0):
    """`(count, H, W, 3)` uint8: square crops of scikit-learn's sample
    photographs at fixed (seeded) positions and sizes, every other one
    mirrored, each resized to 256 x 256."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((count, 256, 256, 3), np.uint8)
    for i in range(count):
        photo = photos[i % len(photos)]
        height, width = photo.shape[:2]
        side = int(rng.integers(min(height, width) // 3, min(height, width) + 1))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side])
        crop = crop.resize((256, 256), Image.BICUBIC)
        out[i] = np.asarray(crop)[:, ::-1] if i % 2 else np.asarray(crop)
    return out


def compare(reference, logits) -> dict:
    """Agreement of `logits` with `reference` (both `(n, classes)`)."""
    import numpy as np

    reference = np.asarray(reference, np.float64)
    logits = np.asarray(logits, np.float64)
    deviation = np.abs(logits - reference)
    largest = float(deviation.max())
    top = np.argsort(reference, axis=1)
    margin = reference[np.arange(len(reference)), top[:, -1]] - reference[
        np.arange(len(reference)), top[:, -2]]
    disagree = reference.argmax(1) != logits.argmax(1)
    return {
        "images": len(reference),
        "top1_agreement": float(1.0 - disagree.mean()),
        "max_abs_deviation": largest,
        "max_relative_deviation": largest / float(np.abs(reference).max()),
        "mean_abs_deviation": float(deviation.mean()),
        "disagreements": int(disagree.sum()),
        "disagreements_within_deviation": int((disagree & (margin < largest)).sum()),
        "median_top1_margin": float(np.median(margin)),
    }


def run_worker(args) -> None:
    import keras
    import numpy as np

    import keras_aim
    from keras_aim.models.aim.aim_backbone import evaluation_preprocessor

    images = keras.ops.convert_to_numpy(
        evaluation_preprocessor("aim_600m")(test_images(args.images)))
    images = images.astype("float32")

    def build(policy):
        keras.utils.set_random_seed(args.seed)
        return keras_aim.AIMImageClassifier.from_preset(
            "aim_600m", load_weights=args.weights, dtype=policy, head_dtype=policy,
            preprocessor=None)

    logits, seconds = {}, {}
    weights = None
    for policy in POLICIES:
        model = build(policy)
        if weights is None:
            weights = model.get_weights()  # float32: every policy gets these
        else:
            model.set_weights(weights)
        model.predict(images[: args.batch_size], batch_size=args.batch_size, verbose=0)
        start = time.perf_counter()
        logits[policy] = np.asarray(
            model.predict(images, batch_size=args.batch_size, verbose=0), np.float32)
        seconds[policy] = time.perf_counter() - start
        del model
    result = {policy: {**compare(logits["float32"], logits[policy]),
                       "images_per_s": args.images / seconds[policy]}
              for policy in POLICIES[1:]}
    result["float32"] = {"images_per_s": args.images / seconds["float32"],
                         "max_abs_logit": float(np.abs(logits["float32"]).max())}
    print("RESULT " + json.dumps(result), flush=True)


def format_rows(results: dict, markdown: bool = False) -> str:
    header = ["backend", "policy", "images", "top-1 agreement", "max |dlogit|",
              "max |dlogit| / max |logit|", "mean |dlogit|", "disagreements (near ties)",
              "images/s (vs float32)"]
    lines = []
    for backend, result in results.items():
        base = result["float32"]["images_per_s"]
        for policy in POLICIES[1:]:
            r = result[policy]
            lines.append([backend, policy, str(r["images"]), f"{100 * r['top1_agreement']:.1f}%",
                          f"{r['max_abs_deviation']:.3g}",
                          f"{100 * r['max_relative_deviation']:.2f}%",
                          f"{r['mean_abs_deviation']:.3g}",
                          f"{r['disagreements']} ({r['disagreements_within_deviation']})",
                          f"{r['images_per_s']:.2f} ({r['images_per_s'] / base:.2f}x)"])
    return throughput._render(header, lines, markdown)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["jax", "tensorflow", "torch"],
                        choices=("jax", "tensorflow", "torch"))
    parser.add_argument("--images", type=throughput._at_least(2), default=64)
    parser.add_argument("--batch-size", type=throughput._at_least(1), default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", action="store_true",
                        help="the released aim_600m weights instead of random ones")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--markdown-out", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    forwarded = ["--images", str(args.images), "--batch-size", str(args.batch_size),
                 "--seed", str(args.seed)] + (["--weights"] if args.weights else [])
    results = {}
    for backend in args.backends:
        result = throughput._run([sys.executable, os.path.abspath(__file__), "--worker",
                                  *forwarded], throughput._environment(backend), args.timeout)
        status = result["error"][0] if "error" in result else "ok"
        print(f"{backend}: {status} ({result['wall']:.0f} s)", flush=True)
        if "error" not in result:
            result.pop("wall")
            results[backend] = result
    notes = [f"aim_600m classifier (best-layers probe), "
             f"{'released' if args.weights else f'random (seed {args.seed})'} weights, "
             f"{args.images} fixed test images, batch {args.batch_size}; "
             f"{throughput.describe_cpu()}",
             f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"{throughput._versions()}"]
    print("\n".join(notes))
    print(format_rows(results))
    if args.markdown_out and results:
        throughput._write_text(args.markdown_out, "  \n".join(notes) + "\n\n"
                               + format_rows(results, markdown=True) + "\n")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
