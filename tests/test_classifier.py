"""AIMImageClassifier: logits parity, probe layers, preprocessing, saving."""

import os
import types

import keras
import keras_hub
import numpy as np
import pytest

import keras_aim
from keras_aim.loading.download import DownloadError
from keras_aim.models.aim.aim_image_classifier import resolve_probe_layers
from tests.conftest import (
    PARITY_ATOL,
    TINY_NUM_CLASSES,
    fixture_path,
    make_tiny_backbone,
    make_tiny_classifier,
    released_state_dict,
    to_numpy,
)


def test_logits_match_reference(tiny_classifier, reference):
    got = to_numpy(tiny_classifier(reference["images_nhwc"]))
    assert got.shape == (3, TINY_NUM_CLASSES)
    np.testing.assert_allclose(got, reference["logits"], atol=PARITY_ATOL)
    np.testing.assert_allclose(
        tiny_classifier.predict(reference["images_nhwc"], verbose=0),
        reference["logits"],
        atol=PARITY_ATOL,
    )


def test_logits_from_combined_safetensors_file(reference):
    classifier = make_tiny_classifier()
    keras_aim.load_official_weights(
        classifier, backbone_file=fixture_path("model.safetensors")
    )
    np.testing.assert_allclose(
        to_numpy(classifier(reference["images_nhwc"])),
        reference["logits"],
        atol=PARITY_ATOL,
    )


def test_logits_from_in_memory_dicts(reference):
    state = released_state_dict("backbone.pth", "head.pth")
    classifier = make_tiny_classifier()
    keras_aim.load_official_weights(classifier, backbone_file=state)
    np.testing.assert_allclose(
        to_numpy(classifier(reference["images_nhwc"])),
        reference["logits"],
        atol=PARITY_ATOL,
    )


def test_probe_layers_resolution():
    backbone = make_tiny_backbone()
    assert resolve_probe_layers("last", backbone) == (0, 1, 2, 3)
    assert resolve_probe_layers(2, backbone) == (2, 3)
    assert resolve_probe_layers((1, -1), backbone) == (1, 3)
    with pytest.raises(ValueError, match="only for the released"):
        resolve_probe_layers("best", backbone)
    with pytest.raises(ValueError, match="names a block twice"):
        resolve_probe_layers((1, 1), backbone)
    with pytest.raises(ValueError, match="out of range"):
        resolve_probe_layers((7,), backbone)
    with pytest.raises(ValueError, match="use 1..4"):
        resolve_probe_layers(5, backbone)
    with pytest.raises(ValueError, match="'last', 'best'"):
        resolve_probe_layers("first", backbone)
    with pytest.raises(ValueError, match="empty"):
        resolve_probe_layers((), backbone)


@pytest.mark.parametrize("name", list(keras_aim.AIM_PRESETS))
def test_best_probe_layers_of_released_architectures(name):
    # "best" only reads the architecture; a stand-in avoids building it.
    config = keras_aim.AIM_PRESETS[name]["config"]
    stand_in = types.SimpleNamespace(
        num_layers=config["num_layers"],
        hidden_dim=config["hidden_dim"],
        get_config=lambda: dict(config),
    )
    best = keras_aim.AIM_PRESETS[name]["best_probe_layers"]
    assert resolve_probe_layers("best", stand_in) == best
    depth = config["num_layers"]
    assert resolve_probe_layers("last", stand_in) == tuple(range(depth - 6, depth))


def test_single_block_probe_and_explicit_layers(tiny_backbone, reference):
    classifier = keras_aim.AIMImageClassifier(
        tiny_backbone, TINY_NUM_CLASSES, probe_layers=(3,)
    )
    assert classifier.probe_layers == (3,)
    assert tuple(classifier(reference["images_nhwc"]).shape) == (3, 10)


def test_classifier_rejects_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        keras_aim.AIMImageClassifier(make_tiny_backbone(), 0)


def test_classifier_bad_image_shape_error(tiny_classifier):
    with pytest.raises(ValueError, match="nearest valid sizes: 24 or 32"):
        tiny_classifier(np.zeros((1, 30, 32, 3), "float32"))


def make_preprocessed_classifier():
    converter = keras_aim.AIMImageConverter(image_size=(32, 32))
    preprocessor = keras_aim.AIMImageClassifierPreprocessor(converter)
    classifier = make_tiny_classifier(preprocessor=preprocessor)
    keras_aim.load_official_weights(
        classifier, backbone_file=fixture_path("model.safetensors")
    )
    return classifier


def test_predict_on_raw_uint8_images_of_any_size():
    classifier = make_preprocessed_classifier()
    rng = np.random.RandomState(0)
    for shape in [(2, 50, 70, 3), (1, 97, 33, 3), (3, 32, 32, 3)]:
        raw = rng.randint(0, 256, shape).astype("uint8")
        logits = classifier.predict(raw, verbose=0)
        assert logits.shape == (shape[0], TINY_NUM_CLASSES)
        expected = to_numpy(classifier(classifier.preprocessor(raw)))
        np.testing.assert_allclose(logits, expected, atol=1e-3)


def test_fit_one_step_updates_probe():
    classifier = make_preprocessed_classifier()
    raw = np.random.RandomState(1).randint(0, 256, (4, 40, 40, 3)).astype("uint8")
    before = to_numpy(classifier.probe.linear.kernel)
    history = classifier.fit(raw, np.array([0, 1, 2, 3]), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(before, to_numpy(classifier.probe.linear.kernel))


def test_save_to_preset_round_trip(tmp_path):
    classifier = make_preprocessed_classifier()
    raw = np.random.RandomState(2).randint(0, 256, (2, 45, 60, 3)).astype("uint8")
    expected = classifier.predict(raw, verbose=0)
    preset = str(tmp_path / "tiny_classifier")
    classifier.save_to_preset(preset)
    assert {"config.json", "metadata.json", "model.weights.h5", "task.json",
            "task.weights.h5", "preprocessor.json"} <= set(os.listdir(preset))
    for loader in (keras_hub.models.ImageClassifier, keras_aim.AIMImageClassifier):
        restored = loader.from_preset(preset)
        assert isinstance(restored, keras_aim.AIMImageClassifier)
        assert restored.probe_layers == (2, 3)
        np.testing.assert_array_equal(restored.predict(raw, verbose=0), expected)


def test_keras_file_round_trip(tiny_classifier, reference, tmp_path):
    path = str(tmp_path / "classifier.keras")
    tiny_classifier.save(path)
    restored = keras.saving.load_model(path, compile=False)
    assert isinstance(restored, keras_aim.AIMImageClassifier)
    np.testing.assert_array_equal(
        to_numpy(restored(reference["images_nhwc"])),
        to_numpy(tiny_classifier(reference["images_nhwc"])),
    )


def test_from_preset_unknown_name_and_unreachable_server(monkeypatch):
    from keras_aim.loading import download

    with pytest.raises(ValueError, match="Valid presets"):
        keras_aim.AIMImageClassifier.from_preset("aim_2b", load_weights=False)
    monkeypatch.setattr(download.time, "sleep", lambda seconds: None)
    with pytest.raises(DownloadError, match="aim_600m_2bimgs_attnprobe_backbone"
                       r".*after 5 attempts.*run again to resume"):
        keras_aim.AIMImageClassifier.from_preset("aim_600m")  # no server here


# --- What predict takes: empty batches, memory, scale --------------------------


def with_preprocessor():
    converter = keras_aim.AIMImageConverter(image_size=(32, 32))
    return make_tiny_classifier(keras_aim.AIMImageClassifierPreprocessor(converter))


def test_predict_on_no_images_says_so():
    for model in (make_tiny_backbone(), with_preprocessor()):
        with pytest.raises(ValueError, match=f"{type(model).__name__}.predict received "
                           r"no images \(a batch of shape \(0, 32, 32, 3\)\)"):
            model.predict(np.zeros((0, 32, 32, 3), "float32"), verbose=0)


def allocation_failure():
    """The error each backend raises when an allocation fails (as seen on a
    CPU host; JAX's is produced for real in the test)."""
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        return tf.errors.ResourceExhaustedError(
            None, None, "Graph execution error: OOM when allocating tensor with shape")
    return RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                        "can't allocate memory: you tried to allocate 51682213888 bytes.")


def test_batch_too_large_for_memory_says_so(monkeypatch):
    backbone = make_tiny_backbone(image_shape=(None, None, 3))
    images = np.zeros((64, 512, 512, 3), "float32")
    if keras.config.backend() != "jax":
        # JAX fails for real (one block's attention needs 51 GB, far more
        # than any test machine has: refused at once); the others get their
        # backend's allocator error.
        error = allocation_failure()
        monkeypatch.setattr(keras.Model, "predict", lambda *a, **k: (_ for _ in ()).throw(error))
    with pytest.raises(MemoryError, match=r"AIMBackbone.predict ran out of memory on batches "
                       r"of 64 images of shape \(512, 512, 3\). Pass a smaller batch_size "
                       r"\(now 64\)"):
        backbone.predict(images, batch_size=64, verbose=0)


def test_images_on_the_wrong_scale_are_warned_about_once(monkeypatch):
    import warnings

    from keras_aim.utils import image_inputs

    monkeypatch.setattr(image_inputs, "_warned", set())
    rng = np.random.RandomState(0)
    classifier, backbone = with_preprocessor(), make_tiny_backbone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        classifier.predict((rng.rand(2, 40, 40, 3) * 255).astype("uint8"), verbose=0)
        backbone(rng.randn(2, 32, 32, 3).astype("float32"))
    assert not [w for w in caught if "keras_aim" in str(w.filename) or "scale" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # once only
            classifier.predict(rng.rand(2, 40, 40, 3).astype("float32"), verbose=0)
            backbone(rng.randint(0, 256, (2, 32, 32, 3)).astype("uint8"))
        classifier.predict(rng.randn(2, 40, 40, 3).astype("float32"), verbose=0)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)
                and "AIM" in str(w.message)]
    assert len(messages) == 3, messages
    assert "they look scaled to [0, 1]. Multiply them by 255" in messages[0]
    assert "AIMBackbone takes ImageNet-normalized float images, but received" in messages[1]
    assert "they look normalized already" in messages[2]
