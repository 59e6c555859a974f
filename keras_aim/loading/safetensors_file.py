"""Reading `.safetensors` files one tensor at a time with plain file reads.

A safetensors file is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}` and the tensors' bytes. Written here rather than read through the
`safetensors` library because that library memory-maps the file: every page
a conversion touches stays resident until the file is closed, so converting
a checkpoint peaked at twice its size (measured: 2.07x the weights for a
2.7 GB file, against 1.1x with the reads below; docs/aimv2.md). The header
is checked whole before any tensor is read: it parses, every dtype is
known, the tensors tile the data exactly and the data ends exactly at the
end of the file, so a truncated or padded download is caught at once.
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np

# safetensors dtype -> NumPy dtype name (bfloat16 through ml_dtypes).
DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}
MAX_HEADER_BYTES = 100 << 20  # the format's own limit


class SafetensorsFormatError(ValueError):
    """A file is not a complete, well-formed safetensors file."""


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class SafetensorsFile:
    """Lazy, read-only view of a `.safetensors` file: `keys()`,
    `shape(key)`, `dtype(key)` (safetensors' name, e.g. "F32") from the
    header, `array(key)` reads one tensor; `close()`."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        self._handle = open(path, "rb")
        try:
            self._entries, self._data_start = self._read_header(size)
        except BaseException:
            self._handle.close()
            raise

    def _fail(self, problem: str):
        raise SafetensorsFormatError(
            f"{self.path} is not a complete safetensors file: {problem}. It was "
            "probably truncated or damaged while downloading; delete it and "
            "download it again."
        )

    def _read_header(self, size: int):
        prefix = self._handle.read(8)
        if len(prefix) < 8:
            self._fail(f"it is only {size} bytes long")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > min(MAX_HEADER_BYTES, size - 8):
            self._fail(f"its header length {header_bytes} does not fit the file ({size} bytes)")
        try:
            header = json.loads(self._handle.read(header_bytes))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            self._fail(f"its header is not JSON ({error})")
        if not isinstance(header, dict):
            self._fail("its header is not a JSON object")
        header.pop("__metadata__", None)
        entries = {}
        for name, info in header.items():
            try:
                dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                self._fail(f"the header entry of {name!r} is malformed")
            if dtype not in DTYPES:
                self._fail(f"{name!r} has the unsupported dtype {dtype!r}")
            needed = math.prod(shape) * _numpy_dtype(DTYPES[dtype]).itemsize
            if end - begin != needed:
                self._fail(f"{name!r} spans {end - begin} bytes but {dtype} {shape} needs {needed}")
            entries[name] = (dtype, shape, begin, end)
        position = 0
        for _, _, begin, end in sorted(entries.values(), key=lambda e: e[2]):
            if begin != position:
                self._fail(f"the tensors' data has a gap or an overlap at byte {begin}")
            position = end
        if position != size - 8 - header_bytes:
            self._fail(
                f"its header describes {position} bytes of tensor data but the file "
                f"holds {size - 8 - header_bytes}"
            )
        return entries, 8 + header_bytes

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple:
        return self._entries[key][1]

    def dtype(self, key: str) -> str:
        return self._entries[key][0]

    def array(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[key]
        buffer = np.empty(end - begin, np.uint8)
        self._handle.seek(self._data_start + begin)
        if self._handle.readinto(memoryview(buffer)) != end - begin:
            self._fail(f"{key!r} could not be read whole")
        return buffer.view(_numpy_dtype(DTYPES[dtype])).reshape(shape)

    def verify(self, keys) -> None:
        """Nothing to read: the header check at opening already proved that
        every tensor lies whole within the file (the format has no checksums)."""

    def close(self) -> None:
        self._handle.close()


def safetensors_header(path: str) -> dict[str, tuple[str, tuple]]:
    """`{name: (dtype, shape)}` of a complete safetensors file (raises
    `SafetensorsFormatError` naming the problem otherwise)."""
    handle = SafetensorsFile(path)
    try:
        return {key: (handle.dtype(key), handle.shape(key)) for key in handle.keys()}
    finally:
        handle.close()
