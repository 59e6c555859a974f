"""tf.data pipelines for pre-training and probes, on any Keras backend.

Augmentations use TensorFlow's *stateless* image ops seeded by
`(seed, element index)` and every pass over the data has its own fixed
shuffle: a run is reproducible, and a resumed run (or one under
`tf.distribute`) sees exactly the images an uninterrupted one would (see
`start_step`).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from keras_aim.data.images import decode_image, is_image_file, read_images, summarize_errors
from keras_aim.models.aim.aim_image_converter import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AIMImageConverter,
)

AUGMENTATIONS = ("aim", "shift", "none")


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """[0, 255] pixels -> mean/std normalized float32 (ImageNet's by default)."""
    images = tf.cast(images, "float32") / 255.0
    return (images - mean) / std


def converter_statistics(converter) -> tuple[tuple, tuple]:
    """`(mean, std)` over [0, 1] pixels of an image converter, from its
    scale and offset (`x * scale + offset` on [0, 255] pixels)."""
    std = tuple(1.0 / (255.0 * float(s)) for s in converter.scale)
    mean = tuple(-float(o) * s for o, s in zip(converter.offset, std))
    return mean, std


def aim_augment(image, seed, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The paper's training augmentation on one uint8 image `(H, W, 3)`:
    random resized crop (area 0.4-1.0, aspect 3/4-4/3, bicubic) to
    `image_size`, horizontal flip, color jitter (0.4, 0.4, 0.2, 0.1) with
    probability 0.8, then normalization with `mean`/`std`. `seed`:
    shape-(2,) int tensor."""
    seeds = tf.random.experimental.stateless_split(seed, num=7)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seeds[0],
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.4, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    image = tf.slice(image, begin, size)
    image = tf.image.resize(
        tf.cast(image, "float32"), (image_size, image_size), "bicubic", antialias=True
    )
    image = tf.clip_by_value(image, 0.0, 255.0) / 255.0
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])

    def jitter(x):
        x = tf.image.stateless_random_brightness(x, 0.4, seeds[2])
        x = tf.image.stateless_random_contrast(x, 0.6, 1.4, seeds[3])
        x = tf.image.stateless_random_saturation(x, 0.8, 1.2, seeds[4])
        x = tf.image.stateless_random_hue(x, 0.1, seeds[5])
        return tf.clip_by_value(x, 0.0, 1.0)

    apply = tf.random.stateless_uniform((), seeds[6]) < 0.8
    image = tf.cond(apply, lambda: jitter(image), lambda: image)
    return (image - mean) / std


def shift_augment(image, seed, max_shift: int, image_size: int | None = None,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Random translation by up to `max_shift` pixels (zero padding), then
    normalization: a gentle augmentation for tiny images such as digits.

    An image whose size is not `image_size` x `image_size` (or unknown, as
    in an image folder) is first resized and center-cropped to it, as the
    evaluation transform does."""
    height, width = image.shape[0], image.shape[1]
    if image_size is not None and (height, width) != (image_size, image_size):
        image = _pixel_crop(image_size)(image)
        height = width = image_size
    padded = tf.pad(image, [[max_shift, max_shift], [max_shift, max_shift], [0, 0]])
    image = tf.image.stateless_random_crop(padded, (height, width, 3), seed)
    return normalize(image, mean, std)


def _pixel_crop(image_size: int) -> AIMImageConverter:
    """The evaluation resize + center crop, keeping pixels in [0, 255]."""
    return AIMImageConverter(image_size=(image_size, image_size), scale=1.0, offset=0.0)


def _augment_fn(augmentation: str, image_size: int, seed: int, max_shift: int,
                converter=None):
    if augmentation not in AUGMENTATIONS:
        raise ValueError(
            f"augmentation must be one of {AUGMENTATIONS}; received {augmentation!r}."
        )
    if converter is None:
        converter = AIMImageConverter(image_size=(image_size, image_size))
    mean, std = converter_statistics(converter)

    def fn(index, image):
        element_seed = tf.stack([tf.constant(seed, tf.int64), index])
        if augmentation == "aim":
            return aim_augment(image, element_seed, image_size, mean, std)
        if augmentation == "shift":
            return shift_augment(image, element_seed, max_shift, image_size, mean, std)
        return converter(image)

    return fn


def _image_source(images) -> tf.data.Dataset:
    if isinstance(images, tf.data.Dataset):
        return images
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"Expected images of shape (n, height, width, 3); got {images.shape}."
        )
    if len(images) == 0:
        raise ValueError("The image set is empty.")
    return tf.data.Dataset.from_tensor_slices(images)


def _shuffled_stream(images, seed: int, shuffle_buffer: int) -> tf.data.Dataset:
    """Endless passes over `images`, each in its own order.

    For an array, image j of pass e is image `index_shuffle(j, (seed, e))`:
    a full random permutation per pass, a pure function of the element's
    position, so the stream is the same however it is iterated (and under
    `tf.distribute`, which iterates a dataset once more than `fit` does on
    one device; `reshuffle_each_iteration` would tie the order to that).
    A dataset source goes through a shuffle buffer, reshuffled each pass.
    """
    source = _image_source(images)
    if isinstance(images, tf.data.Dataset):
        return source.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    pixels = tf.constant(np.asarray(images))
    count = len(pixels)

    def image(position):
        epoch, index = position // count, position % count
        order = tf.random.experimental.index_shuffle(
            index, seed=tf.stack([tf.constant(seed, tf.int64), epoch]),
            max_index=count - 1,
        )
        return tf.gather(pixels, order)

    return tf.data.Dataset.counter().map(image, num_parallel_calls=tf.data.AUTOTUNE,
                                         deterministic=True)


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
) -> tf.data.Dataset:
    """An endless, shuffled, augmented stream of normalized image batches.

    Args:
        images: uint8 `(n, H, W, 3)` array, or a `tf.data.Dataset` of uint8
            `(H, W, 3)` images (any sizes with the "aim" augmentation).
        batch_size: global batch size.
        image_size: output side.
        augmentation: "aim" (the paper's), "shift" (translation only) or
            "none" (the evaluation transform).
        seed: seeds the shuffle order and every augmentation.
        start_step: batches to skip, so that a run resumed at step k sees
            the same batches as an uninterrupted run.
        shard: `(index, count)`: yield only part `index` of `count` equal,
            consecutive parts of every global batch (the images one process
            of a multi-process run feeds; see
            `keras_aim.training.distribution_jax.data_shard`). Only those
            are augmented.

    Returns:
        Dataset of float32 `(batch_size // count, image_size, image_size, 3)`.
    """
    index, count = shard
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; received {batch_size}.")
    if count < 1 or not 0 <= index < count or batch_size % count:
        raise ValueError(
            f"shard {shard} does not split batches of {batch_size}: use "
            "(index, count) with 0 <= index < count and count dividing the batch size."
        )
    part = batch_size // count
    ds = _shuffled_stream(images, seed, shuffle_buffer)
    ds = ds.enumerate().skip(start_step * batch_size)
    if count > 1:  # before augmenting: each process augments its part only
        ds = ds.filter(lambda i, image: (i % batch_size) // part == index)
    ds = ds.map(
        _augment_fn(augmentation, image_size, seed, max_shift),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return ds.batch(part, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


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
) -> tf.data.Dataset:
    """(normalized images, labels) batches for probes and fine-tuning.

    `images`: uint8 `(n, H, W, 3)` with `labels` `(n,)`, or (with
    `labels=None`) a dataset of `(uint8 image, label)` pairs of any sizes.
    Training: shuffled and augmented, one pass per epoch. Evaluation: the
    evaluation transform, in order. For arrays, raises before any training
    if the data is empty or a label is outside `[0, num_classes)`.
    `converter`: the evaluation transform, whose mean/std the augmentations
    use too (default: AIM-v1's `AIMImageConverter` at `image_size`; an
    AIMv2 trunk takes `keras_aim.models.families.evaluation_converter`).
    `drop_remainder`: leave out the last, smaller batch (a multi-process
    `fit` needs batches of one known size, which Keras then splits over the
    processes).
    """
    if labels is None:
        if not isinstance(images, tf.data.Dataset):
            raise ValueError("labels=None needs a dataset of (image, label) pairs.")
        source, buffer = images, shuffle_buffer
    else:
        labels = np.asarray(labels)
        if len(labels) == 0:
            raise ValueError("The dataset is empty: no images to train or evaluate on.")
        if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"Labels must be in [0, {num_classes}); found {labels.min()}.."
                f"{labels.max()}. Check the data or the head's num_classes."
            )
        source = tf.data.Dataset.zip(
            (_image_source(images), tf.data.Dataset.from_tensor_slices(labels))
        )
        buffer = len(labels)
    augment = _augment_fn(
        augmentation if training else "none", image_size, seed, max_shift, converter
    )
    if training:
        source = source.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    ds = source.enumerate().map(
        lambda i, pair: (augment(i, pair[0]), pair[1]),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def list_image_folder(directory: str):
    """The images of `directory/<class>/<file>` (or directly in `directory`).

    Every file is decoded once, with the decoding the pipeline uses
    (`keras_aim.data.images.decode_image`): files that fail are left out
    and reported by name, so a bad file never stops a run midway.

    Returns:
        `(paths, int labels, class_names, skipped)`, `skipped` holding one
        message per left-out file, naming it.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Image folder {directory!r} does not exist.")
    classes = sorted(
        d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d))
    )
    entries = [(directory, 0)] if not classes else [
        (os.path.join(directory, c), i) for i, c in enumerate(classes)
    ]
    paths, labels, skipped = [], [], []
    for folder, label in entries:
        files = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if is_image_file(n)]
        readable, _, errors = read_images(files, keep_pixels=False)
        paths += readable
        labels += [label] * len(readable)
        skipped += errors
    if not paths:
        raise ValueError(
            f"No readable images in {directory!r} ({len(skipped)} unreadable"
            + (":\n" + summarize_errors(skipped) if skipped else "") + ")."
        )
    return paths, labels, classes or [os.path.basename(directory)], skipped


def image_files_dataset(paths, labels) -> tf.data.Dataset:
    """`(uint8 image (H, W, 3), int32 label)` pairs read from `paths`."""

    def load(path, label):
        return decode_image(tf.io.read_file(path)), label

    ds = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels, "int32")))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # A file changed or removed after the check is dropped with a logged
    # warning rather than ending the run.
    return ds.ignore_errors(log_warning=True)


def image_folder(directory: str):
    """`(dataset of (uint8 image (H, W, 3), int32 label), class_names,
    skipped)` of an image folder (see `list_image_folder`)."""
    paths, labels, classes, skipped = list_image_folder(directory)
    return image_files_dataset(paths, labels), classes, skipped


def tfds_images(name: str, split: str, data_dir: str | None = None):
    """A tensorflow-datasets split as a dataset of (uint8 RGB image, label);
    grayscale images get 3 channels.

    Needs the dataset prepared in `data_dir` (or downloadable by tfds).
    """
    import tensorflow_datasets as tfds

    ds, info = tfds.load(
        name, split=split, data_dir=data_dir, as_supervised=True, with_info=True
    )
    if info.features["image"].shape[-1] == 1:
        ds = ds.map(lambda image, label: (tf.image.grayscale_to_rgb(image), label))
    return ds, info.features["label"].names
