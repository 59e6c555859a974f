"""AIM's two findings at small scale: does the pre-training loss predict
probe accuracy, and does quality grow with capacity and data?

    python -m recipes.scaling_study --out runs/study            # ~45 min on 2 CPU cores
    python -m recipes.scaling_study --out runs/study_quick --quick
    python -m recipes.scaling_study --out runs/study_in --data tfds:imagenet2012 \
        --image-size 224 --patch-size 14 --augmentation aim --steps 20000 ...

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
import sys
import time

from recipes.common import add_verbosity_argument, quiet, report_error


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="study folder (resumable)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny study (2 trunks, a few steps) that checks the pipeline")
    parser.add_argument("--data", help="digits | folder:PATH | tfds:NAME (default: digits)")
    parser.add_argument("--tfds-data-dir", default=None)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--patch-size", type=int)
    parser.add_argument("--augmentation", choices=("aim", "shift", "none"))
    parser.add_argument("--steps", type=int, help="pre-training steps per run")
    parser.add_argument("--checkpoints", type=lambda t: tuple(int(v) for v in t.split(",")),
                        help="steps to measure at, e.g. 50,100,200,400 (ends at --steps)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seeds", type=lambda t: tuple(int(v) for v in t.split(",")),
                        help="e.g. 0,1,2: the first for the grid, all at full data")
    parser.add_argument("--max-runs", type=int, default=None,
                        help="stop after this many runs (continue later)")
    add_verbosity_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet(args)
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
        log = print if args.verbose else (lambda text: None)
        rows = scaling.run_study(config, args.out, log=log, max_runs=args.max_runs)
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
