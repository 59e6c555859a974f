"""The dtype policy a local keras-hub preset was saved with, when
`from_preset` would lose it.

keras-hub 0.32 builds a preset's backbone with the `dtype` argument of
`from_preset` put over the saved one, `None` when none is given: a
quantized model's saved `DTypePolicyMap` (which names its int8 layers) is
then dropped, the model is rebuilt in float and its int8 weights fail to
load. The models' `from_preset` pass the saved map back as `dtype`.
"""

from __future__ import annotations

import json
import os

CONFIG_FILE = "config.json"  # keras-hub's backbone config in a preset folder


def saved_policy_map(preset) -> dict | None:
    """The serialized `DTypePolicyMap` in the backbone config of the local
    preset folder `preset` (a quantized model's), else `None` (also for
    handles and folders without a config)."""
    if not isinstance(preset, (str, os.PathLike)):
        return None
    path = os.path.join(os.fspath(preset), CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        dtype = json.load(file).get("config", {}).get("dtype")
    if isinstance(dtype, dict) and dtype.get("class_name") == "DTypePolicyMap":
        return dtype
    return None
