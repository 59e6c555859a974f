"""The `keras-aim` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from keras_aim.presets import AIM_PRESETS, RELEASE_BASE_URL


def _info(args: argparse.Namespace) -> int:
    rows = [("preset", "width", "depth", "heads", "trunk params",
             "fp32 size", "IN-1k top-1 (best/last)")]
    for name, entry in AIM_PRESETS.items():
        config = entry["config"]
        top1 = entry["imagenet_top1"]
        rows.append(
            (
                name,
                str(config["hidden_dim"]),
                str(config["num_layers"]),
                str(config["num_heads"]),
                f"{entry['trunk_params']:,}",
                f"{entry['trunk_params'] * 4 / 1e9:.1f} GB",
                f"{top1['best']} / {top1['last']}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    print(f"\nReleased checkpoints: {RELEASE_BASE_URL}")
    print(
        "All presets: patch 14, 224x224 images. Build one with "
        "keras_aim.AIMBackbone.from_preset(NAME, load_weights=False)."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from keras_aim.version import __version__

    parser = argparse.ArgumentParser(
        prog="keras-aim",
        description="AIM (Autoregressive Image Models) for Keras 3.",
    )
    parser.add_argument(
        "--version", action="version", version=f"keras-aim {__version__}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="list the released AIM presets")
    info.set_defaults(handler=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
