"""The `keras-aim` command line: info, download, classify, zero-shot,
features, export, prepare-data."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from keras_aim.export.formats import FORMATS as EXPORT_FORMATS
from keras_aim.utils.arguments import positive_int
from keras_aim.utils.quiet import quiet_frameworks, report_error

from keras_aim.models.aim.aim_presets import (
    AIM_PRESETS,
    HEAD_KINDS,
    RELEASE_BASE_URL,
    listing,
    released_filenames,
)
from keras_aim.models.aimv2 import aimv2_presets
from keras_aim.models.aimv2.aimv2_presets import AIMV2_PRESETS

LIT_PRESET = "aimv2_large_patch14_224_lit"


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
    print("AIM-v1")
    _table(rows)
    sources = {(m["metadata"]["source"], m["metadata"]["license"],
                m["metadata"]["license_url"]) for m in trunks.values()}
    for source, terms, terms_url in sorted(sources):
        print(f"\nSource: {source}\nLicense: {terms}, {terms_url}")
    print(f"\nReleased checkpoints: {RELEASE_BASE_URL}")
    for strength, names in _checksum_strengths().items():
        print(f"Checksums of {', '.join(names)}: {strength}"
              + (" (all that is recorded for Apple's files: it catches damaged "
                 "files, not deliberately forged ones)" if "prefix" in strength else ""))
    print()
    print("AIMv2 (Apple's model.safetensors at the pinned Hub revision)")
    _table(_aimv2_rows())
    licenses = sorted({m["metadata"]["license"] for m in aimv2_presets.listing("vision").values()})
    print(f"Source: https://huggingface.co/apple/<repo>; License: {', '.join(licenses)} "
          "(each Hub model card)")
    print(
        "Released checkpoints: https://huggingface.co/apple/<repo>/resolve/<revision>/; "
        "their SHA-256 digests are not yet recorded, so a download is checked "
        "by its safetensors header (complete file, every key, dtype and shape)."
    )
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


def _aimv2_rows() -> list[tuple[str, ...]]:
    from keras_aim.loading.preset_cache import cache_status

    # The listing AIMv2Backbone.presets and AIMv2LiT.presets return.
    listed = {**aimv2_presets.listing("vision"), **aimv2_presets.listing("lit")}
    rows = [("preset", "size", "resolution", "params", "fp32 size",
             "IN-1k top-1", "revision", "SHA-256", "cache")]
    for name, entry in AIMV2_PRESETS.items():
        metadata = listed[name]["metadata"]
        size = metadata["image_size"][0]
        if entry["kind"] == "lit":
            reported = f"{entry['zero_shot_top1']} zero-shot"
        elif entry["imagenet_top1"] is not None:
            reported = str(entry["imagenet_top1"])
        else:
            reported = "- (distilled)"
        rows.append(
            (
                name,
                entry["size"],
                f"{size}x{size}" if size else "native",
                f"{metadata['params']:,}",
                f"{metadata['params'] * 4 / 1e9:.1f} GB",
                reported,
                entry["revision"][:10],
                entry["sha256"][:8] if entry["sha256"] else "not yet recorded",
                cache_status(name, aimv2_presets.download_paths(entry), head_kinds=()),
            )
        )
    return rows


def _download_aimv2(args: argparse.Namespace) -> int:
    from keras_aim.loading import preset_cache
    from keras_aim.models.aimv2.aimv2_backbone import AIMv2Backbone, release_checkpoint
    from keras_aim.models.aimv2.aimv2_lit import AIMv2LiT
    from keras_aim.models.aimv2.aimv2_tokenizer import release_tokenizer_files

    entry = aimv2_presets.get_preset(args.preset)
    lit = entry["kind"] == "lit"
    if args.files_only:
        print(release_checkpoint(args.preset))
        if lit:
            print(*release_tokenizer_files(args.preset), sep="\n")
        return 0
    (AIMv2LiT if lit else AIMv2Backbone).from_preset(args.preset, dtype=args.dtype)
    files = aimv2_presets.download_paths(entry)
    print(f"{args.preset}: {preset_cache.cache_status(args.preset, files, head_kinds=())}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from keras_aim.loading import preset_cache
    from keras_aim.models.aim.aim_presets import get_preset

    if aimv2_presets.is_preset_name(args.preset):
        return _download_aimv2(args)
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

    if aimv2_presets.is_preset_name(args.preset):
        print(
            f"error: Apple released no ImageNet heads for AIMv2, so {args.preset} "
            "cannot classify by itself. Use `keras-aim zero-shot IMAGE... --labels "
            f"...` (preset {LIT_PRESET}), or train a probe with recipes.attentive_probe.",
            file=sys.stderr,
        )
        return 1
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


def _zero_shot(args: argparse.Namespace) -> int:
    import numpy as np
    from keras import ops

    from keras_aim.models.aimv2.aimv2_image_converter import AIMv2ImageConverter
    from keras_aim.models.aimv2.aimv2_lit import AIMv2LiT, zero_shot_classifier
    from keras_aim.models.aimv2.aimv2_tokenizer import AIMv2Tokenizer

    labels = [label.strip() for label in args.labels.split(",")]
    templates = args.template or ["a photo of a {}."]
    names, images, failures = read_images(args.images)
    if not images:
        return 1
    model = AIMv2LiT.from_preset(args.preset)
    tokenizer = AIMv2Tokenizer.from_preset(args.preset)
    classifier = zero_shot_classifier(model, labels, templates, tokenizer)
    converter = AIMv2ImageConverter(image_size=model.vision_encoder.image_shape[:2])
    top_k = min(args.top_k, len(labels))
    for start in range(0, len(images), args.batch_size):
        batch = preprocess(converter, images[start : start + args.batch_size])
        probabilities = ops.convert_to_numpy(ops.softmax(classifier(batch), axis=-1))
        for path, probs in zip(names[start : start + args.batch_size], probabilities):
            print(path)
            for rank, index in enumerate(np.argsort(-probs)[:top_k], 1):
                print(f"  {rank}. {labels[index]:<30} {probs[index]:.4f}")
    return 1 if failures else 0


def _features(args: argparse.Namespace) -> int:
    import numpy as np
    from keras import ops

    from keras_aim.models import families
    from keras_aim.models.aim.aim_image_classifier import resolve_probe_layers
    from keras_aim.models.aimv2.aimv2_backbone import AIMv2Backbone
    from keras_aim.utils.atomic_files import atomic_file
    from keras_aim.utils.image_shapes import check_patch_multiple

    check_npz_output(args.out)
    options = {"image_shape": (None, None, 3)}
    if args.resample_positions and families.backbone_class(args.preset) is AIMv2Backbone:
        options["resample_position_embedding"] = True  # (AIM-v1: sin-cos, any size)
    backbone = families.backbone_from_preset(args.preset, **options)
    size = args.image_size or _default_size(backbone)
    check_patch_multiple((size, size), backbone.patch_size, f"--image-size {size}")
    grid = getattr(backbone, "position_grid", None)
    if grid and not backbone.resample_position_embedding and (
        size != grid[0] * backbone.patch_size or grid[0] != grid[1]
    ):
        raise ValueError(
            f"{args.preset} has a learned position table for "
            f"{grid[0] * backbone.patch_size}x{grid[1] * backbone.patch_size} images; "
            f"use --image-size {grid[0] * backbone.patch_size}, or pass "
            "--resample-positions to resample the table (bicubic; this changes "
            "the features)."
        )
    blocks = None
    if args.blocks != "final":
        blocks = resolve_probe_layers(args.blocks, backbone)
    names, images, failures = read_images(args.images)
    if not images:
        return 1
    converter = families.evaluation_converter(backbone, size)
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


def _default_size(backbone) -> int:
    """The features' default crop: a learned table's own size, else 224."""
    grid = getattr(backbone, "position_grid", None)
    if grid and grid[0] == grid[1]:
        return grid[0] * backbone.patch_size
    return 224


def _export(args: argparse.Namespace) -> int:
    import os

    spec = EXPORT_FORMATS[args.format]
    if len(spec.backends) == 1 and "KERAS_BACKEND" not in os.environ and "keras" not in sys.modules:
        # The one backend that writes this format (else the default one).
        os.environ["KERAS_BACKEND"] = spec.backends[0]
    from keras_aim.export.exporters import check_target, export_model, lit_format_error
    from keras_aim.export.formats import check_backend
    from keras_aim.export.saved_model import resolve_version

    if args.backbone and args.model is not None:
        args.parser.error("--backbone exports a preset's trunk; a --model is exported as it is")
    if args.probe and (args.backbone or args.model is not None):
        args.parser.error("--probe chooses the head of a preset's classifier; not with "
                          + ("--backbone" if args.backbone else "--model"))
    if args.top_k is not None and args.backbone:
        args.parser.error("--top-k applies to classifiers; a trunk exports embedding and tokens")
    if spec.name == "saved_model":  # before loading a possibly large model
        version = resolve_version(args.out, args.version, args.overwrite)
    else:
        if args.version is not None:
            raise ValueError("--version applies to the saved_model format only.")
        version = None
        check_target(spec, args.out, args.overwrite)
        if (aimv2_presets.is_preset_name(args.preset)
                and aimv2_presets.get_preset(args.preset)["kind"] == "lit"):
            raise ValueError(lit_format_error(spec.name))
    check_backend(spec)
    if args.model is not None:
        import keras_aim
        from keras_aim.loading.keras_files import load_model_file

        keras_aim.register_classes()  # the classes the .keras file names
        model = load_model_file(args.model)
    elif aimv2_presets.is_preset_name(args.preset):
        from keras_aim.models.aimv2.aimv2_backbone import AIMv2Backbone
        from keras_aim.models.aimv2.aimv2_lit import AIMv2LiT

        lit = aimv2_presets.get_preset(args.preset)["kind"] == "lit"
        model = (AIMv2LiT if lit else AIMv2Backbone).from_preset(args.preset)
    elif args.backbone:
        from keras_aim.models.aim.aim_backbone import AIMBackbone

        model = AIMBackbone.from_preset(args.preset)
    else:
        from keras_aim.models.aim.aim_image_classifier import AIMImageClassifier

        options = {"probe_layers": args.probe} if args.probe else {}
        model = AIMImageClassifier.from_preset(args.preset, **options)
    path = export_model(
        model,
        args.out,
        spec.name,
        version=version,
        overwrite=args.overwrite,
        top_k=args.top_k or 5,
        image_size=args.image_size,
    )
    if spec.name == "saved_model":
        from keras_aim.export import signature_names

        print(f"{path}: SavedModel with signatures {', '.join(signature_names(model))}")
    else:
        print(f"{path}: {spec.description}; input 'images' float32 "
              "(batch, height, width, 3), preprocessed")
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    from keras_aim.data.records import summary, write_records

    index = write_records(args.data, args.out, shards=args.shards, overwrite=args.overwrite,
                          tfds_data_dir=args.tfds_data_dir)
    print(f"{summary(index)}; train on it with --data records:{args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from keras_aim.version import __version__

    parser = argparse.ArgumentParser(
        prog="keras-aim",
        description="AIM and AIMv2 (Autoregressive Image Models) for Keras 3.",
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
        "info", help="list the released AIM and AIMv2 presets and what is cached"
    )
    info.set_defaults(handler=_info)

    download = commands.add_parser(
        "download",
        help="download, verify, convert and cache a preset for offline use",
    )
    download.add_argument("preset", help="e.g. aim_600m, aimv2_large_patch14_224")
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

    zero_shot = commands.add_parser(
        "zero-shot", help="classify images over any labels with the AIMv2 LiT model"
    )
    zero_shot.add_argument("images", nargs="+", metavar="IMAGE")
    zero_shot.add_argument(
        "--labels", required=True, help='comma-separated class names, e.g. "cat,dog,car"'
    )
    zero_shot.add_argument(
        "--template", action="append", default=None,
        help='prompt template with one {} (repeat for an ensemble; default '
        '"a photo of a {}.")',
    )
    zero_shot.add_argument("--preset", default=LIT_PRESET)
    zero_shot.add_argument("--top-k", type=positive_int, default=5)
    zero_shot.add_argument("--batch-size", type=positive_int, default=8)
    zero_shot.set_defaults(handler=_zero_shot)

    features = commands.add_parser(
        "features", help="save trunk features of images to an .npz file"
    )
    features.add_argument("images", nargs="+", metavar="IMAGE")
    features.add_argument("--preset", default="aim_600m",
                          help="an AIM or AIMv2 preset, or a preset directory")
    features.add_argument("--out", required=True, help="output .npz")
    features.add_argument(
        "--blocks", default="final", type=_block_choice,
        help="final (post-norm tokens), last, best, or block indices like 14,15",
    )
    features.add_argument("--pooling", choices=["mean", "none"], default="mean")
    features.add_argument(
        "--image-size", type=positive_int, default=None,
        help="side after resize + center crop (a multiple of the patch; default: "
        "the preset's size, 224 for AIM-v1 and the native model)",
    )
    features.add_argument(
        "--resample-positions", action="store_true",
        help="AIMv2 with a learned position table: resample it (bicubic) to "
        "another --image-size; this changes the features",
    )
    features.add_argument("--batch-size", type=positive_int, default=8)
    features.set_defaults(handler=_features)

    export = commands.add_parser(
        "export",
        help="export a model: SavedModel for TF Serving, ONNX, OpenVINO, LiteRT or torch.export",
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--preset", help="preset name, released-files directory or preset directory"
    )
    source.add_argument(
        "--model", help="a .keras file (AIMImageClassifier, AIMBackbone, AIMv2Backbone or AIMv2LiT)"
    )
    export.add_argument(
        "--format", choices=list(EXPORT_FORMATS), default="saved_model",
        help="saved_model (default): TF Serving folder, preprocessing inside; "
        "onnx (.onnx), openvino (.xml + .bin), litert (.tflite; TensorFlow "
        "backend), torch (.pt2; PyTorch backend): the model on preprocessed images",
    )
    export.add_argument(
        "--out", required=True,
        help="saved_model: TF Serving model base path (a new or empty folder, or the "
        "folder of this model's earlier exports); other formats: the file to write",
    )
    export.add_argument(
        "--version", type=positive_int, default=None,
        help="saved_model version folder (default: one more than the highest present)",
    )
    export.add_argument(
        "--overwrite", action="store_true", help="replace an existing version or file"
    )
    export.add_argument(
        "--backbone", action="store_true",
        help="export the preset's trunk (embedding, tokens) instead of the classifier "
        "(AIMv2 presets: always their trunk, or the LiT model's embeddings)",
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

    prepare = commands.add_parser(
        "prepare-data",
        help="write an image folder or a tfds split as record files (random access, "
        "for --data records:DIR)",
    )
    prepare.add_argument(
        "--data", required=True,
        help="folder:PATH (PATH/<class>/**/<image>) or tfds:NAME[:SPLIT] (default split: train)",
    )
    prepare.add_argument("--out", required=True, help="the records folder to create")
    prepare.add_argument(
        "--shards", type=positive_int, default=None,
        help="number of record files (default: one per ~1 GiB of image bytes)",
    )
    prepare.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing records folder (never a folder holding other files)",
    )
    prepare.add_argument(
        "--tfds-data-dir", default=None,
        help="where tensorflow-datasets keeps prepared data (default: its own)",
    )
    prepare.set_defaults(handler=_prepare_data)
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
