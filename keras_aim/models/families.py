"""One entry point over the model families, for code that takes a preset of
either (the `keras-aim` command, the recipes): the backbone of a preset, the
classifier task and the evaluation preprocessing that belong to a backbone.
"""

from __future__ import annotations

import json
import os

from keras_aim.models.aim import aim_presets
from keras_aim.models.aim.aim_backbone import AIMBackbone
from keras_aim.models.aim.aim_image_classifier import AIMImageClassifier
from keras_aim.models.aim.aim_image_converter import AIMImageConverter
from keras_aim.models.aimv2 import aimv2_presets
from keras_aim.models.aimv2.aimv2_backbone import AIMv2Backbone
from keras_aim.models.aimv2.aimv2_image_classifier import AIMv2ImageClassifier
from keras_aim.models.aimv2.aimv2_image_converter import AIMv2ImageConverter

BACKBONES = {"AIMBackbone": AIMBackbone, "AIMv2Backbone": AIMv2Backbone}


def backbone_class(preset) -> type:
    """`AIMBackbone` or `AIMv2Backbone`, whichever `preset` (a released
    name, a folder of AIM-v1 release files, or a keras-hub preset folder)
    belongs to; `AIMBackbone` for handles it cannot look into."""
    if aimv2_presets.is_preset_name(preset):
        return AIMv2Backbone
    if isinstance(preset, str) and preset in aim_presets.AIM_PRESETS:
        return AIMBackbone
    config = os.path.join(str(preset), "config.json")
    if os.path.isfile(config):
        with open(config) as handle:
            name = json.load(handle).get("class_name")
        if name not in BACKBONES:
            raise ValueError(
                f"{preset} holds a {name}, not an AIM or AIMv2 backbone "
                f"({', '.join(BACKBONES)})."
            )
        return BACKBONES[name]
    if isinstance(preset, str) and "://" not in preset and not os.path.exists(preset):
        names = [*aim_presets.AIM_PRESETS, *aimv2_presets.AIMV2_PRESETS]
        raise ValueError(
            f"Unknown preset {preset!r}. Valid presets: {', '.join(names)}; or "
            "pass a local preset directory or a kaggle:// / hf:// handle."
        )
    return AIMBackbone


def backbone_from_preset(preset, **kwargs):
    """The backbone of any family's preset (`from_preset` of its class)."""
    return backbone_class(preset).from_preset(preset, **kwargs)


def classifier_class(backbone) -> type:
    """The attentive-probe classifier task of `backbone`'s family."""
    return AIMv2ImageClassifier if isinstance(backbone, AIMv2Backbone) else AIMImageClassifier


def evaluation_converter(backbone, image_size) -> AIMImageConverter:
    """The evaluation preprocessing of `backbone`'s family, cropping to
    `image_size` (a side or `(height, width)`; AIMv2: the presets' "clip"
    pipeline)."""
    size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size,) * 2
    if isinstance(backbone, AIMv2Backbone):
        return AIMv2ImageConverter(image_size=size)
    return AIMImageConverter(image_size=size)
