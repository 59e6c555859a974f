"""Loading released checkpoints: download and verify, read state dicts
without torch, convert into a cached keras-hub preset on first use, and
load lean (near one copy of the weights, no wasted random init). Imports no
model: a model's `from_preset` hands it what to build.

    download.py       verified, resumable, atomic HTTP(S) downloads
    preset_cache.py   the cache of released files and converted presets
    preset_folder.py  checks a local preset folder before keras-hub reads it
    state_dict.py     .pth / .safetensors readers, strict all-or-nothing assignment
    strict_weights.py Keras weights files checked both ways before loading
    keras_files.py    .keras model files: checked archive, strict weights
    lean_loading.py   malloc tuning and zero-filled builds while loading
"""

from keras_aim.utils.lazy_imports import lazy_attributes

__getattr__, __dir__ = lazy_attributes(
    __name__,
    {name: f"keras_aim.loading.{name}"
     for name in ("download", "keras_files", "lean_loading", "preset_cache",
                  "preset_folder", "state_dict", "strict_weights")},
)
