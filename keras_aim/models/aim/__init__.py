"""AIM-v1: the autoregressive image models of Apple's ICML 2024 paper.

    aim_presets.py                the released models as data (no Keras)
    aim_image_converter.py        evaluation preprocessing
    aim_image_classifier_preprocessor.py
    convert_aim.py                released key names -> Keras variables
    aim_backbone.py               AIMBackbone (+ converting releases into the cache)
    aim_image_classifier.py       AIMImageClassifier (trunk + attentive probe)
    aim_pretrainer.py             AIMPretrainer (pixel head + loss, for `fit`)
"""

from keras_aim.utils.lazy_imports import lazy_attributes

_HERE = "keras_aim.models.aim"
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "AIMBackbone": f"{_HERE}.aim_backbone:AIMBackbone",
        "AIMImageClassifier": f"{_HERE}.aim_image_classifier:AIMImageClassifier",
        "AIMImageClassifierPreprocessor":
            f"{_HERE}.aim_image_classifier_preprocessor:AIMImageClassifierPreprocessor",
        "AIMImageConverter": f"{_HERE}.aim_image_converter:AIMImageConverter",
        "AIMPretrainer": f"{_HERE}.aim_pretrainer:AIMPretrainer",
        "AIM_PRESETS": f"{_HERE}.aim_presets:AIM_PRESETS",
        "load_official_weights": f"{_HERE}.convert_aim:load_official_weights",
    },
)
