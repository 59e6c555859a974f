"""Clear errors for image sizes and shapes that a ViT trunk cannot take.

`check_patch_multiple` is the one place that decides whether a height or
width fits a patch size; the model constructors, the trunks' calls, the
export and the recipes all ask it.
"""

from __future__ import annotations

import numbers
from typing import Sequence


def nearest_valid_sizes(size: int, patch_size: int) -> list[int]:
    """Multiples of `patch_size` just below and above `size` (positive only)."""
    lower = (size // patch_size) * patch_size
    return [s for s in (lower, lower + patch_size) if s > 0]


def patch_size_problems(sizes: Sequence, patch_size: int, names=("height", "width")) -> list[str]:
    """One message per size in `sizes` that is not a positive multiple of
    `patch_size` (unknown `None` sizes pass)."""
    problems = []
    for size, name in zip(sizes, names):
        size = static_size(size)
        if size is not None and (size <= 0 or size % patch_size):
            nearest = " or ".join(str(s) for s in nearest_valid_sizes(size, patch_size))
            problems.append(
                f"{name} {size} is not a multiple of the patch size {patch_size} "
                f"(nearest valid sizes: {nearest})"
            )
    return problems


def check_patch_multiple(
    sizes: Sequence, patch_size: int, where: str, fix: str = "", names=("height", "width")
) -> None:
    """Raises `ValueError` naming `where`, each bad size, the nearest valid
    sizes and `fix`, unless every size is a multiple of `patch_size`."""
    problems = patch_size_problems(sizes, patch_size, names)
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems) + (f". {fix}" if fix else "."))


def static_size(size):
    """An int, or `None` for unknown sizes: `None` or symbolic (JAX shape
    polymorphism and `torch.export`, where the batch size is a variable).

    Symbolic sizes are never turned into ints: `int()` of a `torch.SymInt`
    would fix the exported program to the example's batch size.
    """
    if isinstance(size, numbers.Integral):
        return int(size)
    return None


def check_image_shape(
    shape: Sequence,
    patch_size: int,
    num_channels: int,
    where: str = "AIMBackbone",
) -> None:
    """Raises `ValueError` unless `shape` is `(batch, H, W, num_channels)` with
    H and W multiples of `patch_size`. Unknown (`None`) sizes are accepted."""
    shape = tuple(static_size(d) for d in shape)
    expected = f"(batch, height, width, {num_channels})"
    if len(shape) != 4:
        hint = " Add a batch axis, e.g. `images[None]`." if len(shape) == 3 else ""
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
    check_patch_multiple(
        shape[1:3],
        patch_size,
        f"{where} received images of shape {shape}",
        "Resize or crop the images first (the model's image converter does "
        "this); keras_aim never crops silently.",
    )
