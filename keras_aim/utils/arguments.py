"""Checks of constructor and command-line numbers, before they divide.

A zero or negative head count, width or size would otherwise surface as a
`ZeroDivisionError` deep inside a layer, or as an empty tensor and
nonsense results; `check_positive_ints` names the argument instead, and
`positive_int` is the argparse type of the command line's and the recipes'
counts and sizes. `positive_float`, `learning_rate` and `share` do the
same for times, rates and fractions, and refuse `nan` and `inf` (which `float()` accepts):
a NaN learning rate trains NaN weights without a single error.
"""

from __future__ import annotations

import argparse
import math
import numbers


def check_positive_ints(where: str, **values) -> None:
    """Raises `ValueError` naming `where` and the first argument of
    `values` that is not a positive int (bools are not ints here)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{where}: {name} must be a positive int; received {value!r}.")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (sizes, counts, steps)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (learning rates, times, rates)."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def learning_rate(text: str) -> float:
    """argparse type: a finite number >= 0 (0 trains nothing, which checks
    a starting point)."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def share(text: str) -> float:
    """argparse type: a finite number in [0, 1] (a fraction of the data)."""
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text!r}")
    return value


def check_learning_rate(where: str, value) -> None:
    """Raises `ValueError` naming `where` if the learning rate `value` is
    not a finite number >= 0 (a NaN rate trains NaN weights silently)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        math.isfinite(value) and value >= 0
    ):
        raise ValueError(
            f"{where}: learning_rate must be a finite number >= 0; received {value!r}."
        )
