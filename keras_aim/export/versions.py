"""TF Serving's model base path: the numbered version folders an export
writes into, which version comes next, and which folders an export may
write into at all.

A model base path holds one served model as numbered version folders
(`1/`, `2/`, ...), each a SavedModel (`saved_model.pb` + `variables/`).
`export_saved_model` writes a version as a hidden `.N.tmp-*` staging folder
beside the others and renames it into place (`keras_aim.utils.atomic_files`);
a killed export can leave that staging folder behind. Nothing else belongs
there: an export into a folder holding anything else (images, a checkpoint,
someone's project) is refused before any work, so a mistyped `--out` never
puts a model into it.

No TensorFlow or Keras import: the command line checks `--out` before
loading a model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# The files TF Serving (and `tf.saved_model.load`) reads as a SavedModel.
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
# `atomic_directory`'s staging folder of version N (`.N.tmp-<random>`), and
# the `.old` name an overwritten version has while it is swapped out.
_STAGING_NAME = re.compile(r"\.\d+\.tmp-.+")
_LISTED = 5  # names an error lists before "and N more"


def is_version_folder(path: Path) -> bool:
    """A numbered folder holding a SavedModel: an earlier export."""
    return (
        path.name.isdigit()
        and path.is_dir()
        and any((path / name).is_file() for name in SAVED_MODEL_FILES)
    )


def foreign_entries(export_dir: str | os.PathLike) -> list[str]:
    """What `export_dir` holds besides earlier exports, as quoted names in
    sorted order: every entry that is neither a version folder
    (`is_version_folder`) nor an export's hidden staging folder
    (`.N.tmp-*`). Folders end in `/`; a numbered folder without a SavedModel
    says so. `[]` for a folder that does not exist."""
    base = Path(export_dir)
    if not base.is_dir():
        return []
    foreign = []
    for entry in sorted(base.iterdir(), key=lambda p: p.name):
        if is_version_folder(entry):
            continue
        if _STAGING_NAME.fullmatch(entry.name) and entry.is_dir():
            continue
        label = repr(entry.name + ("/" if entry.is_dir() else ""))
        if entry.name.isdigit() and entry.is_dir():
            label += " (numbered, but no saved_model.pb)"
        foreign.append(label)
    return foreign


def check_export_folder(export_dir: str | os.PathLike) -> None:
    """Raises unless `export_dir` may receive a new version: it does not
    exist yet, or it is a folder holding only earlier exports.

    Checked: `export_dir` is not a file (`NotADirectoryError`), and each of
    its entries is either a numbered folder holding a SavedModel
    (`saved_model.pb` or `.pbtxt`: what TF Serving loads as a version) or
    the hidden `.N.tmp-*` staging folder of an export in progress or killed
    (`FileExistsError` naming the other entries). Which model the earlier
    versions hold is not checked: an export records no model name or
    configuration, and the versions of one served model legitimately
    differ (new weights, another head, a trunk after its classifier).
    """
    base = Path(export_dir)
    if base.exists() and not base.is_dir():
        raise NotADirectoryError(
            f"export_dir {str(base)!r} is a file; pass a directory (TF "
            "Serving's model base path)."
        )
    foreign = foreign_entries(base)
    if not foreign:
        return
    listed = ", ".join(foreign[:_LISTED])
    if len(foreign) > _LISTED:
        listed += f" and {len(foreign) - _LISTED} more"
    raise FileExistsError(
        f"export_dir {str(base)!r} holds other things than earlier exports: "
        f"{listed}. An export writes a numbered version folder (TF Serving's "
        "layout) into an empty or new folder, or into the folder of this "
        "model's earlier exports (numbered folders with a saved_model.pb), "
        "never among other files. Choose an empty or new folder (e.g. "
        "serving/<model name>), or the folder of this model's earlier exports."
    )


def resolve_version(
    export_dir: str | os.PathLike, version: int | None, overwrite: bool = False
) -> int:
    """The version to write (`next_version` when `None`), after
    `check_export_folder`; raises if the version is not a positive int, or
    it exists and `overwrite` is off."""
    base = Path(export_dir)
    check_export_folder(base)
    version = next_version(base) if version is None else version
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(
            f"version must be a positive int (TF Serving's version folder); "
            f"received {version!r}."
        )
    refuse_existing(base / str(version), overwrite)
    return version


def next_version(export_dir: str | os.PathLike) -> int:
    """One more than the highest numeric version folder (1 if none)."""
    base = Path(export_dir)
    if not base.is_dir():
        return 1
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def refuse_existing(target: Path, overwrite: bool) -> None:
    """Raises `FileExistsError` if version folder `target` exists and
    `overwrite` is off."""
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"Version {target.name} already exists in {str(target.parent)!r}. "
            "Pass overwrite=True (keras-aim export --overwrite) to replace it, "
            "or another version."
        )


__all__ = [
    "check_export_folder",
    "foreign_entries",
    "is_version_folder",
    "next_version",
    "resolve_version",
]
