r"""torchdiffeq backend: a counted, range-safe ``odeint`` and the ``torchdiffeq:<method>`` solvers.

`odeint_counted` is the one place in sdekit that calls torchdiffeq (the likelihood module
builds on it). It adds what plain ``torchdiffeq.odeint`` lacks for diffusion models:

**Every evaluation stays inside the interval.** Plain torchdiffeq evaluates the vector field
outside ``[t_end, t_start]`` in two ways (both measured on the VP probability-flow ODE):

1. Its initial-step heuristic (``_select_initial_step``, Hairer–Nørsett–Wanner II.4) probes
   ``f(t0 + h0, y0 + h0 f0)`` with ``h0 = 0.01 ||y0|| / ||f0||``; where the drift is ≈ 0 (the VP
   PF drift at T) ``h0`` is huge — run from T = 1 to 1e-3 the probe landed at t = −29.9.
2. Adaptive RK steps run past the last output time and interpolate back (T → 1.044 when
   integrating 1e-3 → 1).

Here the first step is computed by the same heuristic with ``h0`` clamped to ``|t_end − t_start|``
(so the probe lies inside the interval) and passed as ``first_step``; ``step_t = [t_end]`` makes
the controller shorten the step that would cross ``t_end`` so that it ends exactly there. The
adjoint backward pass gets ``step_t = [t_start]`` and a ``first_step`` too (the controller's last
step-size proposal of the forward pass, clamped to the interval), so it never probes outside
either. torchdiffeq casts stage times to the state's dtype before calling the function; the
function receives that time converted back to float64 and clamped into the interval — the clamp
absorbs only this cast (≤ a few ulps of the state dtype; ``info["max_time_clamp"]`` reports the
largest correction and a correction above ``1e-6 · max(1, |t|)`` raises ``RuntimeError``, as it
would mean the guarantee is broken).

**Exact bookkeeping.** Every call of ``func`` is counted (initial-step probes and rejected steps
included). For the adaptive Runge–Kutta methods torchdiffeq computes ``f0 = f(t0, y0)`` and the
probe ``f(t0 + h0, ·)`` once, then ``s`` new evaluations per *attempted* step, where ``s`` is the
number of stages after the first (``len(tableau.alpha)``): the first stage of the next step reuses
the last stage of an accepted step ("FSAL"; a rejected step restarts from the saved ``f0``). So

$$
    \mathrm{NFE} = 2 + s\,(\text{accepted} + \text{rejected}),
$$

with ``s`` = 6 for dopri5 (7-stage Dormand–Prince, FSAL), 13 for dopri8, 3 for bosh3, 2 for
fehlberg2 and 1 for adaptive_heun (torchdiffeq reuses the last stage for the latter two as well,
although their last stage is not evaluated at the new state). Here the heuristic's ``f0`` is
computed once and handed to torchdiffeq's own first call (which torchdiffeq makes with the same
``(t0, y0)``), so the count is exactly torchdiffeq's. With an explicit ``first_step`` in
``options`` there is no probe: ``1 + s·steps``. Fixed-grid methods: ``evals_per_step · steps``
(euler 1, midpoint 2, rk4 4 — torchdiffeq's ``rk4`` is the 3/8 rule). Accepted and rejected steps
come from torchdiffeq's ``callback_accept_step`` / ``callback_reject_step`` hooks.

**Limits and norms.** ``max_steps`` (attempted steps) and ``min_step`` (a controller proposal
below it) raise `SolverError` with the step, the time and the partial
statistics, as do non-finite states and a collapsing step size (torchdiffeq's own assertions are
translated). ``norm="per-sample"`` makes the worst sample meet the tolerance (torchdiffeq's RMS
over the whole batch lets one hard sample's error grow with the batch size).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torchdiffeq
from torchdiffeq._impl.odeint import SOLVERS as _TD_SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver
from torchdiffeq._impl.solvers import FixedGridODESolver

from .adaptive import CONTROLLER_OPTIONS, initial_step
from .fixed import grid_method
from .registry import MethodInfo, Option, register
from .stats import Solution, SolverError, SolverStats, counted_problem

__all__ = ["odeint_counted", "run_torchdiffeq", "ADAPTIVE_METHODS", "FIXED_METHODS", "batch_norm",
           "per_sample_norm"]

F64 = torch.float64
State = Union[torch.Tensor, Tuple[torch.Tensor, ...]]

#: adaptive torchdiffeq methods -> new function evaluations per attempted step
ADAPTIVE_METHODS: Dict[str, int] = {name: len(cls.tableau.alpha) for name, cls in _TD_SOLVERS.items()
                                    if isinstance(cls, type) and issubclass(cls, RKAdaptiveStepsizeODESolver)}
#: fixed-grid torchdiffeq methods -> function evaluations per step (Adams methods: 1 per step after start-up)
FIXED_METHODS: Dict[str, int] = {"euler": 1, "midpoint": 2, "rk4": 4, "heun2": 2, "heun3": 3,
                                 "explicit_adams": 1, "implicit_adams": 1}
FIXED_METHODS = {k: v for k, v in FIXED_METHODS.items() if k in _TD_SOLVERS and
                 issubclass(_TD_SOLVERS[k], FixedGridODESolver)}

# options odeint_counted sets itself (users pass the corresponding keyword instead)
_MANAGED = {"norm": "norm=", "step_t": "(set to the end time automatically)", "grid_constructor": "grid=",
            "step_size": "step_size=", "min_step": "min_step=", "max_num_steps": "max_steps="}
_ADAPTIVE_OPTIONS = {"first_step", "max_step", "safety", "ifactor", "dfactor", "jump_t"}
_FIXED_OPTIONS = {"interp", "perturb", "max_iters"}


# ------------------------------------------------------------------------------------------------
# norms (called by torchdiffeq on the scaled error, on y0 / scale and f0 / scale)
# ------------------------------------------------------------------------------------------------
def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.abs().pow(2).mean().sqrt()


def _rms_per_sample(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0:
        return t.abs()
    return t.abs().pow(2).reshape(t.shape[0], -1).mean(1).sqrt()


def batch_norm(y: State) -> torch.Tensor:
    """torchdiffeq's default: RMS over every element (tensor state); for a tuple state the max over
    components of each component's RMS (torchdiffeq's ``_mixed_norm``)."""
    if isinstance(y, torch.Tensor):
        return _rms(y)
    return torch.stack([_rms(c) for c in y]).max()


def per_sample_norm(y: State) -> torch.Tensor:
    """Max over samples of each sample's RMS (batch first; for a tuple state the max over components
    too, every component batch-first), so the worst sample meets the tolerance."""
    if isinstance(y, torch.Tensor):
        return _rms_per_sample(y).max()
    return torch.stack([_rms_per_sample(c).max() for c in y]).max()


# ------------------------------------------------------------------------------------------------
# the counted, range-clamping function wrapper
# ------------------------------------------------------------------------------------------------
class _Monitor(torch.nn.Module):
    """Wraps ``func(t, y)``: converts t to float64 and clamps it into the interval, counts calls,
    and receives torchdiffeq's step callbacks (attached per instance, only those the solver
    supports, so torchdiffeq does not warn)."""

    def __init__(self, func: Callable, lo: float, hi: float, t_start: float, t_end: float, method: str,
                 adaptive: bool, max_steps: Optional[int], min_step: Optional[float], adjoint: bool,
                 step_callback: Optional[Callable]):
        super().__init__()
        self.func = func  # registered as a submodule when it is one (adjoint parameter discovery)
        self.lo, self.hi, self.t_start, self.t_end = lo, hi, t_start, t_end
        self.method, self.adaptive = method, adaptive
        self.max_steps, self.min_step = max_steps, min_step
        self.step_callback = step_callback
        self.phase = "forward"
        self.counts = {"forward": _Counts(), "adjoint": _Counts()}
        self._slack = 1e-6 * max(1.0, abs(lo), abs(hi))
        # mutable per-call bookkeeping lives in a plain slotted object: writing attributes of an
        # nn.Module goes through Module.__setattr__, measurably slow at one call per evaluation
        self.track = _Track()
        self.callback_step = self._on_step
        if adaptive:
            self.callback_accept_step = self._on_accept
            self.callback_reject_step = self._on_reject
        if adjoint:
            self.callback_step_adjoint = self._on_step
            if adaptive:
                self.callback_accept_step_adjoint = self._on_accept
                self.callback_reject_step_adjoint = self._on_reject

    # -- evaluation --------------------------------------------------------------------------------
    def clamp_time(self, t) -> torch.Tensor:
        """``t`` as a float64 0-d tensor clamped into ``[lo, hi]``; tracks the range seen and the
        largest clamp correction (Python floats: one host read of ``t``, no extra kernels)."""
        tf = float(t.detach()) if isinstance(t, torch.Tensor) else float(t)
        tc = min(max(tf, self.lo), self.hi)
        tr = self.track
        tr.dev = max(tr.dev, abs(tf - tc))
        tr.tmin = min(tr.tmin, tc)
        tr.tmax = max(tr.tmax, tc)
        if tc == tf and isinstance(t, torch.Tensor):
            return t.detach().to(F64)  # no gradient w.r.t. time: the output times never require grad
        dev = t.device if isinstance(t, torch.Tensor) else None
        return torch.tensor(tc, dtype=F64, device=dev)

    def forward(self, t, y):
        if self.track.cached_f0 is not None:
            t_c, y_c, f_c = self.track.cached_f0
            self.track.cached_f0 = None
            if abs(float(t) - t_c) <= self._slack and _same_state(y, y_c):
                return f_c  # torchdiffeq's first call repeats the heuristic's f(t0, y0): counted once
        self.counts[self.phase].nfe += 1
        return self.func(self.clamp_time(t), y)

    def call_direct(self, t: float, y: State) -> State:
        """A counted evaluation at a float time (used by the initial-step heuristic)."""
        self.counts[self.phase].nfe += 1
        return self.func(self.clamp_time(torch.tensor(t, dtype=F64, device=_device(y))), y)

    # -- callbacks ---------------------------------------------------------------------------------
    def _on_step(self, t0, y0, dt):
        c = self.counts[self.phase]
        c.t_last = t0
        if self.step_callback is not None and self.phase == "forward":
            self.step_callback(c.attempts, t0, y0)
        if self.max_steps is not None and c.attempts >= self.max_steps:
            raise SolverError(f"max_steps={self.max_steps} exceeded ({self.phase} pass of torchdiffeq:"
                              f"{self.method})", step=c.attempts, t=float(t0), stats=self.stats())
        dtf = float(dt)
        if not math.isfinite(dtf) or dtf <= 0.0:
            raise SolverError(f"step size collapsed to {dtf!r} ({self.phase} pass of torchdiffeq:{self.method}): "
                              f"the error estimate was not finite; the vector field or state is probably NaN/inf",
                              step=c.attempts, t=float(t0), stats=self.stats())
        if self.adaptive:
            self.track.last_proposal = dtf
            if self.min_step is not None and dtf < self.min_step:
                raise SolverError(f"the step-size controller proposed dt={dtf:.3g} < min_step={self.min_step:g} "
                                  f"({self.phase} pass of torchdiffeq:{self.method})", step=c.attempts,
                                  t=float(t0), stats=self.stats())
        if not _all_finite(y0):
            raise SolverError(f"the state became non-finite (NaN or inf) ({self.phase} pass of torchdiffeq:"
                              f"{self.method})", step=max(c.attempts - 1, 0), t=float(t0), stats=self.stats())
        c.attempts += 1
        if not self.adaptive:
            c.accepted += 1

    def _on_accept(self, t0, y0, dt):
        self.counts[self.phase].accepted += 1

    def _on_reject(self, t0, y0, dt):
        self.counts[self.phase].rejected += 1

    # -- reporting ---------------------------------------------------------------------------------
    def stats(self) -> SolverStats:
        c = self.counts["forward"]
        return SolverStats(nfe=c.nfe, steps=c.attempts, accepted=c.accepted, rejected=c.rejected,
                           backend="torchdiffeq", method=f"torchdiffeq:{self.method}")

    def time_report(self) -> Dict[str, float]:
        tr = self.track
        if tr.tmin == math.inf:
            return {"t_min": float("nan"), "t_max": float("nan"), "max_time_clamp": 0.0}
        return {"t_min": tr.tmin, "t_max": tr.tmax, "max_time_clamp": tr.dev}

    def check_clamp(self) -> None:
        d = self.track.dev
        if d > self._slack:
            raise RuntimeError(f"internal error: torchdiffeq evaluated {d:.3g} outside [{self.lo}, {self.hi}] "
                               f"(clamped); please report")


class _Track:
    __slots__ = ("dev", "tmin", "tmax", "last_proposal", "cached_f0")

    def __init__(self):
        self.dev, self.tmin, self.tmax = 0.0, math.inf, -math.inf
        self.last_proposal: Optional[float] = None
        self.cached_f0: Optional[Tuple[float, State, State]] = None


class _Counts:
    __slots__ = ("nfe", "attempts", "accepted", "rejected", "t_last")

    def __init__(self):
        self.nfe = self.attempts = self.accepted = self.rejected = 0
        self.t_last = None

    def as_dict(self) -> Dict[str, int]:
        return {"nfe": self.nfe, "steps": self.attempts, "accepted": self.accepted, "rejected": self.rejected}


def _device(y: State) -> torch.device:
    return y.device if isinstance(y, torch.Tensor) else y[0].device


def _all_finite(y: State) -> bool:
    """One reduction and one host read per component (a sum is non-finite iff an entry is, up to
    overflow of the sum itself, which only a diverging state reaches)."""
    if isinstance(y, torch.Tensor):
        return math.isfinite(float(y.detach().sum()))
    return all(math.isfinite(float(c.detach().sum())) for c in y)


def _same_state(a: State, b: State) -> bool:
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        return False
    if isinstance(a, torch.Tensor):
        return a is b or (a.shape == b.shape and torch.equal(a, b))
    return len(a) == len(b) and all(x is y or (x.shape == y.shape and torch.equal(x, y)) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------
# odeint_counted
# ------------------------------------------------------------------------------------------------
def _check_float(v, name: str, positive: bool = False) -> float:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite real number, got {v!r}")
    if positive and not float(v) > 0:
        raise ValueError(f"{name} must be positive, got {v!r}")
    return float(v)


def _check_tol(v, name: str, y0: State):
    if v is None:
        raise ValueError(f"adaptive methods need an explicit {name} (no library default is used)")
    if isinstance(v, (tuple, list)):
        if isinstance(y0, torch.Tensor) or len(v) != len(y0):
            raise ValueError(f"a tuple {name} needs a tuple state with one entry per component; got {v!r}")
        return tuple(_check_float(x, name, positive=True) for x in v)
    return _check_float(v, name, positive=True)


def _check_y0(y0) -> Tuple[bool, Optional[int]]:
    if isinstance(y0, torch.Tensor):
        comps = (y0,)
        is_tuple = False
    elif isinstance(y0, tuple) and len(y0) > 0 and all(isinstance(c, torch.Tensor) for c in y0):
        comps = y0
        is_tuple = True
    else:
        raise TypeError(f"y0 must be a tensor or a non-empty tuple of tensors, got {type(y0).__name__}")
    for c in comps:
        if not c.is_floating_point():
            raise TypeError(f"y0 must be floating point, got dtype {c.dtype}")
    if len({c.device for c in comps}) > 1 or len({c.dtype for c in comps}) > 1:
        raise ValueError("all components of a tuple y0 must share one dtype and device")
    B = comps[0].shape[0] if comps[0].dim() > 0 else None
    return is_tuple, B


def _output_times(save_at, t_start: float, t_end: float):
    """Output times for torchdiffeq and, for each save_at entry, its index among them."""
    if save_at is None:
        return [t_start, t_end], None, None
    s = torch.as_tensor(save_at, dtype=F64).detach().flatten().cpu()
    lo, hi = min(t_start, t_end), max(t_start, t_end)
    tol = 1e-12 * max(1.0, abs(lo), abs(hi))
    if s.numel() == 0 or not bool(torch.isfinite(s).all()) or bool((s < lo - tol).any()) or bool((s > hi + tol).any()):
        raise ValueError(f"save_at must hold finite times within [{lo}, {hi}], got {s.tolist()[:8]}")
    vals = []
    for v in s.clamp(lo, hi).tolist():
        if abs(v - t_start) <= tol:
            v = t_start
        elif abs(v - t_end) <= tol:
            v = t_end
        vals.append(v)
    interior = sorted({v for v in vals if v != t_start and v != t_end}, reverse=t_end < t_start)
    times = [t_start] + interior + [t_end]
    pos = {v: i for i, v in enumerate(times)}
    return times, [pos[v] for v in vals], s


def _grid_between(grid: torch.Tensor) -> Callable:
    """torchdiffeq ``grid_constructor``: the points of ``grid`` strictly between ``t[0]`` and ``t[-1]``
    (in their order) with those two as end points. Serves the forward pass and every interval of
    the adjoint backward pass (which steps on the same grid, reversed)."""
    def ctor(f, y, t):
        a, b = float(t[0]), float(t[-1])
        lo_, hi_ = min(a, b), max(a, b)
        inner = grid[(grid > lo_) & (grid < hi_)].sort(descending=b < a).values
        return torch.cat([t[:1], inner.to(dtype=t.dtype, device=t.device), t[-1:]])
    return ctor


def odeint_counted(func: Callable, y0: State, t_start: float, t_end: float, *, method: str,
                   rtol=None, atol=None, step_size: Optional[float] = None,
                   grid: Optional[torch.Tensor] = None, norm: str = "batch", max_steps: Optional[int] = None,
                   min_step: Optional[float] = None, save_at=None, adjoint: bool = False,
                   adjoint_params: Optional[Sequence[torch.Tensor]] = None,
                   options: Optional[Dict[str, Any]] = None,
                   step_callback: Optional[Callable] = None) -> Tuple[State, Optional[State], Dict[str, Any]]:
    r"""Integrate ``dy/dt = func(t, y)`` from ``t_start`` to ``t_end`` with torchdiffeq, counted and
    without evaluating ``func`` outside the interval (see the module docs).

    Parameters
    ----------
    func:
        ``func(t, y)``; ``t`` is a float64 0-d tensor (on y's device) guaranteed to lie in
        ``[min(t_start, t_end), max(t_start, t_end)]``; ``y`` has y0's structure (tensor or tuple).
        For ``adjoint=True`` it should be an ``nn.Module`` holding the parameters, or pass
        ``adjoint_params``.
    y0:
        Initial state: a floating tensor or a tuple of them (one dtype and device).
    t_start, t_end:
        Python floats, any order (``t_start > t_end`` integrates backwards in time).
    method:
        A torchdiffeq method: adaptive ``dopri5``, ``dopri8``, ``bosh3``, ``fehlberg2``,
        ``adaptive_heun`` (need ``rtol``, ``atol``), or fixed-grid ``euler``, ``midpoint``,
        ``rk4``, ``heun2``, ``heun3``, ``explicit_adams``, ``implicit_adams`` (need ``step_size``
        or ``grid``).
    rtol, atol:
        Positive floats (or, for a tuple state, tuples with one entry per component).
    step_size:
        Fixed-grid methods: uniform step (torchdiffeq's grid; the last step is shortened).
    grid:
        Fixed-grid methods: 1-D tensor of times running monotonically from ``t_start`` to
        ``t_end`` (first and last entries equal to them); the solver steps exactly on it.
    norm:
        ``"batch"`` (torchdiffeq's default: RMS over all elements; for tuple states the max of
        the components' RMS), ``"per-sample"`` (max over samples of each sample's RMS: the worst
        sample meets the tolerance; components batch-first), or ``"seminorm"`` (adjoint only:
        forward ``"batch"``, backward pass measured on the state and its adjoint only, not the
        parameter gradients — torchdiffeq's ``adjoint_options=dict(norm="seminorm")``).
    max_steps:
        Raise `SolverError` when more steps would be attempted (accepted + rejected;
        the adjoint backward pass has its own budget of the same size).
    min_step:
        Adaptive methods: raise `SolverError` when the controller proposes a smaller step
        (the final step, shortened to land on ``t_end``, does not count).
    save_at:
        Times in the interval; the states there are returned stacked in the order given
        (torchdiffeq's output times are ``[t_start, *save_at sorted along the direction of
        travel, t_end]``; dense output between steps for adaptive methods, linear interpolation
        for fixed-grid ones unless on the grid).
    adjoint:
        Use ``torchdiffeq.odeint_adjoint`` (memory O(1) in the steps); the backward pass uses the
        same tolerances, keeps every evaluation in the interval too, and is counted separately
        (``info["adjoint"]``, filled when ``backward()`` runs).
    adjoint_params:
        Parameters to differentiate in the adjoint pass (default: ``func.parameters()`` if
        ``func`` is an ``nn.Module``; otherwise required).
    options:
        Extra torchdiffeq options: adaptive ``first_step`` (then no initial-step probe),
        ``max_step``, ``safety``, ``ifactor``, ``dfactor``, ``jump_t``; fixed-grid ``interp``,
        ``perturb``, ``max_iters``. Options this function manages (``norm``, ``step_t``,
        ``grid_constructor``, ``step_size``, ``min_step``, ``max_num_steps``) are refused.
    step_callback:
        Optional ``callback(k, t, y)`` called before each attempted step ``k`` (0-based, forward
        pass) with its start time (float64 0-d tensor) and state.

    Returns
    -------
    tuple
        ``(y_final, ys, info)``: ``y_final`` at ``t_end`` (same structure as y0); ``ys`` the
        states at ``save_at`` stacked along a new leading dimension (a tuple of such for tuple
        states) or ``None``; ``info`` a dict: ``nfe``, ``steps`` (attempted), ``accepted``,
        ``rejected``, ``method``, ``adaptive``,
        ``first_step`` (adaptive), ``t_min``/``t_max`` (range of times passed to ``func``),
        ``max_time_clamp``, ``adjoint`` (a live dict of the backward pass counts, or None).

    Raises
    ------
    ValueError, TypeError
        Invalid arguments (before any evaluation).
    SolverError
        Step limit, step-size collapse or non-finite state; ``.stats`` holds the partial counts.
    """
    req = _request(func, y0, t_start, t_end, method, rtol, atol, step_size, grid, norm, max_steps, min_step,
                   save_at, adjoint, adjoint_params, options, step_callback)
    mon = _Monitor(func, req.lo, req.hi, req.t_start, req.t_end, method, req.adaptive, req.max_steps, req.min_step,
                   adjoint, step_callback)
    info: Dict[str, Any] = {"method": method, "adaptive": req.adaptive, "norm": norm}
    opts = _solver_options(req, mon, y0, info)
    kwargs = dict(method=method, options=opts)
    kwargs.update(rtol=req.rtol, atol=req.atol) if req.adaptive else kwargs.update(rtol=0.0, atol=0.0)
    t_out = torch.tensor(req.times, dtype=F64, device=_device(y0))
    adj_first = None
    try:
        if adjoint:
            adj_opts, adj_first = _adjoint_options(req, opts)
            sol = torchdiffeq.odeint_adjoint(mon, y0, t_out, adjoint_params=req.adjoint_params,
                                             adjoint_options=adj_opts, **kwargs)
        else:
            sol = torchdiffeq.odeint(mon, y0, t_out, **kwargs)
    except AssertionError as e:  # torchdiffeq's own checks ('underflow in dt', non-finite state, ...)
        c = mon.counts["forward"]
        raise SolverError(f"torchdiffeq:{method} failed: {e}", step=c.attempts,
                          t=None if c.t_last is None else float(c.t_last), stats=mon.stats()) from e
    mon.check_clamp()
    mon.phase = "adjoint"
    if adj_first is not None and mon.track.last_proposal is not None:
        adj_first.fill_(min(mon.track.last_proposal, req.hi - req.lo))
    y_final = tuple(s[-1] for s in sol) if req.is_tuple else sol[-1]
    if not _all_finite(y_final):
        c = mon.counts["forward"]
        raise SolverError(f"the state became non-finite (NaN or inf) (torchdiffeq:{method})", step=c.attempts,
                          t=req.t_end, stats=mon.stats())
    ys = None
    if req.save_idx is not None:
        idx = torch.tensor(req.save_idx, dtype=torch.long, device=_device(y0))
        ys = tuple(s.index_select(0, idx) for s in sol) if req.is_tuple else sol.index_select(0, idx)
        info["save_at"] = req.save_t
    info.update(mon.counts["forward"].as_dict())
    info.update(mon.time_report())
    info["adjoint"] = _LiveCounts(mon) if adjoint else None
    return y_final, ys, info


@dataclass(frozen=True)
class _Request:
    """The validated arguments of one `odeint_counted` call."""

    method: str
    adaptive: bool
    is_tuple: bool
    t_start: float
    t_end: float
    lo: float
    hi: float
    norm: str
    rtol: Any
    atol: Any
    step_size: Optional[float]
    grid: Optional[torch.Tensor]
    max_steps: Optional[int]
    min_step: Optional[float]
    options: Dict[str, Any]
    times: list
    save_idx: Optional[list]
    save_t: Optional[torch.Tensor]
    adjoint: bool
    adjoint_params: Optional[tuple]


def _request(func, y0, t_start, t_end, method, rtol, atol, step_size, grid, norm, max_steps, min_step, save_at,
             adjoint, adjoint_params, options, step_callback) -> _Request:
    """Validate `odeint_counted`'s arguments (before any evaluation)."""
    if not callable(func):
        raise TypeError(f"func must be callable (t, y), got {type(func).__name__}")
    if not isinstance(method, str) or method not in _TD_SOLVERS or method == "scipy_solver":
        valid = sorted(list(ADAPTIVE_METHODS) + list(FIXED_METHODS))
        raise ValueError(f"method must be a torchdiffeq method, one of {valid}; got {method!r}")
    adaptive = method in ADAPTIVE_METHODS
    is_tuple, B = _check_y0(y0)
    t_start = _check_float(t_start, "t_start")
    t_end = _check_float(t_end, "t_end")
    if t_start == t_end:
        raise ValueError(f"t_start and t_end must differ, both are {t_start!r}")
    lo, hi = min(t_start, t_end), max(t_start, t_end)
    _check_norm(norm, adjoint, is_tuple, B, y0)
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
    if min_step is not None:
        min_step = _check_float(min_step, "min_step", positive=True)
        if not adaptive:
            raise ValueError(f"min_step applies to adaptive methods; {method!r} is fixed-grid")
    opts = _check_options(options, method, adaptive, hi - lo)
    if adaptive:
        rtol = _check_tol(rtol, "rtol", y0)
        atol = _check_tol(atol, "atol", y0)
        if step_size is not None or grid is not None:
            raise ValueError(f"adaptive method {method!r} chooses its own steps; do not pass step_size or grid")
    else:
        step_size, grid = _check_fixed_grid(method, rtol, atol, step_size, grid, t_start, t_end)
    times, save_idx, save_t = _output_times(save_at, t_start, t_end)
    if adjoint:
        adjoint_params = _check_adjoint_params(func, adjoint_params)
    if step_callback is not None and not callable(step_callback):
        raise TypeError("step_callback must be callable (k, t, y)")
    return _Request(method, adaptive, is_tuple, t_start, t_end, lo, hi, norm, rtol, atol, step_size, grid,
                    max_steps, min_step, opts, times, save_idx, save_t, bool(adjoint), adjoint_params)


def _check_norm(norm, adjoint, is_tuple, B, y0) -> None:
    if norm not in ("batch", "per-sample", "seminorm"):
        raise ValueError(f"norm must be 'batch', 'per-sample' or 'seminorm', got {norm!r}")
    if norm == "seminorm" and not adjoint:
        raise ValueError("norm='seminorm' applies to the adjoint backward pass: pass adjoint=True "
                         "(or use norm='batch' / 'per-sample')")
    if norm == "per-sample" and B is None:
        raise ValueError("norm='per-sample' needs batch-first states (y0 has no batch dimension)")
    if norm == "per-sample" and is_tuple and any(c.dim() == 0 or c.shape[0] != B for c in y0):
        raise ValueError("norm='per-sample' needs every component of a tuple y0 to be batch-first with the "
                         f"same batch size; got shapes {[tuple(c.shape) for c in y0]}")


def _check_options(options, method: str, adaptive: bool, length: float) -> Dict[str, Any]:
    opts = dict(options or {})
    for k in opts:
        if k in _MANAGED:
            raise ValueError(f"option {k!r} is managed by odeint_counted; use {_MANAGED[k]}")
        allowed = _ADAPTIVE_OPTIONS if adaptive else _FIXED_OPTIONS
        if k not in allowed:
            raise ValueError(f"unknown option {k!r} for torchdiffeq method {method!r}; valid: {sorted(allowed)}")
    if adaptive and "first_step" in opts:
        opts["first_step"] = min(_check_float(opts["first_step"], "options['first_step']", positive=True), length)
    return opts


def _check_fixed_grid(method, rtol, atol, step_size, grid, t_start, t_end):
    if rtol is not None or atol is not None:
        raise ValueError(f"rtol/atol apply to adaptive methods; {method!r} is fixed-grid (pass step_size or grid)")
    if (step_size is None) == (grid is None):
        raise ValueError(f"fixed-grid method {method!r} needs exactly one of step_size or grid")
    if step_size is not None:
        return _check_float(step_size, "step_size", positive=True), None
    grid = torch.as_tensor(grid, dtype=F64).detach().flatten().cpu()
    if grid.numel() < 2 or float(grid[0]) != t_start or float(grid[-1]) != t_end:
        raise ValueError(f"grid must run from t_start={t_start} to t_end={t_end} (exact end points), got "
                         f"{grid.tolist()[:4]}...")
    if not bool(((grid[1:] - grid[:-1]) * (t_end - t_start) > 0).all()):
        raise ValueError("grid must be strictly monotone from t_start to t_end")
    return None, grid


def _check_adjoint_params(func, adjoint_params) -> tuple:
    if adjoint_params is None:
        if not isinstance(func, torch.nn.Module):
            raise ValueError("adjoint=True needs func to be an nn.Module (its parameters are differentiated) "
                             "or an explicit adjoint_params (a tuple of tensors; () for none)")
        return tuple(func.parameters())
    adjoint_params = tuple(adjoint_params)
    if not all(isinstance(p, torch.Tensor) for p in adjoint_params):
        raise TypeError("adjoint_params must be a sequence of tensors")
    return adjoint_params


def _solver_options(req: _Request, mon: _Monitor, y0: State, info: Dict[str, Any]) -> Dict[str, Any]:
    """torchdiffeq's ``options``: the norm, ``step_t`` and first step (adaptive), or the grid."""
    opts = dict(req.options)
    if req.adaptive:
        norm_fn = per_sample_norm if req.norm == "per-sample" else batch_norm
        opts["norm"] = norm_fn
        opts["step_t"] = torch.tensor([req.t_end], dtype=F64, device=_device(y0))
        if "first_step" not in opts:
            order = _TD_SOLVERS[req.method].order
            first, f0 = initial_step(mon, y0, req.t_start, req.t_end, order, req.rtol, req.atol, norm_fn,
                                     grad=torch.is_grad_enabled() and not req.adjoint)
            mon.track.cached_f0 = (req.t_start, y0, f0)
            opts["first_step"] = first
        info["first_step"] = float(opts["first_step"])
    elif req.grid is not None:
        opts["grid_constructor"] = _grid_between(req.grid)
    else:
        opts["step_size"] = req.step_size
    return opts


def _adjoint_options(req: _Request, opts: Dict[str, Any]):
    """The backward pass's options; its first step is refilled after the forward pass."""
    adj_opts = {k: v for k, v in opts.items() if k not in ("norm", "first_step", "step_t")}
    adj_first = None
    if req.adaptive:
        adj_first = torch.tensor(float(opts["first_step"]), dtype=F64)
        adj_opts["first_step"] = adj_first  # refilled with the forward pass's last proposal
        # The backward odeint receives times in the forward pass's *internal* variable
        # (torchdiffeq negates time for a decreasing forward solve), so does step_t.
        adj_opts["step_t"] = torch.tensor([req.t_start if req.t_end > req.t_start else -req.t_start], dtype=F64,
                                          device=opts["step_t"].device)
        if req.norm == "seminorm":
            adj_opts["norm"] = "seminorm"
    if req.grid is not None:  # the backward pass steps on the same grid (internal time, see above)
        adj_opts["grid_constructor"] = _grid_between(req.grid if req.t_end > req.t_start else -req.grid)
    return adj_opts, adj_first


class _LiveCounts(dict):
    """The adjoint pass's counts, read when accessed (they fill in during ``backward()``)."""

    def __init__(self, mon: _Monitor):
        super().__init__()
        self._mon = mon

    def _refresh(self):
        dict.update(self, self._mon.counts["adjoint"].as_dict())
        dict.update(self, self._mon.time_report())  # t range / clamp over both passes

    def __getitem__(self, k):
        self._refresh()
        return dict.__getitem__(self, k)

    def __repr__(self):
        self._refresh()
        return dict.__repr__(self)

    def items(self):
        self._refresh()
        return dict.items(self)

    def get(self, k, default=None):
        self._refresh()
        return dict.get(self, k, default)


# ------------------------------------------------------------------------------------------------
# solve() entry points
# ------------------------------------------------------------------------------------------------
def run_torchdiffeq(plan, x: torch.Tensor) -> Solution:
    """``run`` of ``torchdiffeq:<adaptive method>`` on a `ProbabilityFlowODE`.

    NFE counts score calls. ``plan.options``: the controller options (``first_step``,
    ``max_step``, ``safety``, ``ifactor``, ``dfactor``), ``jump_t``, and ``adjoint`` /
    ``adjoint_params`` (see `odeint_counted`). Deterministic.
    """
    info = plan.method
    method = info.name.split(":", 1)[1]
    stats = SolverStats(method=info.name, backend="torchdiffeq")
    p, counter = counted_problem(plan.problem, check_inputs=False)  # odeint_counted keeps t in [t_end, t_start]
    opts = {k: v for k, v in plan.options.items() if k not in ("adjoint", "adjoint_params") and v is not None}
    try:
        y, ys, inf = odeint_counted(p, x, plan.t_start, plan.t_end, method=method, rtol=plan.rtol, atol=plan.atol,
                                    norm=plan.norm, max_steps=plan.max_steps, min_step=plan.min_step,
                                    save_at=plan.save_at, adjoint=plan.options["adjoint"],
                                    adjoint_params=plan.options["adjoint_params"], options=opts)
    except SolverError as e:
        if e.stats is not None:
            stats.steps, stats.accepted, stats.rejected = e.stats.steps, e.stats.accepted, e.stats.rejected
        stats.nfe = counter.count
        e.stats = stats
        raise
    stats.nfe = counter.count
    stats.steps, stats.accepted, stats.rejected = inf["steps"], inf["accepted"], inf["rejected"]
    stats.extra.update(first_step=inf.get("first_step"), t_min=inf["t_min"], t_max=inf["t_max"])
    sol = Solution(x=y, stats=stats)
    if plan.save_at is not None:
        sol.ts, sol.xs = inf["save_at"], ys
    return sol


def _fixed_fn(method: str):
    def fn(ctx, x: torch.Tensor) -> torch.Tensor:
        def func(t, y):
            return ctx.velocity(y, float(t))

        def on_step(k, t, y):
            if k > 0:
                ctx.step_done(k - 1, y)

        y, _, _ = odeint_counted(func, x, ctx.ts[0], ctx.ts[-1], method=method, grid=ctx.grid,
                                 step_callback=on_step)
        ctx.step_done(ctx.n - 1, y)
        return y

    fn.__name__ = f"torchdiffeq_{method}"
    fn.__doc__ = f"torchdiffeq's fixed-grid {method!r} stepping exactly on the solve grid (counted through ctx)."
    return fn


_ADJOINT_OPTIONS = (Option("jump_t", object, None, None, "torchdiffeq's jump_t (times of discontinuities)"),
                    Option("adjoint", bool, False, None, "backpropagate with the adjoint ODE"),
                    Option("adjoint_params", object, None, None, "parameters the adjoint differentiates"))
_ORDERS = {"dopri5": 5.0, "dopri8": 8.0, "bosh3": 3.0, "adaptive_heun": 2.0, "fehlberg2": 2.0}
for _name in ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2"):
    if _name in ADAPTIVE_METHODS:
        register(MethodInfo(name=f"torchdiffeq:{_name}", problem="ode", noise=(), strong_order=_ORDERS[_name],
                            weak_order=None, evals_per_step=ADAPTIVE_METHODS[_name], backend="torchdiffeq",
                            stepping=("adaptive",), default_grid=None, stochastic=False, run=run_torchdiffeq,
                            options=CONTROLLER_OPTIONS + _ADJOINT_OPTIONS,
                            doc=f"torchdiffeq {_name} (adaptive; NFE = 2 + {ADAPTIVE_METHODS[_name]} x attempted "
                                f"steps)"))
for _name, _order in (("euler", 1.0), ("midpoint", 2.0), ("rk4", 4.0)):
    grid_method(_fixed_fn(_name), name=f"torchdiffeq:{_name}", problem="ode", noise=(), strong_order=_order,
                weak_order=None, evals_per_step=FIXED_METHODS[_name], stochastic=False, backend="torchdiffeq",
                doc=f"torchdiffeq fixed-grid {_name} on the solve grid")
