"""Tuned time grids (`sdekit.studies.tune_grid`) against the fixed grids, on held-out start points.

Not a test. Prints markdown tables and writes JSON (default ``benchmarks/results/tune_grid.json``)
with the machine it ran on. Every error is the median (and mean) over held-out start points of
``||x - x_ref|| / sqrt(d)`` against ``dopri5`` at rtol = atol = 1e-10 in float64 from the same
points; grids are tuned on a separate calibration batch.

Sections (``--only fixed,tuned,transfer,network``; default all):

``fixed``
    Every deterministic grid method on every fixed grid kind (uniform, log_snr, quadratic, edm)
    at NFE 10 / 20 / 50 on VP d = 2, VP d = 64, VE d = 2 and the custom numeric-kernel process:
    the evidence for each method's ``default_grid`` in the registry.
``tuned``
    `tune_grid` for DPM-Solver++(2M) on VP d = 2 (N = 20, 10), VP d = 64 (N = 20), VE d = 2 and
    the custom process, and for DDIM, DPM-Solver-3 and Heun on VP d = 2: the tuned grid's
    held-out error next to every fixed grid's, the tuning time and the overfitting (held-out /
    calibration error).
``transfer``
    A grid tuned at one N resampled to another (`TunedGrid.resample`); a grid tuned on one
    mixture used on another; a grid tuned for one method used by another.
``network``
    A tiny `diffusion.ScoreModel` trained for a few hundred steps on the 2-D mixture; the grid
    is tuned on its own probability-flow ODE (reference: the same network, dopri5).

The mixtures are the ones of ``benchmarks/solvers.py`` (2-D: four modes at (+-1, +-1), std 0.1;
d = 64: eight modes, means N(0, I), stds in [0.05, 0.3], seed 0), VP(0.1, 20), t: 1 -> 1e-3.

Usage::

    PYTHONPATH=. python benchmarks/tune_grid.py            # full run (~15 min on 2 busy cores)
    PYTHONPATH=. python benchmarks/tune_grid.py --quick    # smoke run (< 1 min)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sdekit  # noqa: E402
from sdekit.solvers import solve  # noqa: E402
from sdekit.solvers.grids import GRID_KINDS  # noqa: E402
from sdekit.solvers.registry import get_method  # noqa: E402
from sdekit.studies.tune import TunedGrid, tune_grid  # noqa: E402

F64 = torch.float64
SECTIONS = ("fixed", "tuned", "transfer", "network")
T_EPS = 1e-3
BETA_MIN, BETA_MAX = 0.1, 20.0
# the issue's quick experiment (2-D VP mixture, DPM-Solver++(2M), median flow-map error)
ISSUE = {"d2_N20": {"log_snr": 8.2e-3, "uniform": 2.1e-3, "tuned": 6.1e-4},
         "d2_N10": {"quadratic": 1.17e-2, "tuned": 4.3e-3}, "d64_N20": {"best_fixed": 1.1e-2, "tuned": 6.4e-4}}
# deterministic grid methods for the default-grid table: (name, options)
FIXED_METHODS = [("euler", {}), ("heun", {}), ("rk4", {}), ("ddim", {}), ("dpm_solver_2", {}), ("dpm_solver_3", {}),
                 ("dpmpp_2m", {}), ("dpmpp_2m", {"predict": "noise"}), ("dpmpp_3m", {})]


# ------------------------------------------------------------------------------------------------
# machine, formatting
# ------------------------------------------------------------------------------------------------
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from solvers import cpu_model  # noqa: E402  (benchmarks/solvers.py: one machine description)


def load() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def machine_info() -> Dict:
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "cores_available": len(os.sched_getaffinity(0)),
            "machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_start": load()}


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, (str, int)):
        return str(v)
    if v != v or math.isinf(v):
        return str(v)
    a = abs(v)
    if a != 0 and (a < 1e-2 or a >= 1e4):
        return f"{v:.{max(digits - 1, 1)}e}"
    return f"{v:.{digits}g}"


def table(headers: List[str], rows: List[List]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------------
# the benchmark mixtures: one definition, in sdekit.studies.named (the named studies use them too)
from sdekit.studies.named import mixture_2d, mixture_nd  # noqa: E402


def custom_sde() -> sdekit.LinearSDE:
    r"""A process given only by its coefficients (numeric kernel): $f(t) = -2t$,
    $g(t)^2 = 0.5 + 8t$ — not variance preserving ($\sigma^2(1) \approx 1.5$, $m(1) = e^{-1}$)."""
    return sdekit.LinearSDE(lambda t: -2.0 * t, lambda t: (0.5 + 8.0 * t).sqrt())


def make_problem(name: str):
    """(sde, mixture) for a problem name: vp-gmm2d, vp-gmm64, ve-gmm2d, custom-gmm2d, vp-gmm2d-b, vp-gmm64-b."""
    sde = {"vp": lambda: sdekit.VPSDE(BETA_MIN, BETA_MAX), "ve": lambda: sdekit.VESDE(0.01, 50.0),
           "custom": custom_sde}[name.split("-")[0]]()
    gm = {"gmm2d": mixture_2d, "gmm64": lambda: mixture_nd(64), "gmm2d-b": lambda: mixture_nd(2, 8, seed=1),
          "gmm64-b": lambda: mixture_nd(64, seed=1)}[name.split("-", 1)[1]]()
    return sde, gm


class Case:
    """A problem with its PF ODE, calibration and held-out start points and their references."""

    def __init__(self, name: str, n_cal: int, n_held: int):
        self.name = name
        self.sde, self.gm = make_problem(name)
        self.pf = self.sde.probability_flow(self.gm.exact_score(self.sde), t_eps=T_EPS)
        pT = self.gm.push(self.sde, self.sde.T)
        self.x_cal = pT.sample(n_cal, torch.Generator().manual_seed(1))
        self.x_held = pT.sample(n_held, torch.Generator().manual_seed(2))
        tic = time.perf_counter()
        with torch.no_grad():
            self.ref_cal = solve(self.pf, self.x_cal, method="dopri5", rtol=1e-10, atol=1e-10).x
            self.ref_held = solve(self.pf, self.x_held, method="dopri5", rtol=1e-10, atol=1e-10).x
        self.ref_seconds = time.perf_counter() - tic

    def errors(self, method: str, grid, steps: Optional[int] = None, options: Optional[Dict] = None):
        """(median, mean, NFE) of the held-out per-sample error, inf if the solve fails."""
        try:
            with torch.no_grad():
                if isinstance(grid, torch.Tensor):
                    sol = solve(self.pf, self.x_held, method=method, grid=grid, **(options or {}))
                else:
                    sol = solve(self.pf, self.x_held, method=method, steps=steps, grid=grid, **(options or {}))
        except sdekit.solvers.SolverError:
            return math.inf, math.inf, None
        e = (sol.x - self.ref_held).reshape(sol.x.shape[0], -1).norm(dim=1) / math.sqrt(sol.x[0].numel())
        if not bool(torch.isfinite(e).all()):
            return math.inf, math.inf, sol.stats.nfe
        return float(e.median()), float(e.mean()), sol.stats.nfe


def label(method: str, options: Dict) -> str:
    return method + "".join(f" {k}={v}" for k, v in options.items())


# ------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------
def bench_fixed(cfg, cases: Callable[[str], Case]) -> Dict:
    rows = []
    for pname in cfg["fixed_problems"]:
        c = cases(pname)
        for method, opts in FIXED_METHODS:
            e = get_method(method).evals_per_step
            for nfe in cfg["fixed_nfe"]:
                steps = nfe // e
                for kind in GRID_KINDS:
                    med, mean, got = c.errors(method, kind, steps, opts)
                    rows.append({"problem": pname, "method": label(method, opts), "grid": kind, "steps": steps,
                                 "nfe": got, "median_err": med, "mean_err": mean})
    # the best grid per (method, nfe) and how it ranks across problems
    return {"rows": rows}


def print_fixed(res: Dict) -> str:
    rows = res["rows"]
    parts = []
    problems = list(dict.fromkeys(r["problem"] for r in rows))
    for pname in problems:
        parts.append(f"**{pname}**: median held-out error per grid; NFE = steps x evals/step (best grid in bold)\n")
        hdr = ["method", "NFE"] + list(GRID_KINDS) + ["registry default"]
        out = []
        for method, opts in FIXED_METHODS:
            lab = label(method, opts)
            for steps_nfe in sorted({r["steps"] for r in rows if r["problem"] == pname and r["method"] == lab}):
                qs = {r["grid"]: r for r in rows if r["problem"] == pname and r["method"] == lab
                      and r["steps"] == steps_nfe}
                best = min(qs, key=lambda k: qs[k]["median_err"])
                out.append([lab, next(iter(qs.values()))["nfe"]] +
                           [("**" + fmt(qs[k]["median_err"]) + "**") if k == best else fmt(qs[k]["median_err"])
                            for k in GRID_KINDS] + [get_method(method).default_grid])
        parts.append(table(hdr, out))
        parts.append("")
    # summary: geometric-mean ratio of each grid to the best, over problems and NFEs
    parts.append("Geometric mean over problems and NFEs of (grid's error / best grid's error), per method:\n")
    hdr = ["method"] + list(GRID_KINDS) + ["registry default"]
    out = []
    for method, opts in FIXED_METHODS:
        lab = label(method, opts)
        logs = {k: [] for k in GRID_KINDS}
        for pname in problems:
            for steps in sorted({r["steps"] for r in rows if r["problem"] == pname and r["method"] == lab}):
                qs = {r["grid"]: r["median_err"] for r in rows
                      if r["problem"] == pname and r["method"] == lab and r["steps"] == steps}
                b = min(qs.values())
                for k in GRID_KINDS:
                    logs[k].append(math.log(min(qs[k], 1e6) / b))
        out.append([lab] + [math.exp(sum(v) / len(v)) if v else None for v in logs.values()] +
                   [get_method(method).default_grid])
    parts.append(table(hdr, out))
    parts.append("")
    return "\n".join(parts)


def tuned_row(c: Case, method: str, nfe: int, cfg, options: Optional[Dict] = None) -> (Dict, TunedGrid):
    l0 = load()
    tg = tune_grid(c.pf, method, nfe, c.x_cal, reference=c.ref_cal, max_seconds=cfg["max_seconds"],
                   options=options or {})
    steps = tg.steps
    both = {k: c.errors(method, k, steps, options) for k in GRID_KINDS}
    fixed = {k: v[0] for k, v in both.items()}
    fixed_mean = {k: v[1] for k, v in both.items()}
    med, mean, got = c.errors(method, tg.grid, options=options)
    best_kind = min(fixed, key=fixed.get)
    return {"problem": c.name, "method": label(method, options or {}), "nfe": nfe, "nfe_measured": got,
            "steps": steps, "n_calibration": c.x_cal.shape[0], "n_held_out": c.x_held.shape[0],
            "fixed_held_out": fixed, "best_fixed": best_kind, "tuned_median_err": med, "tuned_mean_err": mean,
            "gain_vs_best_fixed": fixed[best_kind] / med, "fixed_held_out_mean": fixed_mean,
            "mean_gain_vs_best_fixed_mean": min(fixed_mean.values()) / mean, "calibration_err": tg.calibration_error,
            "overfit": med / tg.calibration_error, "init": tg.init, "evaluations": tg.evaluations,
            "tuning_seconds": tg.seconds, "load_before": l0, "load_after": load(),
            "tuned": tg.to_dict()}, tg


def bench_tuned(cfg, cases) -> Dict:
    rows, grids = [], {}
    for pname, method, nfe, opts in cfg["tuned_runs"]:
        row, tg = tuned_row(cases(pname), method, nfe, cfg, opts)
        rows.append(row)
        grids[(pname, label(method, opts), nfe)] = tg
        print(f"  tuned {pname} {method} nfe={nfe}: {row['gain_vs_best_fixed']:.2f}x in {row['tuning_seconds']:.0f} s",
              file=sys.stderr, flush=True)
    return {"rows": rows, "_grids": grids}


def print_tuned(res: Dict) -> str:
    hdr = ["problem", "method", "NFE", "best fixed (held-out)", "tuned (held-out)", "gain", "mean-error gain",
           "held-out / calibration",
           "evals", "seconds", "load (1 min) before/after"]
    rows = [[r["problem"], r["method"], r["nfe_measured"],
             f"{fmt(r['fixed_held_out'][r['best_fixed']])} ({r['best_fixed']})",
             r["tuned_median_err"], f"{r['gain_vs_best_fixed']:.2f}x", f"{r['mean_gain_vs_best_fixed_mean']:.2f}x",
             r["overfit"], r["evaluations"],
             f"{r['tuning_seconds']:.1f}", f"{r['load_before'][0] if r['load_before'] else '-'} / "
                                           f"{r['load_after'][0] if r['load_after'] else '-'}"] for r in res["rows"]]
    return table(hdr, rows) + "\n"


def bench_transfer(cfg, cases, grids: Dict) -> Dict:
    rows = []
    for src, dst in cfg["transfer_n"]:  # ((problem, method, nfe), nfe_new)
        tg = grids.get(src)
        if tg is None:
            continue
        c = cases(src[0])
        steps = dst // get_method(tg.method).evals_per_step
        fixed = {k: c.errors(tg.method, k, steps, dict(tg.options))[0] for k in GRID_KINDS}
        med = c.errors(tg.method, tg.resample(steps), options=dict(tg.options))[0]
        own = grids.get((src[0], src[1], dst))
        rows.append({"kind": "N", "from": f"{src[0]} {src[1]} NFE {src[2]}", "to": f"NFE {dst}",
                     "transferred": med, "best_fixed": min(fixed.values()),
                     "best_fixed_kind": min(fixed, key=fixed.get),
                     "tuned_there": c.errors(own.method, own.grid, options=dict(own.options))[0] if own else None})
    for src, dst_problem in cfg["transfer_data"]:
        tg = grids.get(src)
        if tg is None:
            continue
        c = cases(dst_problem)
        fixed = {k: c.errors(tg.method, k, tg.steps, dict(tg.options))[0] for k in GRID_KINDS}
        med = c.errors(tg.method, tg.grid, options=dict(tg.options))[0]
        rows.append({"kind": "data", "from": f"{src[0]} {src[1]} NFE {src[2]}", "to": dst_problem,
                     "transferred": med, "best_fixed": min(fixed.values()),
                     "best_fixed_kind": min(fixed, key=fixed.get), "tuned_there": None})
    for src, method in cfg["transfer_method"]:
        tg = grids.get(src)
        if tg is None:
            continue
        c = cases(src[0])
        fixed = {k: c.errors(method, k, tg.steps)[0] for k in GRID_KINDS}
        med = c.errors(method, tg.grid)[0]
        rows.append({"kind": "method", "from": f"{src[0]} {src[1]} NFE {src[2]}", "to": method,
                     "transferred": med, "best_fixed": min(fixed.values()),
                     "best_fixed_kind": min(fixed, key=fixed.get), "tuned_there": None})
    return {"rows": rows}


def print_transfer(res: Dict) -> str:
    hdr = ["transfer", "tuned on", "used on", "transferred grid", "best fixed there", "gain", "grid tuned there"]
    rows = [[r["kind"], r["from"], r["to"], r["transferred"], f"{fmt(r['best_fixed'])} ({r['best_fixed_kind']})",
             f"{r['best_fixed'] / r['transferred']:.2f}x", r["tuned_there"]] for r in res["rows"]]
    return table(hdr, rows) + "\n"


def bench_network(cfg) -> Dict:
    """A tiny ScoreModel trained briefly on the 2-D mixture; tune dpmpp_2m on its PF ODE."""
    from diffusion.losses import DSMLoss
    from diffusion.model import ScoreModel
    from diffusion.nets import MLPScoreNet
    from diffusion.train import TrainConfig, Trainer

    sde = sdekit.VPSDE(BETA_MIN, BETA_MAX)
    gm = mixture_2d()
    data = gm.sample(cfg["net_data"], torch.Generator().manual_seed(3)).float()
    torch.manual_seed(0)
    model = ScoreModel(MLPScoreNet(2, width=cfg["net_width"], depth=cfg["net_depth"]), sde)
    tic = time.perf_counter()
    trainer = Trainer(model, data, DSMLoss(), TrainConfig(steps=cfg["net_steps"], batch_size=256, lr=2e-3, seed=0,
                                                          eval_every=0, ckpt_every=0, device="cpu", progress=False),
                      None)
    trainer.train()
    train_s = time.perf_counter() - tic
    model = trainer.ema_model
    model.eval()
    pf = sde.probability_flow(model.score, t_eps=T_EPS)
    pT = gm.push(sde, sde.T)
    x_cal = pT.sample(cfg["net_cal"], torch.Generator().manual_seed(1)).float()
    x_held = pT.sample(cfg["net_held"], torch.Generator().manual_seed(2)).float()
    with torch.no_grad():
        ref_cal = solve(pf, x_cal, method="dopri5", rtol=1e-6, atol=1e-6).x
        ref_held = solve(pf, x_held, method="dopri5", rtol=1e-6, atol=1e-6).x
    tg = tune_grid(pf, "dpmpp_2m", 20, x_cal, reference=ref_cal, max_seconds=cfg["max_seconds"])

    def err(grid, steps=None):
        with torch.no_grad():
            sol = (solve(pf, x_held, method="dpmpp_2m", grid=grid) if steps is None else
                   solve(pf, x_held, method="dpmpp_2m", steps=steps, grid=grid))
        return float(((sol.x - ref_held).norm(dim=1) / math.sqrt(2)).median())

    fixed = {k: err(k, 20) for k in GRID_KINDS}
    med = err(tg.grid)
    # the grid tuned on the exact score, used on the network
    exact = Case("vp-gmm2d", cfg["net_cal"], 10)
    tg_exact = tune_grid(exact.pf, "dpmpp_2m", 20, exact.x_cal, reference=exact.ref_cal, max_seconds=cfg["max_seconds"])
    return {"setup": f"MLPScoreNet(2, width={cfg['net_width']}, depth={cfg['net_depth']}), EMA, {cfg['net_steps']} "
                     f"training steps ({train_s:.0f} s) on {cfg['net_data']} samples; float32; reference dopri5 "
                     f"rtol=atol=1e-6 on the network's PF ODE (float32)",
            "fixed_held_out": fixed, "tuned_median_err": med, "gain": min(fixed.values()) / med,
            "exact_score_grid_on_network": err(tg_exact.grid), "tuning_seconds": tg.seconds,
            "evaluations": tg.evaluations}


def print_network(res: Dict) -> str:
    hdr = ["grid", "median held-out error (network PF ODE, dpmpp_2m, NFE 20)"]
    rows = [[k, v] for k, v in res["fixed_held_out"].items()]
    rows += [["tuned on the network", res["tuned_median_err"]],
             ["tuned on the exact score, used on the network", res["exact_score_grid_on_network"]]]
    return (res["setup"] + "\n\n" + table(hdr, rows) +
            f"\n\ngain {res['gain']:.2f}x, tuning {res['tuning_seconds']:.1f} s\n")


# ------------------------------------------------------------------------------------------------
# configuration and main
# ------------------------------------------------------------------------------------------------
def config(quick: bool) -> Dict:
    if quick:
        return {"n": {"vp-gmm2d": (100, 200)}, "max_seconds": 5.0, "fixed_problems": ["vp-gmm2d"],
                "fixed_nfe": [10],
                "tuned_runs": [("vp-gmm2d", "dpmpp_2m", 10, {})],
                "transfer_n": [], "transfer_data": [], "transfer_method": [(("vp-gmm2d", "dpmpp_2m", 10), "ddim")],
                "net_steps": 10, "net_data": 1000, "net_width": 32, "net_depth": 2, "net_cal": 50,
                "net_held": 100}
    d2, d64 = (500, 2000), (100, 300)
    return {
        "n": {"vp-gmm2d": d2, "vp-gmm2d-b": d2, "ve-gmm2d": d2, "custom-gmm2d": d2, "vp-gmm64": d64,
              "vp-gmm64-b": d64, "ve-gmm64": d64},
        "max_seconds": 60.0,
        "fixed_problems": ["vp-gmm2d", "vp-gmm64", "ve-gmm2d", "ve-gmm64", "custom-gmm2d"],
        "fixed_nfe": [10, 20, 50],
        "tuned_runs": [("vp-gmm2d", "dpmpp_2m", 20, {}), ("vp-gmm2d", "dpmpp_2m", 10, {}),
                       ("vp-gmm64", "dpmpp_2m", 20, {}), ("ve-gmm2d", "dpmpp_2m", 20, {}),
                       ("custom-gmm2d", "dpmpp_2m", 20, {}), ("vp-gmm2d", "ddim", 20, {}),
                       ("vp-gmm2d", "dpm_solver_3", 21, {}), ("vp-gmm2d", "heun", 20, {})],
        "transfer_n": [(("vp-gmm2d", "dpmpp_2m", 20), 10), (("vp-gmm2d", "dpmpp_2m", 10), 20),
                       (("vp-gmm2d", "dpmpp_2m", 20), 50)],
        "transfer_data": [(("vp-gmm2d", "dpmpp_2m", 20), "vp-gmm2d-b"), (("vp-gmm64", "dpmpp_2m", 20), "vp-gmm64-b")],
        "transfer_method": [(("vp-gmm2d", "dpmpp_2m", 20), "dpmpp_3m"), (("vp-gmm2d", "dpmpp_2m", 20), "ddim")],
        "net_steps": 400, "net_data": 20000, "net_width": 128, "net_depth": 3, "net_cal": 200, "net_held": 1000,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections from {', '.join(SECTIONS)}")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "tune_grid.json"), help="JSON output path")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="tuning budget per grid in seconds (default 60; 5 with --quick)")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2), help="torch.set_num_threads")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections {bad}; choose from {SECTIONS}")
    torch.set_num_threads(args.threads)
    cfg = config(args.quick)
    if args.max_seconds is not None:
        cfg["max_seconds"] = args.max_seconds
    out = {"machine": machine_info(), "quick": args.quick, "config": {k: v for k, v in cfg.items() if k != "n"},
           "issue_reference": ISSUE, "setup": __doc__.split("\n\n")[1]}
    built: Dict[str, Case] = {}

    def cases(name: str) -> Case:
        if name not in built:
            n_cal, n_held = cfg["n"].get(name, (100, 200))
            built[name] = Case(name, n_cal, n_held)
        return built[name]

    report = []
    tic = time.perf_counter()
    if "fixed" in only:
        out["fixed"] = bench_fixed(cfg, cases)
        report += ["## Fixed grids\n", print_fixed(out["fixed"])]
    grids = {}
    if "tuned" in only or "transfer" in only:
        res = bench_tuned(cfg, cases)
        grids = res.pop("_grids")
        out["tuned"] = res
        report += ["## Tuned grids (median held-out error)\n", print_tuned(res)]
    if "transfer" in only:
        out["transfer"] = bench_transfer(cfg, cases, grids)
        report += ["## Transfer\n", print_transfer(out["transfer"])]
    if "network" in only:
        out["network"] = bench_network(cfg)
        report += ["## Trained network\n", print_network(out["network"])]
    out["machine"]["load_average_end"] = load()
    out["wall_s"] = time.perf_counter() - tic
    out["references"] = {k: c.ref_seconds for k, c in built.items()}
    text = "\n".join(report)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
