r"""Observed convergence orders of a work-precision study, with confidence intervals.

For a fixed-step method with error $e \approx C h^p$ the order is the slope of $\log e$ against
$\log h$ ($h = |t_1 - t_0|/N$, the uniform step size of $N$ steps, whatever the grid); for an
adaptive method it is the slope of $\log e$ against $\log(1/\mathrm{NFE})$ (cost, not steps,
is what it controls). `observed_order` fits the slope by least squares over every seed's
points that lie clearly above the metric's floor (`FLOOR_MARGIN` times it: points near the
floor carry no information about the order), with a Student-$t$ confidence interval, and compares it with the order the registry
declares (`sdekit.solvers.MethodInfo`): ``strong_order`` for the pathwise metrics (``strong``,
``flow``) and for deterministic methods, ``weak_order`` for distribution metrics of stochastic
methods.

The interval: with three or more seeds, the $t$-interval of the mean of the per-seed slopes
(seeds are independent replicates; the points of one seed share start points and noise, so
they are not); with fewer, the least-squares interval of the pooled fit. Declared orders are
asymptotic: over a finite range of step sizes the slope drifts by a few hundredths, so the
verdict is ``"consistent"`` when the declared order lies within `ORDER_TOLERANCE` of the
interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

from ..solvers import get_method
from .work_precision import StudyTable

__all__ = ["OrderRow", "observed_order", "fit_slope", "orders_markdown", "CONFIDENCE", "ORDER_TOLERANCE"]

#: Two-sided confidence level of the reported intervals.
CONFIDENCE = 0.95
#: Slack between the interval and the declared (asymptotic) order that still counts as consistent.
ORDER_TOLERANCE = 0.1
#: Points below this multiple of their floor are left out of the fit: a statistic near its noise
#: floor is dominated by sampling noise and would pull the slope towards 0.
FLOOR_MARGIN = 3.0
#: An interval wider than this says nothing about the order: verdict ``"inconclusive"``.
MAX_INTERVAL_WIDTH = 2.0
#: Seeds from which the interval comes from the per-seed slopes (replicates) instead of the pooled fit.
MIN_REPLICATES = 3
_PATHWISE = ("strong", "flow", "flow_mean", "flow_max")


@dataclass(frozen=True)
class OrderRow:
    """One fitted order: ``observed`` with ``[ci_low, ci_high]``, the ``declared`` order, and
    ``verdict``: ``"consistent"`` (declared within `ORDER_TOLERANCE` of the interval), ``"above declared"``,
    ``"below declared"``, ``"inconclusive"`` (interval wider than `MAX_INTERVAL_WIDTH`) or
    ``"too few points"`` (fewer than 3 points above `FLOOR_MARGIN` times their floor)."""

    label: str
    method: str
    grid: str
    metric: str
    against: str
    observed: Optional[float]
    ci_low: Optional[float]
    ci_high: Optional[float]
    declared: Optional[float]
    points: int
    verdict: str

    def as_dict(self) -> Dict:
        return asdict(self)


def fit_slope(x: List[float], y: List[float], confidence: float = CONFIDENCE):
    """Least-squares slope of ``y`` on ``x`` and its two-sided Student-$t$ interval:
    ``(slope, low, high)``. Needs >= 3 points with distinct ``x``."""
    n = len(x)
    if n != len(y) or n < 3:
        raise ValueError(f"fit_slope needs >= 3 (x, y) pairs, got {n}")
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    if sxx == 0:
        raise ValueError("fit_slope needs at least two distinct x values")
    b = sum((a - mx) * (c - my) for a, c in zip(x, y)) / sxx
    resid = [c - (my + b * (a - mx)) for a, c in zip(x, y)]
    s2 = sum(r * r for r in resid) / (n - 2)
    half = _t_quantile(confidence, n - 2) * math.sqrt(s2 / sxx)
    return b, b - half, b + half


def _t_quantile(confidence: float, df: int) -> float:
    """Two-sided Student-$t$ quantile (``scipy.special``: far lighter to import than scipy.stats)."""
    from scipy.special import stdtrit

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    return float(stdtrit(df, 0.5 + confidence / 2))


def _ls_slope(x: List[float], y: List[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (c - my) for a, c in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def _mean_interval(v: List[float], confidence: float):
    n = len(v)
    m = sum(v) / n
    sd = math.sqrt(sum((a - m) ** 2 for a in v) / (n - 1))
    half = _t_quantile(confidence, n - 1) * sd / math.sqrt(n)
    return m - half, m + half


def _declared(method: str, metric: str) -> Optional[float]:
    info = get_method(method)
    if metric in _PATHWISE or not info.stochastic or info.weak_order is None:
        return info.strong_order
    return info.weak_order


def observed_order(table: StudyTable, metrics: Optional[List[str]] = None,
                   confidence: float = CONFIDENCE) -> List[OrderRow]:
    r"""Fit the observed order of each (method, grid, metric) of ``table``.

    Uses the per-seed records: $\log e$ against $\log h$ for step budgets, against
    $\log(1/\mathrm{NFE})$ for tolerance budgets, skipping points at or below their floor.
    """
    if not isinstance(table, StudyTable):
        raise TypeError(f"table must be a StudyTable (from work_precision), got {type(table).__name__}")
    mets = list(table.metrics if metrics is None else metrics)
    unknown = [m for m in mets if m not in table.metrics]
    if unknown:
        raise ValueError(f"metrics {unknown} are not in this table (it has {list(table.metrics)})")
    out: List[OrderRow] = []
    keys = []
    for r in table.records:
        k = (r["label"], r["method"], r["grid"])
        if k not in keys:
            keys.append(k)
    for label, method, grid in keys:
        rs = [r for r in table.records if (r["label"], r["method"], r["grid"]) == (label, method, grid)]
        steps = rs[0]["budget_kind"] == "steps"
        for m in mets:
            pts = [r for r in rs if r[m] > FLOOR_MARGIN * r[f"{m}_floor"] and r[m] > 0]
            xs = [math.log(r["h"]) if steps else -math.log(r["nfe"]) for r in pts]
            ys = [math.log(r[m]) for r in pts]
            declared = _declared(method, m)
            if len(pts) < 3 or len(set(xs)) < 2:
                out.append(OrderRow(label, method, grid, m, "h" if steps else "1/NFE", None, None, None, declared,
                                    len(pts), "too few points"))
                continue
            b, lo, hi = fit_slope(xs, ys, confidence)
            per_seed = []
            for sd in sorted({r["seed"] for r in pts}):
                q = [(x, y) for x, y, r in zip(xs, ys, pts) if r["seed"] == sd]
                if len(q) >= 2 and len({x for x, _ in q}) >= 2:
                    per_seed.append(_ls_slope([x for x, _ in q], [y for _, y in q]))
            if len(per_seed) >= MIN_REPLICATES:
                b = sum(per_seed) / len(per_seed)
                lo, hi = _mean_interval(per_seed, confidence)
            tol = ORDER_TOLERANCE
            verdict = ("inconclusive" if hi - lo > MAX_INTERVAL_WIDTH else
                       "consistent" if declared is None or lo - tol <= declared <= hi + tol else
                       "above declared" if lo - tol > declared else "below declared")
            out.append(OrderRow(label, method, grid, m, "h" if steps else "1/NFE", b, lo, hi, declared,
                                len(pts), verdict))
    return out


def orders_markdown(rows: List[OrderRow]) -> str:
    """The fitted orders as a markdown table."""
    def f(v):
        return "-" if v is None else f"{v:.2f}"

    lines = [f"| method | grid | metric | vs | observed order | {CONFIDENCE:.0%} interval | declared | points | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = "-" if r.ci_low is None else f"[{r.ci_low:.2f}, {r.ci_high:.2f}]"
        lines.append(f"| `{r.label}` | {r.grid} | {r.metric} | {r.against} | {f(r.observed)} | {ci} | "
                     f"{f(r.declared)} | {r.points} | {r.verdict} |")
    return "\n".join(lines)
