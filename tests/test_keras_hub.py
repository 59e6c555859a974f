"""keras-hub's own model test harness (`keras_hub.src.tests.test_case`) on
every model family, every layer and the preprocessing; presets listed the
keras-hub way.

The harness runs on all three backends. Its checks that stay off, and why:
- `run_vision_backbone_test(run_data_format_check=False)`: AIM models take
  channels-last images only, as the released weights do.
- keras-hub itself skips mixed precision on PyTorch without a GPU and its
  quantization check on PyTorch (tests/test_quantization.py quantizes on
  every backend).
"""

import keras
from keras_hub.src.tests import test_case

import keras_aim
from tests.conftest import TINY_CONFIG, TINY_NUM_CLASSES
from tests.model_families import FAMILIES, ModelFamily
from tests.test_layers import ROUND_TRIP_CASES


def harness_tests(family: ModelFamily) -> type:
    """keras-hub's harness on one family's tiny models."""

    class FamilyHarness(test_case.TestCase):
        def test_vision_backbone(self):
            self.run_vision_backbone_test(
                cls=family.backbone_cls,
                init_kwargs=dict(family.backbone_config),
                input_data=family.images(2),
                expected_output_shape=(2, family.num_tokens, family.hidden_dim),
                run_mixed_precision_check=True,
                run_quantization_check=True,
                run_data_format_check=False,
            )

        def test_classifier_task_with_preprocessor(self):
            if family.classifier_cls is None:
                self.skipTest(f"{family.name} has no image classifier")
            labels = keras.ops.convert_to_numpy(keras.ops.arange(4) % family.num_classes)
            self.run_task_test(
                cls=family.classifier_cls,
                init_kwargs={
                    "backbone": family.backbone(),
                    "preprocessor": family.preprocessor(),
                    **family.classifier_kwargs,
                },
                train_data=(family.raw_images(4), labels),
                expected_output_shape=(4, family.num_classes),
            )

        def test_classifier_without_preprocessor_predicts_and_fits(self):
            if family.classifier_cls is None:
                self.skipTest(f"{family.name} has no image classifier")
            classifier = family.classifier()
            images = family.images(4)
            self.assertEqual(
                classifier.predict(images, verbose=0).shape, (4, family.num_classes)
            )
            history = classifier.fit(
                images, keras.ops.convert_to_numpy(keras.ops.arange(4) % family.num_classes),
                epochs=1, verbose=0,
            )
            self.assertTrue(keras.ops.all(keras.ops.isfinite(history.history["loss"])))

        def test_model_saving(self):
            images = family.images(2)
            self.run_model_saving_test(
                cls=family.backbone_cls, init_kwargs=dict(family.backbone_config),
                input_data=images,
            )
            if family.classifier_cls is not None:
                self.run_model_saving_test(
                    cls=family.classifier_cls,
                    init_kwargs={"backbone": family.backbone(), **family.classifier_kwargs},
                    input_data=images,
                )
            if family.pretrainer_cls is not None:
                self.run_model_saving_test(
                    cls=family.pretrainer_cls,
                    init_kwargs={"backbone": family.backbone(), **family.pretrainer_kwargs},
                    input_data=images,
                )

        def test_local_preset(self):
            images = family.images(2)
            backbone_dir = self.get_temp_dir() + "/backbone_preset"
            family.backbone().save_to_preset(backbone_dir)
            self.run_preset_test(
                cls=family.backbone_cls,
                preset=backbone_dir,
                input_data=images,
                expected_output_shape=(2, family.num_tokens, family.hidden_dim),
            )
            if family.classifier_cls is not None:
                classifier_dir = self.get_temp_dir() + "/classifier_preset"
                family.classifier(preprocessor=True).save_to_preset(classifier_dir)
                self.run_preset_test(
                    cls=family.classifier_cls,
                    preset=classifier_dir,
                    input_data=images,
                    expected_output_shape=(2, family.num_classes),
                )

        def test_serialization_of_models_and_preprocessing(self):
            self.run_serialization_test(family.backbone())
            if family.classifier_cls is not None:
                self.run_serialization_test(family.classifier(preprocessor=True))
            if family.preprocessor_cls is not None:
                self.run_serialization_test(family.preprocessor())
                self.run_serialization_test(family.converter(family.image_shape[:2]))
            if family.pretrainer_cls is not None:
                self.run_serialization_test(family.pretrainer())

    FamilyHarness.__name__ = FamilyHarness.__qualname__ = f"{family.name.upper()}HarnessTest"
    return FamilyHarness


for _family in FAMILIES:
    globals()[f"{_family.name.upper()}HarnessTest"] = harness_tests(_family)
del _family


class LayerHarnessTest(test_case.TestCase):
    def test_serialization_of_every_layer(self):
        for name, (make, _) in sorted(ROUND_TRIP_CASES.items()):
            with self.subTest(layer=name):
                self.run_serialization_test(make())


def test_presets_are_listed_the_keras_hub_way(monkeypatch):
    from keras_aim.models.aim import aim_presets

    for cls, kind in ((keras_aim.AIMBackbone, "backbone"),
                      (keras_aim.AIMImageClassifier, "classifier")):
        presets = cls.presets
        assert presets == aim_presets.listing(kind)
        assert sorted(presets) == sorted(aim_presets.AIM_PRESETS)
        for name, preset in presets.items():
            metadata = preset["metadata"]
            assert {"description", "params", "image_size", "source", "license"} <= set(metadata)
            assert metadata["image_size"] == (224, 224)
            assert metadata["source"] == "https://huggingface.co/apple/AIM"
            trunk = aim_presets.AIM_PRESETS[name]["trunk_params"]
            if kind == "backbone":
                assert metadata["params"] == trunk
            else:
                assert metadata["params"] > trunk and "probe" in metadata["description"]
    # The counts are those of the built models (a tiny registered preset).
    monkeypatch.setitem(aim_presets.AIM_PRESETS, "tiny", None)
    aim_presets.register_preset(
        "tiny", dict(TINY_CONFIG), {"backbone": ("b.pth", "0")}, (2, 3), (2, 3),
        num_classes=TINY_NUM_CLASSES,
    )
    classifier = keras_aim.AIMImageClassifier.from_preset("tiny", load_weights=False)
    listed = {
        cls: cls.presets["tiny"]["metadata"]
        for cls in (keras_aim.AIMBackbone, keras_aim.AIMImageClassifier)
    }
    assert listed[keras_aim.AIMBackbone]["params"] == classifier.backbone.count_params()
    # Trunk and probe (on PyTorch, keras-hub's Task does not track its
    # backbone, so classifier.count_params() leaves out the unused final norm).
    assert listed[keras_aim.AIMImageClassifier]["params"] == (
        classifier.backbone.count_params() + classifier.probe.count_params()
    )
    assert listed[keras_aim.AIMBackbone]["image_size"] == (32, 32)
