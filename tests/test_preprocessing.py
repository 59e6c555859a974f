"""AIMImageConverter: the released evaluation transform."""

import keras
import numpy as np
import pytest
from PIL import Image

import keras_aim
from keras_aim.models.aim.aim_image_converter import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import to_numpy


def smooth_image(height, width, seed=0):
    """A smooth RGB uint8 image (interpolation differences stay small)."""
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.RandomState(seed)
    channels = [
        128 + 100 * np.sin(xx / rng.uniform(6, 12) + k) * np.cos(yy / rng.uniform(6, 12))
        for k in range(3)
    ]
    return np.stack(channels, -1).astype("uint8")


def torchvision_style_reference(image, resize, crop):
    """Resize(shorter=resize, bicubic) + CenterCrop(crop) with PIL, as the
    released evaluation transform does, then ImageNet normalization."""
    height, width = image.shape[:2]
    if height <= width:
        size = (int(resize * width / height), resize)
    else:
        size = (resize, int(resize * height / width))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))
    top = int(round((resized.shape[0] - crop) / 2.0))
    left = int(round((resized.shape[1] - crop) / 2.0))
    cropped = resized[top : top + crop, left : left + crop].astype("float32")
    return (cropped / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


def test_defaults_are_the_released_transform():
    converter = keras_aim.AIMImageConverter()
    assert converter.image_size == (224, 224)
    assert converter.resize_size == 256
    assert converter.interpolation == "bicubic"


@pytest.mark.parametrize("shape", [(300, 400), (400, 300), (256, 256), (231, 517)])
def test_matches_pil_resize_and_center_crop(shape):
    image = smooth_image(*shape)
    got = to_numpy(keras_aim.AIMImageConverter()(image))
    assert got.shape == (224, 224, 3)
    expected = torchvision_style_reference(image, 256, 224)
    error = np.abs(got - expected)
    # PIL rounds to uint8 and its antialias kernel differs slightly: about
    # one grey level at most (1 level = 0.017 after normalization).
    assert error.mean() < 0.01, error.mean()
    assert error.max() < 0.04, error.max()


def textured_image(height, width, seed=0):
    """Blocks with sharp edges plus pixel noise: the interpolation kernel
    shows (bilinear or Lanczos differ from PIL's bicubic by 5-20x more
    than the bicubic resize does, see below)."""
    rng = np.random.RandomState(seed)
    blocks = rng.randint(0, 256, (height // 4 + 1, width // 4 + 1, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(blocks).resize((width, height), Image.NEAREST))
    noise = rng.randint(-20, 21, (height, width, 3))
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


# Mean absolute error (normalized units) against PIL's bicubic on
# textured_image, measured: bicubic 0.009-0.010, Lanczos-3 >= 0.055,
# bilinear >= 0.079 (downscaling 300x400 and 231x517, upscaling 180x200).
BICUBIC_MEAN_ERROR = 0.03


@pytest.mark.parametrize("shape", [(300, 400), (180, 200)])
def test_resizing_is_pils_bicubic_on_textured_images(shape):
    """Eagerly and in tf.data with unknown image sizes (image folders)."""
    import tensorflow as tf

    image = textured_image(*shape)
    expected = torchvision_style_reference(image, 256, 224)
    converter = keras_aim.AIMImageConverter()
    eager = to_numpy(converter(image))
    images = tf.data.Dataset.from_generator(
        lambda: iter([image]), output_signature=tf.TensorSpec((None, None, 3), tf.uint8)
    )
    in_graph = next(iter(images.map(converter))).numpy()
    for got in (eager, in_graph):
        assert got.shape == (224, 224, 3)
        assert np.abs(got - expected).mean() < BICUBIC_MEAN_ERROR


def test_batched_unbatched_and_float_inputs_agree():
    images = np.stack([smooth_image(60, 90, seed=s) for s in range(2)])
    converter = keras_aim.AIMImageConverter(image_size=(32, 32))
    batched = to_numpy(converter(images))
    assert batched.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(to_numpy(converter(images[1])), batched[1], atol=1e-4)
    np.testing.assert_allclose(
        to_numpy(converter(images.astype("float32"))), batched, atol=1e-4
    )


def test_tf_data_pipeline_equals_eager():
    import tensorflow as tf

    images = np.stack([smooth_image(50, 70, seed=s) for s in range(3)])
    converter = keras_aim.AIMImageConverter(image_size=(32, 32))
    eager = to_numpy(converter(images))
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(3).map(converter)
    np.testing.assert_allclose(next(iter(dataset)).numpy(), eager, atol=1e-4)


def test_no_resize_when_shorter_side_already_matches():
    image = smooth_image(36, 40)
    converter = keras_aim.AIMImageConverter(image_size=(32, 32), resize_size=36)
    got = to_numpy(converter(image))
    expected = (image[2:34, 4:36] / 255.0 - np.array(IMAGENET_MEAN)) / np.array(
        IMAGENET_STD
    )
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_resize_smaller_than_crop_is_refused():
    converter = keras_aim.AIMImageConverter(image_size=(32, 32), resize_size=20)
    with pytest.raises(ValueError, match="resize_size >= 32"):
        converter(smooth_image(40, 40))


def test_config_round_trip():
    converter = keras_aim.AIMImageConverter(image_size=(64, 64), resize_size=80)
    clone = keras_aim.AIMImageConverter.from_config(converter.get_config())
    assert clone.resize_size == 80 and clone.image_size == (64, 64)
    image = smooth_image(90, 100)
    np.testing.assert_array_equal(to_numpy(clone(image)), to_numpy(converter(image)))


def test_preprocessor_passes_labels_through():
    preprocessor = keras_aim.AIMImageClassifierPreprocessor(
        keras_aim.AIMImageConverter(image_size=(32, 32))
    )
    x, y = preprocessor(np.stack([smooth_image(40, 50)] * 2), np.array([3, 4]))
    assert tuple(x.shape) == (2, 32, 32, 3)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(y), [3, 4])
