r"""Tuned time grids: a fixed-step solver's grid optimised on a calibration batch.

A fixed-step method with $N$ steps on the grid $t_0 > t_1 > \dots > t_N$ (or increasing)
has a flow-map error that depends on where the $N - 1$ interior times sit as much as on the
method. `tune_grid` chooses them for one problem, one method and one budget of score
evaluations (NFE): it minimises a statistic (default: the median) of the per-sample error

$$
    e(x) = \frac{\lVert \Phi_{\text{grid}}(x) - \Phi_{\text{ref}}(x) \rVert_2}{\sqrt{D}}
$$

over a calibration batch of start points $x$, where $\Phi_{\text{grid}}$ is the method on
the grid, $\Phi_{\text{ref}}$ a tight reference solve from the same start points and $D$ the
number of coordinates of one sample.

Parametrisation (see ``docs/studies_tuning.md``): $N$ logits $z_1, \dots, z_N$, one per step,

$$
    \Delta_i = \frac{e^{z_i}}{\sum_j e^{z_j}},\qquad
    t_k = t_{\text{start}} + (t_{\text{end}} - t_{\text{start}})\sum_{i \le k}\Delta_i ,
$$

so every parameter vector is a valid grid (strictly monotone, exact end points) and the
optimiser is unconstrained. The softmax is invariant to adding a constant to every $z_i$, so
$z_1$ is held at its initial value and $N - 1$ numbers are optimised. The logits start at
$z_i = \log(t_i - t_{i-1})$ of the best fixed grid on the calibration batch, and the optimiser
minimises $\log$ of the statistic (relative changes matter, whatever the error's scale) with
scipy's derivative-free Powell method: the native solvers are not differentiable in the grid
(their kernel coefficients are computed as Python floats), and the median is only piecewise
smooth.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Union

import torch

from .._validation import check_choice, check_int, check_positive, check_real, check_state
from ..solvers.grids import GRID_KINDS, make_grid
from ..solvers.registry import get_method
from ..solvers.solve import solve
from ..solvers.stats import SolverError

__all__ = ["TunedGrid", "tune_grid", "grid_error", "resample_grid", "METRICS"]

F64 = torch.float64

#: Statistics of the per-sample error that `tune_grid` can minimise.
METRICS = ("median", "mean", "rms", "max")

#: Tolerances of the default reference solve (``dopri5`` in float64), as in ``docs/concepts.md``.
REFERENCE_TOL = 1e-10

#: Bound on each optimised logit's change from its initial value: a step can shrink or grow by a
#: factor up to $e^{8} \approx 3000$ relative to the others, far beyond any useful grid, and the
#: bound keeps Powell's bracketing line searches from wandering into grids with vanishing steps.
LOGIT_BOUND = 8.0

#: Serialisation format tag and version of `TunedGrid.to_dict`.
FORMAT = "sdekit.TunedGrid"
FORMAT_VERSION = 1


def _per_sample_error(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """$\\lVert x - x_{ref} \\rVert_2 / \\sqrt{D}$ per sample, float64."""
    diff = (x.to(F64) - ref.to(F64)).reshape(x.shape[0], -1)
    return diff.norm(dim=1) / math.sqrt(diff.shape[1])


def _statistic(err: torch.Tensor, metric: str) -> float:
    if metric == "median":
        return float(err.median())
    if metric == "mean":
        return float(err.mean())
    if metric == "rms":
        return float(err.square().mean().sqrt())
    return float(err.max())


def _reference(problem, x: torch.Tensor, t0: float, t1: float, reference) -> torch.Tensor:
    """The reference end points: given (checked) or a float64 ``dopri5`` solve at `REFERENCE_TOL`."""
    if reference is None:
        with torch.no_grad():
            return solve(problem, x.detach().to(F64), t0, t1, method="dopri5", rtol=REFERENCE_TOL,
                         atol=REFERENCE_TOL).x
    check_state(reference, "reference")
    if reference.shape != x.shape:
        raise ValueError(f"reference must have the shape of the start points {tuple(x.shape)}, got "
                         f"{tuple(reference.shape)}")
    return reference.detach()


def _method_steps(method: str, nfe: Any, options: Mapping[str, Any]):
    """(MethodInfo, validated options, steps) for a deterministic grid-stepping method and an NFE it fits."""
    info = get_method(method)
    if "grid" not in info.stepping:
        raise ValueError(f"method {method!r} does not step on a time grid (stepping {info.stepping}); tune_grid "
                         f"needs a fixed-step grid method")
    if info.fixed_level:
        raise ValueError(f"method {method!r} samples at one noise level; it has no time grid to tune")
    opts = info.validate_options(dict(options))
    if info.is_stochastic(opts):
        raise ValueError(f"method {method!r} draws random numbers with options {dict(opts)}; tune_grid measures a "
                         f"deterministic flow-map error (pass {info.stochastic_option}=0 if it has that option)"
                         if info.stochastic_option else
                         f"method {method!r} is stochastic; tune_grid measures a deterministic flow-map error")
    nfe = check_int(nfe, "nfe", 1)
    e = info.evals_per_step
    if nfe % e != 0:
        raise ValueError(f"nfe={nfe} does not fit method {method!r}: it spends {e} score evaluations per step, "
                         f"so nfe must be a multiple of {e} (e.g. {max(e, nfe - nfe % e)} or {nfe - nfe % e + e})")
    return info, opts, nfe // e


def grid_error(problem, method: str, grid: Union[str, torch.Tensor], x: torch.Tensor, *,
               steps: Optional[int] = None, reference: Optional[torch.Tensor] = None, metric: str = "median",
               t_start: Optional[float] = None, t_end: Optional[float] = None,
               options: Optional[Mapping[str, Any]] = None) -> float:
    r"""The flow-map error of ``method`` on ``grid`` from the start points ``x``.

    Parameters
    ----------
    problem:
        What `sdekit.solve` integrates (typically a `ProbabilityFlowODE`).
    method:
        A deterministic fixed-step method name.
    grid:
        A grid kind (``"uniform"``, ``"log_snr"``, ``"edm"``, ``"quadratic"``; then ``steps`` is
        required) or a tensor of times (e.g. ``TunedGrid.grid``).
    x:
        Start points, batch first.
    reference:
        End points of a tight solve from ``x``; default: ``dopri5`` in float64 at
        `REFERENCE_TOL`.
    metric:
        Statistic of the per-sample error $\lVert \Phi(x) - \Phi_{\text{ref}}(x)\rVert_2/\sqrt D$,
        one of `METRICS`.
    t_start, t_end:
        End times (default: the grid tensor's ends, else the problem's direction).
    options:
        The method's options.

    Returns
    -------
    float
        The statistic; ``inf`` if the solve fails (non-finite state).
    """
    check_state(x, "x")
    check_choice(metric, "metric", METRICS)
    options = dict(options or {})
    if isinstance(grid, torch.Tensor):
        g = make_grid(grid, 0.0, 0.0, 1)
        t0 = float(g[0]) if t_start is None else check_real(t_start, "t_start")
        t1 = float(g[-1]) if t_end is None else check_real(t_end, "t_end")
    else:
        t0 = problem.t_start if t_start is None else check_real(t_start, "t_start")
        t1 = problem.t_end if t_end is None else check_real(t_end, "t_end")
    ref = _reference(problem, x, t0, t1, reference)
    with torch.no_grad():
        try:
            if isinstance(grid, torch.Tensor):
                sol = solve(problem, x, t0, t1, method=method, grid=grid, **options)
            else:
                sol = solve(problem, x, t0, t1, method=method, steps=steps, grid=grid, **options)
        except SolverError:
            return math.inf
    err = _per_sample_error(sol.x, ref)
    return _statistic(err, metric) if bool(torch.isfinite(err).all()) else math.inf


@dataclass(frozen=True)
class TunedGrid:
    r"""A time grid tuned by `tune_grid`, with what it was tuned for and how well it did.

    Use it as any grid: ``sdekit.solve(problem, x, method=tuned.method, grid=tuned.grid,
    **tuned.options)`` (the end points are the grid's). ``to_dict`` / ``from_dict`` (and
    ``to_json`` / ``from_json``) round-trip it exactly through JSON, so a model checkpoint can
    carry it.

    Attributes
    ----------
    grid:
        The ``(steps + 1,)`` float64 times, strictly monotone from ``t_start`` to ``t_end``.
    method, options:
        The method (and its non-default options) the grid was tuned for.
    nfe, steps:
        Score evaluations per solve (measured on the calibration solve) and steps
        ($\text{nfe} = \text{steps} \times$ the method's evaluations per step).
    metric:
        The statistic minimised (one of `METRICS`).
    init:
        The fixed grid kind the optimiser started from (the best on the calibration batch).
    calibration_error:
        The statistic of the tuned grid on the calibration batch.
    fixed_errors:
        The statistic of each fixed grid kind on the calibration batch.
    n_calibration:
        Calibration batch size.
    evaluations, seconds:
        Objective evaluations (solves) and wall time of the optimisation.
    problem:
        ``repr`` of the problem (informative only; not checked when the grid is used).
    """

    grid: torch.Tensor
    method: str
    nfe: int
    steps: int
    metric: str = "median"
    options: Mapping[str, Any] = field(default_factory=dict)
    init: str = ""
    calibration_error: float = math.nan
    fixed_errors: Mapping[str, float] = field(default_factory=dict)
    n_calibration: int = 0
    evaluations: int = 0
    seconds: float = 0.0
    problem: str = ""

    def __post_init__(self):
        if not isinstance(self.grid, torch.Tensor):
            raise TypeError(f"grid must be a tensor, got {type(self.grid).__name__}")
        object.__setattr__(self, "grid", make_grid(self.grid, 0.0, 0.0, 1).clone())
        info = get_method(self.method)
        steps = check_int(self.steps, "steps", 1)
        if self.grid.numel() != steps + 1:
            raise ValueError(f"grid has {self.grid.numel()} times but steps={steps} needs {steps + 1}")
        nfe = check_int(self.nfe, "nfe", 1)
        if nfe != steps * info.evals_per_step:
            raise ValueError(f"nfe={nfe} is not steps x evals per step = {steps} x {info.evals_per_step} "
                             f"for method {self.method!r}")
        check_choice(self.metric, "metric", METRICS)

    @property
    def t_start(self) -> float:
        """First time of the grid."""
        return float(self.grid[0])

    @property
    def t_end(self) -> float:
        """Last time of the grid."""
        return float(self.grid[-1])

    @property
    def improvement(self) -> float:
        """Calibration error of the best fixed grid divided by the tuned one's."""
        best = min(self.fixed_errors.values()) if self.fixed_errors else math.nan
        return best / self.calibration_error if self.calibration_error > 0 else math.inf

    def solve(self, problem, x: torch.Tensor, **kw: Any):
        """``sdekit.solve(problem, x, method=self.method, grid=self.grid, **self.options, **kw)``."""
        return solve(problem, x, method=self.method, grid=self.grid, **{**dict(self.options), **kw})

    def resample(self, steps: int) -> torch.Tensor:
        r"""The grid carried to another number of steps: $t(s)$, piecewise linear through the
        knots $(k/N, t_k)$, read at $s = i/\text{steps}$ (monotone, same ends). For a method
        with $e$ evaluations per step this is the grid for $\text{nfe} = e\cdot\text{steps}$;
        how well it transfers is measured in ``docs/studies_tuning.md``."""
        return resample_grid(self.grid, steps)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict (floats are written exactly by ``json``)."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "grid": self.grid.tolist(), "method": self.method,
                "options": dict(self.options), "nfe": self.nfe, "steps": self.steps, "metric": self.metric,
                "init": self.init, "calibration_error": self.calibration_error,
                "fixed_errors": dict(self.fixed_errors), "n_calibration": self.n_calibration,
                "evaluations": self.evaluations, "seconds": self.seconds, "problem": self.problem}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TunedGrid":
        """Rebuild from `to_dict`'s output (validated: format, version, grid, method, NFE)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"d must be a mapping, got {type(d).__name__}")
        if d.get("format") != FORMAT or d.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT} version {FORMAT_VERSION} dict: format {d.get('format')!r}, "
                             f"version {d.get('version')!r}")
        missing = [k for k in ("grid", "method", "nfe", "steps") if k not in d]
        if missing:
            raise ValueError(f"TunedGrid dict is missing {missing}")
        kw = {k: d[k] for k in ("method", "nfe", "steps", "metric", "options", "init", "calibration_error",
                                "fixed_errors", "n_calibration", "evaluations", "seconds", "problem") if k in d}
        return cls(grid=torch.tensor(d["grid"], dtype=F64), **kw)

    def to_json(self) -> str:
        """`to_dict` as a JSON string."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> "TunedGrid":
        """Inverse of `to_json`."""
        return cls.from_dict(json.loads(s))


def resample_grid(grid: torch.Tensor, steps: int) -> torch.Tensor:
    r"""A monotone grid of ``steps`` steps following ``grid``'s spacing: the piecewise-linear
    $t(s)$ through $(k/N, t_k)$, $k = 0..N$, read at $s = i/\text{steps}$; ends exact."""
    g = make_grid(grid, 0.0, 0.0, 1)
    steps = check_int(steps, "steps", 1)
    n = g.numel() - 1
    s = torch.arange(steps + 1, dtype=F64) * (n / steps)
    k = s.floor().clamp(max=n - 1).long()
    w = s - k.to(F64)
    out = g[k] + w * (g[k + 1] - g[k])
    out[0], out[-1] = g[0], g[-1]
    return out


def _grid_from_logits(z: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    """$t_k = t_0 + (t_1 - t_0)\\sum_{i\\le k}\\mathrm{softmax}(z)_i$, ends exact."""
    u = torch.cumsum(torch.softmax(z.to(F64), dim=0), dim=0)
    g = torch.cat([torch.zeros(1, dtype=F64), u]) * (t1 - t0) + t0
    g[0], g[-1] = t0, t1
    return g


def tune_grid(problem, method: str, nfe: int, calibration_x: torch.Tensor, *,
              reference: Optional[torch.Tensor] = None, metric: str = "median",
              t_start: Optional[float] = None, t_end: Optional[float] = None,
              init: Union[str, torch.Tensor, None] = None, max_evals: int = 4000, max_seconds: float = 60.0,
              xtol: float = 1e-3, ftol: float = 1e-4, coarse: int = 4,
              options: Optional[Mapping[str, Any]] = None) -> TunedGrid:
    r"""Optimise the time grid of ``method`` at ``nfe`` score evaluations on a calibration batch.

    Parameters
    ----------
    problem:
        What `sdekit.solve` integrates: a `ProbabilityFlowODE` (any method), or for the
        ``"score"`` methods a `ReverseSDE` used deterministically. Its score is called only
        through `sdekit.solve`.
    method:
        A deterministic fixed-step method (``dpmpp_2m``, ``ddim``, ``heun``, ``dpm_solver_3`` ...).
    nfe:
        Score evaluations per solve; must be a multiple of the method's evaluations per step
        (``MethodInfo.evals_per_step``): ``steps = nfe / evals_per_step``. The count is checked
        against the solver's own on the first calibration solve.
    calibration_x:
        ``(B, ...)`` start points at ``t_start`` (e.g. samples of $p_T$), finite, ``B >= 1``.
        Solved in their own dtype.
    reference:
        The end points of a tight solve from ``calibration_x`` at ``t_end``; default
        ``sdekit.solve(problem, calibration_x.double(), method="dopri5", rtol=1e-10, atol=1e-10)``
        (the problem's score must then accept float64).
    metric:
        The statistic of the per-sample error minimised, one of `METRICS` (default ``"median"``).
    t_start, t_end:
        End times of the grid (default: the problem's direction, e.g. $T \to t_\varepsilon$).
    init:
        Start of the optimisation: ``None`` (default) for the best of the fixed grid kinds on the
        calibration batch (``"log_snr"`` and ``"edm"`` only for linear SDEs), a kind, or a tensor
        of ``steps + 1`` times.
    max_evals:
        Budget of the optimiser in objective evaluations (solves); the best grid seen is
        returned when it (or ``max_seconds``) runs out.
    max_seconds:
        Budget of the optimiser in wall-clock seconds (likewise).
    xtol:
        Powell's tolerance on the logits.
    ftol:
        Powell's tolerance on the log of the statistic.
    coarse:
        Size of the smooth first stage: the logits first move along ``coarse`` cosines
        $\cos(k\pi s)$, $s$ the step's position in $(0, 1)$, then every logit moves; 0 skips it.
    options:
        Options of ``method`` (e.g. ``{"predict": "noise"}``), used for every solve.

    Returns
    -------
    TunedGrid
        The tuned grid and its record (calibration errors of the fixed grids and of the tuned one).

    Raises
    ------
    ValueError
        For an unknown, stochastic, adaptive or fixed-level method; an ``nfe`` that is not a
        multiple of its evaluations per step; an empty or non-finite calibration batch; a
        reference of the wrong shape; an unknown metric or grid kind.
    """
    from scipy.optimize import minimize

    options = dict(options or {})
    info, _, steps = _method_steps(method, nfe, options)
    check_state(calibration_x, "calibration_x")
    if calibration_x.shape[0] < 1:
        raise ValueError(f"calibration_x must hold at least one start point, got shape {tuple(calibration_x.shape)}")
    check_choice(metric, "metric", METRICS)
    max_evals = check_int(max_evals, "max_evals", 1)
    max_seconds = check_positive(max_seconds, "max_seconds")
    coarse = check_int(coarse, "coarse", 0)
    xtol, ftol = check_positive(xtol, "xtol"), check_positive(ftol, "ftol")
    t0 = problem.t_start if t_start is None else check_real(t_start, "t_start")
    t1 = problem.t_end if t_end is None else check_real(t_end, "t_end")
    x = calibration_x.detach()
    ref = _reference(problem, x, t0, t1, reference)
    tic = time.perf_counter()

    def run(g: torch.Tensor):
        with torch.no_grad():
            return solve(problem, x, t0, t1, method=method, grid=g, **options)

    def error(g: torch.Tensor) -> float:
        try:
            sol = run(g)
        except (SolverError, ValueError):  # a degenerate grid (equal times) or a blown-up state
            return math.inf
        err = _per_sample_error(sol.x, ref)
        return _statistic(err, metric) if bool(torch.isfinite(err).all()) else math.inf

    # the fixed grids on the calibration batch
    sde = getattr(problem, "sde", problem)
    kinds = [k for k in GRID_KINDS if k in ("uniform", "quadratic") or getattr(sde, "is_linear", False)]
    fixed = {k: error(make_grid(k, t0, t1, steps, sde=sde)) for k in kinds}
    if init is None:
        init_name = min(fixed, key=fixed.get)
        g_init = make_grid(init_name, t0, t1, steps, sde=sde)
    elif isinstance(init, torch.Tensor):
        g_init, init_name = make_grid(init, t0, t1, steps), "tensor"
        if g_init.numel() != steps + 1 or float(g_init[0]) != t0 or float(g_init[-1]) != t1:
            raise ValueError(f"init must hold steps + 1 = {steps + 1} times from t_start={t0} to t_end={t1}, "
                             f"got {g_init.numel()} times from {float(g_init[0])} to {float(g_init[-1])}")
    else:
        init_name = check_choice(init, "init", GRID_KINDS)
        g_init = make_grid(init, t0, t1, steps, sde=sde)
    measured = run(g_init).stats.nfe
    if measured != nfe:
        raise ValueError(f"nfe={nfe} does not fit method {method!r} on this problem: {steps} steps spend "
                         f"{measured} score evaluations")
    e_init = error(g_init)
    if not math.isfinite(e_init):
        raise ValueError(f"the initial grid {init_name!r} gives a non-finite error; pass another init")

    z0 = torch.log(torch.diff(g_init).abs())
    best = {"f": math.log(e_init) if e_init > 0 else -math.inf, "theta": torch.zeros(steps - 1, dtype=F64)}
    count = {"n": 0}

    class _Budget(Exception):
        pass

    def grid_of(theta) -> torch.Tensor:
        z = z0.clone()
        z[1:] += torch.as_tensor(theta, dtype=F64)
        return _grid_from_logits(z, t0, t1)

    def objective(theta) -> float:
        if count["n"] >= max_evals or time.perf_counter() - tic > max_seconds:
            raise _Budget
        count["n"] += 1
        e = error(grid_of(theta))
        f = math.log(e) if 0 < e < math.inf else (-math.inf if e == 0 else math.inf)
        if f < best["f"]:
            best["f"], best["theta"] = f, torch.as_tensor(theta, dtype=F64).clone()
        # Powell's line searches need finite values: a failed grid scores far above the start
        return f if math.isfinite(f) else best["f"] + 2 * LOGIT_BOUND * max(1, steps)

    def powell(to_theta, start: torch.Tensor, bound: float) -> None:
        minimize(lambda c: objective(to_theta(torch.as_tensor(c, dtype=F64))), start.numpy(), method="Powell",
                 bounds=[(-bound, bound)] * start.numel(), options={"xtol": xtol, "ftol": ftol, "maxfev": max_evals})

    if steps > 1 and best["f"] > -math.inf:
        try:
            # stage 1: a smooth change of the logits, theta_i = sum_k c_k cos(k pi s_i), few numbers
            k = min(coarse, steps - 1)
            if k > 0 and k < steps - 1:
                s_mid = (torch.arange(1, steps, dtype=F64) + 0.5) / steps
                basis = torch.cos(math.pi * torch.arange(1, k + 1, dtype=F64)[:, None] * s_mid[None, :])
                powell(lambda c: c @ basis, torch.zeros(k, dtype=F64), LOGIT_BOUND / k)
            # stage 2: every logit, from the best grid so far; restarted (fresh directions) while it
            # still gains more than ftol
            while True:
                f_before, theta1 = best["f"], best["theta"].clone()
                powell(lambda c, th=theta1: (th + c).clamp(-LOGIT_BOUND, LOGIT_BOUND),
                       torch.zeros(steps - 1, dtype=F64), LOGIT_BOUND)
                if not best["f"] < f_before - ftol:
                    break
        except _Budget:
            pass
    g = grid_of(best["theta"]) if steps > 1 else g_init
    return TunedGrid(grid=g, method=method, nfe=nfe, steps=steps, metric=metric, options=options, init=init_name,
                     calibration_error=math.exp(best["f"]) if best["f"] > -math.inf else 0.0,
                     fixed_errors=fixed, n_calibration=int(x.shape[0]), evaluations=count["n"],
                     seconds=time.perf_counter() - tic, problem=repr(problem))
