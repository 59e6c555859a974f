"""Per-device memory of an AIM pre-training run on a device mesh.

    python -m recipes.plan --config aim_7b --mesh 16x8 --batch-size 4096 --precision bf16
    python -m recipes.plan --config aim_7b --mesh 64x8 32x16 --remat \
        --device-memory 80 141 16

Prints, per mesh, the bytes each device holds for parameters, optimizer
state (AdamW m and v; fp32 master weights with bf16), gradients and the
activations of one (micro-)batch, and whether that fits each device memory
(with 10% headroom). The formulas are in keras_aim/training/memory_plan.py;
measured peaks of real steps are in docs/distribution.md
(benchmarks/plan_vs_measured.py).
Nothing is built or allocated.
"""

from __future__ import annotations

import argparse
import sys

from keras_aim.utils.arguments import positive_float, positive_int
from recipes.configs import NAMES, load

# 80 GB: A100/H100; 141 GB: H200; 16 GB: a TPU v4 / v5e core.
DEFAULT_DEVICE_MEMORY_GB = (16, 80, 141)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # --preset and --batch: the names of earlier versions.
    parser.add_argument("--config", "--preset", dest="config", choices=NAMES,
                        default="aim_7b", help="a pre-training config (recipes/configs/)")
    parser.add_argument("--mesh", nargs="+", default=["16x8"], help="BATCHxMODEL, one or more")
    parser.add_argument("--batch-size", "--batch", dest="batch_size", type=positive_int,
                        help="global batch (default: the config's)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--accumulate", type=positive_int, default=1, metavar="N")
    parser.add_argument("--device-memory", type=positive_float, nargs="+",
                        default=DEFAULT_DEVICE_MEMORY_GB, metavar="GB",
                        help="device memories to check, in GB (10^9 bytes)")
    return parser.parse_args(argv)


def plan_table(args) -> str:
    """The plan as a Markdown table, one row per mesh."""
    from keras_aim.training.distribution import parse_mesh
    from keras_aim.training.memory_plan import GIB, PretrainingShape, plan_memory

    config = load(args.config)
    batch = args.batch_size or config["batch_size"]
    shape = PretrainingShape.from_config(config)
    fits_header = "".join(f" fits {gb:g} GB |" for gb in args.device_memory)
    lines = [
        f"{args.config}: global batch {batch}, {args.precision}, "
        f"remat {'on' if args.remat else 'off'}, accumulate {args.accumulate} "
        "(GiB per device)",
        "",
        "| mesh | images/device/step | parameters | optimizer state | gradients "
        f"| activations | total |{fits_header}",
        "|---|---|---|---|---|---|---|" + "---|" * len(args.device_memory),
    ]
    for text in args.mesh:
        mesh = parse_mesh(text)
        plan = plan_memory(shape, mesh.batch, mesh.model, batch, args.precision,
                           args.remat, args.accumulate)
        fits = "".join(
            f" {'yes' if plan.fits(gb * 1e9) else 'no'} |" for gb in args.device_memory
        )
        figures = (plan.parameters, plan.optimizer_state, plan.gradients,
                   plan.activations, plan.total)
        lines.append(
            f"| {mesh} | {plan.micro_batch_per_device} | "
            + " | ".join(f"{value / GIB:.1f}" for value in figures)
            + f" |{fits}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(plan_table(args))
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
