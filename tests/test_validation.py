"""The one set of scalar validators (`sdekit._validation`): the kind of error (TypeError for the
wrong kind of value, ValueError for a value out of range), the message naming the argument and
the value, and the normalised return value."""

import math

import pytest
import torch

from sdekit._validation import (check_bool, check_callable, check_choice, check_generator, check_int, check_positive,
                                check_real)


@pytest.mark.parametrize("value,exc,match", [
    ("1", TypeError, r"^w must be a real number, got str: '1'$"),
    (True, TypeError, r"^w must be a real number, got bool: True$"),
    (torch.tensor([1.0, 2.0]), TypeError, r"^w must be a real number, got Tensor"),
    (float("nan"), ValueError, r"^w must be a finite real number, got nan$"),
    (math.inf, ValueError, r"^w must be a finite real number, got inf$"),
])
def test_check_real_rejects(value, exc, match):
    with pytest.raises(exc, match=match):
        check_real(value, "w")


def test_check_real_accepts():
    assert check_real(3, "w") == 3.0 and isinstance(check_real(3, "w"), float)
    assert check_real(torch.tensor(-2.5, dtype=torch.float64), "w") == -2.5
    assert check_real(-math.inf, "w", allow_inf=True) == -math.inf
    with pytest.raises(ValueError, match=r"^w must be a real number, got nan$"):
        check_real(math.nan, "w", allow_inf=True)


@pytest.mark.parametrize("value,kw,exc,match", [
    (0, {}, ValueError, r"^T must be a finite positive number, got 0$"),
    (-1e-3, dict(allow_zero=True), ValueError, r"^T must be a finite non-negative number, got -0.001$"),
    (math.nan, {}, ValueError, r"^T must be a finite positive number, got nan$"),
    (math.inf, {}, ValueError, r"^T must be a finite positive number, got inf$"),
    (math.nan, dict(allow_inf=True), ValueError, r"^T must be a positive number, got nan$"),
    ("1", {}, TypeError, r"^T must be a real number, got str: '1'$"),
    (False, {}, TypeError, r"^T must be a real number, got bool"),
])
def test_check_positive_rejects(value, kw, exc, match):
    with pytest.raises(exc, match=match):
        check_positive(value, "T", **kw)


def test_check_positive_accepts():
    assert check_positive(0, "T", allow_zero=True) == 0.0
    assert check_positive(math.inf, "T", allow_inf=True) == math.inf
    assert check_positive(torch.tensor(2), "T") == 2.0


@pytest.mark.parametrize("value,minimum,kw,exc,match", [
    (2.0, 1, {}, TypeError, r"^n must be an integer, got float: 2.0$"),
    (True, 1, {}, TypeError, r"^n must be an integer, got bool: True$"),
    (None, 1, {}, TypeError, r"^n must be an integer, got NoneType"),
    (0, 1, {}, ValueError, r"^n must be a positive integer, got 0$"),
    (-1, 0, {}, ValueError, r"^n must be a non-negative integer, got -1$"),
    (1, 2, {}, ValueError, r"^n must be an integer >= 2, got 1$"),
    (1, 2, dict(allow_none=True), ValueError, r"^n must be an integer >= 2 or None, got 1$"),
])
def test_check_int_rejects(value, minimum, kw, exc, match):
    with pytest.raises(exc, match=match):
        check_int(value, "n", minimum, **kw)


def test_check_int_accepts():
    assert check_int(5, "n", 1) == 5 and check_int(None, "n", 1, allow_none=True) is None
    assert check_int(torch.tensor(3), "n") == 3 and check_int(-7, "n") == -7


def test_check_bool_choice_generator():
    assert check_bool(False, "flag") is False
    for bad in (1, 0, "yes", None, torch.tensor(True)):
        with pytest.raises(TypeError, match=r"^flag must be True or False, got "):
            check_bool(bad, "flag")
    assert check_choice(None, "mode", ("a", None)) is None
    with pytest.raises(ValueError, match=r"^mode must be one of \('a', 'b'\), got 'c'$"):
        check_choice("c", "mode", ("a", "b"))
    with pytest.raises(ValueError, match=r"^mode must be one of"):
        check_choice(torch.tensor([1, 2]), "mode", ("a", "b"))
    g = torch.Generator()
    assert check_generator(g) is g and check_generator(None) is None
    with pytest.raises(TypeError, match=r"^generator must be a torch.Generator or None, got int$"):
        check_generator(3)


def test_check_callable():
    f = lambda x, t: x  # noqa: E731
    assert check_callable(f, "score") is f and check_callable(None, "p", "z -> (N,)", allow_none=True) is None
    with pytest.raises(TypeError, match=r"^score must be callable \(x, t\) -> tensor, got int$"):
        check_callable(3, "score")
    with pytest.raises(TypeError, match=r"^p must be callable z -> \(N,\) or None, got str$"):
        check_callable("f", "p", "z -> (N,)", allow_none=True)
