"""`AIMv2ImageClassifier`: an AIMv2 trunk + an attentive probe."""

from __future__ import annotations

import keras

from keras_aim.models.aim.aim_image_classifier import AIMImageClassifier
from keras_aim.models.aimv2 import aimv2_presets
from keras_aim.models.aimv2.aimv2_backbone import AIMv2Backbone, evaluation_preprocessor
from keras_aim.models.aimv2.aimv2_image_classifier_preprocessor import (
    AIMv2ImageClassifierPreprocessor,
)
from keras_aim.utils.class_properties import classproperty


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMv2ImageClassifier(AIMImageClassifier):
    """AIMv2 trunk + attentive probe over the average of several blocks.

    The same task as `AIMImageClassifier` (block outputs before the final
    norm, averaged, pooled by `AIMAttentionProbe`, a linear classifier) on
    an `AIMv2Backbone`. Apple released no probe heads for AIMv2, so the
    probe starts untrained: train it with the attentive-probe recipe
    (`python -m recipes.attentive_probe --backbone aimv2_large_patch14_224`)
    or `keras_aim.probing`.

    Args:
        backbone: an `AIMv2Backbone`.
        num_classes: number of classes.
        probe_layers: `"last"` (last 6 blocks), an int n (last n blocks) or
            block indices.
        preprocessor: optional `AIMv2ImageClassifierPreprocessor`.
        activation: optional activation on the logits.
        head_dtype: dtype policy of the probe; the backbone's by default.
    """

    backbone_cls = AIMv2Backbone
    preprocessor_cls = AIMv2ImageClassifierPreprocessor

    @classproperty
    def presets(cls) -> dict:
        """Empty: Apple released no AIMv2 classifier heads, so no preset is
        a whole classifier (`from_preset(name, num_classes=N)` puts a new
        probe on any of `AIMv2Backbone.presets`)."""
        return aimv2_presets.listing("classifier")

    @classmethod
    def from_preset(
        cls, preset: str, load_weights: bool = True, allow_partial: bool = False, **kwargs
    ):
        """An untrained probe on a preset's trunk: for a released AIMv2
        preset name, `num_classes` is required (there are no released
        heads) and the evaluation preprocessor is attached. Other presets
        (directories, handles) go through keras-hub (`allow_partial` as in
        `AIMImageClassifier.from_preset`)."""
        if not aimv2_presets.is_preset_name(preset):
            return super().from_preset(
                preset, load_weights=load_weights, allow_partial=allow_partial, **kwargs
            )
        if "num_classes" not in kwargs:
            raise ValueError(
                f"Apple released no classifier heads for AIMv2; pass "
                f"num_classes=N to put a new, untrained probe on {preset}'s "
                "trunk (train it with recipes.attentive_probe)."
            )
        backbone_kwargs = {
            k: kwargs.pop(k)
            for k in ("dtype", "image_shape", "resample_position_embedding", "remat")
            if k in kwargs
        }
        kwargs.setdefault("preprocessor", evaluation_preprocessor(preset))
        backbone = AIMv2Backbone.from_preset(
            preset, load_weights=load_weights, **backbone_kwargs
        )
        return cls(backbone=backbone, **kwargs)
