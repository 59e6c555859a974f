"""AIM evaluation preprocessing: resize the shorter side, center crop,
ImageNet mean/std. A subclass of keras-hub's `ImageConverter`, so presets
save and load it.

The converter sits below the models: it imports none of them, and
`aim_backbone` names itself as its `backbone_cls` (keras-hub uses that to
pick the converter class of a preset), so a model can write its converter
into a preset it creates.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops
from keras_hub.layers import ImageConverter

from keras_aim.utils.arguments import check_positive_ints

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_FRACTION = 0.875  # resize to 224 / 0.875 = 256, crop 224


def _shorter_side_size(height, width, target: int):
    """(new_height, new_width) with the shorter side equal to `target`,
    keeping the aspect ratio (torchvision `Resize(int)` rounding)."""
    if height <= width:
        return target, int(target * width / height)
    return int(target * height / width), target


def _resize_and_crop_dynamic(images, resize_size, crop, interpolation, antialias):
    """The same transform for images whose size is only known at run time:
    TensorFlow graphs (tf.data over differently sized images)."""
    import tensorflow as tf

    if tf.executing_eagerly():
        raise ValueError("Images with unknown height/width need tf.data/tf.function.")
    shape = tf.shape(images)
    height, width = tf.cast(shape[1], "float32"), tf.cast(shape[2], "float32")
    scale = resize_size / tf.minimum(height, width)
    # torchvision: the shorter side becomes resize_size exactly, the other
    # int(resize_size * long / short).
    new_h = tf.where(height <= width, resize_size, tf.cast(height * scale, "int32"))
    new_w = tf.where(height <= width, tf.cast(width * scale, "int32"), resize_size)
    images = tf.image.resize(
        tf.cast(images, "float32"),
        tf.stack([new_h, new_w]),
        method=interpolation,
        antialias=antialias,
    )
    top = tf.cast(tf.round(tf.cast(new_h - crop[0], "float32") / 2.0), "int32")
    left = tf.cast(tf.round(tf.cast(new_w - crop[1], "float32") / 2.0), "int32")
    return images[:, top : top + crop[0], left : left + crop[1], :]


def _to_float32(images):
    """Casts on TensorFlow inside tf.data graphs, on the backend elsewhere."""
    import tensorflow as tf

    if not tf.executing_eagerly():
        return tf.cast(images, "float32")
    return ops.cast(images, "float32")


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMImageConverter(ImageConverter):
    """Resize the shorter side to `resize_size` (bicubic, antialiased),
    center crop `image_size`, scale to [0, 1], normalize with ImageNet
    mean/std: the released evaluation transform.

    Input: uint8 or float images in [0, 255], `(H, W, 3)` or `(B, H, W, 3)`,
    any H and W. Output: float `(..., image_size[0], image_size[1], 3)`.

    Args:
        image_size: `(height, width)` of the center crop.
        resize_size: shorter side before cropping; defaults to
            `round(min(image_size) / 0.875)` (256 for 224).
        scale, offset: per-channel affine applied after resizing; default
            to ImageNet normalization of [0, 255] pixels.
    """

    def __init__(
        self,
        image_size=(224, 224),
        resize_size: int | None = None,
        scale=None,
        offset=None,
        interpolation: str = "bicubic",
        antialias: bool = True,
        **kwargs,
    ):
        if scale is None and offset is None:
            scale = [1.0 / (255.0 * s) for s in IMAGENET_STD]
            offset = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
        super().__init__(
            image_size=image_size,
            scale=scale,
            offset=offset,
            interpolation=interpolation,
            antialias=antialias,
            **kwargs,
        )
        if image_size is not None:
            height, width = image_size
            check_positive_ints(type(self).__name__, height=height, width=width)
        if resize_size is None and image_size is not None:
            resize_size = round(min(image_size) / DEFAULT_CROP_FRACTION)
        if resize_size is not None:
            check_positive_ints(type(self).__name__, resize_size=resize_size)
        self.resize_size = resize_size

    def _resize_and_crop(self, images):
        """Shorter side -> resize_size, then center crop to image_size."""
        if self.image_size is None:
            return images
        crop_h, crop_w = self.image_size
        unbatched = len(images.shape) == 3
        if unbatched:
            images = images[None]
        height, width = images.shape[1], images.shape[2]
        if height is None or width is None:
            images = _resize_and_crop_dynamic(
                images,
                self.resize_size,
                (crop_h, crop_w),
                self.interpolation,
                self.antialias,
            )
            return images[0] if unbatched else images
        new_h, new_w = _shorter_side_size(height, width, self.resize_size)
        if new_h < crop_h or new_w < crop_w:
            raise ValueError(
                f"resize_size={self.resize_size} is smaller than the crop "
                f"{self.image_size}; use resize_size >= {max(crop_h, crop_w)}."
            )
        if (new_h, new_w) != (height, width):
            # A keras Resizing layer runs on TensorFlow inside tf.data and on
            # the active backend elsewhere; it keeps integer input dtypes in
            # eager mode, so cast first.
            images = keras.layers.Resizing(
                new_h,
                new_w,
                interpolation=self.interpolation,
                antialias=self.antialias,
                dtype="float32",
            )(_to_float32(images))
        # torchvision's CenterCrop offsets (round, not floor).
        top = int(round((new_h - crop_h) / 2.0))
        left = int(round((new_w - crop_w) / 2.0))
        images = images[:, top : top + crop_h, left : left + crop_w, :]
        return images[0] if unbatched else images

    def _call_python(self, inputs):
        if not hasattr(inputs, "shape"):  # lists of same-sized images
            inputs = ops.convert_to_tensor(np.asarray(inputs))
        x = self._resize_and_crop(inputs)
        if self.scale is not None:
            scale = self._expand_non_channel_dims(self.scale, x)
            x, scale = self._convert_types(x, scale, self.compute_dtype)
            x = x * scale
        if self.offset is not None:
            offset = self._expand_non_channel_dims(self.offset, x)
            x, offset = self._convert_types(x, offset, x.dtype)
            x = x + offset
        return x

    def get_config(self):
        config = super().get_config()
        config["resize_size"] = self.resize_size
        return config
