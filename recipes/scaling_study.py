"""AIM's two findings at small scale: does the pre-training loss predict
probe accuracy, and does quality grow with capacity and data?

    KERAS_BACKEND=torch python -m recipes.scaling_study --out runs/study   # 32 min on 2 CPU cores
    python -m recipes.scaling_study --out runs/study_quick --quick
    python -m recipes.scaling_study --out runs/study --estimate          # analytic cost only
    python -m recipes.scaling_study --out runs/study_in --data tfds:imagenet2012 \
        --image-size 224 --patch-size 14 --augmentation aim --steps 20000 --batch-size 256

A grid of 4 trunk sizes x 3 fractions of the training images, 3 seeds for
the full-data points, and ablations (plain causal attention, raw-pixel
targets, pixel-head depth), each pre-trained with the AIM objective and
measured at several checkpoints (validation loss, attentive-probe top-1).
Results are appended to OUT/results.jsonl as they come; rerunning with the
same options continues an interrupted study. At the end: OUT/summary.json,
the tables (printed) and three figures (OUT/*.png). See
keras_aim.studies.scaling and docs/findings.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from keras_aim.utils.arguments import positive_float, positive_int
from recipes.common import add_verbosity_argument, quiet, report_error


def _image_counts(text: str) -> tuple[int, int]:
    try:
        train, val = (int(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected TRAIN,VAL image counts such as 1281167,50000; got {text!r}") from None
    if train < 1 or val < 1:
        raise argparse.ArgumentTypeError(f"image counts must be at least 1; got {text!r}")
    return train, val


def print_estimate(config, images: tuple[int, int] | None, tflops: float) -> None:
    """The study's analytic cost (`scaling.estimated_cost`)."""
    from keras_aim.studies import scaling

    if images is None:
        data = scaling.load_data(config)
        images = (data.train_count, scaling.count_images(data.val))
    cost = scaling.estimated_cost(config, *images)
    pretraining, step = cost["pretraining_flops"], cost["largest_step"]
    print(f"{len(cost['runs'])} runs on {images[0]} training and {images[1]} held-out images:")
    print(f"  pre-training {pretraining / 1e15:.3g} PFLOP, measuring (validation loss and "
          f"probe features at {len(config.checkpoints)} checkpoints) "
          f"{(cost['total_flops'] - pretraining) / 1e15:.3g} PFLOP")
    seconds = cost["total_flops"] / (tflops * 1e12)
    took = f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.3g} s"
    print(f"  total {cost['total_flops'] / 1e15:.3g} PFLOP: {took} at {tflops:g} TFLOP/s sustained")
    print(f"  largest step (batch {config.batch_size}, float32, one device): "
          f"{step.total / 1e9:.2f} GB (activations {step.activations / 1e9:.2f} GB)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="study folder (resumable)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny study (2 trunks, a few steps) that checks the pipeline")
    parser.add_argument("--data", help="digits | folder:PATH | tfds:NAME (default: digits)")
    parser.add_argument("--tfds-data-dir", default=None)
    parser.add_argument("--image-size", type=positive_int)
    parser.add_argument("--patch-size", type=positive_int)
    parser.add_argument("--augmentation", choices=("aim", "shift", "none"))
    parser.add_argument("--steps", type=positive_int, help="pre-training steps per run")
    parser.add_argument("--checkpoints", type=lambda t: tuple(int(v) for v in t.split(",")),
                        help="steps to measure at, e.g. 50,100,200,400 (ends at --steps)")
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--seeds", type=lambda t: tuple(int(v) for v in t.split(",")),
                        help="e.g. 0,1,2: the first for the grid, all at full data")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="runs at a time, each in its own process (default: one per CPU "
                             "core, at most 4, on the embedded digits; 1 on other data, whose "
                             "larger models want the machine or accelerator to themselves)")
    parser.add_argument("--max-runs", type=positive_int, default=None,
                        help="stop after this many runs (continue later)")
    parser.add_argument("--estimate", action="store_true",
                        help="print the study's analytic cost (FLOPs, memory of the largest "
                             "step, time at --tflops) and exit without running")
    parser.add_argument("--images", type=_image_counts, default=None, metavar="TRAIN,VAL",
                        help="with --estimate: training and held-out image counts "
                             "(default: counted from --data)")
    parser.add_argument("--tflops", type=positive_float, default=100.0,
                        help="with --estimate: the sustained TFLOP/s to convert FLOPs to hours "
                             "(default 100, about 10%% of an H100's dense bfloat16 peak)")
    add_verbosity_argument(parser)
    return parser.parse_args(argv)


def use_compilation_cache(out: str) -> None:
    """Keeps JAX's compiled programs in OUT/compilation_cache (unless
    JAX_COMPILATION_CACHE_DIR is set): runs of one trunk size differ only in
    seed, data or values, so their programs are compiled once (a later run
    of the smallest trunk on a 2-core CPU: 149 -> 78 s). Has an effect only
    before JAX is imported (JAX reads these environment variables at
    start-up), and none on other backends."""
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(out, "compilation_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def default_workers(config) -> int:
    """One run per CPU core (at most 4) on the embedded digits, whose tiny
    trunks leave a core mostly idle within one run; 1 on other data."""
    return min(4, os.cpu_count() or 1) if config.data == "digits" else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet(args)
    use_compilation_cache(args.out)
    from keras_aim.studies import scaling

    config = scaling.QUICK if args.quick else scaling.StudyConfig()
    overrides = {key: getattr(args, key) for key in
                 ("data", "tfds_data_dir", "image_size", "patch_size", "augmentation",
                  "steps", "checkpoints", "batch_size", "seeds")
                 if getattr(args, key) is not None}
    if "steps" in overrides and "checkpoints" not in overrides:
        overrides["checkpoints"] = tuple(
            c * overrides["steps"] // config.steps for c in config.checkpoints)
    start = time.perf_counter()
    try:
        config = dataclasses.replace(config, **overrides)
        if args.estimate:
            print_estimate(config, args.images, args.tflops)
            return 0
        log = print if args.verbose else (lambda text: None)
        workers = default_workers(config) if args.workers is None else args.workers
        rows = scaling.run_study(config, args.out, log=log, max_runs=args.max_runs,
                                 workers=workers)
    except (ValueError, FileNotFoundError) as error:
        return report_error(args, error)
    done = {row["run"] for row in rows if row["final"]}
    if len(done) < len(config.runs()):
        print(f"{len(done)} of {len(config.runs())} runs done; rerun to continue.")
        return 0
    summary = scaling.summarize(config, rows)
    summary["wall_seconds_this_call"] = time.perf_counter() - start
    path = scaling.write_summary(args.out, summary)
    figures = scaling.plot(config, rows, args.out)
    print(scaling.format_summary(config, summary))
    print(f"\nsummary: {path}\nfigures: {', '.join(figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
