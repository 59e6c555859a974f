"""`model.quantize(mode)`: every Dense kernel and the fused qkv quantized,
outputs near float32, quantized presets, LoRA on a quantized trunk."""

import keras
import numpy as np
import pytest

from tests.conftest import to_numpy
from tests.model_families import each_family

# The largest logit deviation of int8 from float32 on the reference model
# (docs/quantization.md measures 0.07; the tolerance leaves headroom for
# other CPUs' rounding).
INT8_LOGIT_TOLERANCE = 0.2


def kernel_layers(model) -> list:
    """Every layer with a Dense-style kernel (Dense and its subclasses, such
    as the fused qkv, and EinsumDense)."""
    return [
        layer for layer in model._flatten_layers()
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
    ]


@each_family
@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
def test_quantize_reaches_every_kernel_including_fused_qkv(family, mode):
    classifier = family.classifier()
    images = family.images(2)
    classifier.quantize(mode)
    layers = kernel_layers(classifier)
    assert any(type(layer) is not keras.layers.Dense for layer in layers)  # fused qkv
    for layer in layers:
        assert layer.quantization_mode == mode, layer.path
        if mode != "float8":  # float8 keeps float kernels and scales the matmul
            assert keras.backend.standardize_dtype(layer._kernel.dtype) == "int8", layer.path
    assert np.isfinite(to_numpy(classifier(images))).all()


def test_int8_logits_stay_near_float32_on_the_reference_model(tiny_classifier, reference):
    images = reference["images_nhwc"]
    expected = to_numpy(tiny_classifier(images))
    np.testing.assert_allclose(expected, reference["logits"], atol=1e-4)
    tiny_classifier.quantize("int8")
    got = to_numpy(tiny_classifier(images))
    assert np.abs(got - expected).max() < INT8_LOGIT_TOLERANCE
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))


@each_family
def test_quantized_models_round_trip_presets_exactly(family, tmp_path):
    images = family.images(2)
    models = {"backbone": family.backbone()}
    if family.classifier_cls is not None:
        models["classifier"] = family.classifier(preprocessor=True)
    for kind, model in models.items():
        model.quantize("int8")
        expected = to_numpy(model(images))
        model.save_to_preset(str(tmp_path / kind))
        loaded = type(model).from_preset(str(tmp_path / kind))
        np.testing.assert_array_equal(to_numpy(loaded(images)), expected)
        assert {layer.quantization_mode for layer in kernel_layers(loaded)} == {"int8"}


@each_family
def test_lora_on_an_int8_trunk_trains(family):
    classifier = family.classifier()
    images = family.images(16, seed=1)
    labels = np.arange(16) % family.num_classes
    classifier.quantize("int8")
    frozen = {
        layer.path: to_numpy(layer._kernel).copy() for layer in kernel_layers(classifier.backbone)
    }
    before = to_numpy(classifier(images))
    classifier.backbone.enable_lora(4)
    np.testing.assert_allclose(to_numpy(classifier(images)), before, atol=1e-6)  # B starts at 0
    classifier.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    losses = classifier.fit(images, labels, batch_size=8, epochs=8, verbose=0).history["loss"]
    assert losses[-1] < 0.8 * losses[0], losses
    for layer in kernel_layers(classifier.backbone):
        np.testing.assert_array_equal(to_numpy(layer._kernel), frozen[layer.path])
    adapters = [w for w in classifier.backbone.trainable_weights if "lora_kernel_b" in w.path]
    assert adapters and all(np.abs(to_numpy(w)).max() > 0 for w in adapters)
