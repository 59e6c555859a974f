"""One configuration per experiment (big_vision style): each module defines
CONFIG, a plain dict. `recipes/pretrain.py --config NAME` picks one."""

import importlib

NAMES = ("tiny", "aim_600m", "aim_1b", "aim_3b", "aim_7b")


def load(name: str) -> dict:
    if name not in NAMES:
        raise ValueError(f"Unknown config {name!r}; choose one of: {', '.join(NAMES)}.")
    return dict(importlib.import_module(f"configs.pretrain_{name}").CONFIG)
