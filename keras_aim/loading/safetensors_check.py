"""Checking a `.safetensors` file's structure from its header alone.

Where no SHA-256 digest of a released file is recorded, this is what can be
verified before a download is kept: `safetensors` itself checks on opening
that the header parses and that its tensors cover the file's data exactly
(a truncated or padded file fails), and the header names every tensor's
dtype and shape without reading the data.
"""

from __future__ import annotations

from keras_aim.loading.state_dict import WeightLoadingError


def check_safetensors(path: str) -> dict[str, tuple[str, tuple]]:
    """`{name: (dtype, shape)}` (dtype as safetensors names it, e.g. "F32")
    of a structurally complete safetensors file; raises `WeightLoadingError`
    naming the problem and the fix otherwise."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as handle:
            tensors = {}
            for key in handle.keys():
                view = handle.get_slice(key)
                tensors[key] = (view.get_dtype(), tuple(view.get_shape()))
            return tensors
    except SafetensorError as error:
        raise WeightLoadingError(
            f"{path} is not a complete safetensors file ({error}). It was "
            "probably truncated or damaged while downloading; delete it and "
            "download it again."
        ) from error
