"""Per-image transforms of the pipelines, as TensorFlow ops (run in tf.data).

Each transform takes one image, either encoded file bytes (a scalar string)
or uint8 pixels `(H, W, 3)`, and an element seed (`(seed, position)`), and
returns a normalized float32 `(S, S, 3)` image. Randomness is stateless: the
same image, seed and position give the same output on every run and
process.

The paper's augmentation (`aim_augment`) decodes a JPEG *and crops it in
one step* (`tf.image.decode_and_crop_jpeg`): the crop box is drawn from the
image's shape, read from the JPEG header without decoding, and only the
crop's MCU rows and columns are decoded. The box is the same as for a full
decode followed by a crop, and so are the pixels, except on the crop's
outermost one-pixel ring of JPEGs with subsampled chroma (4:2:0, 4:2:2),
where libjpeg's chroma upsampling sees no neighbour outside the crop: there
a pixel can differ by a few levels (up to about 25/255 on sharp colour
edges; the ring's mean difference stays below 1/255). 4:4:4 JPEGs match
exactly. `tests/test_data.py` checks both. Other formats are decoded whole,
then cropped.
"""

from __future__ import annotations

import tensorflow as tf

from keras_aim.data.images import decode_image
from keras_aim.models.aim.aim_image_converter import IMAGENET_MEAN, IMAGENET_STD, AIMImageConverter

AUGMENTATIONS = ("aim", "shift", "none")
# RandomResizedCrop of the AIM recipe: area share and aspect ratio ranges.
CROP_AREA = (0.4, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)


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


def crop_box(shape, seed) -> tuple[tf.Tensor, tf.Tensor]:
    """`(begin, size)` of the random resized crop (area 0.4-1, aspect
    3/4-4/3, 10 attempts, else the whole image) for an image of `shape`
    `(H, W, C)`."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=CROP_ASPECT,
        area_range=CROP_AREA,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


def random_crop(image, seed) -> tf.Tensor:
    """The random resized crop's box (`crop_box`) cut from encoded bytes or
    uint8 pixels, as uint8 pixels `(h, w, 3)`. A JPEG's box is drawn from
    its header and only the box is decoded (see the module docstring)."""

    def from_pixels(pixels):
        begin, size = crop_box(tf.shape(pixels), seed)
        return tf.slice(pixels, begin, size)

    if image.dtype != tf.string:
        return from_pixels(image)

    def jpeg():
        shape = tf.image.extract_jpeg_shape(image, output_type=tf.int32)
        begin, size = crop_box(shape, seed)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        return tf.image.decode_and_crop_jpeg(
            image, window, channels=3, dct_method="INTEGER_ACCURATE"
        )

    cropped = tf.cond(tf.io.is_jpeg(image), jpeg, lambda: from_pixels(decode_image(image)))
    cropped.set_shape((None, None, 3))
    return cropped


def pixels(image) -> tf.Tensor:
    """uint8 `(H, W, 3)` of encoded bytes or pixels."""
    return decode_image(image) if image.dtype == tf.string else image


def aim_augment(image, seed, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The paper's training augmentation on one image (encoded bytes or uint8
    `(H, W, 3)`): random resized crop (area 0.4-1.0, aspect 3/4-4/3,
    antialiased bicubic) to `image_size`, horizontal flip, color jitter
    (0.4, 0.4, 0.2, 0.1) with probability 0.8, then normalization with
    `mean`/`std`. `seed`: shape-(2,) int tensor."""
    seeds = tf.random.experimental.stateless_split(seed, num=7)
    image = random_crop(image, seeds[0])
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
    image = pixels(image)
    height, width = image.shape[0], image.shape[1]
    if image_size is not None and (height, width) != (image_size, image_size):
        image = pixel_crop(image_size)(image)
        height = width = image_size
    padded = tf.pad(image, [[max_shift, max_shift], [max_shift, max_shift], [0, 0]])
    image = tf.image.stateless_random_crop(padded, (height, width, 3), seed)
    return normalize(image, mean, std)


def pixel_crop(image_size: int) -> AIMImageConverter:
    """The evaluation resize + center crop, keeping pixels in [0, 255]."""
    return AIMImageConverter(image_size=(image_size, image_size), scale=1.0, offset=0.0)


def transform(augmentation: str, image_size: int, seed: int, max_shift: int = 2,
              converter=None):
    """`fn(position, image)` -> normalized float32 `(S, S, 3)`: the named
    augmentation seeded by `(seed, position)` ("none": the evaluation
    transform, `converter`, by default AIM v1's at `image_size`; the
    augmentations normalize with the converter's mean and std)."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(
            f"augmentation must be one of {AUGMENTATIONS}; received {augmentation!r}."
        )
    if converter is None:
        converter = AIMImageConverter(image_size=(image_size, image_size))
    mean, std = converter_statistics(converter)

    def fn(position, image):
        element_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(position, tf.int64)])
        if augmentation == "aim":
            return aim_augment(image, element_seed, image_size, mean, std)
        if augmentation == "shift":
            return shift_augment(image, element_seed, max_shift, image_size, mean, std)
        return converter(pixels(image))

    return fn
