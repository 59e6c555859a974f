"""Quantizing tasks, shared by the families: `quantize` without the
preprocessor, and the head's dtype policy for the config.

Keras' `Model.quantize` visits every layer the model tracks. A keras-hub
task tracks its preprocessor too (on JAX and TensorFlow), and the image
converter's resizing layer is not built until images pass through it, so
Keras refuses: "Cannot quantize a layer that isn't yet built" (for
`AIMImageClassifier.from_preset(...)`, which comes with its preprocessor).
Preprocessing has no kernels to quantize; this mixin leaves it out.
"""

from __future__ import annotations

import re

import keras


class QuantizeNetworkOnly:
    """Mix into a keras-hub `Task`: `quantize` skips the preprocessor's
    layers, with Keras' `filters` (a regex on layer names, a list of them,
    or a callable) still applied to the rest."""

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        preprocessor = getattr(self, "preprocessor", None)
        if preprocessor is not None:
            skipped = {id(layer) for layer in preprocessor._flatten_layers()}
            filters = _network_only(filters, skipped)
        return super().quantize(mode, config=config, filters=filters, **kwargs)


def _network_only(filters, skipped: set):
    """A `filters` callable: `filters` (as `Model.quantize` reads them) and
    not one of the `skipped` layers (by id)."""

    def keep(layer) -> bool:
        if id(layer) in skipped:
            return False
        if filters is None:
            return True
        if isinstance(filters, str):
            return bool(re.search(filters, layer.name))
        if isinstance(filters, (list, tuple)):
            return any(re.search(pattern, layer.name) for pattern in filters)
        return bool(filters(layer))

    return keep


def head_dtype_policy(head: keras.layers.Layer, policy):
    """The dtype policy that rebuilds `head` as it is now: `policy`, or, once
    `quantize` changed some of its layers, a `DTypePolicyMap` naming them
    (as keras-hub's `Backbone.get_config` does for the trunk), so that a
    quantized classifier saves and loads with its quantized head."""
    policy = keras.dtype_policies.get(policy)
    quantized = {
        layer.path: layer.dtype_policy
        for layer in head._flatten_layers()
        if layer.quantization_mode is not None
    }
    if not quantized or isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return policy  # a map already names its quantized layers
    policy_map = keras.dtype_policies.DTypePolicyMap(default_policy=policy)
    for path, layer_policy in quantized.items():
        policy_map[path] = layer_policy
    return policy_map
