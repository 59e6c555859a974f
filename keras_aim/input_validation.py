"""Clear errors for image shapes that an AIM trunk cannot take."""

from __future__ import annotations

from typing import Sequence


def nearest_valid_sizes(size: int, patch_size: int) -> list[int]:
    """Multiples of `patch_size` just below and above `size` (positive only)."""
    lower = (size // patch_size) * patch_size
    return [s for s in (lower, lower + patch_size) if s > 0]


def _static_size(size):
    """An int, or `None` for unknown sizes: `None` or symbolic (JAX shape
    polymorphism while exporting, where the batch size is a variable)."""
    if size is None:
        return None
    try:
        return int(size)
    except Exception:  # jax's InconclusiveDimensionOperation
        return None


def check_image_shape(
    shape: Sequence,
    patch_size: int,
    num_channels: int,
    where: str = "AIMBackbone",
) -> None:
    """Raises `ValueError` unless `shape` is `(batch, H, W, num_channels)` with
    H and W multiples of `patch_size`. Unknown (`None`) sizes are accepted."""
    shape = tuple(_static_size(d) for d in shape)
    expected = f"(batch, height, width, {num_channels})"
    if len(shape) != 4:
        hint = (
            " Add a batch axis, e.g. `images[None]`."
            if len(shape) == 3
            else ""
        )
        raise ValueError(
            f"{where} expects a batch of images of shape {expected} (rank 4); "
            f"received shape {shape} of rank {len(shape)}.{hint}"
        )
    if shape[3] is not None and shape[3] != num_channels:
        raise ValueError(
            f"{where} expects images with {num_channels} channels, shape "
            f"{expected}; received shape {shape} with {shape[3]} channels. "
            "Convert the images (e.g. to RGB), or build the model with "
            f"image_shape=(height, width, {shape[3]})."
        )
    problems = []
    for axis, name in ((1, "height"), (2, "width")):
        size = shape[axis]
        if size is not None and (size <= 0 or size % patch_size):
            nearest = " or ".join(
                str(s) for s in nearest_valid_sizes(size, patch_size)
            )
            problems.append(
                f"{name} {size} is not a multiple of the patch size "
                f"{patch_size} (nearest valid sizes: {nearest})"
            )
    if problems:
        raise ValueError(
            f"{where} received images of shape {shape}: "
            + "; ".join(problems)
            + ". Resize or crop the images first (AIMImageConverter does "
            "this); keras_aim never crops silently."
        )
