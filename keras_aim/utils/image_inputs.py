"""Images handed to a model's `predict` or call: clear errors and warnings
for inputs that Keras would take silently or fail on obscurely.

- `check_not_empty`: `predict` on zero images ends inside Keras with
  `StopIteration` (JAX) or `UnboundLocalError` (TensorFlow, PyTorch).
- `out_of_memory_explained`: a batch too large for the device ends in the
  backend's allocator error (`RESOURCE_EXHAUSTED`, `OOM when allocating`,
  `DefaultCPUAllocator`); it is raised again as a `MemoryError` that says
  what ran out and what to lower.
- `warn_if_wrong_scale`: the models take ImageNet-normalized floats, their
  preprocessors pixels in [0, 255]; images on the other scale give
  confident nonsense, so the first such input gets a warning (once per
  model class and kind of mistake).

Backend-independent: only shapes, dtypes, NumPy values and exception texts.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import numpy as np

# Markers of an allocation failure in the messages of XLA (JAX,
# TensorFlow), TensorFlow's allocators and PyTorch's.
OUT_OF_MEMORY_MARKERS = (
    "RESOURCE_EXHAUSTED",
    "ResourceExhausted",
    "out of memory",
    "Out of memory",
    "OOM when allocating",
    "can't allocate memory",
    "Failed to allocate",
)
SAMPLE_IMAGES = 8  # images looked at to judge the scale
_warned: set[tuple[str, str]] = set()


def batch_length(x) -> int | None:
    """Leading dimension of an array, tensor or list; `None` when unknown
    (a dataset, a generator, a dict of inputs)."""
    shape = getattr(x, "shape", None)
    if shape is not None and len(shape) > 0 and shape[0] is not None:
        return int(shape[0])
    if isinstance(x, (list, tuple)):
        return len(x)
    return None


def check_not_empty(x, where: str) -> None:
    """Raises `ValueError` if `x` holds zero images."""
    if batch_length(x) == 0:
        raise ValueError(
            f"{where} received no images (a batch of shape "
            f"{tuple(getattr(x, 'shape', (0,)))}); pass at least one image."
        )


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    text = f"{type(error).__name__}: {error}"
    return any(marker in text for marker in OUT_OF_MEMORY_MARKERS)


@contextlib.contextmanager
def out_of_memory_explained(where: str, x, batch_size: int | None) -> Iterator[None]:
    """Re-raises an allocation failure inside as a `MemoryError` naming
    `where`, the batch and the fix; other errors pass unchanged."""
    try:
        yield
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        shape = tuple(getattr(x, "shape", ()) or ())
        images = f"images of shape {shape[1:]}" if len(shape) > 1 else "images"
        per_step = batch_size or 32  # Keras' default batch size
        raise MemoryError(
            f"{where} ran out of memory on batches of {per_step} {images}. "
            f"Pass a smaller batch_size (now {per_step}), smaller images or "
            f"a lower-precision dtype (e.g. dtype='bfloat16'). The backend "
            f"said: {_first_line(error)}"
        ) from error


def warn_if_wrong_scale(x, where: str, expects_pixels: bool) -> None:
    """Warns (once per `where` and mistake) when the values of `x` do not
    look like what the model takes: pixels in [0, 255] (`expects_pixels`,
    a model with a preprocessor) or normalized floats (a model without).
    Only NumPy arrays and eager tensors are looked at (a few images)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return
    integer = "int" in str(dtype)  # uint8, int32, torch.uint8, <dtype: 'uint8'>
    if not expects_pixels:
        if integer:
            _warn_once(where, "integer", (
                f"{where} takes ImageNet-normalized float images, but received "
                f"{dtype} pixels. Preprocess them first: "
                "keras_aim.AIMImageConverter (resize, crop, normalize), or "
                "predict() of a classifier that has a preprocessor."
            ))
        return
    sample = _values(x)
    if sample is None or sample.size == 0 or integer:
        return
    low, high = float(sample.min()), float(sample.max())
    if low < 0:
        _warn_once(where, "normalized", (
            f"{where} applies its preprocessor, which takes pixels in [0, 255], "
            f"but the images hold negative values ({low:.2f}): they look "
            "normalized already. Pass the original pixels, or call the model "
            "itself on normalized images."
        ))
    elif high <= 1.0:
        _warn_once(where, "unit", (
            f"{where} applies its preprocessor, which takes pixels in [0, 255], "
            f"but the images lie in [{low:.2f}, {high:.2f}]: they look scaled "
            "to [0, 1]. Multiply them by 255 (or pass the uint8 pixels)."
        ))


def _values(x) -> np.ndarray | None:
    """Up to `SAMPLE_IMAGES` images of `x` as NumPy, if `x` holds values."""
    try:
        head = x[:SAMPLE_IMAGES]
        if hasattr(head, "numpy") and not isinstance(head, np.ndarray):
            head = head.numpy()
        return np.asarray(head, dtype="float32")
    except Exception:  # symbolic tensors and the like: nothing to judge
        return None


def _warn_once(where: str, kind: str, message: str) -> None:
    key = (where.split(".")[0], kind)  # one warning per model class and kind
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, UserWarning, stacklevel=4)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
