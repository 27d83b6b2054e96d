"""Checks for the arguments a component gets from its config section: each returns the value in the
type the component uses, or raises `DataError` naming the argument and what it got (a dataset or
transform of any plugin raises the same one-line error)."""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

from .errors import DataError

__all__ = ["int_arg", "float_arg", "range_arg", "fraction_arg"]


def int_arg(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass, but `size=True` is always a config mistake
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise DataError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def float_arg(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise DataError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def range_arg(name: str, value: Any) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise DataError(f"{name} must be a pair [low, high], got {value!r}")
    low, high = float_arg(f"{name}[0]", value[0]), float_arg(f"{name}[1]", value[1])
    if low > high:
        raise DataError(f"{name} must satisfy low <= high, got {value!r}")
    return low, high


def fraction_arg(name: str, value: Any, high: float = 1.0) -> float:
    value = float_arg(name, value)
    if not 0.0 <= value <= high:
        raise DataError(f"{name} must be in [0, {high}], got {value}")
    return value
