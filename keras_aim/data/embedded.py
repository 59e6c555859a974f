"""Scikit-learn's handwritten digits as a tiny RGB image dataset."""

from __future__ import annotations

import numpy as np


def digits(image_size: int = 16, test_fraction: float = 0.2, seed: int = 0):
    """The 1,797 8x8 digit images of scikit-learn, upsampled, as RGB uint8.

    Args:
        image_size: output side (a multiple of 8; pixels are repeated).
        test_fraction: share of images held out, stratified by class.
        seed: the split's seed.

    Returns:
        `((x_train, y_train), (x_test, y_test))`, images
        `(n, image_size, image_size, 3)` uint8 in [0, 255], labels int32.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "The embedded dataset needs scikit-learn: pip install scikit-learn"
        ) from error
    if isinstance(image_size, bool) or not isinstance(image_size, int) or (
        image_size < 8 or image_size % 8
    ):
        raise ValueError(f"image_size must be a positive multiple of 8; got {image_size!r}.")
    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype("uint8")  # (n, 8, 8)
    factor = image_size // 8
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = data.target.astype("int32")
    rng = np.random.RandomState(seed)
    test = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test[members[: int(round(len(members) * test_fraction))]] = True
    return (images[~test], labels[~test]), (images[test], labels[test])
