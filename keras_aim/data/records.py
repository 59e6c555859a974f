"""Writing an image set as keras_aim record files (`keras-aim prepare-data`).

    write_records("folder:/data/imagenet/train", "/data/imagenet-train-records")
    write_records("tfds:imagenet2012:train", "/data/in1k-train", tfds_data_dir=...)

The output folder holds `images-00000-of-000NN.array_record` files and the
index `keras_aim_records.json` (class names, count, file names and the
source's fingerprint) that `keras_aim.data.random_access.record_files_source`
reads (`--data records:DIR` in the recipes). Each record is a serialized
`tf.train.Example` with

    image  bytes  the encoded image file exactly as it was (no decode, no
                  re-encode: the pipeline decodes it, as it does the file)
    label  int64  the class number (an index into the class names)
    name   bytes  the source file's path relative to the folder (or the
                  tfds split and position), to name a bad image in messages

in the order of the source's listing (the pipelines shuffle indices
themselves), so `records:DIR` streams the same batches as `folder:PATH`
for the same seed.

Writer options: `group_size:1` is what tensorflow-datasets and grain write
for random access: each record is its own chunk, so reading record `i`
seeks to it and decodes only it (with the ArrayRecord default of 65536
records per chunk, every random read would decompress a whole chunk).
`uncompressed`: encoded images are compressed already; zstd would only cost
time on every read.

Safety: the files are written into a hidden folder beside the output folder
and renamed to it once complete and checked (`atomic_directory`), so a
folder named by `--out` is either a complete record set or absent; an
exception, Ctrl-C or SIGTERM removes the hidden folder (only SIGKILL can
leave it, as `.NAME.tmp-*`, never as a valid records folder). A non-empty
output folder is refused unless `overwrite`, and even then only a folder
that holds keras_aim record files and nothing else is replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import tensorflow as tf

from keras_aim.data.random_access import (
    RECORDS_FORMAT,
    RECORDS_INDEX,
    FileSource,
    ImageSource,
    RecordSource,
)

DEFAULT_SHARD_BYTES = 1 << 30  # ~1 GiB of image bytes per file
WRITER_OPTIONS = "group_size:1,uncompressed"
FILE_PREFIX = "images"
RECORD_SUFFIX = ".array_record"
READ_THREADS = 16  # files read ahead in parallel (network file systems)
READ_CHUNK = 256  # files read per round: bounds the memory held


@dataclasses.dataclass
class _Items:
    """What to write: `count` items `(image bytes, label, name)` in order;
    an item whose bytes are `None` could not be read (its name says why)."""

    count: int
    class_names: list[str]
    fingerprint: str
    description: str
    items: Iterator[tuple[bytes | None, int, str]]
    folder: str | None = None  # the source folder, if any


def write_records(spec_or_source, out_dir: str, shards: int | None = None,
                  shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                  tfds_data_dir: str | None = None, progress_every: int = 10_000,
                  stream=None) -> dict:
    """Writes the images of `spec_or_source` as record files in `out_dir`.

    Args:
        spec_or_source: `folder:PATH`, `tfds:NAME[:SPLIT]` (default split
            "train"), `records:PATH` (written again, e.g. with other
            shards), or a `FileSource` / `RecordSource`.
        out_dir: the folder to create (absent or empty; see `overwrite`).
        shards: the number of record files (items split evenly by count);
            default: a new file after every `shard_bytes` of image bytes.
        shard_bytes: image bytes per file when `shards` is not given.
        overwrite: replace `out_dir` if it is a keras_aim records folder.
        tfds_data_dir: where tensorflow-datasets keeps prepared data.
        progress_every: a progress line on `stream` every this many images.
        stream: progress and warnings (default: stderr).

    Returns:
        The index written (`keras_aim_records.json`), plus `"path"`.

    Raises:
        ValueError: a bad spec, a refused `out_dir`, or no readable image.
        FileNotFoundError: a missing source folder or records folder.
    """
    from keras_aim.utils.atomic_files import atomic_directory

    stream = stream if stream is not None else sys.stderr
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int)
                               or shards < 1):
        raise ValueError(f"shards must be a positive int; received {shards!r}.")
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1; received {shard_bytes!r}.")
    check_output_folder(out_dir, overwrite)
    source = _resolve(spec_or_source, tfds_data_dir, stream)
    if source.folder is not None and _is_within(out_dir, source.folder):
        raise ValueError(
            f"--out {out_dir} lies inside the image folder {source.folder}: it would "
            "become a class folder of it. Choose a folder outside it."
        )
    with _sigterm_as_interrupt(), atomic_directory(out_dir, replace=True) as staging:
        index = _write(source, staging, shards, shard_bytes, progress_every, stream)
        # Read back before publishing: the folder appears only if it is valid.
        from keras_aim.data.random_access import record_files_source

        record_files_source(staging)
    return {**index, "path": out_dir}


def check_output_folder(out_dir: str, overwrite: bool) -> None:
    """Raises `ValueError` unless `out_dir` may receive record files: it is
    absent or empty, or (with `overwrite`) a records folder holding nothing
    but record files and their index. Checked before any work."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is a file; name a folder to create.")
    if not os.path.isdir(out_dir):
        parent = os.path.dirname(os.path.abspath(out_dir))
        existing = parent
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
            raise ValueError(f"--out {out_dir}: {existing} is not a writable folder.")
        return
    entries = sorted(os.listdir(out_dir))
    if not entries:
        return
    if not overwrite:
        raise ValueError(
            f"--out {out_dir} is not empty ({len(entries)} entries, e.g. {entries[0]}); "
            "name a new or empty folder, or pass --overwrite to replace the record "
            "files there."
        )
    foreign = [e for e in entries if e != RECORDS_INDEX and not e.endswith(RECORD_SUFFIX)]
    if RECORDS_INDEX not in entries or foreign:
        raise ValueError(
            f"--out {out_dir} is not a keras_aim records folder (it holds "
            f"{(foreign or entries)[0]}"
            + ("" if RECORDS_INDEX in entries else f" and no {RECORDS_INDEX}")
            + "); --overwrite replaces only record files. Name a new or empty folder."
        )


def _write(source: _Items, staging: str, shards: int | None, shard_bytes: int,
           progress_every: int, stream) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    shards = min(shards, source.count) if shards else None
    files: list[str] = []  # staged names, renamed "-of-NNNNN" at the end
    counts: list[int] = []
    skipped: list[str] = []
    writer = None
    shard_of_writer = -1
    in_shard = total = written = 0
    started = time.monotonic()
    try:
        for position, (data, label, name) in enumerate(source.items):
            if data is None:
                skipped.append(name)
                if len(skipped) <= 20:
                    stream.write(f"warning: skipping {name}\n")
                continue
            shard = position * shards // source.count if shards else None
            if writer is None or (shard is not None and shard != shard_of_writer) or (
                    shard is None and in_shard >= shard_bytes):
                if writer is not None:
                    _close(writer, files[-1])
                files.append(f"{FILE_PREFIX}-{len(files):05d}{RECORD_SUFFIX}")
                counts.append(0)
                writer = ArrayRecordWriter(os.path.join(staging, files[-1]), WRITER_OPTIONS)
                shard_of_writer, in_shard = shard, 0
            writer.write(_example(data, label, name))
            counts[-1] += 1
            in_shard += len(data)
            total += len(data)
            written += 1
            if progress_every and (position + 1) % progress_every == 0:
                rate = (position + 1) / max(time.monotonic() - started, 1e-9)
                stream.write(f"prepare-data: {position + 1:,}/{source.count:,} images, "
                             f"{total / 1e9:.2f} GB, {rate:,.0f} images/s\n")
                stream.flush()
        if writer is not None:
            _close(writer, files[-1])
            writer = None
    finally:
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        close = getattr(source.items, "close", None)
        if close is not None:  # stops the reading threads now, also on Ctrl-C
            close()
    if not written:
        raise ValueError(f"{source.description}: no image could be read; nothing written.")
    if skipped:
        stream.write(f"warning: {len(skipped)} unreadable file(s) left out\n")
    final = [f"{FILE_PREFIX}-{i:05d}-of-{len(files):05d}{RECORD_SUFFIX}" for i in range(len(files))]
    for staged, name in zip(files, final):
        os.rename(os.path.join(staging, staged), os.path.join(staging, name))
    fingerprint = source.fingerprint
    if skipped:  # not the source's content: say so in the fingerprint
        import hashlib

        fingerprint += ":without:" + hashlib.sha256("\0".join(skipped).encode()).hexdigest()
    index = {
        "format": RECORDS_FORMAT,
        "class_names": list(source.class_names),
        "count": written,
        "files": final,
        "counts": counts,
        "fingerprint": fingerprint,
        "bytes": total,
        "source": source.description,
        "skipped": skipped,
    }
    with open(os.path.join(staging, RECORDS_INDEX), "w") as handle:
        json.dump(index, handle, indent=1)
        handle.write("\n")
    return index


def _close(writer, name: str) -> None:
    if not writer.ok():
        raise OSError(f"writing record file {name} failed")
    writer.close()


def _example(data: bytes, label: int, name: str) -> bytes:
    feature = tf.train.Feature
    return tf.train.Example(features=tf.train.Features(feature={
        "image": feature(bytes_list=tf.train.BytesList(value=[data])),
        "label": feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "name": feature(bytes_list=tf.train.BytesList(value=[name.encode("utf-8")])),
    })).SerializeToString()


def _resolve(spec_or_source, tfds_data_dir: str | None, stream) -> _Items:
    if isinstance(spec_or_source, ImageSource):
        return _source_items(spec_or_source)
    if not isinstance(spec_or_source, str):
        raise ValueError(
            f"Expected a data spec or a FileSource / RecordSource; received "
            f"{type(spec_or_source).__name__}."
        )
    kind, _, rest = spec_or_source.partition(":")
    if kind == "folder" and rest:
        return _folder_items(rest, stream)
    if kind == "tfds" and rest:
        name, _, split = rest.partition(":")
        return _tfds_items(name, split or "train", tfds_data_dir)
    if kind == "records" and rest:
        from keras_aim.data.random_access import record_files_source

        return _source_items(record_files_source(rest))
    raise ValueError(
        f"prepare-data reads folder:PATH, tfds:NAME[:SPLIT] or records:PATH; "
        f"received {spec_or_source!r}"
        + (" (the digits live in memory already)." if spec_or_source == "digits" else ".")
    )


def _folder_items(directory: str, stream) -> _Items:
    from keras_aim.data.images import summarize_errors
    from keras_aim.data.listing import list_folder

    listing = list_folder(directory)
    if listing.problems:
        stream.write(f"left out {len(listing.problems)} entr(y/ies) of {directory}:\n"
                     + summarize_errors(listing.problems) + "\n")
    items = _file_items(listing.paths, listing.labels, directory)
    return _Items(len(listing.paths), listing.class_names, listing.fingerprint,
                  f"folder {directory} ({len(listing.paths)} images)", items,
                  folder=directory)


def _file_items(paths, labels, base: str | None) -> Iterator[tuple[bytes | None, int, str]]:
    """`(bytes, label, name)` of each file, in order, read ahead by a few
    threads a bounded chunk at a time."""

    def read(path: str):
        try:
            with open(path, "rb") as handle:
                return handle.read(), None
        except OSError as error:
            return None, error.strerror or str(error)

    pool = ThreadPoolExecutor(READ_THREADS)
    try:
        for start in range(0, len(paths), READ_CHUNK):
            chunk = paths[start:start + READ_CHUNK]
            for offset, (data, problem) in enumerate(pool.map(read, chunk)):
                path = chunk[offset]
                name = os.path.relpath(path, base) if base else path
                if problem:
                    name = f"{name} (cannot be read: {problem})"
                yield data, int(labels[start + offset]), name
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _source_items(source: ImageSource) -> _Items:
    if isinstance(source, FileSource):
        items = _file_items(source.paths, source.labels, None)
        return _Items(len(source), list(source.class_names or []),
                      source.fingerprint, source.description, items)
    if isinstance(source, RecordSource):
        return _Items(len(source), list(source.class_names or []),
                      source.fingerprint.removeprefix("records:"), source.description,
                      _record_items(source))
    raise ValueError(
        f"prepare-data writes encoded image files; {source.description} is "
        f"{'decoded pixels' if not source.encoded else type(source).__name__}. "
        "Give a folder, a tfds split or record files."
    )


def _record_items(source: RecordSource) -> Iterator[tuple[bytes | None, int, str]]:
    for i in range(len(source)):
        example = tf.train.Example.FromString(source.reader[i])
        feature = example.features.feature
        label = feature[source.label_key].int64_list.value[0] if source.label_key else -1
        name = None
        if source.name_key and feature[source.name_key].bytes_list.value:
            name = feature[source.name_key].bytes_list.value[0].decode("utf-8", "replace")
        yield (feature[source.image_key].bytes_list.value[0], int(label),
               name or f"{source.description} record {i}")


def _tfds_items(name: str, split: str, data_dir: str | None) -> _Items:
    """A tfds split in its stored order: through `tfds.data_source` when it
    is stored as ArrayRecord, else `as_dataset` with the images left encoded
    (`SkipDecoding`)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(f"tfds:{name}: no such tensorflow-datasets name.") from error
    if not list(builder.info.splits.keys()):
        raise ValueError(
            f"tfds:{name} is not prepared in {builder.data_dir_root}: prepare it first "
            f"(`tfds build {name}`), or pass its data directory (--tfds-data-dir)."
        )
    try:
        count = builder.info.splits[split].num_examples
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"tfds:{name} has no split {split!r}; it has {list(builder.info.splits.keys())}."
        ) from error
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    features = builder.info.features
    if not isinstance(features[image_key], tfds.features.Image):
        raise ValueError(f"tfds:{name}: feature {image_key!r} is not an encoded image.")
    if not isinstance(features[label_key], tfds.features.ClassLabel):
        raise ValueError(f"tfds:{name}: feature {label_key!r} is not a class label.")
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    what = f"tfds:{name}:{split}"
    if file_format == "array_record":
        reader = tfds.data_source(
            name, split=split, data_dir=data_dir, download=False,
            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
        )
        items = _record_items(RecordSource(reader, image_key, label_key, description=what))
    else:
        items = _tfds_dataset_items(builder, split, image_key, label_key, what)
    return _Items(count, list(features[label_key].names),
                  f"tfds:{name}:{split}:{builder.info.version}:{count}",
                  f"tfds {name}:{split} ({count} images)", items)


def _tfds_dataset_items(builder, split, image_key, label_key, what):
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(
        split, shuffle_files=False, decoders={image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(try_autocache=False),
    )
    for i, example in enumerate(ds.as_numpy_iterator()):
        yield example[image_key], int(example[label_key]), f"{what} record {i}"


def _is_within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile (main thread only), so the
    hidden folder being written is removed as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def summary(index: dict) -> str:
    """The one-line report of `keras-aim prepare-data`."""
    files = len(index["files"])
    return (
        f"{index['path']}: {index['count']:,} images of {len(index['class_names'])} "
        f"classes in {files} record file{'s' if files != 1 else ''}, "
        f"{_size(index['bytes'])} of image bytes"
        + (f" ({len(index['skipped'])} unreadable file(s) left out)" if index["skipped"] else "")
    )


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} bytes"
