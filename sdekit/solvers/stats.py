"""Solver results, statistics and errors; the NFE-counting wrapper.

NFE counts calls of the score (or, for a process without a score, the drift) made by the solver,
including initial-step probes and rejected steps and a final denoising step, excluding a
backend's own argument-validation calls (see ``docs/concepts.md``, "Errors and validation").

A score that itself calls networks several times (a guided score of `sdekit.guidance`: two
per classifier-free-guidance call) keeps a running integer ``network_evals`` (`EVALS_ATTR`);
a call is then counted as the number of evaluations it made (the advance of that counter), so
NFE counts every network evaluation, not only the solver's calls of the score.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch

__all__ = ["SolverStats", "Solution", "SolverError", "CountingFunction", "counted_problem", "EVALS_ATTR",
           "call_counted"]

#: The attribute through which a score callable reports how many network evaluations it has made
#: so far (an int it keeps increasing); see `call_counted`.
EVALS_ATTR = "network_evals"


@dataclass
class SolverStats:
    """What a solve did.

    Attributes
    ----------
    nfe:
        Score (or drift) evaluations, every call counted once per batch; a score keeping a
        ``network_evals`` counter (guided scores) counts the network evaluations each call made.
    steps:
        Steps attempted (accepted + rejected).
    accepted, rejected:
        Accepted and rejected steps (rejected is 0 for fixed-step methods).
    nfe_per_sample:
        Per-sample evaluation counts where steps differ between samples, else None.
    steps_per_sample, accepted_per_sample, rejected_per_sample:
        Per-sample step counts (int64 ``(B,)``) where steps differ between samples (per-sample
        stepping, ``norm="independent"``), else None. There the scalar counts describe the
        batched run's critical path: ``nfe`` batched evaluations and ``steps`` iterations (the
        largest per-sample counts: the sequential cost), ``accepted``/``rejected`` those of the
        sample that ran longest; totals over samples are ``sample_evals`` and the sums of the
        per-sample tensors.
    sample_evals:
        Rows evaluated in total (the sum of ``nfe_per_sample``: the arithmetic cost) where steps
        differ between samples, else None (it is then ``nfe`` times the batch size).
    wall_time:
        Seconds spent in the solve (after validation), measured on the host; on CUDA the device
        is synchronised at the end so the number includes queued work.
    backend:
        ``"native"``, ``"torchdiffeq"`` or ``"torchsde"``.
    method:
        The method name as passed to `sdekit.solve`.
    extra:
        Method-specific counters (e.g. corrector evaluations).
    """

    nfe: int = 0
    steps: int = 0
    accepted: int = 0
    rejected: int = 0
    nfe_per_sample: Optional[torch.Tensor] = None
    steps_per_sample: Optional[torch.Tensor] = None
    accepted_per_sample: Optional[torch.Tensor] = None
    rejected_per_sample: Optional[torch.Tensor] = None
    sample_evals: Optional[int] = None
    wall_time: float = 0.0
    backend: str = "native"
    method: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        d = {k: getattr(self, k) for k in ("nfe", "steps", "accepted", "rejected", "wall_time", "backend", "method")}
        if self.sample_evals is not None:
            d["sample_evals"] = self.sample_evals
        d.update(self.extra)
        return d

    def set_per_sample(self, info: Dict[str, Any]) -> None:
        """Copy the per-sample counters of a per-sample-stepping solve's ``info`` dict."""
        self.nfe_per_sample = info["nfe_per_sample"]
        self.steps_per_sample = info["steps_per_sample"]
        self.accepted_per_sample = info["accepted_per_sample"]
        self.rejected_per_sample = info["rejected_per_sample"]
        self.sample_evals = info["sample_evals"]


@dataclass
class Solution:
    """Result of `sdekit.solve`.

    ``x`` is the final state (at ``t_end``); ``ts`` (float64) and ``xs`` (stacked along a new
    leading dimension) hold the states at ``save_at`` when requested; ``stats`` the statistics;
    ``status`` is ``"success"`` (failures raise `SolverError`).
    """

    x: torch.Tensor
    stats: SolverStats
    ts: Optional[torch.Tensor] = None
    xs: Optional[torch.Tensor] = None
    status: str = "success"


class SolverError(RuntimeError):
    """A solve that could not finish: non-finite state, too many steps, a step size underflow.

    Carries ``step`` (index of the failing step), ``t`` (the time reached) and ``stats`` (the
    partial `SolverStats`).
    """

    def __init__(self, message: str, *, step: Optional[int] = None, t: Optional[float] = None,
                 stats: Optional[SolverStats] = None):
        where = []
        if step is not None:
            where.append(f"step {step}")
        if t is not None:
            where.append(f"t = {t:.6g}")
        super().__init__(message + (f" (at {', '.join(where)})" if where else "") +
                         (f"; partial stats: nfe={stats.nfe}, steps={stats.steps}" if stats else ""))
        self.step, self.t, self.stats = step, t, stats


def call_counted(fn: Callable, *args, **kwargs) -> Tuple[Any, int]:
    """``(fn(*args, **kwargs), evaluations)``: how many network evaluations the call made.

    1 for a plain callable; for one that keeps an integer ``network_evals`` counter
    (`EVALS_ATTR`), the counter's advance during the call (0, 1, 2, ... — e.g. a
    classifier-free-guided score outside its guidance interval makes 1, inside it 2).
    """
    before = getattr(fn, EVALS_ATTR, None)
    out = fn(*args, **kwargs)
    if before is None:
        return out, 1
    return out, int(getattr(fn, EVALS_ATTR)) - int(before)


class CountingFunction:
    """Wrap a callable and count its evaluations in ``self.count`` (a Python int: no device sync):
    one per call, or, for a score that reports its network evaluations, those (`call_counted`)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.count = 0
        self._reports = hasattr(fn, EVALS_ATTR)

    def __call__(self, *args, **kwargs):
        if not self._reports:
            self.count += 1
            return self.fn(*args, **kwargs)
        out, n = call_counted(self.fn, *args, **kwargs)
        self.count += n
        return out


def counted_problem(problem, check_inputs: Optional[bool] = None) -> Tuple[Any, CountingFunction]:
    """A shallow copy of ``problem`` whose score (ReverseSDE, ProbabilityFlowODE) or, for a
    forward SDE, drift is wrapped in a `CountingFunction`; returns ``(copy, counter)``.

    The copy shares modules and parameters with ``problem``; only the counted function differs.
    ``check_inputs=False`` switches off the copy's time/state checks where the caller guarantees
    them (the integrators keep every time inside the interval). The one place the solvers swap a
    problem's function.
    """
    if hasattr(problem, "with_score"):  # ReverseSDE / ProbabilityFlowODE: their own copy-with-score
        counter = CountingFunction(problem.score_fn)
        p = problem.with_score(counter)
    else:  # a forward SDE: its drift is the counted function
        counter = CountingFunction(problem._drift)
        p = copy.copy(problem)
        p._drift = counter
    if check_inputs is not None:
        p.check_inputs = check_inputs
    return p, counter
