"""`AIMv2ImageClassifierPreprocessor`: the AIMv2 image converter applied to
images, labels passed through (keras-hub's `ImageClassifierPreprocessor`)."""

from __future__ import annotations

import keras
from keras_hub.models import ImageClassifierPreprocessor

from keras_aim.models.aimv2.aimv2_image_converter import AIMv2ImageConverter


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMv2ImageClassifierPreprocessor(ImageClassifierPreprocessor):
    """Applies `AIMv2ImageConverter` to images, passing labels through.

    Its `backbone_cls` is set by `aimv2_backbone`.
    """

    image_converter_cls = AIMv2ImageConverter
