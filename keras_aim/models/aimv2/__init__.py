"""AIMv2: Apple's multimodal autoregressive vision encoders (arXiv
2411.14402) and the LiT image-text model built on one.

    aimv2_presets.py                  the 16 released models as data (no Keras)
    aimv2_image_converter.py          evaluation preprocessing ("clip" / "apple")
    aimv2_image_classifier_preprocessor.py
    convert_aimv2.py                  Apple's and transformers' key names -> variables
    aimv2_backbone.py                 AIMv2Backbone (+ converting releases into the cache)
    aimv2_image_classifier.py         AIMv2ImageClassifier (trunk + attentive probe)
    aimv2_tokenizer.py                AIMv2Tokenizer (keras-hub's CLIPTokenizer)
    aimv2_lit.py                      AIMv2TextEncoder, AIMv2LiT, zero_shot_classifier
"""

from keras_aim.utils.lazy_imports import lazy_attributes

_HERE = "keras_aim.models.aimv2"
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "AIMv2Backbone": f"{_HERE}.aimv2_backbone:AIMv2Backbone",
        "AIMv2ImageClassifier": f"{_HERE}.aimv2_image_classifier:AIMv2ImageClassifier",
        "AIMv2ImageClassifierPreprocessor":
            f"{_HERE}.aimv2_image_classifier_preprocessor:AIMv2ImageClassifierPreprocessor",
        "AIMv2ImageConverter": f"{_HERE}.aimv2_image_converter:AIMv2ImageConverter",
        "AIMv2LiT": f"{_HERE}.aimv2_lit:AIMv2LiT",
        "AIMv2TextEncoder": f"{_HERE}.aimv2_lit:AIMv2TextEncoder",
        "AIMv2Tokenizer": f"{_HERE}.aimv2_tokenizer:AIMv2Tokenizer",
        "AIMV2_PRESETS": f"{_HERE}.aimv2_presets:AIMV2_PRESETS",
        "load_aimv2_weights": f"{_HERE}.convert_aimv2:load_aimv2_weights",
        "zero_shot_classifier": f"{_HERE}.aimv2_lit:zero_shot_classifier",
    },
)
