"""Reading PyTorch-style state dicts and filling Keras variables from them.

Checkpoints of the released models are PyTorch state dicts (`.pth` zip
files, read here without torch, one tensor at a time), `.safetensors` files
(read one tensor at a time too, `safetensors_file`), or in-memory dicts of
arrays. A model family's converter (e.g.
`keras_aim.models.aim.convert_aim`) maps its key names to Keras variables and
a layout transform; `assign_strictly` checks every key and shape of that map
before it changes any variable. This module imports no model.

Layouts: torch Linear `(out, in)` -> Keras kernel `(in, out)` (`linear`);
torch conv `OIHW` -> Keras `HWIO` (`conv`); everything else as is
(`identity`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import zipfile
import zlib
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import numpy as np

from keras_aim.loading.lean_loading import limit_heap_fragmentation
from keras_aim.loading.safetensors_file import SafetensorsFile, SafetensorsFormatError

StateDictLike = Union[str, os.PathLike, Mapping[str, Any]]


def identity(x):
    return x


def linear(x):  # torch (out, in) -> Keras (in, out)
    return x.T


def conv(x):  # torch (O, I, H, W) -> Keras (H, W, I, O)
    return x.transpose(2, 3, 1, 0)


def torch_shape(keras_shape: tuple, transform: Callable) -> tuple:
    """The shape a released tensor must have to fill a Keras variable."""
    if transform is linear:
        return tuple(reversed(keras_shape))
    if transform is conv:
        h, w, i, o = keras_shape
        return (o, i, h, w)
    return tuple(keras_shape)


class WeightLoadingError(ValueError):
    """Released weights do not fit the model; nothing was loaded."""


class _StateDict:
    """Lazy, read-only view of one state dict: key names and shapes without
    reading tensor data, then one tensor at a time as a NumPy array."""

    def __init__(self, source: StateDictLike):
        self.name = "<in-memory dict>"
        self._reader = None
        if isinstance(source, Mapping):
            self._tensors = dict(source)
            return
        path = os.fspath(source)
        self.name = path
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Weight file {path!r} does not exist. Download it (`keras-aim "
                "info` lists the released presets and their files) or fix "
                "the path."
            )
        if path.endswith(".safetensors"):
            try:
                self._reader = SafetensorsFile(path)
            except SafetensorsFormatError as error:
                raise WeightLoadingError(str(error)) from error
        elif zipfile.is_zipfile(path):
            self._reader = TorchZipReader(path)
        elif _starts_with(path, b"PK\x03\x04"):
            raise WeightLoadingError(
                f"{path!r} is an incomplete zip (PyTorch) file: it was "
                "probably truncated while downloading. Delete it and "
                "download it again."
            )
        elif _starts_with(path, _LEGACY_TORCH_MAGIC):
            # PyTorch's legacy (pre-1.6) format: only torch reads it.
            self._tensors = _torch_load(path)
        else:
            raise WeightLoadingError(
                f"{path!r} is not a weights file: neither a PyTorch checkpoint "
                "(.pth, a zip) nor .safetensors. Pass the released file; if it "
                "was downloaded, delete it and download it again."
            )

    def keys(self) -> list[str]:
        if self._reader is not None:
            return self._reader.keys()
        return list(self._tensors.keys())

    def shape(self, key: str) -> tuple:
        if self._reader is not None:
            return self._reader.shape(key)
        return tuple(self._tensors[key].shape)

    def array(self, key: str) -> np.ndarray:
        if self._reader is not None:
            return self._reader.array(key)
        return _to_numpy(self._tensors[key])

    def verify(self, keys) -> None:
        """Reads the data of `keys` once, without keeping it, and raises
        `WeightLoadingError` if any of it is damaged (checksums, sizes):
        afterwards `array` cannot fail on these keys."""
        if self._reader is not None:
            self._reader.verify(keys)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def open_state_dict(source: StateDictLike) -> _StateDict:
    """A released-format state dict (`.pth`, `.safetensors` or a dict),
    opened lazily: `keys()`, `shape(key)`, `array(key)`, `close()`."""
    return _StateDict(source)


# torch storage classes -> NumPy dtypes (bfloat16 through ml_dtypes).
_TORCH_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


class _TensorRecord(NamedTuple):
    storage: str
    dtype: str
    offset: int
    shape: tuple
    stride: tuple


def _rebuild_tensor(storage, offset, shape, stride, *unused):
    key, dtype = storage
    return _TensorRecord(key, dtype, offset, tuple(shape), tuple(stride))


# What `torch.save(..., _use_new_zipfile_serialization=False)` writes first:
# pickle protocol 2 and torch's magic number as a 10-byte long.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


class _StateDictUnpickler(pickle.Unpickler):
    """Reads a torch state-dict pickle into `_TensorRecord`s; like
    `torch.load(weights_only=True)`, any other global is refused."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda tensor, *unused: tensor
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _TORCH_STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(
            f"{module}.{name} is not allowed in a weights file"
        )

    def persistent_load(self, pid):
        _, dtype, key, _, _ = pid  # ("storage", type, key, location, numel)
        return key, dtype


class TorchZipReader:
    """Reads tensors of a PyTorch zip checkpoint (`torch.save`, torch >= 1.6)
    one at a time with plain file reads, without torch.

    Only the tensor asked for is in memory: no memory map keeps the rest of
    the file resident, which keeps converting large checkpoints within
    about one copy of the weights.
    """

    def __init__(self, path: str):
        self.path = path
        self._zip = zipfile.ZipFile(path)
        names = self._zip.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise WeightLoadingError(
                f"{path!r} is a zip file but not a PyTorch checkpoint (no "
                "data.pkl). Pass the released .pth file."
            )
        self._prefix = pickles[0][: -len("data.pkl")]
        byteorder = self._prefix + "byteorder"
        if byteorder in names and self._zip.read(byteorder) != b"little":
            raise WeightLoadingError(f"{path!r} is big-endian; not supported.")
        try:
            with self._zip.open(pickles[0]) as handle:
                self._records = _StateDictUnpickler(handle).load()
        except Exception as error:  # a damaged pickle raises many types
            raise WeightLoadingError(
                f"Could not read {path!r} as a PyTorch state dict ({error})."
            ) from error
        if not isinstance(self._records, Mapping):
            raise WeightLoadingError(f"{path!r} does not hold a state dict.")
        self._sizes = {info.filename: info.file_size for info in self._zip.infolist()}
        for key, record in self._records.items():
            problem = _record_problem(record, self._sizes.get(self._storage_name(record)))
            if problem:
                raise WeightLoadingError(
                    f"{path!r} is damaged or not a PyTorch checkpoint: tensor "
                    f"{key!r} {problem}. Nothing was loaded; delete the file "
                    "and download it again."
                )

    def _storage_name(self, record) -> str:
        return f"{self._prefix}data/{getattr(record, 'storage', '')}"

    def keys(self) -> list[str]:
        return list(self._records)

    def shape(self, key: str) -> tuple:
        return self._records[key].shape

    def array(self, key: str) -> np.ndarray:
        """The tensor `key` (its storage, offset and strides were checked
        against the bytes in the file when the reader opened it)."""
        record = self._records[key]
        dtype = np.dtype(_numpy_dtype(record.dtype))
        name = self._storage_name(record)
        with self._damage_reported(key):
            data = self._zip.read(name)
            if len(data) != self._sizes[name]:
                raise zipfile.BadZipFile(
                    f"{len(data)} bytes instead of {self._sizes[name]}"
                )
        flat = np.frombuffer(data, dtype=dtype)
        return np.lib.stride_tricks.as_strided(
            flat[record.offset :],
            shape=record.shape,
            strides=tuple(s * dtype.itemsize for s in record.stride),
            writeable=False,
        )

    def verify(self, keys) -> None:
        """Streams every storage of `keys` through zip's CRC check, holding
        one chunk at a time."""
        storages = {self._storage_name(self._records[k]): k for k in keys}
        for name, key in storages.items():
            with self._damage_reported(key), self._zip.open(name) as handle:
                while handle.read(_VERIFY_CHUNK_BYTES):
                    pass

    @contextlib.contextmanager
    def _damage_reported(self, key: str):
        """Turns zip's errors about damaged data into one naming the file."""
        try:
            yield
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
            raise WeightLoadingError(
                f"{self.path!r} is damaged: the data of {key!r} fails its zip "
                f"check ({error}). Nothing was loaded; delete the file and "
                "download it again."
            ) from error

    def close(self) -> None:
        self._zip.close()


_VERIFY_CHUNK_BYTES = 1 << 24


def _record_problem(record, storage_bytes: int | None) -> str:
    """Why `record` cannot be a view of `storage_bytes` bytes ("" if it can):
    every index the shape, strides and offset reach must lie inside them."""
    if not isinstance(record, _TensorRecord):
        return f"is a {type(record).__name__}, not a tensor"
    if record.dtype not in _TORCH_STORAGE_DTYPES.values():
        return f"has an unknown storage type {record.dtype!r}"
    if storage_bytes is None:
        return f"names a storage ({record.storage!r}) that is not in the file"

    def whole(values):
        return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)

    if not (whole(record.shape) and whole(record.stride) and whole([record.offset])):
        return (f"has an invalid shape {record.shape}, strides {record.stride} "
                f"or offset {record.offset!r}")
    if len(record.shape) != len(record.stride):
        return f"has {len(record.shape)} dimensions but {len(record.stride)} strides"
    itemsize = np.dtype(_numpy_dtype(record.dtype)).itemsize
    if storage_bytes % itemsize:
        return (f"has a {record.dtype} storage of {storage_bytes} bytes, not a "
                f"multiple of {itemsize}")
    if 0 in record.shape:
        return ""
    last = record.offset + sum((n - 1) * s for n, s in zip(record.shape, record.stride))
    if (last + 1) * itemsize > storage_bytes:
        return (f"declares shape {record.shape} (strides {record.stride}, offset "
                f"{record.offset}) reaching {(last + 1) * itemsize} bytes of "
                f"{record.dtype} data, but its storage holds {storage_bytes}")
    return ""


def _starts_with(path: str, magic: bytes) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(magic)) == magic


def _torch_load(path: str):
    """Reads PyTorch's legacy (non-zip) format; only torch can."""
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"{path!r} is in PyTorch's legacy (pre-zip) format, which needs "
            "torch to read: `pip install torch==2.13.0` (the CPU wheel is "
            "enough), or re-save it as .safetensors."
        ) from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for bad files
        # torch's own message may advise weights_only=False, which runs any
        # code the file holds: never pass that on for a file of unknown origin.
        raise WeightLoadingError(
            f"Could not read {path!r} as a PyTorch state dict (torch's "
            f"restricted loader refused it: {type(error).__name__}). The file "
            "may be truncated, damaged or not a released AIM checkpoint; "
            "delete it and download it again."
        ) from error


def _to_numpy(tensor) -> np.ndarray:
    """A NumPy array from a NumPy, torch, JAX or TensorFlow tensor."""
    if hasattr(tensor, "detach"):  # torch.Tensor
        tensor = tensor.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(tensor)


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return name


VariableMap = Mapping[str, "tuple[Any, Callable]"]


def assign_strictly(
    expected: VariableMap,
    sources: Sequence["_StateDict"],
    model_name: str,
    ignored: frozenset = frozenset(),
    unexpected_reason: Callable[[str], str] = lambda key: "not a key of this model",
    hint: str = "",
) -> None:
    """Fills the variables of `expected` (key -> (variable, transform)) from
    `sources`, all-or-nothing on names and shapes.

    Every key and shape is checked first; one `WeightLoadingError` lists
    every missing key, unexpected key (with `unexpected_reason(key)`) and
    shape mismatch, and then nothing has changed. Variables are filled one
    tensor at a time, so no second full copy of the weights is held.
    Keys in `ignored` carry no model state and are skipped.
    """
    found = {}  # key -> source
    for source in sources:
        for key in source.keys():
            if key not in ignored:
                found[key] = source
    missing, unexpected, mismatched = [], [], []
    for key, (variable, transform) in expected.items():
        want = torch_shape(tuple(variable.shape), transform)
        if key not in found:
            missing.append(f"{key}  expected shape {want}")
        elif found[key].shape(key) != want:
            mismatched.append(f"{key}  expected shape {want}, found {found[key].shape(key)}")
    for key, source in found.items():
        if key not in expected:
            unexpected.append(f"{key}  shape {source.shape(key)} ({unexpected_reason(key)})")
    if missing or unexpected or mismatched:
        lines = [
            f"Cannot load weights from {', '.join(s.name for s in sources)} into "
            f"{model_name}; nothing was loaded."
        ]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines.extend(f"  {item}" for item in items)
        if hint:
            lines.append(hint)
        raise WeightLoadingError("\n".join(lines))
    # All-or-nothing on the data too: every tensor is read once (and
    # dropped) before any variable changes, so a damaged file leaves the
    # model as it was. This costs a second read of the file, not memory.
    for source in sources:
        source.verify([key for key in expected if found[key] is source])
    limit_heap_fragmentation()
    for key, (variable, transform) in expected.items():
        _assign(variable, transform(found[key].array(key)))


def _assign(variable, value: np.ndarray) -> None:
    from keras import ops

    if value.dtype.name == "bfloat16":  # not every backend takes ml_dtypes
        value = value.astype("float32")
    # np.require, not np.ascontiguousarray: that one turns 0-d into (1,).
    variable.assign(ops.cast(np.require(value, requirements="C"), variable.dtype))
