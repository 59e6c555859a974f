"""Converts Apple's released AIM checkpoints into keras-hub preset
directories, ready for `keras_hub.upload_preset(handle, dir)`.

    python weights/convert.py aim_600m OUT_DIR            # downloads if needed
    python weights/convert.py /path/to/released/ OUT_DIR  # local .pth files

writes OUT_DIR/aim_600m (trunk + preprocessor) and
OUT_DIR/aim_600m_probe_{best,last} (trunk + released head + preprocessor),
each with a README.md model card for released presets. Existing outputs are
kept unless --overwrite; each directory appears by an atomic rename when
complete.
"""

from __future__ import annotations

import argparse
import os
import sys

from keras_aim.utils.atomic_files import atomic_directory


def convert(
    source: str,
    out_dir: str,
    probes=("best", "last"),
    dtype: str | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Writes the preset directories; returns their paths."""
    from build_manifest import RELEASED, model_card

    from keras_aim.loading.preset_cache import SHARD_SIZE_GB
    from keras_aim.models.aim.aim_backbone import AIMBackbone, evaluation_preprocessor
    from keras_aim.models.aim.aim_image_classifier import AIMImageClassifier
    from keras_aim.models.aim.aim_presets import resolve_release

    name, _ = resolve_release(source)
    if name is None:
        raise ValueError(
            f"{source!r} is neither a released preset name nor a directory of "
            "released AIM files."
        )
    targets = {name: None, **{f"{name}_probe_{kind}": kind for kind in probes}}
    paths = {t: os.path.join(out_dir, t) for t in targets}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(
            f"Output exists: {', '.join(existing)}. Pass --overwrite to "
            "replace it, or choose another OUT_DIR."
        )
    os.makedirs(out_dir, exist_ok=True)
    card = model_card(name) if name in RELEASED else None
    options = {"dtype": dtype} if dtype else {}
    backbone_saved = False
    for target, kind in targets.items():
        if kind is None:
            if probes:
                continue  # saved from the first classifier's trunk below
            model = AIMBackbone.from_preset(source, **options)
        else:
            model = AIMImageClassifier.from_preset(source, probe_layers=kind, **options)
        with atomic_directory(paths[target], replace=True) as staging:
            model.save_to_preset(staging, max_shard_size=SHARD_SIZE_GB)
            if card:
                _write(os.path.join(staging, "README.md"), card)
        if not backbone_saved:
            backbone = model.backbone if kind else model
            with atomic_directory(paths[name], replace=True) as staging:
                backbone.save_to_preset(staging, max_shard_size=SHARD_SIZE_GB)
                preprocessor = getattr(model, "preprocessor", None)
                if preprocessor is None:
                    preprocessor = evaluation_preprocessor(name)
                preprocessor.save_to_preset(staging)
                if card:
                    _write(os.path.join(staging, "README.md"), card)
            backbone_saved = True
    return list(paths.values())


def _write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="preset name or directory of released files")
    parser.add_argument("out_dir")
    parser.add_argument(
        "--probes", nargs="*", default=["best", "last"], choices=["best", "last"],
        help="released heads to convert (none: trunk only)",
    )
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        paths = convert(args.source, args.out_dir, tuple(args.probes), args.dtype,
                        args.overwrite)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    print("Upload with: keras_hub.upload_preset('kaggle://USER/aim/keras/NAME', DIR)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
