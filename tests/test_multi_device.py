"""The trunk and classifier under keras.distribution on 8 (virtual) devices.

Run with KERAS_BACKEND=jax and
XLA_FLAGS=--xla_force_host_platform_device_count=8 (`.ci/run` does).
"""

import keras
import numpy as np
import pytest

import keras_aim
from tests.conftest import fixture_path, make_tiny_classifier, to_numpy

pytestmark = pytest.mark.multi_device


def _devices():
    if keras.config.backend() != "jax":
        return []
    return keras.distribution.list_devices("cpu")


@pytest.mark.skipif(
    len(_devices()) < 8,
    reason="needs JAX with XLA_FLAGS=--xla_force_host_platform_device_count=8",
)
def test_data_parallel_classifier_matches_single_device(reference):
    images = np.concatenate([reference["images_nhwc"]] * 3)[:8]
    single = make_tiny_classifier()
    keras_aim.load_official_weights(single, fixture_path("model.safetensors"))
    expected = to_numpy(single(images))

    distribution = keras.distribution.DataParallel(devices=_devices()[:8])
    with distribution.scope():
        parallel = make_tiny_classifier()
        keras_aim.load_official_weights(parallel, fixture_path("model.safetensors"))
        logits = parallel.predict(images, batch_size=8, verbose=0)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    np.testing.assert_allclose(logits, np.concatenate([reference["logits"]] * 3)[:8], atol=1e-4)
