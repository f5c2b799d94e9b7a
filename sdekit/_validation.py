"""Input validation and broadcasting helpers shared by every public entry point.

Conventions (``docs/concepts.md``, "Errors and validation"): bad input raises ``ValueError`` /
``TypeError`` naming the argument and the offending value *before* any work starts — ``TypeError``
when the kind of value is wrong (a string, a bool where a number belongs, a float where an
integer belongs), ``ValueError`` when the value is of the right kind but out of range; times are
float64; a time is a Python float, a 0-d tensor or a ``(B,)`` tensor and broadcasts against data
of any rank.

The scalar validators are the one set the package uses: `check_real`, `check_positive`,
`check_int`, `check_bool`, `check_choice`, `check_generator`, `check_callable`. Each returns the normalised value
(a Python ``float``/``int``/``bool``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence, Union

import torch

TimeLike = Union[float, int, torch.Tensor]

__all__ = [
    "TimeLike",
    "as_time",
    "check_time_range",
    "check_finite",
    "check_state",
    "check_positive",
    "check_real",
    "check_int",
    "check_bool",
    "check_choice",
    "check_generator",
    "check_callable",
    "broadcast_to_data",
    "time_for",
    "short",
]


def short(value: Any, n: int = 6) -> str:
    """A compact human-readable rendering of ``value`` for error messages."""
    if isinstance(value, torch.Tensor):
        if value.numel() <= n:
            return f"tensor({value.detach().cpu().tolist()}, dtype={value.dtype})"
        flat = value.detach().flatten()[:n].cpu().tolist()
        return f"tensor(shape={tuple(value.shape)}, first={flat}, dtype={value.dtype})"
    return repr(value)


def as_time(t: TimeLike, name: str = "t", device: Optional[torch.device] = None) -> torch.Tensor:
    """Convert a time argument to a float64 tensor (0-d or 1-d) without range checks.

    Raises ``TypeError`` for non-numeric input and ``ValueError`` for tensors of rank > 1 or
    non-finite values.
    """
    if isinstance(t, bool):
        raise TypeError(f"{name} must be a float or a tensor of times, got bool {t!r}")
    if isinstance(t, numbers.Real):
        out = torch.tensor(float(t), dtype=torch.float64, device=device)
    elif isinstance(t, torch.Tensor):
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real tensor, got dtype {t.dtype}")
        if t.dim() > 1:
            raise ValueError(
                f"{name} must be a scalar, a 0-d tensor or a (B,) tensor; got shape {tuple(t.shape)}"
            )
        out = t.to(dtype=torch.float64, device=device if device is not None else t.device)
    else:
        raise TypeError(f"{name} must be a float or a torch.Tensor, got {type(t).__name__}: {t!r}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} must be finite, got {short(t)}")
    return out


def check_time_range(t64: torch.Tensor, T: float, name: str = "t", lower: float = 0.0) -> None:
    """Raise ``ValueError`` unless every entry of ``t64`` lies in ``[lower, T]``.

    A relative slack of 1e-12 absorbs round-off in computed grids.
    """
    slack = 1e-12 * max(1.0, abs(T))
    t64 = t64.detach()
    lo, hi = float(t64.min()), float(t64.max())
    if lo < lower - slack or hi > T + slack:
        raise ValueError(f"{name} must lie in [{lower}, {T}] (the process's time interval); got {short(t64)}")


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or inf."""
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")


def check_state(x: Any, name: str = "x") -> torch.Tensor:
    """Validate a data/state tensor: a floating-point tensor with a batch dimension, finite."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (shape (B, ...)); got a 0-d tensor")
    check_finite(x, name)
    return x


def _scalar(value: Any) -> Any:
    """A 0-d real tensor as a Python number; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool \
            and not value.dtype.is_complex:
        return value.item()
    return value


def _real_number(value: Any, name: str) -> float:
    """``float(value)`` for a real number or 0-d real tensor (NaN and inf included); else ``TypeError``."""
    v = _scalar(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    return float(v)


def check_real(value: Any, name: str, *, allow_inf: bool = False) -> float:
    """Return ``float(value)`` for a real number (or a 0-d real tensor) that is not NaN.

    ``TypeError`` for anything else (bools included); ``ValueError`` for NaN, and for an
    infinity unless ``allow_inf``.
    """
    v = _real_number(value, name)
    if v != v or (not allow_inf and math.isinf(v)):
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}real number, got {value!r}")
    return v


def check_positive(value: Any, name: str, allow_zero: bool = False, *, allow_inf: bool = False) -> float:
    """Return ``float(value)`` after checking it is a positive (or, with ``allow_zero``,
    non-negative) real number, finite unless ``allow_inf``. ``TypeError`` / ``ValueError`` as
    `check_real`."""
    v = _real_number(value, name)
    if not ((v >= 0.0) if allow_zero else (v > 0.0)) or (not allow_inf and math.isinf(v)):  # NaN fails too
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}{kind} number, got {value!r}")
    return v


def check_int(value: Any, name: str, minimum: Optional[int] = None, *, allow_none: bool = False) -> Optional[int]:
    """Return ``int(value)`` for an integer (not a bool, not a float) ``>= minimum``.

    ``None`` passes through when ``allow_none``. ``TypeError`` for a non-integer,
    ``ValueError`` below ``minimum``; the message names the range (``"a positive integer"``
    for ``minimum = 1``, ``"a non-negative integer"`` for 0, ``"an integer >= k"`` otherwise).
    """
    if value is None and allow_none:
        return None
    v = _scalar(value)
    or_none = " or None" if allow_none else ""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer{or_none}, got {type(value).__name__}: {value!r}")
    if minimum is not None and int(v) < minimum:
        what = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name} must be {what}{or_none}, got {value!r}")
    return int(v)


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (not 0/1, not a tensor); else ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``; else ``ValueError`` listing them."""
    try:
        ok = value in tuple(choices)
    except (TypeError, RuntimeError, ValueError):  # e.g. a tensor, whose == is elementwise
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_callable(value: Any, name: str, signature: str = "(x, t) -> tensor", *, allow_none: bool = False) -> Any:
    """Return ``value`` if it is callable (or ``None`` when ``allow_none``); else ``TypeError``
    saying what ``name`` must be: ``"{name} must be callable {signature}[ or None], got <type>"``."""
    if not (callable(value) or (allow_none and value is None)):
        raise TypeError(f"{name} must be callable {signature}{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__}")
    return value


def check_generator(generator: Any, name: str = "generator") -> Optional[torch.Generator]:
    """Return ``generator`` if it is a ``torch.Generator`` or ``None``; else ``TypeError``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def time_for(t: TimeLike, x: torch.Tensor, name: str = "t") -> torch.Tensor:
    """Validate ``t`` against the state ``x`` and return it as float64 on ``x.device``.

    Rules: a tensor ``t`` must live on ``x``'s device and have dtype float64 (the solver-time
    convention) or ``x.dtype``; a ``(B,)`` tensor must match ``x``'s batch size (or be length 1).
    """
    if isinstance(t, torch.Tensor):
        if t.device != x.device:
            raise ValueError(f"{name} is on device {t.device} but the state is on {x.device}")
        if t.is_floating_point() and t.dtype not in (torch.float64, x.dtype):
            raise ValueError(
                f"{name} has dtype {t.dtype} but the state has dtype {x.dtype}; pass times as "
                f"float64 or in the state's dtype"
            )
    t64 = as_time(t, name, device=x.device)
    if t64.dim() == 1 and t64.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"{name} has {t64.shape[0]} entries but the batch has {x.shape[0]} samples"
        )
    return t64


def broadcast_to_data(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a 0-d or ``(B,)`` coefficient to ``(B, 1, ..., 1)`` (rank of ``x``) in x's dtype."""
    coef = coef.to(dtype=x.dtype, device=x.device)
    if coef.dim() == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (x.dim() - 1)))
