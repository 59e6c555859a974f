"""Loading `.keras` model files (written by `model.save`) strictly.

`keras.saving.load_model` reports a file that is not a Keras model file
with the error of whatever part fails first (`KeyError: "There is no item
named 'config.json'"` for another zip archive) and, like `load_weights`,
loads weights files holding more variables than the model. `load_model_file`
checks the archive first (`check_keras_archive`: an error naming what was
expected and what was found), builds the model from its `config.json`,
compares the archive's weights with the model (`strict_weights`), and only
then loads them. Imports no model: the caller registers the model classes
(`keras_aim.register_classes()`).
"""

from __future__ import annotations

import json
import os
import zipfile

from keras_aim.loading.lean_loading import variables_to_be_overwritten
from keras_aim.loading.strict_weights import check_weights_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
EXPECTED = ("a Keras model file saved with model.save(path) (a zip archive holding "
            f"{CONFIG_FILE}, metadata.json and {WEIGHTS_FILE})")
MAX_CONFIG_BYTES = 64 << 20


def check_keras_archive(path) -> None:
    """Raises `FileNotFoundError` or `ValueError` naming what was expected
    and what was found, unless `path` is a `.keras` zip archive holding a
    model's `config.json` and `model.weights.h5`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; pass {EXPECTED}.")
    found = None
    if os.path.isdir(path):
        found = "a folder" + (
            f" holding {CONFIG_FILE}: a keras-hub preset folder, which from_preset "
            "(or --preset) loads" if os.path.exists(os.path.join(path, CONFIG_FILE)) else ""
        )
    elif not zipfile.is_zipfile(path):
        found = _describe_file(path)
    else:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        lacking = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if n not in names]
        if lacking:
            found = (f"a zip archive without {' or '.join(lacking)} (it holds "
                     f"{_listing(names)})")
        elif not path.endswith(".keras"):
            found = "a Keras model archive whose name does not end in .keras"
    if found is not None:
        raise ValueError(
            f"{path} is not {EXPECTED}: it is {found}. Save the model with "
            "model.save('model.keras') and pass that file."
        )


def load_model_file(path, allow_partial: bool = False, custom_objects: dict | None = None):
    """The model in `.keras` file `path`, uncompiled.

    The archive is checked (`check_keras_archive`), the model built from
    its `config.json`, and its weights compared with the model before any
    is loaded: a file lacking variables or with other shapes is refused,
    and one holding more variables than its config describes too, unless
    `allow_partial` (then only the model's variables are loaded). Errors
    are `ValueError`s (`WeightLoadingError` for the weights) naming the
    file, what differs and the fix.
    """
    import keras

    check_keras_archive(path)
    path = os.fspath(path)
    with zipfile.ZipFile(path) as archive:
        if archive.getinfo(CONFIG_FILE).file_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{path}: its {CONFIG_FILE} is too large for a model config; "
                             f"pass {EXPECTED}.")
        try:
            config = json.loads(archive.read(CONFIG_FILE))
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{path}: its {CONFIG_FILE} is damaged ({error}); the file was probably "
                "copied or written only in part. Save the model anew with model.save."
            ) from error
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(f"{path}: its {CONFIG_FILE} holds no model config; pass {EXPECTED}.")
    config["compile_config"] = None  # uncompiled, as load_model(compile=False)
    with variables_to_be_overwritten():  # the strict load fills every one
        model = keras.saving.deserialize_keras_object(config, custom_objects=custom_objects)
    check_weights_file(model, path, allow_partial, fix=(
        f"Fix: its {CONFIG_FILE} does not describe the model that wrote its "
        f"{WEIGHTS_FILE}; save the model anew with model.save."))
    with zipfile.ZipFile(path) as archive:
        has_assets = any(n.startswith("assets/") for n in archive.namelist())
    if has_assets:  # e.g. a tokenizer's vocabulary: Keras' loader reads them
        del model
        return keras.saving.load_model(path, compile=False)
    keras.saving.load_weights(model, path)
    return model


def _describe_file(path: str) -> str:
    with open(path, "rb") as handle:
        head = handle.read(8)
    if not head:
        return "an empty file"
    if head == b"\x89HDF\r\n\x1a\n":
        return ("an HDF5 file (weights only, as save_weights writes them: build the "
                "model and call load_weights on it)")
    return f"a file of {os.path.getsize(path)} bytes that is not a zip archive"


def _listing(names: list[str], most: int = 5) -> str:
    if not names:
        return "nothing"
    shown = ", ".join(sorted(names)[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")
