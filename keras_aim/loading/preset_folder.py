"""Checking a local keras-hub preset folder before keras-hub reads it.

keras-hub reports a damaged or incomplete folder with the error of whatever
part fails first (a `JSONDecodeError`, an h5py message, a missing
`model.weights.json` when `model.weights.h5` is what is missing, its
`bert_base_en` advice for a path that does not exist). `check_preset_folder`
looks at the folder first and raises one error that names the folder, what
is wrong and the fix. Only the files' headers are read (JSON files in full,
HDF5 superblocks), not the weights.
"""

from __future__ import annotations

import json
import os

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_FILE = "model.weights.json"
TASK_FILE = "task.json"
PREPROCESSOR_FILES = ("preprocessor.json", "image_converter.json")
JSON_FILES = ("config.json", "metadata.json", TASK_FILE, *PREPROCESSOR_FILES,
              SHARDED_WEIGHTS_FILE)


class PresetFolderError(ValueError):
    """A local preset folder is missing, incomplete or damaged."""


def is_local_path(preset) -> bool:
    """Whether `preset` names a local folder (not a handle such as `hf://`)."""
    return isinstance(preset, (str, os.PathLike)) and "://" not in os.fspath(preset)


def check_preset_folder(preset, load_weights: bool = True) -> None:
    """Raises `PresetFolderError` (or `FileNotFoundError`) naming the folder,
    the problem and the fix, unless `preset` is a complete preset folder."""
    path = os.fspath(preset)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"The preset folder {path!r} does not exist. Pass a released preset "
            "name (`keras-aim info` lists them), a folder written by "
            "save_to_preset, a folder of released .pth files, or a kaggle:// "
            "/ hf:// handle."
        )
    if not os.path.isdir(path):
        raise PresetFolderError(
            f"{path!r} is a file, not a preset folder. Pass the folder that "
            "save_to_preset wrote (it holds config.json); for a released .pth "
            "file, pass its folder or use keras_aim.load_official_weights."
        )
    present = set(os.listdir(path))
    if CONFIG_FILE not in present:
        raise PresetFolderError(
            f"{path!r} is not a preset folder: it has no {CONFIG_FILE} (it "
            f"holds {_listing(present)}). Pass the folder that save_to_preset "
            "wrote."
        )
    for name in JSON_FILES:
        if name in present:
            _check_json(path, name)
    if not load_weights:
        return
    if WEIGHTS_FILE in present:
        _check_hdf5(path, WEIGHTS_FILE)
    elif SHARDED_WEIGHTS_FILE in present:
        with open(os.path.join(path, SHARDED_WEIGHTS_FILE)) as handle:
            entries = json.load(handle).get("weight_map", {}).values()
        # One file name per group, or a list of them (newer Keras versions).
        shards = sorted({name for entry in entries
                         for name in ([entry] if isinstance(entry, str) else entry)})
        missing = [shard for shard in shards if shard not in present]
        if missing or not shards:
            raise PresetFolderError(
                f"The preset folder {path!r} is incomplete: {SHARDED_WEIGHTS_FILE} "
                f"lists weight shards {missing or '(none)'} that are not there. "
                "Copy the whole folder again, or save the model anew."
            )
        for shard in shards:
            _check_hdf5(path, shard)
    else:
        raise PresetFolderError(
            f"The preset folder {path!r} has {CONFIG_FILE} but no weights "
            f"({WEIGHTS_FILE}): it is incomplete. Copy the whole folder again, "
            "save the model anew, or pass load_weights=False for an untrained "
            "model of this architecture."
        )


def has_task(preset) -> bool:
    """Whether a (checked) preset folder holds a task (`task.json`)."""
    return os.path.exists(os.path.join(os.fspath(preset), TASK_FILE))


def has_preprocessor(preset) -> bool:
    """Whether a (checked) preset folder holds a preprocessor or converter."""
    folder = os.fspath(preset)
    return any(os.path.exists(os.path.join(folder, f)) for f in PREPROCESSOR_FILES)


def _check_json(folder: str, name: str) -> None:
    try:
        with open(os.path.join(folder, name)) as handle:
            json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise PresetFolderError(
            f"{os.path.join(folder, name)!r} is damaged (not valid JSON: "
            f"{error}); the preset folder was probably copied or written only "
            "in part. Copy the whole folder again, or save the model anew."
        ) from error


def _check_hdf5(folder: str, name: str) -> None:
    import h5py

    file = os.path.join(folder, name)
    try:
        with h5py.File(file, "r"):
            pass
    except OSError as error:
        raise PresetFolderError(
            f"{file!r} is damaged ({error}); the preset folder was probably "
            "copied or written only in part. Copy the whole folder again, or "
            "save the model anew."
        ) from error


def _listing(names: set[str], most: int = 5) -> str:
    if not names:
        return "nothing"
    shown = sorted(names)[:most]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(shown) + more
