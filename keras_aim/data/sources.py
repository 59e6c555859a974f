"""Labeled image sets named by a short spec, as the recipes take them.

    digits              the embedded digits (train: 80%, val: the held-out 20%)
    folder:PATH         PATH/<class>/**/<image>; classes in sorted order
    records:PATH        record files written by `keras-aim prepare-data`
    tfds:NAME[:SPLIT]   a tensorflow-datasets split prepared as ArrayRecord

Each is a random-access `ImageSource` (nothing is decoded to list it) with a
*fingerprint*, a string that changes whenever the images or labels do, so
cached features of a stale data set are never reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from keras_aim.data.embedded import digits
from keras_aim.data.listing import FolderListing, list_folder
from keras_aim.data.images import summarize_errors
from keras_aim.data.random_access import (
    ArraySource,
    FileSource,
    ImageSource,
    record_files_source,
    tfds_source,
)

SPLITS = ("train", "val")
# tfds split names tried for "val", in order, when a spec names none.
TFDS_VALIDATION_SPLITS = ("validation", "test")


@dataclasses.dataclass
class LabeledImages:
    """A labeled image set.

    Attributes:
        source: random access to the images and labels.
        class_names: one name per class; labels lie in `[0, len)`.
        fingerprint: changes whenever the images or labels change.
        description: for messages, e.g. "folder /data/val (50000 images)".
    """

    source: ImageSource
    class_names: list[str]
    fingerprint: str
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.source)

    @property
    def images(self):
        """uint8 images `(n, H, W, 3)` of an array set; else the source."""
        return self.source.images if isinstance(self.source, ArraySource) else self.source

    @property
    def labels(self) -> np.ndarray | None:
        """int labels `(n,)` of an array set; else `None` (they come with
        the images)."""
        return self.source.labels if isinstance(self.source, ArraySource) else None


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
        names = [str(i) for i in range(10)]
        description = f"digits {split} ({len(labels)} images)"
        return LabeledImages(ArraySource(images, labels, names, f"digits:{digest}", description),
                             names, f"digits:{digest}", description)
    if kind == "folder" and rest:
        return _folder_split(rest, split, seed, holdout)
    if kind == "records" and rest:
        return _with_holdout(record_files_source(rest), split, seed, holdout)
    if kind == "tfds" and rest:
        return _tfds_split(rest, split, tfds_data_dir)
    raise ValueError(
        f"Unknown data {spec!r}: use digits, folder:PATH, records:PATH or "
        "tfds:NAME[:SPLIT] (e.g. tfds:imagenet2012:validation)."
    )


def has_own_validation_split(spec: str) -> bool:
    """Whether the "val" split of `spec` differs from its "train" split
    without a hold-out: the digits, and tfds names without a split."""
    kind, _, rest = spec.partition(":")
    return spec == "digits" or (kind == "tfds" and ":" not in rest)


_listings: dict[str, FolderListing] = {}  # both splits of a folder: listed once


def _folder_split(directory: str, split: str, seed: int, holdout: float) -> LabeledImages:
    key = os.path.abspath(directory)
    if key not in _listings or split == "train":  # a new run lists the folder anew
        _listings[key] = list_folder(directory)
        if _listings[key].problems:
            print(f"left out {len(_listings[key].problems)} entr(y/ies) of {directory}:\n"
                  + summarize_errors(_listings[key].problems))
    listing = _listings[key]
    source = FileSource(listing.paths, listing.labels, listing.class_names,
                        f"folder:{listing.fingerprint}",
                        f"folder {directory} ({len(listing.paths)} images)")
    return _with_holdout(source, split, seed, holdout)


def _with_holdout(source, split: str, seed: int, holdout: float) -> LabeledImages:
    """The set of `source`, or with `holdout` its seeded train or val part
    (a `holdout` share of each class; labels are read from the listing,
    or for record files from a pass over the records' labels)."""
    description = source.description
    fingerprint = source.fingerprint
    if holdout:
        labels = _labels_of(source)
        train, val = holdout_indices(labels, holdout, seed)
        chosen = train if split == "train" else val
        base = description.rsplit(" (", 1)[0]
        if len(chosen) == 0:
            raise ValueError(
                f"{base} has too few images to hold out {holdout:.0%} "
                "of each class for validation (a class needs 2 images); add "
                "images or pass --val with a validation folder."
            )
        source = subset(source, chosen)
        fingerprint += f":{split}:holdout={holdout}:seed={seed}"
        share = holdout if split == "val" else 1 - holdout
        description = f"{base}, {split} part (~{share:.0%} of each class) ({len(chosen)} images)"
        source.fingerprint, source.description = fingerprint, description
    return LabeledImages(source, list(source.class_names), fingerprint, description)


def _labels_of(source) -> np.ndarray:
    if isinstance(source, (FileSource, ArraySource)):
        return np.asarray(source.labels)
    import tensorflow as tf

    labels = tf.data.Dataset.range(len(source)).map(
        lambda i: source.fetch(i)[1], num_parallel_calls=tf.data.AUTOTUNE)
    return np.concatenate([b.numpy() for b in labels.batch(4096)])


def subset(source, indices) -> ImageSource:
    """The items `indices` of a source, as a source of their own."""
    indices = np.asarray(indices, "int64")
    if isinstance(source, FileSource):
        return FileSource([source.paths[i] for i in indices], source.labels[indices],
                          source.class_names, source.fingerprint, source.description)
    if isinstance(source, ArraySource):
        return ArraySource(source.images[indices], source.labels[indices], source.class_names,
                           source.fingerprint, source.description)
    return _Subset(source, indices)


class _Subset(ImageSource):
    """Items `indices` of another source (record files with a hold-out)."""

    def __init__(self, parent, indices):
        self.parent, self.indices = parent, indices
        self.encoded, self.class_names = parent.encoded, parent.class_names
        self.fingerprint, self.description = parent.fingerprint, parent.description
        self._table = None

    def __len__(self) -> int:
        return len(self.indices)

    def fetch(self, index):
        import tensorflow as tf

        if self._table is None:
            with tf.init_scope():
                self._table = tf.constant(self.indices)
        return self.parent.fetch(tf.gather(self._table, index))

    def name(self, index: int) -> str:
        return self.parent.name(int(self.indices[index]))


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
            f"first as ArrayRecord (`tfds build {name} --file_format=array_record`; "
            "manual-download sets such as "
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
    source = tfds_source(name, chosen, data_dir)
    return LabeledImages(source, list(source.class_names), source.fingerprint,
                         source.description)


def folder_fingerprint(directory: str) -> str:
    """SHA-256 over every image file's relative path, size and modification
    time under `directory` (no file is read: an edited file gets a new
    modification time)."""
    return list_folder(directory).fingerprint
