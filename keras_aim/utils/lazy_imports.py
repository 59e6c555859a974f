"""Package attributes that import their module on first use (PEP 562).

Hand-written rather than taken from a library (e.g. `lazy_loader`): it is a
dozen lines, and keras_aim's packages must import without Keras, TensorFlow,
JAX or PyTorch so that `keras-aim --help` starts at once.
"""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_attributes(
    package: str, attributes: dict[str, str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for `package`'s `__init__`.

    `attributes` maps a public name to `"module"` (the attribute is that
    module) or `"module:name"` (an object in it); module paths are absolute.
    """

    def __getattr__(name: str):
        target = attributes.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, _, attribute = target.partition(":")
        value = importlib.import_module(module_name)
        if attribute:
            value = getattr(value, attribute)
        return value

    def __dir__() -> list[str]:
        return sorted(attributes)

    return __getattr__, __dir__
