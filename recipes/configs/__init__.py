"""One configuration per experiment (big_vision style): each module defines
CONFIG, a plain dict. `python -m recipes.pretrain --config NAME` picks one;
the released sizes take their architecture from keras_aim's preset table."""

import importlib

NAMES = ("tiny", "aim_600m", "aim_1b", "aim_3b", "aim_7b")


def load(name: str) -> dict:
    if name not in NAMES:
        raise ValueError(f"Unknown config {name!r}; choose one of: {', '.join(NAMES)}.")
    return dict(importlib.import_module(f"recipes.configs.pretrain_{name}").CONFIG)
