"""Argument checks shared by every layer, so that one idea gets one message everywhere."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any


def check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    """A ValueError unless ``value`` is an integer ``>= minimum`` (``True`` is not an integer)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_choice(name: str, value: Any, choices: Collection[str]) -> None:
    """A ValueError unless ``value`` is one of ``choices``."""
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (``True`` is not a number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
