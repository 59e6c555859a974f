"""`AIMImageClassifierPreprocessor`: the AIM image converter applied to
images, labels passed through (keras-hub's `ImageClassifierPreprocessor`)."""

from __future__ import annotations

import keras
from keras_hub.models import ImageClassifierPreprocessor

from keras_aim.models.aim.aim_image_converter import AIMImageConverter


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMImageClassifierPreprocessor(ImageClassifierPreprocessor):
    """Applies `AIMImageConverter` to images, passing labels through.

    Its `backbone_cls` is set by `aim_backbone` (see `aim_image_converter`).
    """

    image_converter_cls = AIMImageConverter
