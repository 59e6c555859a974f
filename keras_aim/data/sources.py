"""Labeled image sets named by a short spec, as the recipes take them.

    digits              the embedded digits (train: 80%, val: the held-out 20%)
    folder:PATH         PATH/<class>/<image>; classes in sorted order
    tfds:NAME[:SPLIT]   a prepared tensorflow-datasets split

Each comes with a *fingerprint*, a string that changes whenever the images
or labels do, so cached features of a stale data set are never reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import tensorflow as tf

from keras_aim.data.embedded import digits
from keras_aim.data.images import is_image_file, summarize_errors
from keras_aim.data.pipelines import image_files_dataset, list_image_folder, tfds_images

SPLITS = ("train", "val")
# tfds split names tried for "val", in order, when a spec names none.
TFDS_VALIDATION_SPLITS = ("validation", "test")


@dataclasses.dataclass
class LabeledImages:
    """A labeled image set.

    Attributes:
        images: uint8 images `(n, H, W, 3)` (an array), or a dataset of
            `(uint8 image (H, W, 3), int label)` pairs of any sizes.
        labels: int labels `(n,)` for an array; `None` for a dataset (they
            arrive with the images).
        class_names: one name per class; labels lie in `[0, len)`.
        fingerprint: changes whenever the images or labels change.
        description: for messages, e.g. "folder /data/val (50000 images)".
    """

    images: np.ndarray | tf.data.Dataset
    labels: np.ndarray | None
    class_names: list[str]
    fingerprint: str
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def pairs(self) -> tf.data.Dataset:
        """The set as a dataset of `(image, label)` pairs."""
        if self.labels is None:
            return self.images
        return tf.data.Dataset.from_tensor_slices((self.images, self.labels))


def labeled_images(spec: str, split: str = "train", seed: int = 0,
                   image_size: int = 16, tfds_data_dir: str | None = None,
                   holdout: float = 0.0) -> LabeledImages:
    """The `split` ("train" or "val") of the set named by `spec`.

    For a folder, both splits are the whole folder (give the validation
    folder as its own spec), unless `holdout` is set: then a seeded
    `holdout` share of each class's images is the "val" split and the rest
    the "train" split. `image_size` applies to the digits only;
    `tfds_data_dir` is where tensorflow-datasets keeps prepared data
    (default: its own, `TFDS_DATA_DIR` or ~/tensorflow_datasets).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; received {split!r}.")
    kind, _, rest = spec.partition(":")
    if spec == "digits":
        train, val = digits(image_size, seed=seed)
        images, labels = train if split == "train" else val
        digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
        return LabeledImages(
            images, labels, [str(i) for i in range(10)], f"digits:{digest}",
            f"digits {split} ({len(labels)} images)",
        )
    if kind == "folder" and rest:
        return _folder_split(rest, split, seed, holdout)
    if kind == "tfds" and rest:
        return _tfds_split(rest, split, tfds_data_dir)
    raise ValueError(
        f"Unknown data {spec!r}: use digits, folder:PATH or tfds:NAME[:SPLIT] "
        "(e.g. tfds:imagenet2012:validation)."
    )


def has_own_validation_split(spec: str) -> bool:
    """Whether the "val" split of `spec` differs from its "train" split
    without a hold-out: the digits, and tfds names without a split."""
    kind, _, rest = spec.partition(":")
    return spec == "digits" or (kind == "tfds" and ":" not in rest)


_listings: dict[tuple[str, str], tuple] = {}  # (folder, fingerprint) -> listing


def _folder_split(directory: str, split: str, seed: int, holdout: float) -> LabeledImages:
    fingerprint = folder_fingerprint(directory)
    key = (os.path.abspath(directory), fingerprint)
    if key not in _listings:  # both splits of one folder: decoded once
        _listings[key] = list_image_folder(directory)
        skipped = _listings[key][3]
        if skipped:
            print(f"skipped {len(skipped)} unreadable image file(s) in {directory}:\n"
                  + summarize_errors(skipped))
    paths, labels, classes, _ = _listings[key]
    description = f"folder {directory}"
    if holdout:
        train, val = holdout_indices(labels, holdout, seed)
        chosen = train if split == "train" else val
        if len(chosen) == 0:
            raise ValueError(
                f"{description} has too few images to hold out {holdout:.0%} "
                "of each class for validation (a class needs 2 images); add "
                "images or pass --val with a validation folder."
            )
        paths = [paths[i] for i in chosen]
        labels = [labels[i] for i in chosen]
        fingerprint += f":{split}:holdout={holdout}:seed={seed}"
        share = holdout if split == "val" else 1 - holdout
        description += f", {split} part (~{share:.0%} of each class)"
    return LabeledImages(
        image_files_dataset(paths, labels), None, classes, f"folder:{fingerprint}",
        f"{description} ({len(paths)} images)",
    )


def holdout_indices(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`(train indices, val indices)`: of each class, a seeded
    `round(fraction * n)` of its `n` items (at least 1 when `n >= 2`, none
    of a class with one item) go to validation."""
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    val = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = min(max(round(fraction * len(members)), 1), len(members) - 1)
        val.extend(members[:count])
    val = np.sort(np.asarray(val, "int64"))
    return np.setdiff1d(np.arange(len(labels)), val), val


def _tfds_split(rest: str, split: str, data_dir: str | None) -> LabeledImages:
    import tensorflow_datasets as tfds

    name, _, named_split = rest.partition(":")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(f"tfds:{name}: no such tensorflow-datasets name.") from error
    available = list(builder.info.splits.keys())
    if not available:
        raise ValueError(
            f"tfds:{name} is not prepared in {builder.data_dir_root}: prepare it "
            f"first (`tfds build {name}`; manual-download sets such as "
            "imagenet2012 need their archives), or pass its data directory."
        )
    if named_split:
        chosen = named_split
    elif split == "train":
        chosen = "train"
    else:
        chosen = next((s for s in TFDS_VALIDATION_SPLITS if s in available), None)
        if chosen is None:
            raise ValueError(
                f"tfds:{name} has no validation or test split (it has "
                f"{available}); name one, e.g. --val tfds:{name}:train[90%:]."
            )
    try:
        count = builder.info.splits[chosen].num_examples
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"tfds:{name} has no split {chosen!r}; it has {available}."
        ) from error
    if count == 0:
        raise ValueError(f"tfds:{name}:{chosen} is empty: no images to use.")
    ds, classes = tfds_images(name, chosen, data_dir)
    fingerprint = f"tfds:{name}:{chosen}:{builder.info.version}:{count}"
    return LabeledImages(ds, None, list(classes), fingerprint,
                         f"tfds {name}:{chosen} ({count} images)")


def folder_fingerprint(directory: str) -> str:
    """SHA-256 over every image file's relative path, size and modification
    time under `directory` (contents are not read: an edited file gets a
    new modification time)."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if not is_image_file(name):
                continue
            path = os.path.join(root, name)
            stat = os.stat(path)
            relative = os.path.relpath(path, directory)
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
