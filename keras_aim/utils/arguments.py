"""Checks of constructor and command-line numbers, before they divide.

A zero or negative head count, width or size would otherwise surface as a
`ZeroDivisionError` deep inside a layer, or as an empty tensor and
nonsense results; `check_positive_ints` names the argument instead, and
`positive_int` is the argparse type of the command line's and the recipes'
counts and sizes.
"""

from __future__ import annotations

import argparse
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
