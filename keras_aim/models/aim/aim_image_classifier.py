"""`AIMImageClassifier`: AIM trunk + the released attentive probe."""

from __future__ import annotations

import os
from typing import Sequence, Union

import keras
from keras_hub.models import ImageClassifier, Task

from keras_aim.layers import AIMAttentionProbe
from keras_aim.loading import preset_cache, preset_folder
from keras_aim.loading.lean_loading import limit_heap_fragmentation
from keras_aim.loading.preset_dtype import saved_policy_map
from keras_aim.loading.strict_weights import StrictWeights, check_weights_file, preset_weights
from keras_aim.models.aim import aim_presets
from keras_aim.models.aim.aim_backbone import (
    AIMBackbone,
    cached_release_preset,
    checked_predict,
    evaluation_preprocessor,
)
from keras_aim.models.aim.aim_image_classifier_preprocessor import (
    AIMImageClassifierPreprocessor,
)
from keras_aim.models.aim.aim_presets import (
    AIM_PRESETS,
    HEAD_KINDS,
    PROBE_NUM_BLOCKS,
    get_preset,
    preset_for_architecture,
)
from keras_aim.models.aim.convert_aim import load_official_weights
from keras_aim.models.intermediates import ClassifierIntermediates
from keras_aim.models.quantization import QuantizeNetworkOnly, head_dtype_policy
from keras_aim.utils import image_inputs
from keras_aim.utils.class_properties import classproperty

ProbeLayers = Union[str, int, Sequence[int]]


def resolve_probe_layers(probe_layers: ProbeLayers, backbone) -> tuple[int, ...]:
    """Block indices the probe averages.

    `"last"`: a preset's released "last" blocks, else the last 6 (all of
    them if the trunk has fewer); `"best"`: the presets' best blocks (spec
    table); an int n: the last n blocks; a sequence: explicit block
    indices (negative count from the end).
    """
    depth = backbone.num_layers
    if isinstance(probe_layers, str):
        name = preset_for_architecture(backbone.get_config())
        if probe_layers == "last":
            if name is not None:
                return AIM_PRESETS[name]["last_probe_layers"]
            start = max(depth - PROBE_NUM_BLOCKS, 0)
            return tuple(range(start, depth))
        if probe_layers == "best":
            if name is None:
                raise ValueError(
                    "probe_layers='best' is defined only for the released "
                    f"architectures ({', '.join(AIM_PRESETS)}); this trunk "
                    f"(hidden_dim={backbone.hidden_dim}, num_layers={depth}) "
                    "is not one of them. Pass explicit block indices, e.g. "
                    "probe_layers=(2, 3)."
                )
            return AIM_PRESETS[name]["best_probe_layers"]
        raise ValueError(
            f"probe_layers must be 'last', 'best', an int or block indices; "
            f"received {probe_layers!r}."
        )
    if isinstance(probe_layers, int) and not isinstance(probe_layers, bool):
        if not 1 <= probe_layers <= depth:
            raise ValueError(
                f"probe_layers={probe_layers} asks for the last "
                f"{probe_layers} blocks of a {depth}-block trunk; use 1.."
                f"{depth}."
            )
        return tuple(range(depth - probe_layers, depth))
    indices = backbone.normalize_block_indices(list(probe_layers))
    if not indices:
        raise ValueError("probe_layers is empty; name at least one block.")
    if len(set(indices)) != len(indices):
        raise ValueError(
            f"probe_layers {tuple(probe_layers)} names a block twice; each "
            "block may be averaged once."
        )
    return tuple(indices)


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMImageClassifier(
    ClassifierIntermediates, QuantizeNetworkOnly, StrictWeights, ImageClassifier
):
    """AIM trunk + attentive probe over the average of several blocks.

    Calling the classifier takes ImageNet-normalized float images of the
    trunk's size; `fit`, `evaluate` and `predict` of a classifier with a
    `preprocessor` take pixels in [0, 255] (uint8 or float) of any size and
    preprocess them. Images on the other scale are warned about once.

    images `(B, H, W, C)` -> block outputs (before `post_trunk_norm`) of
    `probe_layers`, averaged `(B, N, D)` -> `AIMAttentionProbe` ->
    logits `(B, num_classes)`.

    Args:
        backbone: an `AIMBackbone`.
        num_classes: number of classes (1000 for the released heads).
        probe_layers: `"last"` (last 6 blocks), `"best"` (the released
            presets' best 6), an int n (last n blocks) or block indices.
        preprocessor: optional `AIMImageClassifierPreprocessor`; with it,
            `predict` takes raw uint8 images of any size.
        activation: optional activation on the logits (e.g. "softmax").
        head_dtype: dtype policy of the probe; the backbone's by default.
    """

    backbone_cls = AIMBackbone
    preprocessor_cls = AIMImageClassifierPreprocessor

    def __init__(
        self,
        backbone: AIMBackbone,
        num_classes: int,
        probe_layers: ProbeLayers = "last",
        preprocessor: AIMImageClassifierPreprocessor | None = None,
        activation=None,
        head_dtype=None,
        **kwargs,
    ):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"num_classes must be a positive int; received {num_classes!r}."
            )
        indices = resolve_probe_layers(probe_layers, backbone)
        head_dtype = head_dtype or backbone.dtype_policy

        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.probe = AIMAttentionProbe(
            backbone.hidden_dim,
            num_classes,
            backbone.num_heads,
            activation=activation,
            dtype=head_dtype,
            name="probe",
        )

        # === Functional Model ===
        inputs = backbone.input
        self.block_average = None
        if len(indices) > 1:
            self.block_average = keras.layers.Average(
                dtype=head_dtype, name="block_average"
            )
        outputs = self.probe(
            self._average_blocks([backbone.block_output_tensors[i] for i in indices])
        )
        Task.__init__(self, inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.num_classes = num_classes
        self.probe_layers = indices
        self.activation = activation
        self.head_dtype = head_dtype

    def __call__(self, images, *args, **kwargs):
        if hasattr(images, "shape"):
            self.backbone.check_images(images, exact_size=True)
            image_inputs.warn_if_wrong_scale(images, type(self).__name__, False)
        return super().__call__(images, *args, **kwargs)

    def predict(self, x, batch_size=None, *args, **kwargs):
        """`keras.Model.predict`: with a preprocessor, `x` is pixels in
        [0, 255] (uint8 or float) of any size; without one, normalized
        images. Zero images, images on the other scale (a warning) and
        batches too large for memory are reported clearly."""
        return checked_predict(
            self, x, batch_size, self.preprocessor is not None, super().predict,
            *args, **kwargs,
        )

    # --- forward_intermediates (see keras_aim.models.intermediates) -------

    def _average_blocks(self, features: list):
        return self.block_average(features) if self.block_average else features[0]

    @property
    def head_blocks(self) -> tuple[int, ...]:
        """The blocks the probe averages."""
        return self.probe_layers

    def pre_logits(self, block_outputs: dict, training: bool = False):
        """The probe's pooled features `(B, D)`, before its linear layer,
        from `{block index: (B, N, D)}` of the `head_blocks`."""
        features = self._average_blocks([block_outputs[i] for i in self.head_blocks])
        return self.probe.pool(features, training=training)

    def logits_from_pre_logits(self, pre_logits):
        """The probe's linear layer (and activation, if any): `(B, classes)`."""
        return self.probe.activation(self.probe.linear(pre_logits))

    @classproperty
    def presets(cls) -> dict:
        """Every released classifier (trunk + released probe) in keras-hub's
        format; the parameter counts include the probe
        (`aim_presets.listing("classifier")`)."""
        return aim_presets.listing("classifier")

    # The same LayoutMap covers the trunk and the attentive probe.
    get_layout_map = staticmethod(AIMBackbone.get_layout_map)

    def get_config(self):
        config = Task.get_config(self)
        config.update(
            {
                "num_classes": self.num_classes,
                "probe_layers": list(self.probe_layers),
                "activation": keras.activations.serialize(
                    keras.activations.get(self.activation)
                ),
                "head_dtype": keras.dtype_policies.serialize(
                    head_dtype_policy(self.probe, self.head_dtype)
                ),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("head_dtype"), dict):
            config["head_dtype"] = keras.dtype_policies.get(config["head_dtype"])
        return super().from_config(config)

    def load_task_weights(self, filepath) -> None:
        """Loads the probe's weights (`save_task_weights`' file) after
        checking that the file holds exactly this probe's variables."""
        check_weights_file(self, filepath, objects_to_skip=list(self.backbone._flatten_layers()))
        super().load_task_weights(filepath)

    @classmethod
    def from_preset(
        cls, preset: str, load_weights: bool = True, allow_partial: bool = False, **kwargs
    ):
        """Builds the classifier from a preset.

        For a released preset name (`aim_600m`, ...) or a directory of
        released files: the trunk, the released 1000-class attentive probe
        (`probe_layers="best"` unless given; `"last"` is the other released
        head) and the evaluation preprocessor, with weights downloaded,
        verified and cached on first use. Passing `num_classes` builds a new,
        untrained probe instead (as keras-hub does). Local keras-hub preset
        directories and `kaggle://` / `hf://` handles go through keras-hub,
        strictly both ways unless `allow_partial=True` (see
        `AIMBackbone.from_preset`).
        """
        name, release_dir = aim_presets.resolve_release(preset)
        if name is None:
            if preset_folder.is_local_path(preset):
                _check_classifier_folder(preset, load_weights, kwargs)
            limit_heap_fragmentation()  # keeps loading near 1x the weights
            if kwargs.get("dtype") is None and saved_policy_map(preset) is not None:
                kwargs["dtype"] = saved_policy_map(preset)  # a quantized preset
            with preset_weights(preset, allow_partial, kwargs):
                return super().from_preset(preset, load_weights=load_weights, **kwargs)
        entry = get_preset(name)
        backbone_kwargs = {
            k: kwargs.pop(k) for k in ("dtype", "image_shape") if k in kwargs
        }
        new_probe = "num_classes" in kwargs
        kwargs.setdefault("num_classes", entry["num_classes"])
        kwargs.setdefault("probe_layers", "best")
        kwargs.setdefault("preprocessor", evaluation_preprocessor(name))
        if not load_weights:
            backbone = AIMBackbone(**{**entry["config"], **backbone_kwargs})
            return cls(backbone=backbone, **kwargs)

        head = None if new_probe else released_head_kind(entry, kwargs["probe_layers"])
        backbone_dir = cached_release_preset(
            AIMBackbone, name, backbone_kwargs.get("dtype"), release_dir
        )
        backbone = AIMBackbone.from_preset(backbone_dir, **backbone_kwargs)
        classifier = cls(backbone=backbone, **kwargs)
        if head is not None:
            load_released_head(classifier, name, head, backbone_dir, release_dir)
        return classifier


def _check_classifier_folder(preset, load_weights: bool, kwargs: dict) -> None:
    """A local preset folder for the classifier: complete, and either a
    classifier (task.json) or a trunk that `num_classes` puts a new probe
    on (then without preprocessor if the folder has none)."""
    preset_folder.check_preset_folder(preset, load_weights)
    if preset_folder.has_task(preset):
        return
    if "num_classes" not in kwargs:
        raise preset_folder.PresetFolderError(
            f"{os.fspath(preset)!r} holds a trunk (no task.json), not a "
            "classifier. Pass num_classes=N (and probe_layers) to put a new, "
            "untrained probe on it, or load it with AIMBackbone.from_preset."
        )
    if not preset_folder.has_preprocessor(preset):
        kwargs.setdefault("preprocessor", None)


def load_released_head(
    classifier: AIMImageClassifier,
    name: str,
    kind: str,
    backbone_dir: str,
    release_dir: str | None = None,
    progress: bool = True,
) -> None:
    """Fills `classifier`'s probe with preset `name`'s released `kind` head
    ("best" or "last"), converting it into the cache on first use."""
    filename, sha256 = get_preset(name)["files"][f"head_{kind}"]

    def write(staging: str) -> None:
        source = preset_cache.release_file(
            filename, sha256, aim_presets.RELEASE_BASE_URL, release_dir, progress
        )
        load_official_weights(classifier, head_file=source)
        classifier.save_task_weights(staging)

    # The cached head may come from another process (which wrote it while
    # this one waited): always load it from the cache.
    cached = preset_cache.cached_file(preset_cache.head_cache_path(backbone_dir, kind), write)
    classifier.load_task_weights(cached)


def released_head_kind(entry: dict, probe_layers: ProbeLayers) -> str:
    """Which released head ("best" or "last") matches `probe_layers`."""
    for kind in HEAD_KINDS:
        if probe_layers == kind or (
            not isinstance(probe_layers, str)
            and tuple(probe_layers) == entry[f"{kind}_probe_layers"]
        ):
            if f"head_{kind}" not in entry["files"]:
                break
            return kind
    available = ", ".join(
        f"'{k}' {entry[f'{k}_probe_layers']}"
        for k in HEAD_KINDS
        if f"head_{k}" in entry["files"]
    )
    raise ValueError(
        f"No released head averages probe_layers={probe_layers!r}; released "
        f"heads: {available or 'none'}. Pass one of them, or num_classes=N "
        "to build a new, untrained probe on other blocks."
    )

