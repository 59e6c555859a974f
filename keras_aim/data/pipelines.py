"""tf.data pipelines for pre-training and probes, on any Keras backend.

Every pipeline is built on a random-access source
(`keras_aim.data.random_access`) and an *order that is a pure function of
the position*: global position `p` of a stream is image
`index_shuffle(p mod n, seed=(seed, p div n))` of the `n` images, a full
random permutation per pass over the data, and its augmentation is seeded
by `(seed, p)`. So

- resuming at step `k` starts at position `k * batch_size` in O(1): no image
  before it is read, decoded or shuffled again;
- a process of a multi-process run computes the positions of its own part
  of every global batch and reads and decodes only those images;
- the shuffle holds indices, never decoded images: memory does not grow
  with the image size or the number of images.

Why tf.data over a random-access index (not grain): the per-image work
(JPEG decoding fused with the crop, antialiased bicubic resizing, color
jitter) is TensorFlow's image ops, which tf.data runs in parallel C++
threads outside Python's lock; grain would run the same ops eagerly from
Python workers (or processes) per image. The order and sharding follow
grain's index sampler and `ShardByJaxProcess` (see docs/architecture.md).

An image that cannot be read or decoded is skipped: the slot gets the next
image of the listing instead (so every batch keeps its size and resume stays
exact), a warning names the file, and `BadImages` counts them; the stream
stops with `BadImagesError` once more than `max_bad_fraction` of the images
read so far were bad (past 10), or when `SUBSTITUTES` images in a row are.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_aim.data.augment import (  # noqa: F401 (re-exported)
    AUGMENTATIONS,
    aim_augment,
    converter_statistics,
    normalize,
    shift_augment,
    transform,
)
from keras_aim.data.bad_images import (  # noqa: F401 (re-exported)
    DEFAULT_MAX_BAD_FRACTION,
    BadImages,
    BadImagesError,
)
from keras_aim.data.images import decode_image
from keras_aim.data.random_access import ArraySource, ImageSource

# Images tried for one slot: the scheduled one, then the next ones in the
# listing; when all fail the stream stops.
SUBSTITUTES = 4


def as_source(images) -> ImageSource:
    """An `ImageSource` for an array `(n, H, W, 3)`, a source, or a data spec
    string (`folder:PATH`, `records:PATH`, `tfds:NAME[:SPLIT]`, `digits`; see
    `keras_aim.data.sources`)."""
    if isinstance(images, ImageSource):
        return images
    if isinstance(images, str):
        from keras_aim.data.sources import labeled_images

        return labeled_images(images, "train").source
    return ArraySource(images)


def shuffled_index(position, count: int, seed: int):
    """Image index of global stream position `position` (int64): pass
    `position // count` in its own random order."""
    epoch, index = position // count, position % count
    return tf.random.experimental.index_shuffle(
        index, seed=tf.stack([tf.constant(seed, tf.int64), epoch]), max_index=count - 1
    )


def _shard_positions(start_step: int, batch_size: int, shard: tuple[int, int],
                     count: int | None = None, seed: int = 0) -> tf.data.Dataset:
    """Global positions of part `index` of `count` of every global batch from
    step `start_step` on: O(1) to start, at any step. With `count` (the
    source's size), `(position, shuffled image index)` pairs."""
    index, parts = shard
    part = batch_size // parts

    def position(local):
        p = (local // part) * batch_size + index * part + local % part
        return p if count is None else (p, shuffled_index(p, count, seed))

    return tf.data.Dataset.counter(start_step * part).map(position)


def _stream(images, batch_size: int, image_size: int, fn, seed: int, start_step: int,
            shard: tuple[int, int], workers: int | None, bad: BadImages,
            labeled: bool) -> tf.data.Dataset:
    """Batches of `(image, label)` (or images) of the endless stream over a
    random-access source (the module docstring's order)."""
    part = _check_shard(batch_size, shard)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0; received {start_step}.")
    source = as_source(images)
    if labeled:
        _require_labels(source)
    # Images this process has read by global position p: its share of p.
    read = (lambda p: max(p // shard[1], 1))
    if source.encoded:
        ds = _step_batches(source, start_step, batch_size, shard, fn, image_size, seed,
                           workers, bad, read)
    else:
        slots = _shard_positions(start_step, batch_size, shard, len(source), seed)
        ds = _map_elements(slots, source, fn, image_size, workers, bad, read)
        ds = ds.batch(part, drop_remainder=True)
    if not labeled:
        ds = ds.map(lambda images, labels: images)
    return _with_options(ds.prefetch(tf.data.AUTOTUNE), workers)


def _step_batches(source: ImageSource, start_step: int, batch_size: int,
                  shard: tuple[int, int], fn, image_size: int, seed: int,
                  workers: int | None, bad: BadImages, read) -> tf.data.Dataset:
    """This process's batch of every step from `start_step` on, from files.

    Each step's batch is first made the quick way: its images read and
    augmented by a parallel map. Only when one of them cannot be decoded
    (that batch fails as a whole) is the step made again image by image,
    each slot with its substitutes (`_map_elements`), and the bad images
    reported. The quick way costs about what a plain tf.data map does; the
    careful one adds a small dataset per image (measured: ~10% of the
    throughput), paid only for batches that hold a bad image."""
    index, parts = shard
    part = batch_size // parts
    n = len(source)
    parallel = workers or tf.data.AUTOTUNE

    def quick_image(position):
        image, label = source.fetch(shuffled_index(position, n, seed))
        return fn(position, image), label

    def step_batch(step):
        positions = step * batch_size + index * part + tf.range(part, dtype=tf.int64)
        quick = tf.data.Dataset.from_tensor_slices(positions).map(
            quick_image, num_parallel_calls=parallel, deterministic=True
        ).batch(part, drop_remainder=True).ignore_errors()
        slots = tf.data.Dataset.from_tensor_slices(positions).map(
            lambda p: (p, shuffled_index(p, n, seed)))
        careful = _map_elements(slots, source, fn, image_size, workers, bad, read).batch(
            part, drop_remainder=True)
        return quick.concatenate(careful).take(1)

    # Two steps in flight: the next batch is made while this one is used.
    return tf.data.Dataset.counter(start_step).interleave(
        step_batch, cycle_length=2, block_length=1, num_parallel_calls=2, deterministic=True)


def _check_shard(batch_size: int, shard: tuple[int, int]) -> int:
    index, count = shard
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; received {batch_size}.")
    if count < 1 or not 0 <= index < count or batch_size % count:
        raise ValueError(
            f"shard {shard} does not split batches of {batch_size}: use "
            "(index, count) with 0 <= index < count and count dividing the batch size."
        )
    return batch_size // count


def _map_elements(slots: tf.data.Dataset, source: ImageSource, fn, image_size: int,
                  workers: int | None, bad: BadImages, count_read,
                  drop_bad: bool = False) -> tf.data.Dataset:
    """`(position, index)` slots -> `(fn(position, image), label)`.

    A source of encoded files gets a fallback per slot: the scheduled image,
    else the next ones of the listing (see the module docstring); with
    `drop_bad` (evaluation: every image once) an unreadable image is left
    out instead, named and counted. Arrays cannot fail and take a plain
    parallel map."""
    parallel = workers or tf.data.AUTOTUNE
    if not source.encoded:
        def plain(position, index):
            image, label = source.fetch(index)
            return fn(position, image), label

        return slots.map(plain, num_parallel_calls=parallel, deterministic=True)
    n = len(source)
    substitutes = 1 if drop_bad else SUBSTITUTES
    empty = tf.zeros((image_size, image_size, 3), tf.float32)

    def slot(position, index):
        # The tries in one small dataset: the scheduled image, its
        # substitutes, and last a marker (k = substitutes) that stands for
        # "all failed"; the first that decodes is taken.
        tries = tf.range(substitutes + 1, dtype=tf.int64)

        def attempt(k):
            def image():
                item, label = source.fetch((index + k) % n)
                return fn(position, item), label

            image, label = tf.cond(k < substitutes, image, lambda: (empty, tf.constant(-1)))
            return image, label, k, position, index

        return tf.data.Dataset.from_tensor_slices(tries).map(attempt).ignore_errors().take(1)

    def report(position, index, failures):
        index, failures = int(index), int(failures)
        bad.record([source.name((index + k) % n) for k in range(failures)],
                   count_read(int(position)), not drop_bad and failures == SUBSTITUTES)
        return np.int64(failures)

    def checked(image, label, failures, position, index):
        noted = tf.cond(
            failures > 0,
            lambda: tf.numpy_function(report, [position, index, failures], tf.int64),
            lambda: failures,
        )
        with tf.control_dependencies([noted]):
            return tf.identity(image), tf.identity(label)

    # Several slots in flight per core: one slow image does not hold the
    # others back (the output order stays the slots' order).
    elements = slots.interleave(
        slot, cycle_length=workers or 2 * _cores(), block_length=1,
        num_parallel_calls=parallel, deterministic=True,
    ).map(checked)
    if drop_bad:
        elements = elements.filter(lambda image, label: label >= 0)
    return elements


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _with_options(ds: tf.data.Dataset, workers: int | None) -> tf.data.Dataset:
    if workers:
        options = tf.data.Options()
        options.threading.private_threadpool_size = workers
        ds = ds.with_options(options)
    return ds


def pretraining_dataset(
    images,
    batch_size: int,
    image_size: int,
    augmentation: str = "aim",
    seed: int = 0,
    start_step: int = 0,
    max_shift: int = 2,
    shuffle_buffer: int = 10_000,
    shard: tuple[int, int] = (0, 1),
    workers: int | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    bad_images: BadImages | None = None,
) -> tf.data.Dataset:
    """An endless, shuffled, augmented stream of normalized image batches.

    Args:
        images: uint8 `(n, H, W, 3)` array; an `ImageSource`; a data spec
            (`folder:PATH`, `records:PATH`, `tfds:NAME[:SPLIT]`, `digits`);
            or a `tf.data.Dataset` of uint8 `(H, W, 3)` images. A dataset
            has no random access: it is shuffled through a buffer of
            `shuffle_buffer` decoded images and `start_step` reads through
            every skipped image; give large data as a folder or records.
        batch_size: global batch size.
        image_size: output side.
        augmentation: "aim" (the paper's), "shift" (translation only) or
            "none" (the evaluation transform).
        seed: seeds the order and every augmentation.
        start_step: the first batch, so that a run resumed at step k sees the
            same batches as an uninterrupted run (O(1) for every source but
            a dataset).
        shard: `(index, count)`: yield only part `index` of `count` equal,
            consecutive parts of every global batch (the images one process
            of a multi-process run feeds; see
            `keras_aim.training.distribution_jax.data_shard`). Only those
            images are read and decoded.
        workers: threads for reading and augmenting (default: tf.data's
            autotuning over all cores).
        max_bad_fraction: stop (`BadImagesError`) once more than this share
            of the images read were unreadable (see the module docstring).
        bad_images: a `BadImages` to count and name skipped images in
            (default: a new one per stream).

    Returns:
        Dataset of float32 `(batch_size // count, image_size, image_size, 3)`.
    """
    fn = transform(augmentation, image_size, seed, max_shift)
    bad = bad_images or BadImages(max_bad_fraction)
    if not isinstance(images, tf.data.Dataset):
        return _stream(images, batch_size, image_size, fn, seed, start_step, shard, workers,
                       bad, labeled=False)
    # A dataset has no random access: a shuffle buffer of decoded images,
    # and a resume reads through every skipped image.
    part = _check_shard(batch_size, shard)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0; received {start_step}.")
    ds = images.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.enumerate().skip(start_step * batch_size)
    index, count = shard
    if count > 1:
        ds = ds.filter(lambda i, image: (i % batch_size) // part == index)
    ds = ds.map(fn, num_parallel_calls=workers or tf.data.AUTOTUNE, deterministic=True)
    return _with_options(ds.batch(part, drop_remainder=True).prefetch(tf.data.AUTOTUNE), workers)


def classification_stream(
    images,
    batch_size: int,
    image_size: int,
    augmentation: str = "aim",
    seed: int = 0,
    start_step: int = 0,
    shard: tuple[int, int] = (0, 1),
    converter=None,
    max_shift: int = 2,
    workers: int | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    bad_images: BadImages | None = None,
) -> tf.data.Dataset:
    """An endless, shuffled, augmented stream of `(images, int32 labels)`
    batches from a labeled source (an `ImageSource` or a data spec), with
    the order, resume and sharding of `pretraining_dataset`: training
    batches for a streamed probe or fine-tuning (one pass over the data is
    `len(source) // batch_size` steps).

    Returns:
        Dataset of `(float32 (b, S, S, 3), int32 (b,))`, `b = batch_size // count`.
    """
    fn = transform(augmentation, image_size, seed, max_shift, converter)
    bad = bad_images or BadImages(max_bad_fraction)
    return _stream(images, batch_size, image_size, fn, seed, start_step, shard, workers, bad,
                   labeled=True)


def evaluation_batches(
    images,
    batch_size: int,
    image_size: int,
    converter=None,
    shard: tuple[int, int] = (0, 1),
    workers: int | None = None,
    bad_images: BadImages | None = None,
) -> tf.data.Dataset:
    """`(images, labels)` batches of every image of a labeled source once, in
    order, with the evaluation transform; with `shard=(i, k)` only images
    `i, i + k, i + 2k, ...` (each process evaluates its share; the shares'
    counts add up to the whole). An unreadable image gets the next one's
    pixels and label, counted in `bad_images` (no limit: evaluation never
    stops on bad files, it reports them).

    Returns:
        Dataset of `(float32 (b, S, S, 3), int32 (b,))`; the last batch may
        be smaller.
    """
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {shard} is not (index, count) with 0 <= index < count.")
    source = as_source(images)
    _require_labels(source)
    fn = transform("none", image_size, 0, converter=converter)
    slots = tf.data.Dataset.range(index, len(source), count).map(lambda i: (i, i))
    bad = bad_images or BadImages(1.0)
    ds = _map_elements(slots, source, fn, image_size, workers, bad, lambda p: max(p // count, 1),
                       drop_bad=True)
    return _with_options(ds.batch(batch_size).prefetch(tf.data.AUTOTUNE), workers)


def _require_labels(source: ImageSource) -> None:
    if isinstance(source, ArraySource) and source.labels is None:
        raise ValueError("A classification pipeline needs labels: pass an ArraySource "
                         "with labels, a folder or record files.")


def classification_dataset(
    images,
    labels,
    batch_size: int,
    image_size: int,
    training: bool,
    augmentation: str = "aim",
    seed: int = 0,
    max_shift: int = 2,
    num_classes: int | None = None,
    shuffle_buffer: int = 10_000,
    converter=None,
    drop_remainder: bool = False,
    workers: int | None = None,
) -> tf.data.Dataset:
    """(normalized images, labels) batches for probes and fine-tuning, one
    pass over the data per iteration (one `fit` epoch).

    `images`: uint8 `(n, H, W, 3)` with `labels` `(n,)`; or, with
    `labels=None`, an `ImageSource` (a folder, record files, a tfds split:
    the shuffle is over indices) or a dataset of `(uint8 image, label)`
    pairs of any sizes (shuffled through a `shuffle_buffer` of images).
    Training: shuffled and augmented, a new order each pass. Evaluation: the
    evaluation transform, in order. For arrays, raises before any training
    if the data is empty or a label is outside `[0, num_classes)`.
    `converter`: the evaluation transform, whose mean/std the augmentations
    use too (default: AIM-v1's `AIMImageConverter` at `image_size`; an
    AIMv2 trunk takes `keras_aim.models.families.evaluation_converter`).
    `drop_remainder`: leave out the last, smaller batch (a multi-process
    `fit` needs batches of one known size, which Keras then splits over the
    processes).
    """
    fn = transform(augmentation if training else "none", image_size, seed, max_shift, converter)
    if labels is None and isinstance(images, tf.data.Dataset):
        source = images
        if training:
            source = source.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        ds = source.enumerate().map(
            lambda i, pair: (fn(i, pair[0]), pair[1]),
            num_parallel_calls=workers or tf.data.AUTOTUNE, deterministic=True,
        )
        return _with_options(
            ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE),
            workers)
    if labels is None:
        if not isinstance(images, ImageSource):
            raise ValueError("labels=None needs an ImageSource or a dataset of (image, label) pairs.")
        source = images
    else:
        labels = np.asarray(labels)
        if len(labels) == 0:
            raise ValueError("The dataset is empty: no images to train or evaluate on.")
        if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"Labels must be in [0, {num_classes}); found {labels.min()}.."
                f"{labels.max()}. Check the data or the head's num_classes."
            )
        source = ArraySource(images, labels)
    count = len(source)
    indices = tf.data.Dataset.range(count)
    if training:  # a shuffle of indices: memory does not grow with the images
        indices = indices.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    bad = BadImages(DEFAULT_MAX_BAD_FRACTION if training else 1.0)
    ds = _map_elements(indices.enumerate(), source, fn, image_size, workers, bad,
                       lambda p: max(p, 1), drop_bad=not training)
    return _with_options(
        ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE), workers)


def image_files_dataset(paths, labels) -> tf.data.Dataset:
    """`(uint8 image (H, W, 3), int32 label)` pairs read from `paths` in
    order; a file that cannot be read or decoded is left out with a logged
    warning."""

    def load(path, label):
        return decode_image(tf.io.read_file(path)), label

    ds = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels, "int32")))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.ignore_errors(log_warning=True)


def image_folder(directory: str):
    """`(dataset of (uint8 image (H, W, 3), int32 label), class_names,
    problems)` of an image folder, in listing order (see
    `keras_aim.data.listing.list_folder`; nothing is decoded to list it)."""
    from keras_aim.data.listing import list_folder

    listing = list_folder(directory)
    return (image_files_dataset(listing.paths, listing.labels), listing.class_names,
            listing.problems)


def tfds_images(name: str, split: str, data_dir: str | None = None):
    """A tensorflow-datasets split as a dataset of (uint8 RGB image, label),
    read in order; grayscale images get 3 channels.

    Needs the dataset prepared in `data_dir` (or downloadable by tfds).
    """
    import tensorflow_datasets as tfds

    ds, info = tfds.load(
        name, split=split, data_dir=data_dir, as_supervised=True, with_info=True
    )
    if info.features["image"].shape[-1] == 1:
        ds = ds.map(lambda image, label: (tf.image.grayscale_to_rgb(image), label))
    return ds, info.features["label"].names
