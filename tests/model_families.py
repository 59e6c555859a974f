"""The model families the keras-hub harness, quantization, export and
feature-API tests run on, each as a tiny configuration.

A family joins these tests with one `ModelFamily(...)` entry in `FAMILIES`
(its backbone class and tiny config, and its classifier, preprocessing and
pre-training classes where it has them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import pytest

import keras_aim


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """How to build a family's tiny models.

    Attributes:
        name: the family, for test ids.
        backbone_cls: its backbone class.
        backbone_config: constructor arguments of a tiny backbone, with a
            fixed `image_shape`.
        classifier_cls: its image classifier class, or `None`.
        classifier_kwargs: constructor arguments besides `backbone` and
            `preprocessor` (e.g. `num_classes`).
        converter: builds the family's image converter for a crop size, or
            `None`.
        preprocessor_cls: its `ImageClassifierPreprocessor`, or `None`.
        pretrainer_cls, pretrainer_kwargs: its pre-training task, or `None`.
        raw_image_size: `(height, width)` of the uint8 images given to the
            preprocessor.
    """

    name: str
    backbone_cls: type
    backbone_config: dict[str, Any]
    classifier_cls: type | None = None
    classifier_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    converter: Callable[[tuple[int, int]], Any] | None = None
    preprocessor_cls: type | None = None
    pretrainer_cls: type | None = None
    pretrainer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    raw_image_size: tuple[int, int] = (40, 48)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.backbone_config["image_shape"])

    @property
    def num_tokens(self) -> int:
        height, width, _ = self.image_shape
        patch = self.backbone_config["patch_size"]
        return (height // patch) * (width // patch)

    @property
    def hidden_dim(self) -> int:
        return self.backbone_config["hidden_dim"]

    @property
    def num_classes(self) -> int:
        return self.classifier_kwargs["num_classes"]

    def backbone(self, **overrides):
        return self.backbone_cls(**{**self.backbone_config, **overrides})

    def preprocessor(self):
        return self.preprocessor_cls(self.converter(self.image_shape[:2]))

    def classifier(self, preprocessor: bool = False, **backbone_overrides):
        return self.classifier_cls(
            backbone=self.backbone(**backbone_overrides),
            preprocessor=self.preprocessor() if preprocessor else None,
            **self.classifier_kwargs,
        )

    def pretrainer(self):
        return self.pretrainer_cls(backbone=self.backbone(), **self.pretrainer_kwargs)

    def images(self, batch: int, seed: int = 0) -> np.ndarray:
        """Normalized-looking float32 images `(batch, H, W, C)`."""
        rng = np.random.RandomState(seed)
        return rng.normal(size=(batch, *self.image_shape)).astype("float32")

    def raw_images(self, batch: int, seed: int = 0) -> np.ndarray:
        """uint8 images of `raw_image_size`, for the preprocessor."""
        rng = np.random.RandomState(seed)
        shape = (batch, *self.raw_image_size, self.image_shape[-1])
        return rng.randint(0, 256, shape).astype("uint8")


AIM_V1 = ModelFamily(
    name="aim",
    backbone_cls=keras_aim.AIMBackbone,
    # Smaller than the reference model (tests/fixtures): two blocks compile fast.
    backbone_config=dict(
        image_shape=(16, 16, 3), patch_size=8, hidden_dim=32, num_layers=2, num_heads=2
    ),
    classifier_cls=keras_aim.AIMImageClassifier,
    classifier_kwargs=dict(num_classes=5, probe_layers=2),
    converter=lambda size: keras_aim.AIMImageConverter(image_size=size),
    preprocessor_cls=keras_aim.AIMImageClassifierPreprocessor,
    pretrainer_cls=keras_aim.AIMPretrainer,
    pretrainer_kwargs=dict(pixel_head_width=16, pixel_head_depth=1, seed=0),
    # Shorter side 18 = the converter's resize size for a 16 crop: only the
    # center crop runs, so the backend and tf.data give identical pixels (the
    # harness compares them at 1e-6; their bicubic resizes differ by ~1e-5).
    raw_image_size=(18, 20),
)

FAMILIES = [AIM_V1]

# `@each_family` runs a test once per family, with the family as `family`.
each_family = pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
