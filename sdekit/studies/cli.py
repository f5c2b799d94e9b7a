"""``python -m sdekit study NAME | path/to/my_study.py``: run a study and write its outputs.

Outputs in ``--out`` (default ``./study-<name>``): ``table.csv`` and ``table.md`` (one row per
method × grid × budget), ``study.json`` (rows, per-seed records, fitted orders, settings),
``orders.md`` and ``orders.csv`` (observed order per method, grid and metric against the declared
one) and ``work_precision.png`` (log-log error against NFE, one panel per metric, floors dashed
or dotted, points at the floor hollow).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

from ..solvers import SolverError
from .named import StudySpec, get_study
from .order import OrderRow, observed_order, orders_markdown
from .work_precision import StudyTable, work_precision

__all__ = ["run_study", "write_outputs", "plot_work_precision", "add_study_parser", "main_study"]

OUTPUT_FILES = ("table.csv", "table.md", "study.json", "orders.md", "orders.csv", "work_precision.png")


def run_study(spec: StudySpec, *, quick: bool = False, seeds: Optional[Sequence[int]] = None,
              methods: Optional[Sequence[str]] = None, metrics: Optional[Sequence[str]] = None,
              progress=None):
    """Run ``spec`` (its quick variant with ``quick``), optionally overriding seeds, methods and
    metrics; returns ``(table, orders)``."""
    s = spec.quick_version() if quick else spec
    meth = list(s.methods)
    budgets = s.budgets
    if methods is not None:
        unknown = [m for m in methods if m not in [getattr(x, "name", x) for x in meth]]
        if unknown:
            # a method outside the study: validated by work_precision (unknown names raise there)
            meth = list(methods)
        else:
            meth = [x for x in meth if getattr(x, "name", x) in methods]
    table = work_precision(s.problem, meth, budgets, reference=s.reference,
                           metrics=list(metrics) if metrics is not None else list(s.metrics),
                           seeds=list(seeds) if seeds is not None else list(s.seeds), grids=s.grids, n=s.n,
                           progress=progress)
    table.meta.update(study=s.name, description=s.description, quick=quick)
    return table, observed_order(table)


def plot_work_precision(table: StudyTable, path: str, title: str = "") -> None:
    """Log-log error against NFE, one panel per metric; points at their floor hollow; the floor
    dashed where all rows share one, else dotted per series in its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    mets = list(table.metrics)
    fig, axes = plt.subplots(1, len(mets), figsize=(4.2 * len(mets), 3.8), squeeze=False)
    fig.subplots_adjust(left=0.09 / len(mets) + 0.05, right=0.98, bottom=0.14, top=0.82, wspace=0.35)
    series: Dict[tuple, List[dict]] = {}
    for r in table.rows:
        series.setdefault((r["label"], r["grid"]), []).append(r)
    for ax, m in zip(axes[0], mets):
        for (label, grid), rs in series.items():
            rs = sorted(rs, key=lambda r: r["nfe_mean"])
            xs = [r["nfe_mean"] for r in rs]
            ys = [max(r[m], 1e-300) for r in rs]
            line, = ax.plot(xs, ys, "-", lw=1.2, label=f"{label} ({grid})")
            for x, y, r in zip(xs, ys, rs):
                ax.plot([x], [y], "o", ms=5, color=line.get_color(),
                        mfc="none" if r[f"{m}_at_floor"] else line.get_color())
            floors = [r[f"{m}_floor"] for r in rs]
            if len({round(f, 12) for f in [r[f"{m}_floor"] for r in table.rows]}) > 1 and min(floors) > 0:
                ax.plot(xs, floors, ":", lw=1, color=line.get_color(), alpha=0.6)  # this series' own floor
        shared = {round(r[f"{m}_floor"], 12) for r in table.rows}
        if len(shared) == 1 and next(iter(shared)) > 0:
            ax.axhline(next(iter(shared)), ls="--", color="gray", lw=1, label="floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("NFE")
        ax.set_ylabel(m)
        ax.set_title(m)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(table: StudyTable, orders: List[OrderRow], out: str, title: str = "") -> Dict[str, str]:
    """Write every output file of a study into ``out`` (created); returns name -> path."""
    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, name) for name in OUTPUT_FILES}
    table.to_csv(paths["table.csv"])
    with open(paths["table.md"], "w") as f:
        f.write((f"# {title}\n\n" if title else "") + table.to_markdown() + "\n")
    with open(paths["orders.md"], "w") as f:
        f.write(orders_markdown(orders) + "\n")
    with open(paths["orders.csv"], "w") as f:
        rows = [o.as_dict() for o in orders]
        w = csv.DictWriter(f, fieldnames=list(OrderRow.__dataclass_fields__), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    with open(paths["study.json"], "w") as f:
        json.dump({"meta": table.meta, "metrics": list(table.metrics), "rows": table.rows, "records": table.records,
                   "orders": [o.as_dict() for o in orders]}, f, indent=1, default=str)
    plot_work_precision(table, paths["work_precision.png"], title)
    return paths


def add_study_parser(sub) -> None:
    p = sub.add_parser("study", help="run a work-precision study (named, or a .py file defining sde and mixture) "
                                     "and write CSV, JSON, markdown tables, observed orders and a plot")
    p.add_argument("study", help="vp-gmm2d, ve-gmm64, custom-sde-gmm8, ou-strong-weak, or path/to/my_study.py")
    p.add_argument("--out", default=None, help="output folder (default ./study-<name>)")
    p.add_argument("--quick", action="store_true", help="a reduced study that runs in seconds")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the study's)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: the study's)")
    p.add_argument("--metrics", default=None, help="comma-separated metrics (default: the study's)")
    p.add_argument("--verbose", action="store_true", help="print one line per solve")


def _csv_list(s: Optional[str], name: str, conv=str):
    if s is None:
        return None
    items = [x.strip() for x in s.split(",") if x.strip()]
    try:
        return [conv(x) for x in items]
    except ValueError:
        raise ValueError(f"--{name} must be a comma-separated list, got {s!r}") from None


def main_study(args) -> int:
    """Run the ``study`` subcommand; bad input prints one line to stderr and returns 2, a solve
    that fails (`sdekit.SolverError`) one line and 1."""
    try:
        spec = get_study(args.study)
        seeds = _csv_list(args.seeds, "seeds", int)
        tic = time.perf_counter()
        table, orders = run_study(spec, quick=args.quick, seeds=seeds, methods=_csv_list(args.methods, "methods"),
                                  metrics=_csv_list(args.metrics, "metrics"), progress=print if args.verbose else None)
    except (ValueError, TypeError) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    except SolverError as e:  # a solve that diverged: no table is written (no NaN rows)
        print(f"error: a solve failed: {e}".splitlines()[0], file=sys.stderr)
        return 1
    out = args.out or f"study-{spec.name}"
    title = f"{spec.name}{' (quick)' if args.quick else ''}: {spec.description}"
    paths = write_outputs(table, orders, out, title)
    print(table.to_markdown())
    print()
    print(orders_markdown(orders))
    print(f"\n{len(table.records)} solves in {time.perf_counter() - tic:.1f} s; outputs in {os.path.abspath(out)}:")
    for p in paths.values():
        print(f"  {p}")
    return 0
