"""``solve``: one entry point for every method, fixed-step or adaptive, native or backend.

Validation, time direction, grids, save points, NFE counting and timing happen here, once; the
methods in :mod:`sdekit.solvers.native` / :mod:`sdekit.solvers.exponential` are bare update rules
and the backends (:mod:`sdekit.solvers.backend_torchdiffeq`, :mod:`sdekit.solvers.backend_torchsde`)
adapt torchdiffeq and torchsde.
"""

from __future__ import annotations

import math
import numbers
import time
from typing import Any, Optional, Sequence, Union

import torch

from .._validation import check_positive, check_state, short
from ..dynamics import ProbabilityFlowODE, ReverseSDE
from ..parameterization import tweedie_mean
from ..processes import SDE
from .context import Context
from .grids import make_grid
from .registry import MethodInfo, get_method
from .stats import Solution, SolverStats

__all__ = ["solve"]

F64 = torch.float64


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


def _as_float(v, name) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a scalar time, got shape {tuple(v.shape)}")
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite real time, got {v!r}")
    return float(v)


def _check_generator(generator, B: int):
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)):
        if len(generator) != B or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"generator must be a torch.Generator or a list of {B} generators (one per "
                             f"sample); got a {type(generator).__name__} of length {len(generator)}")
        return list(generator)
    raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")


def solve(problem, x: torch.Tensor, t_start: Optional[float] = None, t_end: Optional[float] = None, *,
          method: str, steps: Optional[int] = None, dt: Optional[float] = None, rtol: Optional[float] = None,
          atol: Optional[float] = None, grid: Union[str, torch.Tensor, None] = None,
          save_at: Optional[Union[Sequence[float], torch.Tensor]] = None,
          generator: Union[torch.Generator, Sequence[torch.Generator], None] = None, denoise: bool = False,
          max_steps: Optional[int] = None, min_step: Optional[float] = None, norm: str = "batch",
          rho: float = 7.0, check_every: Optional[int] = None, brownian=None, **options: Any) -> Solution:
    r"""Integrate ``problem`` from ``t_start`` to ``t_end`` starting at ``x``.

    Parameters
    ----------
    problem:
        A forward :class:`~sdekit.SDE`, a :class:`~sdekit.ReverseSDE` or a
        :class:`~sdekit.ProbabilityFlowODE`.
    x:
        Initial state, batch first, any rank, any floating dtype.
    t_start, t_end:
        Default to the ends of ``grid`` when it is a tensor, else to the problem's own direction
        (forward SDE: 0 → T; reverse SDE / PF ODE: T → t_eps). ``t_start > t_end`` works for every method that allows it (ODE methods go
        both ways; a ReverseSDE only runs backwards, a forward SDE only forwards).
    method:
        A name from :data:`sdekit.solvers.METHODS`: native ``euler``, ``heun``, ``rk4``,
        ``euler_maruyama``, ``stochastic_heun``, ``reverse_diffusion``, ``ancestral``, ``pc``,
        ``ddim``, ``langevin``, ``annealed_langevin``, ``dpm_solver_1/2/3``, ``dpmpp_2m``,
        ``dpmpp_3m``, ``dpmpp_2m_sde``, the native adaptive ``dopri5`` / ``bosh3`` (torchdiffeq's
        steps, less bookkeeping, no gradient through the solve), or ``torchdiffeq:<name>`` /
        ``torchsde:<name>``.
    steps, dt, grid:
        Fixed-step methods: the number of steps (or a step ``dt`` → ``ceil(|Δt|/dt)`` uniform
        steps), and the grid kind (``"uniform"`` default; ``"log_snr"`` default for the
        exponential integrators; ``"edm"``, ``"quadratic"`` or a tensor of times, see
        :mod:`sdekit.solvers.grids`).
    rtol, atol:
        Adaptive methods: required (no library default is used silently).
    save_at:
        Times at which to store the state (fixed-step: must be grid points).
    generator:
        A ``torch.Generator`` or a list of one generator per sample (a sample's noise then never
        depends on the batch it is in).
    brownian:
        A :class:`~sdekit.solvers.BrownianPath` driving ``euler_maruyama`` / ``stochastic_heun``
        (the same path for every step count: strong-error studies).
    denoise:
        Finish with Tweedie's :math:`\hat x_0 = (x + \sigma^2 \hat s)/m` at ``t_end`` (counted).
    max_steps, min_step, norm:
        Adaptive-backend controls (``norm``: ``"batch"`` RMS or ``"per-sample"``, where the
        worst sample meets the tolerance).
    check_every:
        Native methods check for non-finite states every ``check_every`` steps (default: every
        step on CPU; on CUDA a device-side flag checked once at the end, no host sync per step).
    **options:
        Method-specific options (e.g. ``eta`` for ddim, ``churn`` for heun, ``snr`` and
        ``n_corrector`` for pc; ``predict``, ``r1``, ``r2``, ``lower_order_final``, ``published_form``
        and ``eta`` for the DPM-Solver family).

    Returns
    -------
    Solution
        ``x`` at ``t_end``, ``ts``/``xs`` at ``save_at``, and ``stats`` (nfe, steps, accepted,
        rejected, wall time, backend, method).

    Raises
    ------
    ValueError, TypeError
        For invalid arguments, before any work.
    SolverError
        When the state becomes non-finite or a step limit is exceeded; carries the step, the time
        and the partial statistics.
    """
    info = get_method(method)
    kind = _problem_kind(problem)
    _check_compat(info, problem, kind)
    x = check_state(x, "x")
    T = problem.T
    grid_ends = (None, None)
    if isinstance(grid, torch.Tensor) and grid.numel() >= 2:
        grid_ends = (float(grid.flatten()[0]), float(grid.flatten()[-1]))
    t0 = (grid_ends[0] if grid_ends[0] is not None else problem.t_start) if t_start is None else \
        _as_float(t_start, "t_start")
    t1 = (grid_ends[1] if grid_ends[1] is not None else problem.t_end) if t_end is None else \
        _as_float(t_end, "t_end")
    for name, v in (("t_start", t0), ("t_end", t1)):
        if not (0.0 <= v <= T):
            raise ValueError(f"{name} must lie in [0, T={T}], got {v!r}")
    fixed_level = info.name == "langevin"
    if t0 == t1 and not fixed_level:
        raise ValueError(f"t_start and t_end must differ, both are {t0!r}")
    if fixed_level and t0 != t1:
        raise ValueError(f"method 'langevin' samples at one fixed noise level: pass t_start == t_end "
                         f"(got {t0!r}, {t1!r}); annealed_langevin walks a ladder of levels")
    if kind == "sde" and isinstance(problem, ReverseSDE) and t0 < t1:
        raise ValueError(f"a ReverseSDE runs from high to low t; got t_start={t0} < t_end={t1}")
    if kind == "sde" and not hasattr(problem, "score_fn") and t0 > t1:
        raise ValueError(f"a forward SDE runs from low to high t; got t_start={t0} > t_end={t1}")
    if info.stochastic and info.problem == "score" and t0 < t1:
        raise ValueError(f"method {info.name!r} samples from high to low noise; got t_start={t0} < t_end={t1}")
    if (t1 == 0.0 or t0 == 0.0) and info.problem == "score" and not fixed_level:
        raise ValueError(f"method {info.name!r} needs t > 0 at both ends (sigma(0) = 0, the score is "
                         f"singular); got t_start={t0}, t_end={t1}")
    if not isinstance(denoise, bool):
        raise TypeError(f"denoise must be a bool, got {denoise!r}")
    if denoise and not (hasattr(problem, "score_fn") and getattr(problem.sde, "is_linear", False)):
        raise ValueError("denoise=True needs a ReverseSDE or ProbabilityFlowODE of a linear SDE")
    generator = _check_generator(generator, x.shape[0])
    if norm not in ("batch", "per-sample"):
        raise ValueError(f"norm must be 'batch' or 'per-sample', got {norm!r}")

    stats = SolverStats(method=info.name, backend=info.backend)
    save_t = None
    if save_at is not None:
        save_t = torch.as_tensor(save_at, dtype=F64).flatten().cpu()
        lo, hi = min(t0, t1), max(t0, t1)
        if save_t.numel() == 0 or (save_t < lo - 1e-12).any() or (save_t > hi + 1e-12).any():
            raise ValueError(f"save_at must hold times within [{lo}, {hi}], got {short(save_t)}")

    if info.adaptive:
        if brownian is not None:
            raise ValueError(f"brownian= drives the native fixed-step SDE methods; {info.name!r} does not use it"
                             + (" (torchsde methods take bm=, a torchsde Brownian motion)"
                                if info.backend == "torchsde" else ""))
        # torchsde methods are registered here too: fixed step dt (or steps) unless options adaptive=True
        sde_backend = info.backend == "torchsde"
        need_tol = not sde_backend or options.get("adaptive", False) is True
        for name, v in (("rtol", rtol), ("atol", atol)):
            if v is None:
                if need_tol:
                    raise ValueError(f"adaptive method {info.name!r} needs an explicit {name} (no library default "
                                     f"is used)")
            else:
                if not need_tol:
                    raise ValueError(f"{name} applies to {info.name!r} only with adaptive=True (fixed step dt)")
                check_positive(v, name)
        if sde_backend:
            if steps is not None and dt is not None:
                raise ValueError("pass steps or dt, not both")
            if steps is not None:
                if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                    raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
                dt = abs(t1 - t0) / steps
            elif dt is not None:
                dt = check_positive(dt, "dt")
            options["dt"] = dt
        elif steps is not None or dt is not None:
            raise ValueError(f"adaptive method {info.name!r} chooses its own steps; do not pass steps or dt")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        if min_step is not None:
            check_positive(min_step, "min_step")
        if info.backend == "torchdiffeq":
            from .backend_torchdiffeq import run_torchdiffeq as run
        elif info.backend == "native":
            from .adaptive import run_native_adaptive as run
        else:
            from .backend_torchsde import run_torchsde as run
        tic = time.perf_counter()
        sol = run(problem, x, t0, t1, info=info, rtol=None if rtol is None else float(rtol),
                  atol=None if atol is None else float(atol), save_at=save_t,
                  generator=generator, max_steps=max_steps, min_step=min_step, norm=norm, stats=stats,
                  **options)
        return _finish(problem, sol, denoise, t1, stats, tic)

    # ---- fixed-step ------------------------------------------------------------------------------
    if rtol is not None or atol is not None:
        raise ValueError(f"rtol/atol apply to adaptive methods; {info.name!r} is fixed-step (pass steps)")
    if isinstance(grid, torch.Tensor):
        if steps is not None or dt is not None:
            raise ValueError("pass either a grid tensor or steps/dt, not both")
        g = make_grid(grid, t0, t1, 1)
        if abs(float(g[0]) - t0) > 1e-12 or abs(float(g[-1]) - t1) > 1e-12:
            raise ValueError(f"grid must start at t_start={t0} and end at t_end={t1}; got "
                             f"[{float(g[0])}, ..., {float(g[-1])}]")
        if ((g < -1e-12) | (g > T + 1e-12)).any():
            raise ValueError(f"grid times must lie in [0, T={T}]")
        if (torch.diff(g) * (t1 - t0) <= 0).any():
            raise ValueError("grid must run monotonically from t_start to t_end")
    else:
        if steps is None and dt is None:
            raise ValueError(f"fixed-step method {info.name!r} needs steps (or dt, or a grid tensor)")
        if steps is not None and dt is not None:
            raise ValueError("pass steps or dt, not both")
        if dt is not None:
            dt = check_positive(dt, "dt")
            steps = max(1, math.ceil(abs(t1 - t0) / dt - 1e-9))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if fixed_level:
            g = torch.full((steps + 1,), t0, dtype=F64)
        else:
            default = getattr(info.fn, "default_grid", "uniform")
            g = make_grid(grid if grid is not None else default, t0, t1, steps,
                          sde=getattr(problem, "sde", problem), rho=rho)
    save_idx = {}
    if save_t is not None:
        for j, ts_ in enumerate(save_t.tolist()):
            k = int(torch.argmin((g - ts_).abs()))
            if abs(float(g[k]) - ts_) > 1e-9 * max(1.0, abs(ts_)):
                raise ValueError(f"save_at time {ts_} is not a grid point of this fixed-step solve; pass a grid "
                                 f"tensor containing it")
            save_idx[k] = j
    if check_every is None:
        check_every = 1 if x.device.type == "cpu" else 0
    if brownian is not None:
        from .brownian import BrownianPath

        if not isinstance(brownian, BrownianPath):
            raise TypeError(f"brownian must be a sdekit.solvers.BrownianPath, got {type(brownian).__name__}")
        if brownian.shape != tuple(x.shape):
            raise ValueError(f"brownian has shape {brownian.shape} but x has {tuple(x.shape)}")
    ctx = Context(problem, x, g, generator, save_idx, stats, int(check_every), brownian=brownian)
    if 0 in save_idx:
        ctx.saved[save_idx[0]] = x.detach().clone()
    tic = time.perf_counter()
    xT = info.fn(ctx, x, **options)  # grad mode is the caller's: wrap in torch.no_grad() to sample
    ctx.finish_checks()
    stats.nfe = ctx.counter.count
    sol = Solution(x=xT, stats=stats)
    if save_t is not None:
        sol.ts, sol.xs = save_t, torch.stack(ctx.saved)
    if denoise:
        ctx_nfe = ctx.counter.count
        c = ctx.coefs(t1)
        sol.x = tweedie_mean(xT, ctx.score(xT, t1), c.m, c.sigma ** 2)
        stats.nfe = ctx.counter.count
        stats.extra["denoise_nfe"] = ctx.counter.count - ctx_nfe
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    stats.wall_time = time.perf_counter() - tic
    return sol


def _finish(problem, sol: Solution, denoise: bool, t1: float, stats: SolverStats, tic: float) -> Solution:
    """Common tail of backend solves: optional Tweedie denoising (counted), timing."""
    if denoise:
        k = problem.sde.kernel
        t64 = torch.tensor(t1, dtype=F64)
        m, s = float(k.m(t64)), float(k.sigma(t64))
        x = sol.x
        sc = problem.score_fn(x, torch.full((x.shape[0],), t1, dtype=x.dtype, device=x.device))
        sol.x = tweedie_mean(x, sc, m, s * s)
        stats.nfe += 1
        stats.extra["denoise_nfe"] = 1
    if sol.x.device.type == "cuda":
        torch.cuda.synchronize(sol.x.device)
    stats.wall_time = time.perf_counter() - tic
    return sol
