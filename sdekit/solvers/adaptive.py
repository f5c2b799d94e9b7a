r"""Native embedded Runge–Kutta integration with adaptive steps (Dormand–Prince 5(4), Bogacki–Shampine 3(2)).

`integrate_adaptive` solves $dy/dt = F(t, y)$ for a batch-first state ``y`` of shape
``(B, D)`` from ``t_start`` to ``t_end`` (either direction) and returns only the end state. It is
the same algorithm as torchdiffeq's ``dopri5`` / ``bosh3`` as `odeint_counted`
drives them — same tableaus, same error ratio, same step-size controller, same initial-step
heuristic (with the probe kept inside the interval), the last step shortened to land exactly on
``t_end`` — so it takes the same steps and makes the same number of evaluations (tested). What
differs is the bookkeeping, which dominates when ``F`` is cheap or the state is small:

* the stage derivatives live in one preallocated ``(stages, B·D)`` buffer and every stage state
  $y_0 + h\sum_j a_{ij}k_j$ (and the error estimate $h\sum_j e_j k_j$) is ONE
  matrix–vector product (``torch.addmv``), where torchdiffeq multiplies a ``(…, stages)`` tensor
  by the coefficients and reduces over its last axis;
* time and step size are Python floats (one host read per step — the accept/reject decision —
  which torchdiffeq needs as well), there is no dense-output polynomial (only the end state is
  returned) and no tuple flattening;
* the solver arithmetic runs without autograd: **no gradient flows through this integrator**
  (use ``odeint_counted`` to backpropagate through the solver or for the adjoint).

Error control (Hairer–Nørsett–Wanner II.4, torchdiffeq's defaults): with
$\mathrm{sc} = \mathrm{atol} + \mathrm{rtol}\max(|y_0|, |y_1|)$ and the embedded error
$\hat e = h\sum_j e_j k_j$, the ratio $r = \|\hat e/\mathrm{sc}\|$ is the RMS over
each *component* (the column blocks given by ``segments``; the max over components — torchdiffeq's
mixed norm of a tuple state), over the whole batch (``norm="batch"``) or per sample and then the
max over samples (``norm="per-sample"``). The step is accepted iff $r \le 1$, and the next
step is $h \cdot \min(\text{ifactor}, \max(\text{safety}\,r^{-1/p}, \text{dfactor}))$ with
the ``dfactor`` floor replaced by 1 when $r < 1$ (so an accepted step never shrinks the
next one), ``p`` the method's order.

NFE is $2 + s\,(\text{accepted} + \text{rejected})$ with ``s`` = 6 (dopri5) or 3 (bosh3):
one evaluation at the start, one initial-step probe, then ``s`` per attempted step (the first
stage of a step reuses the last stage of the previous accepted step — both tableaus are FSAL).

``solve(pf_ode, x, method="dopri5" | "bosh3", rtol=..., atol=...)`` runs the probability-flow ODE
with this integrator (`run_native_adaptive`); ``torchdiffeq:dopri5`` is the same steps through
torchdiffeq. They differ only with ``save_at``: here a step is shortened to end on each save
point, torchdiffeq interpolates its dense output there.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from ._checks import positive, positive_or_inf
from .registry import MethodInfo, Option, register
from .adaptive_per_sample import integrate_per_sample
from .stats import Solution, SolverError, SolverStats, counted_problem

__all__ = ["integrate_adaptive", "initial_step", "run_native_adaptive", "NATIVE_ADAPTIVE_METHODS", "CONTROLLER_OPTIONS",
           "ADAPTIVE_NORMS"]

F64 = torch.float64
State = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class _Tableau:
    """An explicit embedded FSAL Runge–Kutta pair: nodes ``c`` (stages 2..s+1), rows ``a``,
    error weights ``e`` = b − b̂ (the solution weights equal the last row of ``a``)."""

    order: int
    c: Tuple[float, ...]
    a: Tuple[Tuple[float, ...], ...]
    e: Tuple[float, ...]


# Dormand & Prince (1980), with Shampine's error weights (as in torchdiffeq, MATLAB ode45).
_DOPRI5 = _Tableau(
    order=5,
    c=(1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=((1 / 5,),
       (3 / 40, 9 / 40),
       (44 / 45, -56 / 15, 32 / 9),
       (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
       (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
       (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
    e=(35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
       -2187 / 6784 + 12231 / 42400, 11 / 84 - 649 / 6300, -1 / 60),
)

# Bogacki & Shampine (1989), 3(2).
_BOSH3 = _Tableau(
    order=3,
    c=(1 / 2, 3 / 4, 1.0),
    a=((1 / 2,),
       (0.0, 3 / 4),
       (2 / 9, 1 / 3, 4 / 9)),
    e=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
)

#: native adaptive methods -> (tableau, new evaluations per attempted step)
NATIVE_ADAPTIVE_METHODS: Dict[str, int] = {"dopri5": 6, "bosh3": 3}
_TABLEAUS = {"dopri5": _DOPRI5, "bosh3": _BOSH3}
#: error norms of the native integrator: one shared step sized by the batch RMS or by the worst
#: sample, or per-sample stepping (each sample its own steps)
ADAPTIVE_NORMS = ("batch", "per-sample", "independent")


class _SegmentNorm:
    """RMS per component (column block) — over the batch or per sample — then the max."""

    def __init__(self, bounds: Sequence[int], per_sample: bool):
        self.blocks = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
        self.per_sample = per_sample

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        end = self.blocks[-1][1]
        r2 = (r if end == r.shape[1] else r[:, :end]).square()  # columns past the blocks are not controlled
        if self.per_sample:
            parts = [r2[:, a:b].mean(1).max() for a, b in self.blocks] if len(self.blocks) > 1 else [r2.mean(1).max()]
        else:
            parts = [r2[:, a:b].mean() for a, b in self.blocks] if len(self.blocks) > 1 else [r2.mean()]
        m = parts[0] if len(parts) == 1 else torch.stack(parts).max()
        return m.sqrt()


def _tol_like(tol, y: State):
    if isinstance(y, torch.Tensor):
        return tol
    if isinstance(tol, (tuple, list)):
        return tuple(tol)
    return tuple(tol for _ in y)


def initial_step(mon, y0: State, t0: float, t1: float, order: int, rtol, atol, norm: Callable,
                  grad: bool) -> Tuple[float, State]:
    """The first step size: torchdiffeq's ``_select_initial_step`` (Hairer–Nørsett–Wanner II.4) with
    the probe distance clamped, ``h0 <= |t1 - t0|``, so the probe stays inside the interval.

    ``mon.call_direct(t, y)`` is a counted evaluation at a float time; ``y0`` a tensor or a tuple
    of tensors (``rtol``/``atol`` then scalars or tuples); ``norm`` the error norm. Returns the
    first step (a positive float) and ``f0 = f(t0, y0)`` (computed with grad mode ``grad``, so a
    caller can reuse it as its first evaluation). Two counted evaluations. Used by
    `integrate_adaptive` and by the torchdiffeq backend.
    """
    direction = 1.0 if t1 > t0 else -1.0
    length = abs(t1 - t0)
    with torch.set_grad_enabled(grad):
        f0 = mon.call_direct(t0, y0)
    with torch.no_grad():
        if isinstance(y0, torch.Tensor):
            scale = atol + y0.abs() * rtol
            d0, d1 = float(norm(y0 / scale)), float(norm(f0 / scale))
        else:
            rt, at = _tol_like(rtol, y0), _tol_like(atol, y0)
            scale = tuple(a + c.abs() * r for c, r, a in zip(y0, rt, at))
            d0 = float(norm(tuple(c / s for c, s in zip(y0, scale))))
            d1 = float(norm(tuple(c / s for c, s in zip(f0, scale))))
        h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
        h0 = min(abs(h0), length)  # the one change: the probe stays in [t_end, t_start]
        if isinstance(y0, torch.Tensor):
            y1 = y0 + (direction * h0) * f0
        else:
            y1 = tuple(c + (direction * h0) * f for c, f in zip(y0, f0))
        f1 = mon.call_direct(t0 + direction * h0, y1)
        if isinstance(y0, torch.Tensor):
            d2 = float(norm((f1 - f0) / scale)) / h0
        else:
            d2 = float(norm(tuple((a - b) / s for a, b, s in zip(f1, f0, scale)))) / h0
        if d1 <= 1e-15 and d2 <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / max(d1, d2)) ** (1.0 / float(order))
    first = min(100.0 * h0, h1, length)
    if not math.isfinite(first) or first <= 0.0:
        first = length * 1e-3
    return first, f0


class _Counted:
    """``call_direct(t, y)`` for the initial-step heuristic: a counted evaluation at a float time."""

    __slots__ = ("func", "nfe", "device")

    def __init__(self, func, device):
        self.func, self.nfe, self.device = func, 0, device

    def call_direct(self, t: float, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.func(torch.tensor(t, dtype=F64, device=self.device), y)


def _positive(v, name: str, allow_inf: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (v > 0) or \
            (not allow_inf and not math.isfinite(v)) or math.isnan(v):
        raise ValueError(f"{name} must be a positive{'' if allow_inf else ' finite'} number, got {v!r}")
    return float(v)


def integrate_adaptive(func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], y0: torch.Tensor,
                       t_start: float, t_end: float, *, method: str = "dopri5", rtol: float, atol: float,
                       norm: str = "batch", segments: Sequence[int] = (), first_step: Optional[float] = None,
                       max_step: float = math.inf, safety: float = 0.9, ifactor: float = 10.0,
                       dfactor: float = 0.2, max_steps: Optional[int] = None, min_step: Optional[float] = None,
                       save_at: Sequence[float] = (), sample_index: bool = False,
                       error_columns: Optional[int] = None) -> Tuple[torch.Tensor, Dict[str, Any]]:
    r"""Integrate ``dy/dt = func(t, y)`` from ``t_start`` to ``t_end``; return ``(y(t_end), info)``.

    Parameters
    ----------
    func:
        ``func(t, y) -> (B, D)`` with ``t`` a float64 0-d tensor on y's device, always inside
        ``[min(t_start, t_end), max(t_start, t_end)]``, and ``y`` a ``(B, D)`` tensor the function
        must not modify (it may be a view of solver memory). Called without grad mode; it may
        enable grad internally (e.g. for a divergence).
    y0:
        ``(B, D)`` floating tensor (float64 recommended: the error control works in its dtype).
    t_start, t_end:
        Python floats, ``t_start != t_end``, either order.
    method:
        ``"dopri5"`` (order 5) or ``"bosh3"`` (order 3).
    rtol, atol:
        Positive tolerances.
    norm:
        ``"batch"`` (torchdiffeq's RMS over the batch), ``"per-sample"`` (one step for the batch,
        sized for the worst sample) or ``"independent"`` (per-sample stepping: each sample has
        its own step size, accepts or rejects on its own error and stops at its own end, see
        `sdekit.solvers.adaptive_per_sample`; ``func`` then receives only the samples still
        running, with ``t`` a ``(n,)`` tensor of their times).
    segments:
        Column indices splitting ``D`` into components whose RMS norms are taken separately and
        maxed (``(d,)`` for a state ``[x | Δ]`` with ``x`` in columns ``[0, d)``).
    first_step:
        Initial step size; default: the Hairer–Nørsett–Wanner heuristic (two evaluations).
    max_step:
        Largest step size.
    safety:
        Safety factor of the step-size controller (torchdiffeq's default).
    ifactor:
        Largest factor by which a step may grow (torchdiffeq's default).
    dfactor:
        Smallest factor by which a step may shrink (torchdiffeq's default).
    max_steps:
        Raise `SolverError` after this many attempted steps.
    min_step:
        Raise `SolverError` when the controller proposes a step below it.
    save_at:
        Times strictly between ``t_start`` and ``t_end`` at which to record the state. The step
        that would cross one is shortened to end on it (as for ``t_end``; no interpolation), so
        each save point can add a step compared with a solve without it.
    sample_index:
        ``norm="independent"`` only: call ``func(t, y, index)`` with ``index`` the ``(n,)`` int64
        positions of the running samples in ``y0``'s batch (to select per-sample constants such as
        Hutchinson probes).
    error_columns:
        Only the first ``error_columns`` columns enter the error norm (``segments`` must lie
        inside them); the others are integrated by the same Runge–Kutta quadrature but never
        reject a step or shape the step size. For components that do not feed back into the
        field — a running integral such as the log-density change — whose values are random
        (Hutchinson probes drawn afresh at each evaluation): their noise must not steer the steps,
        or the steps would depend on the draws. Default: all columns.

    Returns
    -------
    tuple
        ``(y1, info)``: the state at ``t_end`` (a new tensor) and a dict with ``nfe``,
        ``steps``, ``accepted``, ``rejected``, ``first_step``, ``last_proposal``, ``t_min``,
        ``t_max`` and ``saved`` (the states at ``save_at``, in the order given). With
        ``norm="independent"`` the scalar counts describe the batched run's critical path
        (``nfe``: batched evaluations, ``steps``: iterations, ``accepted``/``rejected``: those of
        the sample that ran longest), and ``nfe_per_sample``, ``steps_per_sample``,
        ``accepted_per_sample``, ``rejected_per_sample`` (int64 ``(B,)``),
        ``first_step_per_sample`` and ``sample_evals`` (rows evaluated, the sum of
        ``nfe_per_sample``) are added.

    Raises
    ------
    SolverError
        A non-finite error estimate (the state or the field became NaN/inf), a step size that
        underflows or is proposed below ``min_step``, or ``max_steps`` exceeded — with the step
        index, the time reached and the partial statistics.
    """
    cfg = _config(method, y0, rtol, atol, norm, t_start, t_end, segments, first_step, max_step, safety, ifactor,
                  dfactor, max_steps, min_step, save_at, error_columns)
    if not isinstance(sample_index, bool):
        raise TypeError(f"sample_index must be True or False, got {sample_index!r}")
    if sample_index and not cfg.independent:
        raise ValueError("sample_index=True applies to norm='independent' only")
    with torch.no_grad():
        if cfg.independent:
            return integrate_per_sample(func, y0, cfg, sample_index=sample_index)
        return _integrate(func, y0, cfg)


@dataclass(frozen=True)
class _Config:
    """The validated settings of one `integrate_adaptive` call."""

    tab: _Tableau
    method: str
    rtol: float
    atol: float
    t0: float
    t_end: float
    bounds: Tuple[int, ...]
    per_sample: bool
    independent: bool
    first_step: Optional[float]
    max_step: float
    safety: float
    ifactor: float
    dfactor: float
    max_steps: Optional[int]
    min_step: Optional[float]
    save_at: Tuple[float, ...]


def _config(method, y0, rtol, atol, norm, t_start, t_end, segments, first_step, max_step, safety, ifactor, dfactor,
            max_steps, min_step, save_at, error_columns=None) -> _Config:
    """Validate `integrate_adaptive`'s arguments (before any evaluation)."""
    if method not in _TABLEAUS:
        raise ValueError(f"method must be one of {sorted(_TABLEAUS)}, got {method!r}")
    if not isinstance(y0, torch.Tensor) or y0.dim() != 2 or not y0.is_floating_point():
        raise ValueError(f"y0 must be a (B, D) floating tensor, got "
                         f"{tuple(y0.shape) if isinstance(y0, torch.Tensor) else type(y0).__name__}")
    rtol, atol = _positive(rtol, "rtol"), _positive(atol, "atol")
    if norm not in ADAPTIVE_NORMS:
        raise ValueError(f"norm must be one of {ADAPTIVE_NORMS}, got {norm!r}")
    t0, t1 = float(t_start), float(t_end)
    if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
        raise ValueError(f"t_start and t_end must be finite and distinct, got {t_start!r}, {t_end!r}")
    max_step = _positive(max_step, "max_step", allow_inf=True)
    safety, ifactor, dfactor = _positive(safety, "safety"), _positive(ifactor, "ifactor"), _positive(dfactor, "dfactor")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral)
                                  or max_steps < 1):
        raise ValueError(f"max_steps must be a positive integer or None, got {max_steps!r}")
    if min_step is not None:
        min_step = _positive(min_step, "min_step")
    if first_step is not None:
        first_step = _positive(first_step, "first_step")
    lo, hi = min(t0, t1), max(t0, t1)
    save_list = tuple(float(v) for v in save_at)
    if any(not (lo < v < hi) for v in save_list):
        raise ValueError(f"save_at times must lie strictly between t_start and t_end, got {list(save_list[:8])}")
    D = y0.shape[1]
    if error_columns is None:
        error_columns = D
    elif (isinstance(error_columns, bool) or not isinstance(error_columns, numbers.Integral)
          or not 0 < error_columns <= D):
        raise ValueError(f"error_columns must be an integer in [1, {D}] (the state's width) or None, "
                         f"got {error_columns!r}")
    E = int(error_columns)
    bounds = (0,) + tuple(int(s) for s in segments) + (E,)
    if any(not (0 < bounds[i] < bounds[i + 1]) for i in range(1, len(bounds) - 1)) or bounds[-2] >= E:
        raise ValueError(f"segments must be increasing column indices inside (0, {E}), got {tuple(segments)!r}"
                         + (f" (error_columns = {E})" if E < D else ""))
    return _Config(_TABLEAUS[method], method, rtol, atol, t0, t1, bounds, norm == "per-sample", norm == "independent",
                   first_step,
                   max_step, safety, ifactor, dfactor, max_steps, min_step, save_list)


def _integrate(func: Callable, y0: torch.Tensor, cfg: _Config) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """The stepping loop of `integrate_adaptive` (arguments validated; runs under no_grad)."""
    tab, method, t0, t_end = cfg.tab, cfg.method, cfg.t0, cfg.t_end
    B, D = y0.shape
    dev, dt_ = y0.device, y0.dtype
    S = len(tab.c) + 1
    N = B * D
    lo, hi = min(t0, t_end), max(t0, t_end)
    direction = 1.0 if t_end > t0 else -1.0
    norm_fn = _SegmentNorm(cfg.bounds, per_sample=cfg.per_sample)
    rows = [torch.tensor(r, dtype=dt_, device=dev) for r in tab.a]
    e = torch.tensor(tab.e, dtype=dt_, device=dev)
    exponent = 1.0 / tab.order
    stats = SolverStats(backend="native", method=method)

    def fail(msg: str, t: float):
        stats.nfe, stats.steps, stats.accepted, stats.rejected = nfe, accepted + rejected, accepted, rejected
        raise SolverError(msg + f" ({method})", step=accepted + rejected, t=t, stats=stats)

    y = y0.detach().clone()
    K = torch.empty(S, N, dtype=dt_, device=dev)
    counted = _Counted(func, dev)
    if cfg.first_step is None:
        h, f0 = initial_step(counted, y, t0, t_end, tab.order, cfg.rtol, cfg.atol, norm_fn, grad=False)
    else:
        h = min(cfg.first_step, hi - lo)
        f0 = counted.call_direct(t0, y)
    first = h
    nfe = counted.nfe
    if tuple(f0.shape) != (B, D):
        raise ValueError(f"func(t, y) must return shape {(B, D)}, got {tuple(f0.shape)}")
    K[0].copy_(f0.reshape(N))
    t = t0
    accepted = rejected = 0
    y_flat = y.reshape(N)
    # where steps must end: the save points in the direction of integration, then t_end
    stops = sorted(set(cfg.save_at), reverse=direction < 0) + [t_end]
    saved: Dict[float, torch.Tensor] = {}
    k_stop = 0
    while t != t_end:
        if cfg.max_steps is not None and accepted + rejected >= cfg.max_steps:
            fail(f"max_steps = {cfg.max_steps} attempted steps reached before t_end = {t_end}", t)
        h = min(h, cfg.max_step)
        t1 = t + direction * h
        target = stops[k_stop]
        if direction * (t1 - target) >= 0.0:  # a step that would reach or cross a stop ends there
            t1 = target
        hs = t1 - t  # signed step
        if hs == 0.0:
            fail(f"the step size underflowed (h = {h:.3g} at t = {t!r})", t)
        # the stage times, in one host-to-device transfer per step (not one per evaluation)
        tstage = torch.tensor([t1 if ci == 1.0 else min(max(t + ci * hs, lo), hi) for ci in tab.c],
                              dtype=F64, device=dev)
        yi = y_flat
        for i in range(S - 1):
            yi = torch.addmv(y_flat, K[:i + 1].t(), rows[i], alpha=hs)
            f = func(tstage[i], yi.view(B, D))
            K[i + 1].copy_(f.reshape(N))
        nfe += S - 1
        # FSAL: the last stage state is the new solution (its row of ``a`` is b)
        err = torch.mv(K.t(), e).mul_(hs)
        tol = torch.maximum(y_flat.abs(), yi.abs()).mul_(cfg.rtol).add_(cfg.atol)
        ratio = float(norm_fn(err.div_(tol).view(B, D)))
        if not math.isfinite(ratio):
            fail(f"the error estimate is not finite ({ratio!r}): the state or the vector field became NaN/inf", t)
        if ratio <= 1.0:
            accepted += 1
            t = t1
            y_flat = yi
            K[0].copy_(K[S - 1])
            if t == target and t != t_end:
                saved[t] = y_flat.view(B, D).clone()
                k_stop += 1
        else:
            rejected += 1
        floor = 1.0 if ratio < 1.0 else cfg.dfactor
        factor = cfg.ifactor if ratio == 0.0 else min(cfg.ifactor, max(cfg.safety / ratio ** exponent, floor))
        h = abs(hs) * factor
        if cfg.min_step is not None and h < cfg.min_step and t != t_end:
            fail(f"the step-size controller proposed h = {h:.3g} < min_step = {cfg.min_step:g}", t)
    info = {"nfe": nfe, "steps": accepted + rejected, "accepted": accepted, "rejected": rejected,
            "first_step": first, "last_proposal": h, "t_min": lo, "t_max": hi,
            "saved": [saved[v] for v in cfg.save_at]}
    return y_flat.view(B, D), info


def _controller_options(first_step_doc: str) -> Tuple[Option, ...]:
    """The step-size controller options shared by the native and torchdiffeq adaptive methods
    (defaults: `integrate_adaptive`'s, which are torchdiffeq's)."""
    sig = inspect.signature(integrate_adaptive).parameters
    return (Option("first_step", float, None, positive("first_step"), first_step_doc),
            Option("max_step", float, sig["max_step"].default, positive_or_inf("max_step"), "largest step"),
            Option("safety", float, sig["safety"].default, positive("safety"), "controller safety factor"),
            Option("ifactor", float, sig["ifactor"].default, positive("ifactor"), "largest step growth"),
            Option("dfactor", float, sig["dfactor"].default, positive("dfactor"), "largest step shrink"))


CONTROLLER_OPTIONS = _controller_options("first step (default: the initial-step heuristic)")


def run_native_adaptive(plan, x: torch.Tensor) -> Solution:
    """``run`` of the native ``dopri5`` / ``bosh3`` on a `ProbabilityFlowODE`.

    NFE counts score calls. The state is integrated in x's dtype, flattened to ``(B, d)``;
    gradients do not flow through the solve. ``plan.options``: the controller options.
    ``plan.norm == "independent"``: per-sample stepping (the score sees the running samples
    only, with a ``(n,)`` time tensor); the per-sample counters land in ``stats``.
    """
    problem, info, t0, t1 = plan.problem, plan.method, plan.t_start, plan.t_end
    stats = SolverStats(method=info.name, backend="native")
    p, counter = counted_problem(problem, check_inputs=False)  # every t stays in [t_end, t_start]
    shape, B = tuple(x.shape), x.shape[0]

    def func(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # y: (n, D), n <= B (norm="independent")
        n = y.shape[0]
        return p(t, y.view((n,) + shape[1:])).reshape(n, -1)

    interior = plan.save_interior()
    try:
        y, inf = integrate_adaptive(func, x.detach().reshape(B, -1), t0, t1, method=info.name, rtol=plan.rtol,
                                    atol=plan.atol, norm=plan.norm, max_steps=plan.max_steps, min_step=plan.min_step,
                                    save_at=interior, **plan.options)
    except SolverError as e:
        if e.stats is not None:
            stats.steps, stats.accepted, stats.rejected = e.stats.steps, e.stats.accepted, e.stats.rejected
        stats.nfe = counter.count
        e.stats = stats
        raise
    stats.nfe = counter.count
    stats.steps, stats.accepted, stats.rejected = inf["steps"], inf["accepted"], inf["rejected"]
    stats.extra.update(first_step=inf["first_step"], t_min=inf["t_min"], t_max=inf["t_max"])
    if plan.norm == "independent":
        stats.set_per_sample(inf)
    sol = Solution(x=y.view(shape), stats=stats)
    if plan.save_at is not None:
        at = {v: s.view(shape) for v, s in zip(interior, inf["saved"])}
        sol.ts, sol.xs = plan.save_at.clone(), stack_saved(plan, x, sol.x, at)
    return sol


def stack_saved(plan, x0: torch.Tensor, x1: torch.Tensor, interior: Dict[float, torch.Tensor]) -> torch.Tensor:
    """The states at ``plan.save_at`` (in the order given), stacked: ``x0`` at ``t_start``, ``x1``
    at ``t_end`` and ``interior[t]`` in between."""
    t0, t1 = plan.t_start, plan.t_end
    rows = []
    for v in plan.save_at.tolist():
        if abs(v - t0) <= 1e-12 * max(1.0, abs(t0)):
            rows.append(x0.detach().clone())
        elif abs(v - t1) <= 1e-12 * max(1.0, abs(t1)):
            rows.append(x1.clone())
        else:
            rows.append(interior[v])
    return torch.stack(rows)


for _name, _order in (("dopri5", 5.0), ("bosh3", 3.0)):
    register(MethodInfo(name=_name, problem="ode", noise=(), strong_order=_order, weak_order=None,
                        evals_per_step=NATIVE_ADAPTIVE_METHODS[_name], backend="native", stepping=("adaptive",),
                        default_grid=None, stochastic=False, run=run_native_adaptive, options=CONTROLLER_OPTIONS,
                        doc=f"native {_name} (adaptive; torchdiffeq's steps and NFE = 2 + "
                            f"{NATIVE_ADAPTIVE_METHODS[_name]} x attempted steps, less bookkeeping)"))
