r"""Work-precision sweeps: error against cost for methods × grids × budgets × seeds.

`work_precision` solves a `sdekit.studies.StudyProblem` with every method, time grid and
budget (step counts for fixed-step methods, tolerances for adaptive ones) from the same start
points — and, for SDE methods, on the same `sdekit.solvers.BrownianPath` as the reference —
for each seed, and returns a `StudyTable`: one row per (method, grid, budget) with the NFE
(mean, min, max over seeds), the wall time, and each metric's mean ± standard deviation over
seeds next to its noise floor. A metric whose mean is at or below its floor is flagged
``at_floor``: the study cannot resolve it, so it is no evidence that the method is better.

Metrics (`METRICS`):

- ``strong``: RMS per-sample error $\big(\tfrac1n\sum_i\|x_i - x^{\rm ref}_i\|^2/d\big)^{1/2}$
  against the pathwise reference (same start point, same noise); floor: the reference's own
  error.
- ``flow``: the median of the same per-sample errors (ODE flow-map error); same floor.
  ``flow_mean`` and ``flow_max``: their mean and maximum.
- ``weak``: error of the first two moments (`sdekit.studies.metrics.weak_error`), paired with
  the pathwise reference where there is one, else against target samples; floor: 3 standard
  errors.
- ``sliced_wasserstein``, ``mmd``, ``energy``: two-sample statistics against exact samples of the
  target law (or the reference's points); floor: their 95 % quantile between two independent
  exact samples of the same sizes (`sdekit.studies.noise_floor`).
- ``nll``: cross-entropy error against the exact density of the target; floor: 3 standard
  errors.
- ``modes``: total-variation distance of mode occupancy from the mixture weights; floor: its
  95 % quantile under multinomial sampling.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .._validation import check_int
from ..dynamics import ProbabilityFlowODE
from ..solvers import BrownianPath, get_method, solve
from ..solvers.grids import GRID_KINDS
from ..solvers.registry import MethodInfo
from . import metrics as M
from .reference import FINE_FACTOR, TIGHT_LOOSEN, Reference, StudyProblem

__all__ = ["work_precision", "StudyTable", "MethodSpec", "METRICS", "ADAPTIVE_GRID"]

F64 = torch.float64
#: Grid label of adaptive runs (they choose their own steps).
ADAPTIVE_GRID = "adaptive"
#: Repeats of the two-sample floors (``sliced_wasserstein``, ``mmd``, ``energy``).
FLOOR_REPEATS = 8

METRICS = ("strong", "flow", "flow_mean", "flow_max", "weak", "sliced_wasserstein", "mmd", "energy", "nll", "modes")
_PATHWISE = {"strong": "rms", "flow": "median", "flow_mean": "mean", "flow_max": "max"}
_TWO_SAMPLE = {"sliced_wasserstein": M.sliced_wasserstein, "mmd": M.mmd, "energy": M.energy_distance}


@dataclass(frozen=True)
class MethodSpec:
    """One entry of ``methods``: a registry method with options, and optionally its own problem.

    ``problem`` replaces the study problem's dynamics for this entry only (e.g. a learned score,
    or a deliberately wrong drift) while start points, reference and metrics stay the study's.
    """

    method: str
    label: Optional[str] = None
    options: Mapping[str, Any] = field(default_factory=dict)
    problem: Any = None

    @property
    def name(self) -> str:
        return self.label or self.method


@dataclass
class StudyTable:
    """Result of `work_precision`: ``rows`` (one dict per method × grid × budget, aggregated over
    seeds) and ``records`` (one dict per seed), plus the study's settings in ``meta``.

    Row keys: ``method``, ``label``, ``grid``, ``budget``, ``budget_kind`` (``"steps"`` or
    ``"tol"``), ``h`` (the uniform step size $|t_1 - t_0|/N$ for step budgets), ``nfe_mean``,
    ``nfe_min``, ``nfe_max``, ``seconds``, and per metric ``<m>``, ``<m>_std``, ``<m>_floor``,
    ``<m>_at_floor``.
    """

    rows: List[Dict[str, Any]]
    records: List[Dict[str, Any]]
    metrics: Tuple[str, ...]
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def columns(self) -> List[str]:
        cols = ["label", "method", "grid", "budget_kind", "budget", "h", "nfe_mean", "nfe_min", "nfe_max", "seconds"]
        for m in self.metrics:
            cols += [m, f"{m}_std", f"{m}_floor", f"{m}_at_floor"]
        return cols

    def select(self, **where) -> List[Dict[str, Any]]:
        """Rows whose keys equal the given values, e.g. ``select(label="euler", grid="uniform")``."""
        return [r for r in self.rows if all(r.get(k) == v for k, v in where.items())]

    def to_csv(self, path: Optional[str] = None) -> str:
        """The rows as CSV (written to ``path`` if given); returns the text."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns(), extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in self.columns()})
        text = buf.getvalue()
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def to_json(self, path: Optional[str] = None) -> str:
        """Rows, per-seed records, metrics and settings as JSON (written to ``path`` if given)."""
        text = json.dumps({"meta": self.meta, "metrics": list(self.metrics), "rows": self.rows,
                           "records": self.records}, indent=1, default=str)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def to_markdown(self) -> str:
        """A markdown table: value ± spread over seeds, and ``≤ floor (at floor)`` where the
        value is not resolved."""
        hdr = ["method", "grid", "budget", "NFE"] + [f"{m} (floor)" for m in self.metrics] + ["s"]
        lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        for r in self.rows:
            nfe = _fmt(r["nfe_mean"]) if r["nfe_min"] == r["nfe_max"] else \
                f"{_fmt(r['nfe_mean'])} ({r['nfe_min']}–{r['nfe_max']})"
            cells = [f"`{r['label']}`", r["grid"], _fmt(r["budget"]), nfe]
            for m in self.metrics:
                v, s, fl = r[m], r[f"{m}_std"], r[f"{m}_floor"]
                if r[f"{m}_at_floor"]:
                    cells.append(f"≤ {_fmt(fl)} (at floor)")
                else:
                    cells.append(f"{_fmt(v)} ± {_fmt(s)} ({_fmt(fl)})")
            cells.append(_fmt(r["seconds"]))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, numbers.Integral):
        return str(v)
    v = float(v)
    if v != v:
        return "nan"
    a = abs(v)
    if a != 0 and (a < 1e-2 or a >= 1e4):
        return f"{v:.2e}"
    return f"{v:.3g}"


# ------------------------------------------------------------------------------------------------
# validation of the request
# ------------------------------------------------------------------------------------------------
def _specs(methods) -> List[MethodSpec]:
    if isinstance(methods, (str, MethodSpec)):
        methods = [methods]
    if not isinstance(methods, (list, tuple)) or not methods:
        raise ValueError(f"methods must be a non-empty list of method names or MethodSpec, got {methods!r}")
    out = []
    for m in methods:
        spec = MethodSpec(m) if isinstance(m, str) else m
        if not isinstance(spec, MethodSpec):
            raise TypeError(f"methods entries must be method names or MethodSpec, got {type(m).__name__}: {m!r}")
        info = get_method(spec.method)  # ValueError listing the valid methods
        info.validate_options(spec.options)
        out.append(spec)
    labels = [s.name for s in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"methods must have distinct labels (give MethodSpec(label=...)), got {labels}")
    return out


def _budget_kind(info: MethodInfo, spec: MethodSpec, b) -> str:
    """``"steps"`` or ``"tol"`` for budget ``b`` of this method; ValueError on a mismatch."""
    adaptive_now = info.stepping == ("adaptive",) or bool(spec.options.get("adaptive", False))
    if isinstance(b, bool) or not isinstance(b, numbers.Real):
        raise TypeError(f"budgets must be step counts (int) or tolerances (float), got {b!r}")
    if adaptive_now:
        if isinstance(b, numbers.Integral) or not 0 < float(b) < 1:
            raise ValueError(f"method {spec.name!r} is adaptive: its budgets must be tolerances in (0, 1) "
                             f"(rtol = atol), got {b!r}")
        return "tol"
    if not isinstance(b, numbers.Integral):
        raise ValueError(f"method {spec.name!r} takes fixed steps: its budgets must be step counts (int), got "
                         f"the tolerance {b!r}; tolerances apply to adaptive methods (dopri5, bosh3, ...)")
    if b < 1:
        raise ValueError(f"step budgets must be >= 1, got {b!r} for method {spec.name!r}")
    return "steps"


def _budgets_for(budgets, spec: MethodSpec) -> List:
    if isinstance(budgets, Mapping):
        if spec.name in budgets:
            b = budgets[spec.name]
        elif spec.method in budgets:
            b = budgets[spec.method]
        else:
            raise ValueError(f"budgets has no entry for method {spec.name!r} (keys: {sorted(budgets)})")
    else:
        b = budgets
    if isinstance(b, (numbers.Real,)) and not isinstance(b, bool):
        b = [b]
    if not isinstance(b, (list, tuple)) or not b:
        raise ValueError(f"budgets for {spec.name!r} must be a non-empty list, got {b!r}")
    return list(b)


def _grids(grids, info: MethodInfo) -> List[Tuple[str, Any]]:
    """``(label, grid argument)`` pairs for a method: adaptive → one pseudo-grid."""
    if info.stepping == ("adaptive",) or info.stepping[0] == "dt":
        return [(ADAPTIVE_GRID if info.stepping == ("adaptive",) else "uniform", None)]
    if grids is None:
        return [(info.default_grid, None)]
    if isinstance(grids, str):
        grids = [grids]
    items = list(grids.items()) if isinstance(grids, Mapping) else [(g, g) for g in grids]
    if not items:
        raise ValueError("grids must be None (each method's default) or a non-empty list")
    out = []
    for name, g in items:
        if isinstance(g, str):
            if g not in GRID_KINDS:
                raise ValueError(f"grids entries must be one of {GRID_KINDS} or a name -> callable(steps) mapping; "
                                 f"got {g!r}")
        elif not callable(g):
            raise TypeError(f"grids[{name!r}] must be a grid kind or a callable (method, steps) -> tensor of "
                            f"times, got {type(g).__name__}")
        out.append((str(name), g))
    return out


def _seeds(seeds) -> List[int]:
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, (list, tuple, range)):
        raise TypeError(f"seeds must be a list of integers, got {type(seeds).__name__}: {seeds!r}")
    if len(seeds) == 0:
        raise ValueError("seeds must not be empty: give at least one seed (several for a spread)")
    return [check_int(s, "seeds[i]", 0) for s in seeds]


def _metrics(metrics) -> Tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, (list, tuple)) or not metrics:
        raise ValueError(f"metrics must be a non-empty list from {METRICS}, got {metrics!r}")
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; valid metrics: {', '.join(METRICS)}")
    return tuple(metrics)


def _takes_brownian(info: MethodInfo, spec: MethodSpec) -> bool:
    return info.backend == "native" and info.problem == "sde" and info.stepping == ("grid",)


# ------------------------------------------------------------------------------------------------
# the reference of one seed
# ------------------------------------------------------------------------------------------------
@dataclass
class _SeedRef:
    x0: torch.Tensor
    x_ref: Optional[torch.Tensor]
    ref_floor: float
    brownian: Optional[BrownianPath]
    target_x: Optional[torch.Tensor]
    floors: Dict[str, float]


def _reference(sp: StudyProblem, ref: Reference, seed: int, n: int, n_fine: Optional[int],
               metrics: Tuple[str, ...], target_n: int) -> _SeedRef:
    gen = torch.Generator().manual_seed(seed)
    x0 = sp.draw_start(n, gen)
    bp = None
    if n_fine is not None:
        lo, hi = sorted((sp.t_start, sp.t_end))
        bp = BrownianPath(x0.shape, lo, hi, n_fine, generator=torch.Generator().manual_seed(seed + 1_000_003))
    x_ref, floor = None, 0.0
    if ref.kind == "exact":
        x_ref = sp.exact(x0, bp)
        floor = M.roundoff_floor(x_ref)
    elif ref.kind == "tight":
        x64 = x0.to(F64)
        x_ref = solve(sp.problem, x64, sp.t_start, sp.t_end, method=ref.method, rtol=ref.tol, atol=ref.tol).x
        loose = solve(sp.problem, x64, sp.t_start, sp.t_end, method=ref.method, rtol=ref.tol * TIGHT_LOOSEN,
                      atol=ref.tol * TIGHT_LOOSEN).x
        floor = M.strong_error(loose, x_ref)
    elif ref.kind == "fine":
        kw = dict(method=ref.method, brownian=bp)
        x_ref = solve(sp.problem, x0, sp.t_start, sp.t_end, steps=n_fine, **kw).x
        half = solve(sp.problem, x0, sp.t_start, sp.t_end, steps=n_fine // 2, **kw).x
        floor = M.strong_error(half, x_ref)
    target_x = None
    if ref.kind == "samples":
        target_x = ref.samples_x.detach().to(F64)
    elif sp.target is not None:
        target_x = sp.target.sample(target_n, torch.Generator().manual_seed(seed + 2_000_003)).to(F64)
    floors: Dict[str, float] = {}
    fgen_seed = seed + 3_000_017
    for m in metrics:
        if m in _TWO_SAMPLE:
            pool = target_x if target_x is not None else x_ref
            if sp.target is not None:
                vals = M.noise_floor(lambda k, g: sp.target.sample(k, g).to(F64), n, repeats=FLOOR_REPEATS,
                                     stat=_TWO_SAMPLE[m], seed=fgen_seed)
            else:  # no sampler: the statistic between halves of the pool (a conservative floor)
                perm = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(fgen_seed))
                h = pool.shape[0] // 2
                vals = torch.tensor([_TWO_SAMPLE[m](pool[perm[:h]], pool[perm[h:2 * h]])])
            floors[m] = float(vals.quantile(M.FLOOR_QUANTILE))
        elif m == "modes":
            floors[m] = M.mode_occupancy_floor(sp.target, n, seed=fgen_seed)
    return _SeedRef(x0, x_ref, floor, bp, target_x, floors)


def _check_reference(sp: StudyProblem, ref: Reference, metrics: Tuple[str, ...], specs: List[MethodSpec]):
    if ref.kind == "exact" and sp.exact is None:
        raise ValueError(f"reference='exact' needs the problem's exact solution map (StudyProblem(exact=...)); "
                         f"{sp.name!r} has none: use 'tight' (ODE) or 'fine' (SDE)")
    if ref.kind == "tight" and not isinstance(sp.problem, ProbabilityFlowODE):
        raise ValueError("reference='tight' is an adaptive ODE solve: it needs a ProbabilityFlowODE problem; for an "
                         "SDE use 'fine' (a fine solve on the same Brownian path) or 'exact'")
    if ref.kind == "fine" and isinstance(sp.problem, ProbabilityFlowODE):
        raise ValueError("reference='fine' is an SDE solve on a shared Brownian path; for an ODE use 'tight'")
    if ref.kind == "samples":
        lo, hi = sorted((sp.t_start, sp.t_end))
        if abs(ref.time - sp.t_end) > 1e-12 * max(1.0, abs(sp.t_end)):
            raise ValueError(f"the reference samples are at t = {ref.time!r} but the study ends at t_end = "
                             f"{sp.t_end!r} (interval [{lo}, {hi}]): the reference does not cover the requested time")
        bad = [m for m in metrics if m in _PATHWISE]
        if bad:
            raise ValueError(f"metrics {bad} compare each sample with its own reference; reference samples give "
                             f"none: use a pathwise reference ('exact', 'tight', 'fine')")
    needs_target = [m for m in metrics if m in ("nll", "modes")]
    if needs_target and sp.target is None:
        raise ValueError(f"metrics {needs_target} need the exact target law (StudyProblem(target=...))")
    if "modes" in metrics:
        from ..oracles import GaussianMixture

        if not isinstance(sp.target, GaussianMixture):
            raise ValueError("metric 'modes' needs a GaussianMixture target")
    for s in specs:
        info = get_method(s.method)
        stoch = info.is_stochastic(info.validate_options(s.options))
        if stoch and any(m in _PATHWISE for m in metrics) and not _takes_brownian(info, s):
            raise ValueError(f"metrics {[m for m in metrics if m in _PATHWISE]} need every stochastic method to be "
                             f"driven by the reference's Brownian path; {s.name!r} draws its own noise (use "
                             f"euler_maruyama or stochastic_heun, or distribution metrics)")


# ------------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------------
def work_precision(problem_or_factory: Union[StudyProblem, Callable[[int], StudyProblem]],
                   methods: Sequence[Union[str, MethodSpec]], budgets: Union[Sequence, Mapping[str, Sequence]], *,
                   reference: Union[str, Reference] = "tight",
                   metrics: Sequence[str] = ("strong",), seeds: Sequence[int] = (0,),
                   grids: Union[None, Sequence[str], Mapping[str, Any]] = None, n: Optional[int] = None,
                   target_n: Optional[int] = None, fine_steps: Optional[int] = None,
                   progress: Optional[Callable[[str], None]] = None) -> StudyTable:
    r"""Sweep methods × grids × budgets × seeds and tabulate cost against error.

    Parameters
    ----------
    problem_or_factory:
        A `StudyProblem`, or ``factory(seed) -> StudyProblem`` (problems that depend on the
        seed, e.g. a randomly drawn mixture or a network trained with that seed).
    methods:
        Registry method names (``"euler"``, ``"dpmpp_2m"``, ``"dopri5"`` ...) or `MethodSpec`
        (options, a label, an entry-specific problem).
    budgets:
        Step counts (int) for fixed-step methods and tolerances (float in (0, 1), used as
        ``rtol = atol``) for adaptive ones; one list for all methods or a mapping from label (or
        method name) to a list. A tolerance for a fixed-step method, or a step count for an
        adaptive one, raises ``ValueError``.
    reference:
        ``"tight"`` (float64 dopri5 at $10^{-10}$: ODEs), ``"fine"`` (an SDE solve on the same
        Brownian path at `FINE_FACTOR` × the largest budget), ``"exact"`` (the problem's
        ``exact`` map) or a `Reference`.
    metrics:
        From `METRICS` (see the module docs); each is reported with its floor.
    seeds:
        Non-empty list of integers: each seed draws its own start points, Brownian path and
        reference; values are mean ± standard deviation over seeds.
    grids:
        ``None`` (each method's default grid), a list of grid kinds (``"uniform"``,
        ``"log_snr"``, ``"edm"``, ``"quadratic"``) or a mapping from a label to a grid kind or a
        callable ``(method, steps) -> tensor`` of times (e.g. a tuned grid). Adaptive methods
        ignore it.
    n:
        Start points per seed (default: the problem's ``n``).
    target_n:
        Exact target samples per seed for the distribution metrics (default ``n``).
    fine_steps:
        Steps of the ``"fine"`` reference and resolution of the Brownian path (default
        `FINE_FACTOR` × the largest step budget); every step budget must divide it.
    progress:
        Optional callable receiving one line per solve.

    Returns
    -------
    StudyTable
        Rows per (method, grid, budget) and per-seed records.

    Raises
    ------
    ValueError, TypeError
        For an unknown method or metric, a budget that does not fit its method, an empty seed
        list, a reference that does not cover the study's interval or cannot serve the metrics.
    SolverError
        When a solve fails (a non-finite state): no row is ever filled with NaN.
    """
    specs = _specs(methods)
    mets = _metrics(metrics)
    seed_list = _seeds(seeds)
    ref = Reference.parse(reference)
    plan = []  # (spec, info, grid label, grid arg, budget, kind)
    step_budgets = []
    for s in specs:
        info = get_method(s.method)
        bl = _budgets_for(budgets, s)
        kinds = [_budget_kind(info, s, b) for b in bl]
        for gl, garg in _grids(grids, info):
            for b, k in zip(bl, kinds):
                plan.append((s, info, gl, garg, b, k))
                if k == "steps":
                    step_budgets.append(int(b))
    factory = problem_or_factory if not isinstance(problem_or_factory, StudyProblem) else None
    if factory is not None and not callable(factory):
        raise TypeError(f"problem_or_factory must be a StudyProblem or a callable seed -> StudyProblem, got "
                        f"{type(problem_or_factory).__name__}")
    problems: Dict[int, StudyProblem] = {}

    def problem_of(seed: int) -> StudyProblem:
        if seed not in problems:
            sp = problem_or_factory if factory is None else factory(seed)
            if not isinstance(sp, StudyProblem):
                raise TypeError(f"the factory must return a StudyProblem, got {type(sp).__name__}")
            problems[seed] = sp
        return problems[seed]

    sp0 = problem_of(seed_list[0])
    _check_reference(sp0, ref, mets, specs)
    needs_path = sp0.kind == "sde" and any(_takes_brownian(i, s) for s, i, *_ in plan) and ref.pathwise
    n_fine = None
    if needs_path or ref.kind == "fine":
        n_fine = ref.steps or fine_steps or FINE_FACTOR * max(step_budgets or [1])
        n_fine = check_int(n_fine, "fine_steps", 2)
        bad = [b for b in step_budgets if n_fine % b]
        if bad:
            raise ValueError(f"step budgets {bad} do not divide the Brownian path's {n_fine} fine steps: the "
                             f"reference would not cover the solves' times; use budgets that divide it "
                             f"(e.g. powers of two) or set fine_steps")
    n_pts = check_int(n if n is not None else sp0.n, "n", 2)
    t_n = check_int(target_n if target_n is not None else n_pts, "target_n", 2)

    records: List[Dict[str, Any]] = []
    for seed in seed_list:
        sp = problem_of(seed)
        sref = _reference(sp, ref, seed, n_pts, n_fine, mets, t_n)
        for s, info, gl, garg, b, kind in plan:
            prob = s.problem if s.problem is not None else sp.problem
            kw: Dict[str, Any] = dict(s.options)
            opts = info.validate_options(s.options)
            if kind == "tol":
                kw.update(rtol=float(b), atol=float(b))
            elif callable(garg):
                kw["grid"] = garg(s.method, int(b))
            else:
                kw["steps"] = int(b)
                if garg is not None:
                    kw["grid"] = garg
            if info.is_stochastic(opts):
                if sref.brownian is not None and _takes_brownian(info, s):
                    kw["brownian"] = sref.brownian
                else:
                    kw["generator"] = torch.Generator().manual_seed(seed + 4_000_037)
            tic = time.perf_counter()
            sol = solve(prob, sref.x0, sp.t_start, sp.t_end, method=s.method, **kw)
            secs = time.perf_counter() - tic
            paired = sref.x_ref is not None and ("brownian" in kw or not info.is_stochastic(opts))
            rec = {"seed": seed, "label": s.name, "method": s.method, "grid": gl, "budget": b, "budget_kind": kind,
                   "h": abs(sp.t_end - sp.t_start) / int(b) if kind == "steps" else None,
                   "nfe": int(sol.stats.nfe), "steps": int(sol.stats.steps), "seconds": secs}
            rec.update(_evaluate(sol.x, sref, sp, mets, paired))
            records.append(rec)
            if progress is not None:
                progress(f"seed {seed} {s.name} grid={gl} budget={b}: nfe {rec['nfe']}, " +
                         ", ".join(f"{m} {rec[m]:.3g}" for m in mets))
    table = StudyTable(_aggregate(records, mets), records, mets, meta={
        "problem": sp0.name, "reference": {"kind": ref.kind, "method": ref.method, "tol": ref.tol,
                                           "steps": n_fine if ref.kind == "fine" else ref.steps},
        "seeds": seed_list, "n": n_pts, "target_n": t_n, "t_start": sp0.t_start, "t_end": sp0.t_end,
        "fine_steps": n_fine, "floor_z": M.FLOOR_Z, "floor_quantile": M.FLOOR_QUANTILE})
    return table


def _evaluate(x: torch.Tensor, sref: _SeedRef, sp: StudyProblem, mets: Tuple[str, ...], paired: bool) -> Dict:
    out: Dict[str, Any] = {}
    x = x.detach().to(F64)
    for m in mets:
        if m in _PATHWISE:
            if sref.x_ref is None or not paired:
                raise ValueError(f"metric {m!r} needs a pathwise reference for every solve")
            v = M.strong_error(x, sref.x_ref, _PATHWISE[m])
            fl = sref.ref_floor
        elif m == "weak":
            if paired:
                v, fl = M.weak_error(x, sref.x_ref, paired=True)
            else:
                y = sref.target_x if sref.target_x is not None else sref.x_ref
                v, fl = M.weak_error(x, y)
        elif m in _TWO_SAMPLE:
            y = sref.target_x if sref.target_x is not None else sref.x_ref
            v, fl = _TWO_SAMPLE[m](x, y), sref.floors[m]
        elif m == "nll":
            y = sref.x_ref if paired else sref.target_x
            v, fl = M.nll_error(x, y, sp.target.log_prob, paired=paired)
        else:  # modes
            v, fl = M.mode_occupancy(x, sp.target)[0], sref.floors[m]
        if not math.isfinite(v):
            raise ValueError(f"metric {m!r} is not finite ({v}): the solve diverged")
        out[m], out[f"{m}_floor"] = float(v), float(fl)
    return out


def _aggregate(records: List[Dict[str, Any]], mets: Tuple[str, ...]) -> List[Dict[str, Any]]:
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["label"], r["grid"], r["budget"]), []).append(r)
    rows = []
    for (label, grid, budget), rs in groups.items():
        nfes = [r["nfe"] for r in rs]
        row = {"label": label, "method": rs[0]["method"], "grid": grid, "budget": budget,
               "budget_kind": rs[0]["budget_kind"], "h": rs[0]["h"], "nfe_mean": statistics.fmean(nfes),
               "nfe_min": min(nfes), "nfe_max": max(nfes), "steps_mean": statistics.fmean(r["steps"] for r in rs),
               "seconds": statistics.fmean(r["seconds"] for r in rs),
               "seeds": len(rs)}
        for m in mets:
            vs = [r[m] for r in rs]
            fl = statistics.fmean(r[f"{m}_floor"] for r in rs)
            row[m] = statistics.fmean(vs)
            row[f"{m}_std"] = statistics.stdev(vs) if len(vs) > 1 else 0.0
            row[f"{m}_floor"] = fl
            row[f"{m}_at_floor"] = bool(row[m] <= fl)
        rows.append(row)
    return rows
