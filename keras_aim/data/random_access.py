"""Random-access image sources: image `i` of `n` (and its label) without
reading any other, the base of every keras_aim input pipeline.

- `ArraySource`: uint8 pixels in memory (the digits, a user's array);
- `FileSource`: one encoded image file per item (an image folder, listed
  without decoding, see `keras_aim.data.listing`);
- `RecordSource`: serialized `tf.train.Example` records in ArrayRecord files,
  read by index (files written by `keras-aim prepare-data`, or a
  tensorflow-datasets split prepared as ArrayRecord, through
  `tfds.data_source`).

`fetch(index)` runs inside tf.data (a graph function of a scalar int64
index) and gives `(image, label)`: uint8 pixels `(H, W, 3)` for an array,
encoded file bytes (a scalar string) for the others, so the augmentation can
decode only what it crops (`keras_aim.data.augment`).

Why ArrayRecord for record files: it is the random-access format of
tensorflow-datasets and grain (one file read per image, by offset); TFRecord
files can only be read from the start, so resuming would mean reading
everything before the resume point.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import tensorflow as tf

RECORDS_INDEX = "keras_aim_records.json"  # written beside the record files
RECORDS_FORMAT = "keras_aim.records/1"


class ImageSource:
    """Random access to `len(source)` labeled images (see the module
    docstring). Subclasses set `encoded`, `class_names`, `fingerprint` and
    `description` and implement `__len__`, `fetch` and `name`."""

    encoded: bool = True
    class_names: list[str] | None = None
    fingerprint: str = ""
    description: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def fetch(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """`(image, int32 label)` of item `index` (graph mode; a source
        without labels gives -1)."""
        raise NotImplementedError

    def name(self, index: int) -> str:
        """What a message calls item `index` (e.g. its file path)."""
        return f"{self.description} item {index}"


class ArraySource(ImageSource):
    """uint8 images `(n, H, W, 3)` (and int labels `(n,)`) in memory."""

    encoded = False

    def __init__(self, images, labels=None, class_names=None, fingerprint: str = "",
                 description: str = ""):
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"Expected images of shape (n, height, width, 3); got {images.shape}."
            )
        if len(images) == 0:
            raise ValueError("The image set is empty.")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, "int32")
        self.class_names = class_names
        self.fingerprint = fingerprint
        self.description = description or f"an array of {len(images)} images"
        self._pixels = None
        self._labels = None

    def __len__(self) -> int:
        return len(self.images)

    def fetch(self, index):
        if self._pixels is None:  # one constant per source, made on first use
            labels = self.labels if self.labels is not None else np.full(len(self), -1, "int32")
            with tf.init_scope():  # eager, also when first used inside tf.data
                self._pixels = tf.constant(self.images)
                self._labels = tf.constant(labels)
        return tf.gather(self._pixels, index), tf.gather(self._labels, index)


class FileSource(ImageSource):
    """One image file per item; `paths` and `labels` in memory (about 100
    bytes per image: ImageNet-1k's 1.28M paths take ~130 MB; record files
    hold larger sets)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], class_names=None,
                 fingerprint: str = "", description: str = ""):
        if len(paths) == 0:
            raise ValueError("The image set is empty.")
        self.paths = list(paths)
        self.labels = np.asarray(labels, "int32")
        self.class_names = class_names
        self.fingerprint = fingerprint
        self.description = description or f"{len(self.paths)} image files"
        self._tensors = None

    def __len__(self) -> int:
        return len(self.paths)

    def fetch(self, index):
        if self._tensors is None:
            with tf.init_scope():  # eager, also when first used inside tf.data
                self._tensors = (tf.constant(self.paths), tf.constant(self.labels))
        paths, labels = self._tensors
        return tf.io.read_file(tf.gather(paths, index)), tf.gather(labels, index)

    def name(self, index: int) -> str:
        return self.paths[index]


class RecordSource(ImageSource):
    """Serialized `tf.train.Example` records read by index.

    Args:
        reader: a random-access sequence of serialized records
            (`len(reader)`, `reader[i] -> bytes`): array_record's
            `ArrayRecordDataSource` or a `tfds.data_source` with raw bytes.
        image_key, label_key: the Example features holding the encoded
            image (bytes) and the label (int64); no `label_key`: label -1.
        names: per-item names for messages, or None (the index is used).
        name_key: an Example feature (bytes) naming the item, read only
            when a message needs it (e.g. the source file of a record
            written by `keras-aim prepare-data`).
    """

    def __init__(self, reader, image_key: str = "image", label_key: str | None = "label",
                 class_names=None, fingerprint: str = "", description: str = "",
                 names: Sequence[str] | None = None, name_key: str | None = None):
        if len(reader) == 0:
            raise ValueError(f"{description or 'The record source'} is empty.")
        self.reader = reader
        self.image_key, self.label_key = image_key, label_key
        self.class_names = class_names
        self.fingerprint = fingerprint
        self.description = description or f"{len(reader)} records"
        self.names = names
        self.name_key = name_key

    def __len__(self) -> int:
        return len(self.reader)

    def _read(self, index) -> bytes:
        return self.reader[int(index)]

    def fetch(self, index):
        record = tf.numpy_function(self._read, [index], tf.string, stateful=False)
        record.set_shape(())
        spec = {self.image_key: tf.io.FixedLenFeature([], tf.string)}
        if self.label_key:
            spec[self.label_key] = tf.io.FixedLenFeature([], tf.int64)
        parsed = tf.io.parse_single_example(record, spec)
        label = tf.cast(parsed[self.label_key], tf.int32) if self.label_key else tf.constant(-1)
        return parsed[self.image_key], label

    def name(self, index: int) -> str:
        name = self.names[index] if self.names is not None else self._stored_name(index)
        if name:
            return f"{name} ({self.description}, record {index})"
        return f"{self.description} record {index}"

    def _stored_name(self, index: int) -> str | None:
        """The record's `name_key` feature, if it has one (never raises: it
        names a record that may be damaged)."""
        if not self.name_key:
            return None
        try:
            example = tf.train.Example.FromString(self.reader[int(index)])
            values = example.features.feature[self.name_key].bytes_list.value
            return values[0].decode("utf-8", "replace") if values else None
        except Exception:  # noqa: BLE001 (a damaged record keeps its index as its name)
            return None


def record_files_source(path: str) -> RecordSource:
    """The records in folder `path` written by `keras-aim prepare-data`
    (ArrayRecord files and their `keras_aim_records.json` index)."""
    index_file = os.path.join(path, RECORDS_INDEX)
    if not os.path.isfile(index_file):
        raise FileNotFoundError(
            f"{path} holds no keras_aim record files ({RECORDS_INDEX} is missing); "
            "write them with `keras-aim prepare-data --data folder:IMAGES --out "
            f"{path}`."
        )
    try:
        with open(index_file) as handle:
            index = json.load(handle)
    except ValueError as error:
        raise ValueError(
            f"{index_file} is not readable JSON ({error}); the folder is damaged. "
            "Write it again with `keras-aim prepare-data`."
        ) from error
    if not isinstance(index, dict) or index.get("format") != RECORDS_FORMAT:
        found = index.get("format") if isinstance(index, dict) else None
        raise ValueError(
            f"{index_file} has format {found!r}; this keras_aim reads "
            f"{RECORDS_FORMAT!r}. Write the records again with this version."
        )
    missing_keys = [k for k in ("class_names", "count", "files", "fingerprint") if k not in index]
    if missing_keys or not index["files"]:
        lacking = ", ".join(missing_keys) or "record files"
        raise ValueError(
            f"{index_file} lacks {lacking}; the folder is damaged. "
            "Write it again with `keras-aim prepare-data`."
        )
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    files = [os.path.join(path, name) for name in index["files"]]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(
            f"{path}: record file(s) {', '.join(missing[:3])} listed in "
            f"{RECORDS_INDEX} are missing; copy the whole folder, or write it again."
        )
    try:
        reader = ArrayRecordDataSource(files)
    except (RuntimeError, ValueError, OSError) as error:
        raise ValueError(
            f"{path}: record file {_unreadable_record_file(files) or files[0]} cannot be "
            f"read ({str(error) or 'damaged or cut short'}); copy the whole folder again, or "
            "write it again with `keras-aim prepare-data`."
        ) from error
    if len(reader) != index["count"]:
        raise ValueError(
            f"{path}: the record files hold {len(reader)} records but {RECORDS_INDEX} "
            f"says {index['count']}; the folder is incomplete. Write it again."
        )
    return RecordSource(
        reader, class_names=index["class_names"],
        fingerprint=f"records:{index['fingerprint']}",
        description=f"records {path} ({index['count']} images)",
        name_key="name",
    )


def _unreadable_record_file(files: Sequence[str]) -> str | None:
    """The first of `files` that ArrayRecord cannot open, if any."""
    from array_record.python.array_record_module import ArrayRecordReader

    for name in files:
        try:
            reader = ArrayRecordReader(name)
            healthy = reader.ok()
            reader.close()
        except (RuntimeError, ValueError, OSError):
            healthy = False
        if not healthy:
            return name
    return None


def tfds_source(name: str, split: str, data_dir: str | None = None) -> RecordSource:
    """A tensorflow-datasets split with random access (`tfds.data_source`:
    the split must be prepared as ArrayRecord)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if file_format != "array_record":
        raise ValueError(
            f"tfds:{name} is stored as {file_format}, which can only be read from "
            "the start (a resumed run would read everything before its step). "
            f"Prepare it as ArrayRecord (`tfds build {name} --file_format="
            "array_record`), or write keras_aim record files from it with "
            f"`keras-aim prepare-data --data tfds:{name}:{split} --out DIR`."
        )
    source = tfds.data_source(
        name, split=split, data_dir=data_dir, download=False,
        deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
    )
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    count = builder.info.splits[split].num_examples
    return RecordSource(
        source, image_key=image_key, label_key=label_key,
        class_names=list(builder.info.features[label_key].names),
        fingerprint=f"tfds:{name}:{split}:{builder.info.version}:{count}",
        description=f"tfds {name}:{split} ({count} images)",
    )
