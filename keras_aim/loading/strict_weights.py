"""Strict loading of Keras weights files, both ways.

Keras refuses a weights file that lacks variables the model has (with its
own list of unloaded layers) but loads a file holding more, e.g. a 4-block
trunk's `model.weights.h5` under a `config.json` that says 2 blocks, and
silently drops the rest. `check_weights_file` compares the file's variables
(names and shapes, read from the HDF5 headers only) with what Keras would
save for the model, before anything is loaded, and raises one
`WeightLoadingError` that lists what differs and the fix. A file holding
more than the model is loaded only when asked for by name
(`allow_partial=True`).

The models' `load_weights` check through `StrictWeights`; their
`from_preset` run inside `preset_weights(preset, allow_partial, overrides)`,
which tells the check which preset the file belongs to (the error then
names its `config.json`, and the keys it lacks) and whether partial
loading was asked for. Imports no model.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import threading
import zipfile
from typing import Iterable, Iterator

from keras_aim.loading.state_dict import WeightLoadingError

Layout = dict  # "layers/<group>/.../vars/<index>" -> shape (tuple of ints, or None)

_context = threading.local()
# Keras keeps the optimizer's state beside the weights in `.keras` files
# (and in `.weights.h5` of compiled models) but loads it only into a built
# optimizer, warning otherwise: it is not part of the model's weights here.
_NOT_WEIGHTS = ("optimizer/",)
_SHOWN = 3


@contextlib.contextmanager
def preset_weights(
    preset, allow_partial: bool = False, overrides: Iterable[str] = ()
) -> Iterator[None]:
    """Inside: `load_weights` of files in local folder `preset` reports a
    mismatch against the preset's `config.json` / `task.json` (and the keys
    they lack, besides the `overrides` passed to `from_preset`), and accepts
    files holding more variables than the model if `allow_partial`."""
    previous = getattr(_context, "preset", None)
    folder = os.path.abspath(os.fspath(preset)) if _is_local(preset) else None
    _context.preset = (folder, bool(allow_partial), frozenset(overrides))
    try:
        yield
    finally:
        _context.preset = previous


def expected_layout(model, objects_to_skip: Iterable = ()) -> Layout:
    """The variables Keras saves for `model` (its weights file's layout),
    without writing anything: Keras' own traversal into a store that only
    records each entry's path and shape."""
    from keras.src.saving import saving_lib

    class _Recorder(saving_lib.H5IOStore):  # what Keras' traversal accepts
        def __init__(self):
            self.layout, self.path = {}, ""

        def __bool__(self):
            return True

        def make(self, path, metadata=None):
            self.path = path
            return self

        def __setitem__(self, key, value):
            # A value without a shape (Keras hands a layer built under a
            # DTypePolicyMap a None scale here): its shape is not compared.
            shape = getattr(value, "shape", None)
            self.layout[_join(self.path, key)] = (
                None if shape is None else tuple(int(d) for d in shape))

    recorder = _Recorder()
    saving_lib._save_state(
        model, weights_store=recorder, assets_store=None, inner_path="",
        visited_saveables={id(o) for o in objects_to_skip},
    )
    return recorder.layout


def file_layout(path: str) -> Layout | None:
    """The variables in a Keras weights file (`.weights.h5`, sharded
    `.weights.json`, or the weights inside a `.keras` archive), from the
    HDF5 headers; `None` for files in other formats (legacy `.h5`, remote
    paths), which Keras checks alone."""
    import h5py

    path = os.fspath(path)
    if "://" in path or not os.path.isfile(path):
        return None
    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as archive:
            if "model.weights.h5" not in archive.namelist():
                return None
            with archive.open("model.weights.h5") as member, h5py.File(member, "r") as handle:
                return _datasets(handle)
    if path.endswith("weights.json"):
        with open(path) as handle:
            shards = json.load(handle).get("weight_map", {}).values()
        names = sorted({n for s in shards for n in ([s] if isinstance(s, str) else s)})
        layout = {}
        for name in names:
            with h5py.File(os.path.join(os.path.dirname(path), name), "r") as handle:
                layout.update(_datasets(handle))
        return layout
    if path.endswith(".weights.h5"):
        with h5py.File(path, "r") as handle:
            return _datasets(handle)
    return None


def check_weights_file(
    model, path: str, allow_partial: bool = False, objects_to_skip: Iterable = (),
    fix: str | None = None,
) -> None:
    """Raises `WeightLoadingError` unless the Keras weights file at `path`
    holds exactly the variables `model` saves, with the same shapes;
    nothing is loaded. With `allow_partial` (or inside `preset_weights(...,
    allow_partial=True)`), a file holding more is accepted (Keras then
    loads only the variables the model has); one lacking some never is.
    `fix`: the advice ending the error (else one for the file's origin)."""
    found = file_layout(path)
    if found is None or any(k.startswith("_layer_checkpoint_dependencies") for k in found):
        return  # no file Keras 3 reads this way, or a Keras 2 file: Keras checks it
    folder, preset_partial, overrides = getattr(_context, "preset", None) or (None, False, ())
    allow_partial = allow_partial or preset_partial
    expected = expected_layout(model, objects_to_skip)
    found = {k: v for k, v in found.items() if not k.startswith(_NOT_WEIGHTS)}
    expected = {k: v for k, v in expected.items() if not k.startswith(_NOT_WEIGHTS)}
    extra = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    mismatched = sorted(k for k in set(found) & set(expected)
                        if expected[k] is not None and found[k] != expected[k])
    if not missing and not mismatched and (allow_partial or not extra):
        return
    in_preset = folder is not None and os.path.dirname(os.path.abspath(path)) == folder
    lines = [f"Cannot load {path} into {type(model).__name__} {model.name!r}: the file "
             "does not fit the model; nothing was loaded."]
    if extra:
        lines.append(f"{len(extra)} variables in the file that the model lacks: {_few(extra)}")
    if missing:
        lines.append(f"{len(missing)} variables of the model not in the file: {_few(missing)}")
    if mismatched:
        lines.append(f"{len(mismatched)} shape mismatches: " + _few(
            [f"{k} {found[k]} in the file, {expected[k]} in the model" for k in mismatched],
            "; "))
    lines += _group_counts(found, expected)
    lines.append(fix or (_preset_fix(model, folder, overrides) if in_preset else (
        "Fix: build the model with the configuration that wrote the file (e.g. "
        "its num_layers and hidden_dim).")))
    if extra and not missing and not mismatched:
        lines.append(
            "To load only the variables the model has (e.g. the first blocks of a "
            "deeper trunk's weights), pass allow_partial=True."
        )
    raise WeightLoadingError("\n  ".join(lines))


class StrictWeights:
    """Mixin for Keras models: `load_weights` refuses a file that does not
    hold exactly the model's variables (see `check_weights_file`)."""

    def load_weights(self, filepath, skip_mismatch: bool = False, allow_partial: bool = False,
                     **kwargs) -> None:
        """`keras.Model.load_weights` after `check_weights_file` (skipped
        with Keras' own `skip_mismatch=True`, which warns instead).

        Args:
            filepath: a `.weights.h5`, sharded `.weights.json` or `.keras` file.
            skip_mismatch: Keras' option: skip layers whose variables differ.
            allow_partial: accept a file that holds more variables than the
                model (they are ignored); one lacking some is still refused.
        """
        if kwargs.get("objects_to_skip") is not None:  # read twice: no iterator
            kwargs["objects_to_skip"] = list(kwargs["objects_to_skip"])
        if not skip_mismatch:
            check_weights_file(self, filepath, allow_partial,
                               kwargs.get("objects_to_skip") or ())
        return super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)


def _datasets(handle) -> Layout:
    import h5py

    layout = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset) and name.rpartition("/")[0].split("/")[-1] == "vars":
            layout[name] = tuple(int(d) for d in item.shape)

    handle.visititems(visit)
    return layout


def _join(path: str, key: str) -> str:
    return f"{path.strip('/')}/vars/{key}" if path.strip("/") else f"vars/{key}"


def _few(names: list[str], separator: str = ", ") -> str:
    """The first names, then "..." and the count: "a, b, c, ... (16 in all)"."""
    shown = separator.join(names[:_SHOWN])
    return shown + (f"{separator}... ({len(names)} in all)" if len(names) > _SHOWN else "")


def _group_counts(found: Layout, expected: Layout) -> list[str]:
    """Lines such as "the file holds 4 aim_transformer_block layers, the
    model 2" for each kind of layer whose count differs."""

    def counts(layout):
        groups = set()
        for key in layout:
            parts = key.split("/")
            if "layers" in parts[:-2]:
                groups.add(parts[parts.index("layers") + 1])
        kinds = {}
        for group in groups:
            kind = re.sub(r"_\d+$", "", group)
            kinds[kind] = kinds.get(kind, 0) + 1
        return kinds

    in_file, in_model = counts(found), counts(expected)
    return [
        f"the file holds {in_file.get(kind, 0)} {kind} layers, the model {in_model.get(kind, 0)}"
        for kind in sorted(set(in_file) | set(in_model))
        if in_file.get(kind, 0) != in_model.get(kind, 0)
    ]


def _preset_fix(model, folder: str, overrides: frozenset) -> str:
    """The fix for a preset folder whose config does not match its weights,
    naming the config file and the constructor arguments it lacks."""
    config_file, saved = "config.json", None
    for name in ("config.json", "task.json"):
        try:
            with open(os.path.join(folder, name)) as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            continue
        if config.get("class_name") == type(model).__name__:
            config_file, saved = name, config.get("config", {})
            break
    fix = (f"Fix: {os.path.join(folder, config_file)} does not describe the model that "
           f"wrote these weights. Correct it (or the keyword arguments given to "
           "from_preset) to match the weights, e.g. num_layers and hidden_dim, or save "
           "the preset anew from the model.")
    if saved is not None:
        parameters = inspect.signature(type(model).__init__).parameters.values()
        lacking = [
            f"{p.name} (default {p.default!r} used)" for p in parameters
            if p.default is not p.empty and p.name not in saved
            and p.name not in overrides and p.name not in ("dtype", "name")
        ]
        if lacking:
            fix += f" {config_file} lacks {', '.join(lacking)}."
    return fix


def _is_local(preset) -> bool:
    return isinstance(preset, (str, os.PathLike)) and "://" not in os.fspath(preset)
