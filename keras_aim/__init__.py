"""keras_aim: AIM (Autoregressive Image Models) for Keras 3 on any backend."""

from keras_aim.version import __version__
from keras_aim import layers
from keras_aim.backbone import AIMBackbone
from keras_aim.classifier import AIMImageClassifier, resolve_probe_layers
from keras_aim.conversion import WeightLoadingError, load_official_weights
from keras_aim.preprocessing import (
    AIMImageClassifierPreprocessor,
    AIMImageConverter,
)
from keras_aim.presets import AIM_PRESETS, trunk_parameter_count
from keras_aim import distribution, losses
from keras_aim.pretrainer import AIMPretrainer, pretraining_optimizer

__all__ = [
    "AIM_PRESETS",
    "AIMBackbone",
    "AIMImageClassifier",
    "AIMImageClassifierPreprocessor",
    "AIMImageConverter",
    "AIMPretrainer",
    "WeightLoadingError",
    "__version__",
    "distribution",
    "layers",
    "load_official_weights",
    "losses",
    "pretraining_optimizer",
    "resolve_probe_layers",
    "trunk_parameter_count",
]
