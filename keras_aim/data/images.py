"""Image files -> RGB pixels: the one decoding path of keras_aim.

`keras-aim classify` / `features`, image folders for the recipes and the
exported SavedModel's `predict_images` signature all decode with
`decode_image`, so one file gives the same pixels everywhere:

- JPEG (RGB, grayscale, CMYK) with the accurate integer IDCT: the pixels
  PIL gives, as in the released evaluation;
- PNG with 8 or 16 bits per channel (16-bit values keep their high byte:
  65535 -> 255), grayscale, palette, with or without alpha;
- GIF (first frame), BMP, WebP.

Grayscale becomes three equal channels, palettes are expanded and alpha is
dropped (as PIL's `convert("RGB")` does for the released evaluation; TF
Serving cannot run PIL, so the path is TensorFlow's decoders, also in
Python). Other formats (e.g. TIFF) are refused with the file named.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SUPPORTED_FORMATS = "JPEG, PNG (8 or 16 bits), GIF, BMP or WebP"


class ImageReadError(ValueError):
    """An image file cannot be read or decoded; the message names it."""


def decode_image(data) -> tf.Tensor:
    """Encoded image bytes (a scalar string tensor) -> uint8 `(H, W, 3)`.

    Works eagerly, in `tf.data` and in exported graphs."""
    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )
    image.set_shape((None, None, 3))
    return image


def read_image(path: str) -> np.ndarray:
    """The uint8 RGB pixels `(H, W, 3)` of an image file; raises
    `ImageReadError` naming the file and the reason."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ImageReadError(f"{path}: cannot be read ({error.strerror or error})") from error
    try:
        return decode_image(tf.constant(data)).numpy()
    except tf.errors.OpError as error:
        raise ImageReadError(
            f"{path}: not a readable image ({_reason(error)}); keras_aim reads "
            f"{SUPPORTED_FORMATS} files: convert it to one of them."
        ) from error


def read_images(
    paths: Iterable[str], keep_pixels: bool = True
) -> tuple[list[str], list[np.ndarray], list[str]]:
    """`(readable paths, their RGB arrays, one error message per unreadable
    file)`; an unreadable file never stops the others. Without
    `keep_pixels` every file is decoded once as a check and no array is
    kept (the list of arrays stays empty)."""
    names, images, errors = [], [], []
    for path in paths:
        try:
            image = read_image(path)
        except ImageReadError as error:
            errors.append(str(error))
            continue
        names.append(path)
        if keep_pixels:
            images.append(image)
    return names, images, errors


def summarize_errors(errors: list[str], most: int = 5) -> str:
    """The first `most` messages, one per line, and how many more there are."""
    lines = [f"  {message}" for message in errors[:most]]
    if len(errors) > most:
        lines.append(f"  ... and {len(errors) - most} more")
    return "\n".join(lines)


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _reason(error: tf.errors.OpError) -> str:
    """TensorFlow's message without its `{{function_node ...}}` prefix and
    `[Op:...]` suffix."""
    message = error.message.split("}}")[-1].split("[Op:")[0]
    return message.strip().rstrip(".") or type(error).__name__
