"""The `keras-aim` command line: info, download, classify, features, export."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from keras_aim.export.formats import FORMATS as EXPORT_FORMATS
from keras_aim.utils.quiet import quiet_frameworks

from keras_aim.models.aim.aim_presets import (
    AIM_PRESETS,
    HEAD_KINDS,
    RELEASE_BASE_URL,
    listing,
    released_filenames,
)


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _info(args: argparse.Namespace) -> int:
    from keras_aim.loading.preset_cache import cache_status, keras_aim_home

    # The listing AIMBackbone.presets and AIMImageClassifier.presets return.
    trunks, classifiers = listing("backbone"), listing("classifier")
    rows = [("preset", "width", "depth", "heads", "image", "trunk params",
             "classifier params", "fp32 size", "IN-1k top-1 best/last", "cache")]
    for name, entry in AIM_PRESETS.items():
        config = entry["config"]
        trunk = trunks[name]["metadata"]
        top1 = entry.get("imagenet_top1")
        rows.append(
            (
                name,
                str(config["hidden_dim"]),
                str(config["num_layers"]),
                str(config["num_heads"]),
                "x".join(str(side) for side in trunk["image_size"]),
                f"{trunk['params']:,}",
                f"{classifiers[name]['metadata']['params']:,}",
                f"{trunk['params'] * 4 / 1e9:.1f} GB",
                f"{top1['best']} / {top1['last']}" if top1 else "-",
                cache_status(name, released_filenames(name)),
            )
        )
    _table(rows)
    sources = {(m["metadata"]["source"], m["metadata"]["license"],
                m["metadata"]["license_url"]) for m in trunks.values()}
    for source, terms, terms_url in sorted(sources):
        print(f"\nSource: {source}\nLicense: {terms}, {terms_url}")
    print(f"Released checkpoints: {RELEASE_BASE_URL}")
    print(f"Cache: {keras_aim_home()} (set KERAS_AIM_HOME to move it)")
    return 0


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


def read_image(path: str):
    """An RGB uint8 array `(H, W, 3)`; raises `ValueError` naming the file."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from error


def read_images(paths):
    """`(readable paths, RGB arrays, number of failures)`; each unreadable
    file is reported on stderr and skipped."""
    names, images, failures = [], [], 0
    for path in paths:
        try:
            images.append(read_image(path))
            names.append(path)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            failures += 1
    return names, images, failures


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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _features(args: argparse.Namespace) -> int:
    import numpy as np
    from keras import ops

    from keras_aim.models.aim.aim_backbone import AIMBackbone
    from keras_aim.models.aim.aim_image_classifier import resolve_probe_layers
    from keras_aim.models.aim.aim_image_converter import AIMImageConverter
    from keras_aim.utils.atomic_files import atomic_file

    names, images, failures = read_images(args.images)
    if not images:
        return 1
    backbone = AIMBackbone.from_preset(args.preset, image_shape=(None, None, 3))
    size = args.image_size or 224
    blocks = None
    if args.blocks != "final":
        blocks = resolve_probe_layers(
            args.blocks if args.blocks in ("last", "best")
            else tuple(int(i) for i in args.blocks.split(",")),
            backbone,
        )
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
    import os

    spec = EXPORT_FORMATS[args.format]
    if len(spec.backends) == 1 and "KERAS_BACKEND" not in os.environ and "keras" not in sys.modules:
        # The one backend that writes this format (else the default one).
        os.environ["KERAS_BACKEND"] = spec.backends[0]
    from keras_aim.export.exporters import check_target, export_model
    from keras_aim.export.formats import check_backend
    from keras_aim.export.saved_model import resolve_version

    try:  # before loading a possibly large model
        if spec.name == "saved_model":
            version = resolve_version(args.out, args.version, args.overwrite)
        else:
            if args.version is not None:
                raise ValueError("--version applies to the saved_model format only.")
            version = None
            check_target(spec, args.out, args.overwrite)
        check_backend(spec)
    except (FileExistsError, IsADirectoryError, NotADirectoryError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
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
    try:
        path = export_model(
            model,
            args.out,
            spec.name,
            version=version,
            overwrite=args.overwrite,
            top_k=args.top_k,
            image_size=args.image_size,
        )
    except (FileExistsError, IsADirectoryError, NotADirectoryError, TypeError,
            ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if spec.name == "saved_model":
        print(f"{path}: SavedModel with signatures serving_default, predict_images, "
              "predict_preprocessed")
    else:
        print(f"{path}: {spec.description}; input 'images' float32 "
              "(batch, height, width, 3), preprocessed")
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
    classify.add_argument("--top-k", type=_positive_int, default=5)
    classify.add_argument("--batch-size", type=_positive_int, default=8)
    classify.add_argument("--dtype", default=None, help="e.g. bfloat16")
    classify.set_defaults(handler=_classify)

    features = commands.add_parser(
        "features", help="save trunk features of images to an .npz file"
    )
    features.add_argument("images", nargs="+", metavar="IMAGE")
    features.add_argument("--preset", default="aim_600m")
    features.add_argument("--out", required=True, help="output .npz")
    features.add_argument(
        "--blocks", default="final",
        help="final (post-norm tokens), last, best, or block indices like 14,15",
    )
    features.add_argument("--pooling", choices=["mean", "none"], default="mean")
    features.add_argument(
        "--image-size", type=_positive_int, default=None,
        help="side after resize + center crop (a multiple of the patch; default 224)",
    )
    features.add_argument("--batch-size", type=_positive_int, default=8)
    features.set_defaults(handler=_features)

    export = commands.add_parser(
        "export",
        help="export a model: SavedModel for TF Serving, ONNX, OpenVINO, LiteRT or torch.export",
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--preset", help="preset name, released-files directory or preset directory"
    )
    source.add_argument("--model", help="a .keras file (AIMImageClassifier or AIMBackbone)")
    export.add_argument(
        "--format", choices=list(EXPORT_FORMATS), default="saved_model",
        help="saved_model (default): TF Serving folder, preprocessing inside; "
        "onnx (.onnx), openvino (.xml + .bin), litert (.tflite; TensorFlow "
        "backend), torch (.pt2; PyTorch backend): the model on preprocessed images",
    )
    export.add_argument(
        "--out", required=True,
        help="saved_model: TF Serving model base path; other formats: the file to write",
    )
    export.add_argument(
        "--version", type=_positive_int, default=None,
        help="saved_model version folder (default: one more than the highest present)",
    )
    export.add_argument(
        "--overwrite", action="store_true", help="replace an existing version or file"
    )
    export.add_argument(
        "--backbone", action="store_true",
        help="export the preset's trunk (embedding, tokens) instead of the classifier",
    )
    export.add_argument(
        "--probe", choices=HEAD_KINDS, default=None,
        help="released head of the classifier (default: best)",
    )
    export.add_argument("--top-k", type=_positive_int, default=5)
    export.add_argument(
        "--image-size", type=_positive_int, default=None,
        help="crop side for trunks built for any size (default 224)",
    )
    export.set_defaults(handler=_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    quiet_frameworks(args.verbose)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
