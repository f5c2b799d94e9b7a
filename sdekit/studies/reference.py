r"""What a study solves and what it compares against: `StudyProblem` and `Reference`.

A `StudyProblem` bundles a sdekit problem (a `sdekit.ProbabilityFlowODE`, a
`sdekit.ReverseSDE` or a forward `sdekit.SDE`), a way to draw start points, the time interval,
and what is known exactly: the target law at ``t_end`` (a `sdekit.GaussianMixture`, for
distribution metrics, NLL and mode occupancy) and, where it exists, the exact solution map
``exact(x0, brownian)`` (an exact flow map, or the pathwise solution on a shared Brownian path).

A `Reference` says how the per-sample reference $x^{\rm ref}$ of a study is obtained:

- ``Reference.exact()``: the problem's ``exact`` map (closed form; floor: round-off).
- ``Reference.tight(rtol=1e-10)``: an ODE solve in float64 with ``dopri5`` at ``rtol = atol``
  from the same start points; its floor is its distance to a solve at ``loosen`` times the
  tolerance.
- ``Reference.fine(method, steps)``: an SDE solve with ``steps`` steps on the *same*
  `sdekit.solvers.BrownianPath` as the solves under study (strong errors); its floor is its
  distance to the solve with half the steps on the same path.
- ``Reference.samples(y, t)``: exact samples ``y`` of the law at time ``t`` only (distribution
  metrics; no strong error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .._validation import check_callable, check_int, check_positive, check_real
from ..dynamics import ProbabilityFlowODE, ReverseSDE
from ..processes import SDE

__all__ = ["StudyProblem", "Reference", "REFERENCE_KINDS"]

F64 = torch.float64
REFERENCE_KINDS = ("exact", "tight", "fine", "samples")
#: Default tolerance of the tight ODE reference (float64 dopri5, rtol = atol).
TIGHT_TOL = 1e-10
#: The tight reference's floor is its distance to a solve at this many times its tolerance.
TIGHT_LOOSEN = 100.0
#: Default ratio of the fine SDE reference's step count to the largest step count studied.
FINE_FACTOR = 16


@dataclass
class StudyProblem:
    r"""A problem to study: dynamics, start points, time interval and what is known exactly.

    Parameters
    ----------
    problem:
        A `sdekit.ProbabilityFlowODE`, `sdekit.ReverseSDE` or forward `sdekit.SDE`.
    start:
        ``start(n, generator) -> (n, ...)`` tensor of start points at ``t_start`` (e.g.
        ``mixture.push(sde, T).sample``, exact samples of $p_T$).
    t_start, t_end:
        The interval; default: the problem's own (reverse problems run $T \to t_\varepsilon$).
    target:
        Optional exact law at ``t_end`` with ``sample(n, generator)`` and ``log_prob(x)`` (a
        `sdekit.GaussianMixture`, e.g. ``mixture.push(sde, t_eps)``): distribution metrics,
        ``nll`` and (a mixture) ``modes``.
    exact:
        Optional exact solution ``exact(x0, brownian) -> x_end`` (``brownian`` a
        `sdekit.solvers.BrownianPath` or ``None`` for deterministic problems).
    name:
        A label for tables.
    n:
        Default number of start points.
    dtype:
        Dtype of the start points (float64 default: solver error, not round-off, is studied).
    """

    problem: Any
    start: Callable[[int, torch.Generator], torch.Tensor]
    t_start: Optional[float] = None
    t_end: Optional[float] = None
    target: Any = None
    exact: Optional[Callable] = None
    name: str = "problem"
    n: int = 500
    dtype: torch.dtype = F64

    def __post_init__(self):
        if not isinstance(self.problem, (ProbabilityFlowODE, ReverseSDE, SDE)):
            raise TypeError(f"problem must be a sdekit ProbabilityFlowODE, ReverseSDE or SDE, got "
                            f"{type(self.problem).__name__}")
        check_callable(self.start, "start", "(n, generator) -> tensor")
        check_callable(self.exact, "exact", "(x0, brownian) -> tensor", allow_none=True)
        self.n = check_int(self.n, "n", 2)
        t0 = self.problem.t_start if self.t_start is None else check_real(self.t_start, "t_start")
        t1 = self.problem.t_end if self.t_end is None else check_real(self.t_end, "t_end")
        if t0 == t1:
            raise ValueError(f"t_start and t_end must differ, both are {t0!r}")
        self.t_start, self.t_end = float(t0), float(t1)
        if self.target is not None and not (hasattr(self.target, "sample") and hasattr(self.target, "log_prob")):
            raise TypeError(f"target must have sample(n, generator) and log_prob(x) (a GaussianMixture), got "
                            f"{type(self.target).__name__}")

    @property
    def kind(self) -> str:
        """``"ode"`` for a ProbabilityFlowODE, else ``"sde"``."""
        return "ode" if isinstance(self.problem, ProbabilityFlowODE) else "sde"

    def draw_start(self, n: int, generator: torch.Generator) -> torch.Tensor:
        x = self.start(n, generator)
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != n:
            raise ValueError(f"start(n, generator) must return a tensor with n = {n} rows, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        return x.to(self.dtype)


@dataclass(frozen=True)
class Reference:
    """How a study obtains its reference; build it with `Reference.exact`, `Reference.tight`,
    `Reference.fine` or `Reference.samples` (or pass the strings ``"exact"``, ``"tight"``,
    ``"fine"``)."""

    kind: str
    method: Optional[str] = None
    tol: Optional[float] = None
    steps: Optional[int] = None
    samples_x: Optional[torch.Tensor] = field(default=None, repr=False)
    time: Optional[float] = None

    @classmethod
    def exact(cls) -> "Reference":
        """The problem's closed-form ``exact`` map (an exact flow map or pathwise solution)."""
        return cls("exact")

    @classmethod
    def tight(cls, rtol: float = TIGHT_TOL, method: str = "dopri5") -> "Reference":
        """A float64 adaptive ODE solve at ``rtol = atol`` from the same start points."""
        return cls("tight", method=method, tol=check_positive(rtol, "rtol"))

    @classmethod
    def fine(cls, method: str = "euler_maruyama", steps: Optional[int] = None) -> "Reference":
        """An SDE solve with ``steps`` steps (default `FINE_FACTOR` times the largest budget) on
        the same Brownian path as the solves under study."""
        return cls("fine", method=method, steps=check_int(steps, "steps", 2, allow_none=True))

    @classmethod
    def samples(cls, y: torch.Tensor, t: float) -> "Reference":
        """Exact samples ``y`` of the law at time ``t`` (distribution metrics only)."""
        if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[0] < 2:
            raise ValueError(f"reference samples must be a tensor with >= 2 rows, got "
                             f"{getattr(y, 'shape', type(y).__name__)}")
        return cls("samples", samples_x=y, time=check_real(t, "t"))

    @classmethod
    def parse(cls, value: Any) -> "Reference":
        if isinstance(value, Reference):
            return value
        if value in ("exact", "tight", "fine"):
            return getattr(cls, value)()
        raise ValueError(f"reference must be a sdekit.studies.Reference or one of 'exact', 'tight', 'fine'; "
                         f"got {value!r}")

    @property
    def pathwise(self) -> bool:
        """Whether the reference gives one reference point per start point (strong errors)."""
        return self.kind != "samples"
