"""The `keras-aim` command line: info, download, classify, features, export."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from keras_aim.utils.arguments import positive_int
from keras_aim.utils.quiet import quiet_frameworks, report_error

from keras_aim.models.aim.aim_presets import (
    AIM_PRESETS,
    HEAD_KINDS,
    RELEASE_BASE_URL,
    released_filenames,
)


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _info(args: argparse.Namespace) -> int:
    from keras_aim.loading.preset_cache import cache_status, keras_aim_home

    rows = [("preset", "width", "depth", "heads", "trunk params", "fp32 size",
             "IN-1k top-1 best/last", "cache")]
    for name, entry in AIM_PRESETS.items():
        config = entry["config"]
        top1 = entry.get("imagenet_top1")
        rows.append(
            (
                name,
                str(config["hidden_dim"]),
                str(config["num_layers"]),
                str(config["num_heads"]),
                f"{entry['trunk_params']:,}",
                f"{entry['trunk_params'] * 4 / 1e9:.1f} GB",
                f"{top1['best']} / {top1['last']}" if top1 else "-",
                cache_status(name, released_filenames(name)),
            )
        )
    _table(rows)
    print(f"\nReleased checkpoints: {RELEASE_BASE_URL}")
    for strength, names in _checksum_strengths().items():
        print(f"Checksums of {', '.join(names)}: {strength}"
              + (" (all that is recorded for Apple's files: it catches damaged "
                 "files, not deliberately forged ones)" if "prefix" in strength else ""))
    print(f"Cache: {keras_aim_home()} (set KERAS_AIM_HOME to move it)")
    return 0


def _checksum_strengths() -> dict[str, list[str]]:
    """How well each preset's released files are pinned down -> presets."""
    from keras_aim.loading.download import digest_strength

    found: dict[str, list[str]] = {}
    for name, entry in AIM_PRESETS.items():
        weakest = min((sha for _, sha in entry["files"].values()), key=len)
        found.setdefault(digest_strength(weakest), []).append(name)
    return found


def _download(args: argparse.Namespace) -> int:
    from keras_aim.loading import preset_cache
    from keras_aim.models.aim.aim_presets import get_preset

    entry = get_preset(args.preset)
    kinds = list(HEAD_KINDS) if args.probe == "all" else (
        [] if args.probe == "none" else [args.probe]
    )
    if args.files_only:
        for role in ["backbone"] + [f"head_{k}" for k in kinds]:
            filename, sha256 = entry["files"][role]
            print(preset_cache.release_file(filename, sha256, RELEASE_BASE_URL))
        return 0
    from keras_aim.models.aim.aim_backbone import AIMBackbone
    from keras_aim.models.aim.aim_image_classifier import AIMImageClassifier

    if not kinds:
        AIMBackbone.from_preset(args.preset, dtype=args.dtype)
    for kind in kinds:
        AIMImageClassifier.from_preset(args.preset, probe_layers=kind, dtype=args.dtype)
    status = preset_cache.cache_status(args.preset, released_filenames(args.preset))
    print(f"{args.preset}: {status}")
    return 0


def read_images(paths):
    """`(readable paths, RGB arrays, number of failures)` through
    `keras_aim.data.images` (the decoding the SavedModel uses); each
    unreadable file is reported on stderr and skipped."""
    from keras_aim.data.images import read_images as decode_files

    names, images, errors = decode_files(paths)
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    return names, images, len(errors)


def preprocess(converter, images):
    """Differently sized images -> one `(B, H, W, 3)` batch."""
    import numpy as np
    from keras import ops

    return np.stack([ops.convert_to_numpy(converter(image)) for image in images])


def class_name(index: int, num_classes: int) -> str:
    if num_classes == 1000:
        from keras_hub.utils import imagenet_id_to_name

        return imagenet_id_to_name(index)
    return f"class {index}"


def _classify(args: argparse.Namespace) -> int:
    import numpy as np
    from keras import ops

    from keras_aim.models.aim.aim_image_classifier import AIMImageClassifier

    names, images, failures = read_images(args.images)
    if not images:
        return 1
    options = {"probe_layers": args.probe, "dtype": args.dtype}
    classifier = AIMImageClassifier.from_preset(
        args.preset, **{k: v for k, v in options.items() if v is not None}
    )
    converter = classifier.preprocessor.image_converter
    top_k = min(args.top_k, classifier.num_classes)
    for start in range(0, len(images), args.batch_size):
        batch = preprocess(converter, images[start : start + args.batch_size])
        logits = ops.cast(classifier(batch, training=False), "float32")
        probabilities = ops.convert_to_numpy(ops.softmax(logits, axis=-1))
        for path, probs in zip(names[start : start + args.batch_size], probabilities):
            print(path)
            for rank, index in enumerate(np.argsort(-probs)[:top_k], 1):
                label = class_name(int(index), classifier.num_classes)
                print(f"  {rank}. {label:<30} {probs[index]:.4f}")
    return 1 if failures else 0


def _block_choice(text: str):
    """argparse type of --blocks: final, last, best or block indices."""
    if text in ("final", "last", "best"):
        return text
    try:
        return tuple(int(i) for i in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected final, last, best or comma-separated block indices "
            f"like 14,15; got {text!r}"
        ) from None


def check_npz_output(path: str) -> None:
    """Raises `ValueError` unless `path` can take an `.npz` file: checked
    before any work, so a bad --out costs nothing and leaves nothing."""
    import os

    if not path.endswith(".npz"):
        raise ValueError(f"--out {path}: name an .npz file, e.g. {path.rstrip('/')}.npz.")
    if os.path.isdir(path):
        raise ValueError(f"--out {path} is a folder; name an .npz file inside it.")
    parent = os.path.dirname(os.path.abspath(path))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise ValueError(f"--out {path}: {existing} is not a writable folder.")


def _features(args: argparse.Namespace) -> int:
    import numpy as np
    from keras import ops

    from keras_aim.models.aim.aim_backbone import AIMBackbone
    from keras_aim.models.aim.aim_image_classifier import resolve_probe_layers
    from keras_aim.models.aim.aim_image_converter import AIMImageConverter
    from keras_aim.utils.atomic_files import atomic_file
    from keras_aim.utils.image_shapes import check_patch_multiple

    check_npz_output(args.out)
    backbone = AIMBackbone.from_preset(args.preset, image_shape=(None, None, 3))
    size = args.image_size or 224
    check_patch_multiple((size, size), backbone.patch_size, f"--image-size {size}")
    blocks = None
    if args.blocks != "final":
        blocks = resolve_probe_layers(args.blocks, backbone)
    names, images, failures = read_images(args.images)
    if not images:
        return 1
    converter = AIMImageConverter(image_size=(size, size))
    pooling = None if args.pooling == "none" else args.pooling
    features = []
    for start in range(0, len(images), args.batch_size):
        batch = preprocess(converter, images[start : start + args.batch_size])
        out = backbone.extract_features(batch, blocks, pooling)
        features.append(ops.convert_to_numpy(ops.cast(out, "float32")))
    with atomic_file(args.out) as staging:
        np.savez(
            staging,
            features=np.concatenate(features),
            paths=np.array(names),
            blocks=np.array(blocks if blocks is not None else [], "int32"),
            image_size=np.array(size),
        )
    shape = np.concatenate(features).shape
    print(f"{args.out}: features {shape} for {len(names)} images")
    return 1 if failures else 0


def _export(args: argparse.Namespace) -> int:
    from keras_aim.export import export_saved_model, resolve_version

    if args.backbone and args.model is not None:
        args.parser.error("--backbone exports a preset's trunk; a --model is exported as it is")
    if args.probe and (args.backbone or args.model is not None):
        args.parser.error("--probe chooses the head of a preset's classifier; not with "
                          + ("--backbone" if args.backbone else "--model"))
    if args.top_k is not None and args.backbone:
        args.parser.error("--top-k applies to classifiers; a trunk exports embedding and tokens")
    version = resolve_version(args.out, args.version, args.overwrite)  # before loading
    if args.model is not None:
        import keras

        model = keras.saving.load_model(args.model, compile=False)
    elif args.backbone:
        from keras_aim.models.aim.aim_backbone import AIMBackbone

        model = AIMBackbone.from_preset(args.preset)
    else:
        from keras_aim.models.aim.aim_image_classifier import AIMImageClassifier

        options = {"probe_layers": args.probe} if args.probe else {}
        model = AIMImageClassifier.from_preset(args.preset, **options)
    path = export_saved_model(
        model,
        args.out,
        version=version,
        overwrite=args.overwrite,
        top_k=args.top_k or 5,
        image_size=args.image_size,
    )
    print(f"{path}: SavedModel with signatures serving_default, predict_images, "
          "predict_preprocessed")
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
    parser.add_argument(
        "--verbose", action="store_true",
        help="show framework logs and warnings, and tracebacks of errors",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = commands.add_parser(
        "info", help="list the released AIM presets and what is cached"
    )
    info.set_defaults(handler=_info)

    download = commands.add_parser(
        "download",
        help="download, verify, convert and cache a preset for offline use",
    )
    download.add_argument("preset", help="e.g. aim_600m")
    download.add_argument(
        "--probe", choices=[*HEAD_KINDS, "all", "none"], default="all",
        help="released classifier heads to cache too (default: all)",
    )
    download.add_argument(
        "--dtype", default=None, help="convert in this dtype, e.g. bfloat16"
    )
    download.add_argument(
        "--files-only", action="store_true",
        help="only download and verify the released files",
    )
    download.set_defaults(handler=_download)

    classify = commands.add_parser(
        "classify", help="print the top ImageNet classes of images"
    )
    classify.add_argument("images", nargs="+", metavar="IMAGE")
    classify.add_argument(
        "--preset", default="aim_600m",
        help="preset name, released-files directory or preset directory",
    )
    classify.add_argument(
        "--probe", choices=HEAD_KINDS, default=None,
        help="released head (default for released presets: best)",
    )
    classify.add_argument("--top-k", type=positive_int, default=5)
    classify.add_argument("--batch-size", type=positive_int, default=8)
    classify.add_argument("--dtype", default=None, help="e.g. bfloat16")
    classify.set_defaults(handler=_classify)

    features = commands.add_parser(
        "features", help="save trunk features of images to an .npz file"
    )
    features.add_argument("images", nargs="+", metavar="IMAGE")
    features.add_argument("--preset", default="aim_600m")
    features.add_argument("--out", required=True, help="output .npz")
    features.add_argument(
        "--blocks", default="final", type=_block_choice,
        help="final (post-norm tokens), last, best, or block indices like 14,15",
    )
    features.add_argument("--pooling", choices=["mean", "none"], default="mean")
    features.add_argument(
        "--image-size", type=positive_int, default=None,
        help="side after resize + center crop (a multiple of the patch; default 224)",
    )
    features.add_argument("--batch-size", type=positive_int, default=8)
    features.set_defaults(handler=_features)

    export = commands.add_parser(
        "export", help="write a SavedModel for TensorFlow Serving"
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--preset", help="preset name, released-files directory or preset directory"
    )
    source.add_argument("--model", help="a .keras file (AIMImageClassifier or AIMBackbone)")
    export.add_argument("--out", required=True, help="TF Serving model base path")
    export.add_argument(
        "--version", type=positive_int, default=None,
        help="version folder (default: one more than the highest present)",
    )
    export.add_argument(
        "--overwrite", action="store_true", help="replace an existing version"
    )
    export.add_argument(
        "--backbone", action="store_true",
        help="export the preset's trunk (embedding, tokens) instead of the classifier",
    )
    export.add_argument(
        "--probe", choices=HEAD_KINDS, default=None,
        help="released head of the classifier (default: best)",
    )
    export.add_argument("--top-k", type=positive_int, default=None,
                        help="classes a classifier's export returns (default 5)")
    export.add_argument(
        "--image-size", type=positive_int, default=None,
        help="crop side for trunks built for any size (default 224)",
    )
    export.set_defaults(handler=_export, parser=export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    quiet_frameworks(args.verbose)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure: one line (traceback with --verbose)
        return report_error(error, with_traceback=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
