"""Validators for method options and solver arguments (private to `sdekit.solvers`).

Each ``*_check`` factory returns ``check(value)`` that raises ``ValueError`` naming the option;
the type (real, integer, bool, string) is checked first by
`sdekit.solvers.registry.Option.validate`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional

__all__ = ["positive", "nonnegative", "positive_or_inf", "at_least", "one_of", "open_interval",
           "check_count", "check_real"]


def positive(name: str) -> Callable[[Any], None]:
    def check(v) -> None:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite positive number, got {v!r}")
    return check


def nonnegative(name: str) -> Callable[[Any], None]:
    def check(v) -> None:
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return check


def positive_or_inf(name: str) -> Callable[[Any], None]:
    def check(v) -> None:
        if math.isnan(v) or not v > 0:
            raise ValueError(f"{name} must be a positive number (inf allowed), got {v!r}")
    return check


def at_least(name: str, lo: int) -> Callable[[Any], None]:
    def check(v) -> None:
        if v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return check


def one_of(name: str, *choices: str) -> Callable[[Any], None]:
    def check(v) -> None:
        if v not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {v!r}")
    return check


def open_interval(name: str, lo: float, hi: float) -> Callable[[Any], None]:
    def check(v) -> None:
        if not (lo < v < hi):
            raise ValueError(f"{name} must lie strictly between {lo:g} and {hi:g}, got {v!r}")
    return check


def check_count(v: Any, name: str, allow_none: bool = False) -> Optional[int]:
    """A positive integer (not a bool), or None when allowed."""
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {v!r}")
    return int(v)


def check_real(v: Any, name: str) -> float:
    """A finite real number (a Python number or a one-element tensor)."""
    if hasattr(v, "numel"):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a scalar time, got shape {tuple(v.shape)}")
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite real time, got {v!r}")
    return float(v)
