"""keras_aim: AIM and AIMv2 (Autoregressive Image Models) for Keras 3 on any backend.

    import keras_aim
    backbone = keras_aim.AIMBackbone.from_preset("aim_600m")            # AIM-v1
    encoder = keras_aim.AIMv2Backbone.from_preset("aimv2_large_patch14_224")

Everything public is reachable as an attribute of the package and is
imported on first use, so `import keras_aim` (and the `keras-aim` command)
starts without loading Keras or a backend. The package:

    keras_aim/
      layers/     building blocks (keras.ops only)
      models/     one folder per model family (aim/: backbone, classifier,
                  converter, pretrainer, presets, checkpoint conversion;
                  aimv2/: vision encoders, LiT image-text model, tokenizer)
      loading/    download, verify, cache, read checkpoints, lean loading
      training/   losses, optimizers, probing, LoRA, checkpoints,
                  distribution, memory planner
      data/       tf.data pipelines and data specs
      export/     SavedModel for TF Serving
      utils/      atomic files, shape checks, quiet framework logs
      cli.py      the `keras-aim` command

Keras finds keras_aim's classes when it loads a saved model only once they
are registered; that happens when Keras is imported (before or after
keras_aim) or a keras_aim model is first used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from keras_aim.utils.lazy_imports import lazy_attributes
from keras_aim.version import __version__

_AIM = "keras_aim.models.aim"
_AIMV2 = "keras_aim.models.aimv2"
_PUBLIC = {
    # Models of the AIM-v1 family.
    "AIMBackbone": f"{_AIM}.aim_backbone:AIMBackbone",
    "AIMImageClassifier": f"{_AIM}.aim_image_classifier:AIMImageClassifier",
    "AIMImageClassifierPreprocessor":
        f"{_AIM}.aim_image_classifier_preprocessor:AIMImageClassifierPreprocessor",
    "AIMImageConverter": f"{_AIM}.aim_image_converter:AIMImageConverter",
    "AIMPretrainer": f"{_AIM}.aim_pretrainer:AIMPretrainer",
    "AIM_PRESETS": f"{_AIM}.aim_presets:AIM_PRESETS",
    "trunk_parameter_count": f"{_AIM}.aim_presets:trunk_parameter_count",
    "resolve_probe_layers": f"{_AIM}.aim_image_classifier:resolve_probe_layers",
    "load_official_weights": f"{_AIM}.convert_aim:load_official_weights",
    # Models of the AIMv2 family.
    "AIMv2Backbone": f"{_AIMV2}.aimv2_backbone:AIMv2Backbone",
    "AIMv2ImageClassifier": f"{_AIMV2}.aimv2_image_classifier:AIMv2ImageClassifier",
    "AIMv2ImageClassifierPreprocessor":
        f"{_AIMV2}.aimv2_image_classifier_preprocessor:AIMv2ImageClassifierPreprocessor",
    "AIMv2ImageConverter": f"{_AIMV2}.aimv2_image_converter:AIMv2ImageConverter",
    "AIMv2LiT": f"{_AIMV2}.aimv2_lit:AIMv2LiT",
    "AIMv2TextEncoder": f"{_AIMV2}.aimv2_lit:AIMv2TextEncoder",
    "AIMv2Tokenizer": f"{_AIMV2}.aimv2_tokenizer:AIMv2Tokenizer",
    "AIMV2_PRESETS": f"{_AIMV2}.aimv2_presets:AIMV2_PRESETS",
    "load_aimv2_weights": f"{_AIMV2}.convert_aimv2:load_aimv2_weights",
    "zero_shot_classifier": f"{_AIMV2}.aimv2_lit:zero_shot_classifier",
    "WeightLoadingError": "keras_aim.loading.state_dict:WeightLoadingError",
    "pretraining_optimizer": "keras_aim.training.optimizers:pretraining_optimizer",
    # Subpackages.
    "data": "keras_aim.data",
    "export": "keras_aim.export",
    "layers": "keras_aim.layers",
    "loading": "keras_aim.loading",
    "models": "keras_aim.models",
    "training": "keras_aim.training",
    "utils": "keras_aim.utils",
    # The training modules most scripts use, at the top as before.
    "checkpointing": "keras_aim.training.checkpointing",
    "distribution": "keras_aim.training.distribution",
    "lora": "keras_aim.training.lora",
    "losses": "keras_aim.training.losses",
    "memory_plan": "keras_aim.training.memory_plan",
    "optimizers": "keras_aim.training.optimizers",
    "probing": "keras_aim.training.probing",
}

_lazy_getattr, __dir__ = lazy_attributes(__name__, _PUBLIC)


def __getattr__(name: str):
    value = _lazy_getattr(name)
    if "keras" in sys.modules:  # the attribute brought Keras: register everything
        register_classes()
    return value

__all__ = ["__version__", *sorted(_PUBLIC)]

# Module paths of keras_aim before its model folders existed, kept importable
# (`from keras_aim.lora import fit_lora`) with a DeprecationWarning.
MOVED_MODULES = {
    "keras_aim.backbone": f"{_AIM}.aim_backbone",
    "keras_aim.classifier": f"{_AIM}.aim_image_classifier",
    "keras_aim.preprocessing": f"{_AIM}.aim_image_classifier_preprocessor",
    "keras_aim.pretrainer": f"{_AIM}.aim_pretrainer",
    "keras_aim.presets": f"{_AIM}.aim_presets",
    "keras_aim.conversion": f"{_AIM}.convert_aim",
    "keras_aim.download": "keras_aim.loading.download",
    "keras_aim.initialization": "keras_aim.loading.lean_loading",
    "keras_aim.memory": "keras_aim.loading.lean_loading",
    "keras_aim.atomic_files": "keras_aim.utils.atomic_files",
    "keras_aim.input_validation": "keras_aim.utils.image_shapes",
    "keras_aim.checkpointing": "keras_aim.training.checkpointing",
    "keras_aim.distribution": "keras_aim.training.distribution",
    "keras_aim.distribution_tf": "keras_aim.training.distribution_tf",
    "keras_aim.lora": "keras_aim.training.lora",
    "keras_aim.losses": "keras_aim.training.losses",
    "keras_aim.memory_plan": "keras_aim.training.memory_plan",
    "keras_aim.probing": "keras_aim.training.probing",
}

# Importing these registers every keras_aim class with Keras' serialization.
MODEL_MODULES = (
    f"{_AIM}.aim_image_classifier",
    f"{_AIM}.aim_pretrainer",
    f"{_AIMV2}.aimv2_image_classifier",
    f"{_AIMV2}.aimv2_lit",
    "keras_aim.training.losses",
)


def register_classes() -> None:
    """Registers every keras_aim layer and model with Keras (imports them)."""
    for module in MODEL_MODULES:
        importlib.import_module(module)


def _importing_keras_aim() -> bool:
    """Whether a keras_aim module is being imported right now (then it is
    that import chain that brought Keras in, and registering would re-enter
    it)."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name.startswith("keras_aim.")
    )


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves the old module paths of `MOVED_MODULES` to the new modules."""

    def find_spec(self, name, path=None, target=None):
        if name in MOVED_MODULES:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        new = MOVED_MODULES[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; import it from there.",
            DeprecationWarning,
            stacklevel=3,
        )
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        pass


class _RegisterAfterKeras(importlib.abc.MetaPathFinder):
    """Registers keras_aim's classes right after Keras is imported, so that
    `import keras_aim; import keras; keras.saving.load_model(...)` finds
    them. Hand-written (a post-import hook, as in `wrapt`) because Keras has
    no plugin mechanism for third-party serializable classes."""

    def find_spec(self, name, path=None, target=None):
        if name != "keras":
            return None
        sys.meta_path.remove(self)  # one-shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader

        class RegisteringLoader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                if _importing_keras_aim():
                    return  # registered when that import reaches `keras_aim.<name>`
                try:
                    register_classes()
                except Exception as error:  # never break `import keras`
                    warnings.warn(
                        f"keras_aim could not register its classes with Keras "
                        f"({error}); they are registered on first use.",
                        RuntimeWarning,
                    )

            def __getattr__(self, attribute):
                return getattr(loader, attribute)

        spec.loader = RegisteringLoader()
        return spec


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
if "keras" in sys.modules:
    register_classes()
elif not any(isinstance(f, _RegisterAfterKeras) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterKeras())
