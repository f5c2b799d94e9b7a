"""The normalised plan of a solve, computed once before any work (in the spirit of diffrax).

`make_plan` turns the arguments of `sdekit.solve` into a frozen `Plan`: the
method (`sdekit.solvers.registry.MethodInfo`) and its validated options, the time
direction and end points, the stepping mode and its grid / step / tolerances, the save points,
the limits, the noise source. Every rule that depends on the problem, the method and the
arguments together lives here; a method's ``run(plan, x)`` only does the work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import torch

from .._validation import check_positive, check_state, short
from ..dynamics import ProbabilityFlowODE, ReverseSDE
from ..processes import SDE
from ._checks import check_count, check_real
from .brownian import BrownianPath
from .grids import make_grid
from .registry import MethodInfo, get_method

__all__ = ["Plan", "make_plan"]

F64 = torch.float64
_NORMS = ("batch", "per-sample", "independent")  # "independent": per-sample stepping (native dopri5/bosh3)


@dataclass(frozen=True, eq=False)
class Plan:
    """Everything a method needs to know about a solve, decided once.

    Attributes
    ----------
    problem, method:
        The problem and its method's declarations.
    kind:
        ``"ode"`` (a ProbabilityFlowODE) or ``"sde"`` (a forward SDE or a ReverseSDE).
    t_start, t_end:
        The end points (Python floats); ``direction`` is ``+1`` (increasing t), ``-1`` or ``0``
        (a fixed-level sampler).
    mode:
        The stepping mode in use: ``"grid"``, ``"dt"`` or ``"adaptive"``.
    grid:
        ``"grid"`` mode: the float64 ``(steps + 1,)`` grid, on the CPU.
    dt:
        ``"dt"`` stepping (torchsde): the step, or with ``adaptive=True`` the first step.
    rtol, atol:
        ``"adaptive"`` mode: the tolerances (floats), else ``None``.
    save_at:
        Float64 CPU tensor of the requested save times (in the order given) or ``None``;
        ``save_idx`` maps grid indices to save slots in ``"grid"`` mode.
    options:
        Every option of the method, validated, defaults filled in (read-only).
    max_steps, min_step, norm, generator, brownian, check_every, denoise:
        As passed to `sdekit.solve`, validated.
    """

    problem: Any
    method: MethodInfo
    kind: str
    t_start: float
    t_end: float
    mode: str
    grid: Optional[torch.Tensor]
    dt: Optional[float]
    rtol: Optional[float]
    atol: Optional[float]
    save_at: Optional[torch.Tensor]
    save_idx: Mapping[int, int]
    options: Mapping[str, Any]
    max_steps: Optional[int]
    min_step: Optional[float]
    norm: str
    generator: Any
    brownian: Optional[BrownianPath]
    check_every: int
    denoise: bool

    @property
    def direction(self) -> int:
        return (self.t_end > self.t_start) - (self.t_end < self.t_start)

    @property
    def stochastic(self) -> bool:
        """Whether this solve draws random numbers (method and options)."""
        return self.method.is_stochastic(self.options)

    def save_interior(self) -> Tuple[float, ...]:
        """The save times strictly inside the interval, sorted along the direction of travel."""
        if self.save_at is None:
            return ()
        lo, hi = min(self.t_start, self.t_end), max(self.t_start, self.t_end)
        return tuple(sorted({v for v in self.save_at.tolist() if lo < v < hi}, reverse=self.direction < 0))


def make_plan(problem, x: torch.Tensor, t_start: Optional[float] = None, t_end: Optional[float] = None, *,
              method: str, steps: Optional[int] = None, dt: Optional[float] = None, rtol: Optional[float] = None,
              atol: Optional[float] = None, grid: Union[str, torch.Tensor, None] = None,
              save_at: Optional[Union[Sequence[float], torch.Tensor]] = None, generator=None,
              denoise: bool = False, max_steps: Optional[int] = None, min_step: Optional[float] = None,
              norm: str = "batch", rho: float = 7.0, check_every: Optional[int] = None, brownian=None,
              options: Optional[Mapping[str, Any]] = None) -> Plan:
    """Validate the arguments of `sdekit.solve` and return the `Plan` (see there for
    the parameters). Raises ``ValueError``/``TypeError`` naming the argument; does no work."""
    info = get_method(method)
    kind = _problem_kind(problem)
    _check_compat(info, problem, kind)
    x = check_state(x, "x")
    opts = info.validate_options(options or {})
    mode = _mode(info, opts)
    t0, t1 = _end_times(problem, info, kind, t_start, t_end, grid, opts)
    if not isinstance(denoise, bool):
        raise TypeError(f"denoise must be a bool, got {denoise!r}")
    if denoise and not (hasattr(problem, "score_fn") and getattr(problem.sde, "is_linear", False)):
        raise ValueError("denoise=True needs a ReverseSDE or ProbabilityFlowODE of a linear SDE")
    generator = _check_generator(generator, x.shape[0])
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    if norm == "independent" and not (info.backend == "native" and mode == "adaptive"):
        raise ValueError(f"norm='independent' (per-sample stepping) needs the native adaptive methods 'dopri5' or "
                         f"'bosh3'; got method={info.name!r}")
    save_t = _save_times(save_at, t0, t1)
    rtol, atol = _tolerances(info, mode, rtol, atol)
    max_steps = check_count(max_steps, "max_steps", allow_none=True)
    min_step = None if min_step is None else check_positive(min_step, "min_step")
    brownian = _check_brownian(brownian, info, mode, x)
    g, step, save_idx = None, None, {}
    if mode == "grid":
        g = _grid(problem, info, t0, t1, steps, dt, grid, rho)
        save_idx = _grid_save_index(g, save_t)
    else:
        if grid is not None:
            raise ValueError(f"grid= applies to methods that step on the solve's grid; {info.name!r} "
                             f"({mode} stepping) does not take one")
        step = _step(info, mode, t0, t1, steps, dt)
    if check_every is None:
        check_every = 1 if x.device.type == "cpu" else 0
    plan = Plan(problem=problem, method=info, kind=kind, t_start=t0, t_end=t1, mode=mode, grid=g, dt=step,
                rtol=rtol, atol=atol, save_at=save_t, save_idx=MappingProxyType(save_idx), options=opts,
                max_steps=max_steps, min_step=min_step, norm=norm, generator=generator, brownian=brownian,
                check_every=int(check_every), denoise=denoise)
    if info.check is not None:
        info.check(plan)
    return plan


# ------------------------------------------------------------------------------------------------
# the pieces, in the order make_plan applies them
# ------------------------------------------------------------------------------------------------
def _problem_kind(problem) -> str:
    if isinstance(problem, ProbabilityFlowODE):
        return "ode"
    if isinstance(problem, (ReverseSDE, SDE)):
        return "sde"
    raise TypeError(f"problem must be a sdekit SDE, ReverseSDE or ProbabilityFlowODE, got {type(problem).__name__}")


def _check_compat(info: MethodInfo, problem, kind: str) -> None:
    if info.problem == "ode" and kind != "ode":
        raise ValueError(f"method {info.name!r} solves ODEs (a ProbabilityFlowODE); got a {type(problem).__name__}. "
                         f"Use an SDE method (euler_maruyama, stochastic_heun, torchsde:...) or sde.probability_flow(score)")
    if info.problem == "sde" and kind != "sde":
        raise ValueError(f"method {info.name!r} solves SDEs; got a ProbabilityFlowODE. Use euler, heun, rk4, "
                         f"dpm_solver_*, dpmpp_*, dopri5, bosh3 or torchdiffeq:... for ODEs")
    if info.problem == "score":
        if not hasattr(problem, "score_fn") or not getattr(problem.sde, "is_linear", False):
            raise ValueError(f"method {info.name!r} needs a ReverseSDE or ProbabilityFlowODE of a linear SDE "
                             f"(it uses the kernel m, sigma and the score); got {problem!r}")
    if kind == "sde" and info.problem == "sde" and problem.noise not in info.noise:
        raise ValueError(f"method {info.name!r} supports noise kinds {info.noise}; the problem has noise "
                         f"{problem.noise!r}" + (f" ({info.doc})" if info.backend != "native" and info.doc else ""))


def _mode(info: MethodInfo, opts: Mapping[str, Any]) -> str:
    if len(info.stepping) == 1:
        return info.stepping[0]
    return "adaptive" if opts["adaptive"] else info.stepping[0]


def _end_times(problem, info: MethodInfo, kind: str, t_start, t_end, grid, opts) -> Tuple[float, float]:
    """The end points (defaults: the grid tensor's ends, else the problem's direction) and every
    rule on the direction of time."""
    T = problem.T
    ends = (None, None)
    if isinstance(grid, torch.Tensor) and grid.numel() >= 2:
        ends = (float(grid.flatten()[0]), float(grid.flatten()[-1]))
    t0 = (ends[0] if ends[0] is not None else problem.t_start) if t_start is None else check_real(t_start, "t_start")
    t1 = (ends[1] if ends[1] is not None else problem.t_end) if t_end is None else check_real(t_end, "t_end")
    for name, v in (("t_start", t0), ("t_end", t1)):
        if not (0.0 <= v <= T):
            raise ValueError(f"{name} must lie in [0, T={T}], got {v!r}")
    if t0 == t1 and not info.fixed_level:
        raise ValueError(f"t_start and t_end must differ, both are {t0!r}")
    if info.fixed_level and t0 != t1:
        raise ValueError(f"method {info.name!r} samples at one fixed noise level: pass t_start == t_end "
                         f"(got {t0!r}, {t1!r}); annealed_langevin walks a ladder of levels")
    if kind == "sde" and isinstance(problem, ReverseSDE) and t0 < t1:
        raise ValueError(f"a ReverseSDE runs from high to low t; got t_start={t0} < t_end={t1}")
    if kind == "sde" and not hasattr(problem, "score_fn") and t0 > t1:
        raise ValueError(f"a forward SDE runs from low to high t; got t_start={t0} > t_end={t1}")
    if info.problem == "score" and info.is_stochastic(opts) and t0 < t1:
        raise ValueError(f"method {info.name!r} samples from high to low noise; got t_start={t0} < t_end={t1}"
                         + (f" (it is deterministic with {info.stochastic_option}=0)" if info.stochastic_option
                            else ""))
    if (t1 == 0.0 or t0 == 0.0) and info.problem == "score" and not info.fixed_level:
        raise ValueError(f"method {info.name!r} needs t > 0 at both ends (sigma(0) = 0, the score is "
                         f"singular); got t_start={t0}, t_end={t1}")
    return t0, t1


def _check_generator(generator, B: int):
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)):
        if len(generator) != B or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"generator must be a torch.Generator or a list of {B} generators (one per "
                             f"sample); got a {type(generator).__name__} of length {len(generator)}")
        return tuple(generator)
    raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")


def _save_times(save_at, t0: float, t1: float) -> Optional[torch.Tensor]:
    if save_at is None:
        return None
    save_t = torch.as_tensor(save_at, dtype=F64).flatten().cpu()
    lo, hi = min(t0, t1), max(t0, t1)
    if save_t.numel() == 0 or not bool(torch.isfinite(save_t).all()) or (save_t < lo - 1e-12).any() or \
            (save_t > hi + 1e-12).any():
        raise ValueError(f"save_at must hold times within [{lo}, {hi}], got {short(save_t)}")
    return save_t


def _tolerances(info: MethodInfo, mode: str, rtol, atol) -> Tuple[Optional[float], Optional[float]]:
    out = []
    for name, v in (("rtol", rtol), ("atol", atol)):
        if mode == "adaptive":
            if v is None:
                raise ValueError(f"adaptive method {info.name!r} needs an explicit {name} (no library default "
                                 f"is used)")
            out.append(check_positive(v, name))
        elif v is not None:
            if info.adaptive:  # adaptive only on request (torchsde)
                raise ValueError(f"{name} applies to {info.name!r} only with adaptive=True (fixed step dt)")
            raise ValueError(f"rtol/atol apply to adaptive methods; {info.name!r} is fixed-step (pass steps)")
        else:
            out.append(None)
    return out[0], out[1]


def _check_brownian(brownian, info: MethodInfo, mode: str, x: torch.Tensor) -> Optional[BrownianPath]:
    if brownian is None:
        return None
    if mode != "grid" or info.backend != "native":
        raise ValueError(f"brownian= drives the native fixed-step SDE methods; {info.name!r} does not use it"
                         + (" (torchsde methods take bm=, a torchsde Brownian motion)"
                            if info.backend == "torchsde" else ""))
    if not isinstance(brownian, BrownianPath):
        raise TypeError(f"brownian must be a sdekit.solvers.BrownianPath, got {type(brownian).__name__}")
    if brownian.shape != tuple(x.shape):
        raise ValueError(f"brownian has shape {brownian.shape} but x has {tuple(x.shape)}")
    return brownian


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


def _step(info: MethodInfo, mode: str, t0: float, t1: float, steps, dt) -> Optional[float]:
    """``"dt"`` stepping: the step (or, adaptive, the first step); adaptive-only methods take none."""
    if "dt" not in info.stepping:
        if steps is not None or dt is not None:
            raise ValueError(f"adaptive method {info.name!r} chooses its own steps; do not pass steps or dt")
        return None
    if steps is not None and dt is not None:
        raise ValueError("pass steps or dt, not both")
    if steps is not None:
        return abs(t1 - t0) / _check_steps(steps)
    if dt is None:
        raise ValueError(f"{info.name} needs dt (the step size; with adaptive=True the first step): pass "
                         f"solve(..., dt=...) or steps=...")
    return check_positive(dt, "dt")


def _grid(problem, info: MethodInfo, t0: float, t1: float, steps, dt, grid, rho) -> torch.Tensor:
    """``"grid"`` stepping: the float64 grid from a tensor, or from steps/dt and a grid kind."""
    if isinstance(grid, torch.Tensor):
        if steps is not None or dt is not None:
            raise ValueError("pass either a grid tensor or steps/dt, not both")
        g = make_grid(grid, t0, t1, 1)
        if abs(float(g[0]) - t0) > 1e-12 or abs(float(g[-1]) - t1) > 1e-12:
            raise ValueError(f"grid must start at t_start={t0} and end at t_end={t1}; got "
                             f"[{float(g[0])}, ..., {float(g[-1])}]")
        if ((g < -1e-12) | (g > problem.T + 1e-12)).any():
            raise ValueError(f"grid times must lie in [0, T={problem.T}]")
        if (torch.diff(g) * (t1 - t0) <= 0).any():
            raise ValueError("grid must run monotonically from t_start to t_end")
        return g
    if steps is None and dt is None:
        raise ValueError(f"fixed-step method {info.name!r} needs steps (or dt, or a grid tensor)")
    if steps is not None and dt is not None:
        raise ValueError("pass steps or dt, not both")
    if dt is not None:
        dt = check_positive(dt, "dt")
        steps = max(1, math.ceil(abs(t1 - t0) / dt - 1e-9))
    steps = _check_steps(steps)
    if info.fixed_level:
        return torch.full((steps + 1,), t0, dtype=F64)
    return make_grid(grid if grid is not None else info.default_grid, t0, t1, steps,
                     sde=getattr(problem, "sde", problem), rho=rho)


def _grid_save_index(g: torch.Tensor, save_t: Optional[torch.Tensor]) -> dict:
    save_idx = {}
    if save_t is not None:
        for j, ts_ in enumerate(save_t.tolist()):
            k = int(torch.argmin((g - ts_).abs()))
            if abs(float(g[k]) - ts_) > 1e-9 * max(1.0, abs(ts_)):
                raise ValueError(f"save_at time {ts_} is not a grid point of this fixed-step solve; pass a grid "
                                 f"tensor containing it")
            save_idx[k] = j
    return save_idx
