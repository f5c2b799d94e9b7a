"""Solver benchmarks: per-step overhead, the torchdiffeq backend, and accuracy against NFE.

Not a test (no timing is asserted anywhere in the test suite). Prints markdown tables and writes
JSON (default ``benchmarks/results/solvers.json``) with the machine it ran on.

Sections (``--only overhead,dopri5,accuracy``; default all):

``overhead``
    Per-step wall time of sdekit's native ``euler_maruyama`` (reverse SDE of VP with the cheap
    exact Gaussian score ``-x / v(t)``) and ``heun`` (its probability-flow ODE) against a
    hand-written torch loop doing the same arithmetic (coefficients precomputed as Python floats,
    the same ``torch.randn`` with a generator, the same score function), at batch 1024 x 2 and
    1024 x 3072 (float32): a naive out-of-place loop (target: sdekit / naive <= 1.1) and one
    issuing exactly sdekit's fused in-place ops (the ratio is pure bookkeeping). Also against ``torchsde.sdeint(method=
    "euler")`` with its default Brownian motion on the same problem (``rev.to_torchsde(shape)``)
    and against sdekit's own ``torchsde:euler`` backend.
``dopri5``
    ``solve(pf, x, method="torchdiffeq:dopri5", rtol, atol)`` against ``torchdiffeq.odeint`` called
    directly on the same probability-flow ODE with the options the backend uses (``step_t`` at
    the end time and the same ``first_step``), so both take the same steps; NFE compared too.
    Target: sdekit / direct <= 1.05. Also ``solve(pf, x, method="dopri5")``, the native
    integrator (same steps and NFE as the default backend solve, sdekit's own bookkeeping).
``accuracy``
    Error against the exact Gaussian-mixture oracle versus NFE (float64, VP, t_eps = 1e-3, start
    points drawn exactly from p_T): per-sample error of deterministic methods against a float64
    dopri5 solve at 1e-10 from the same start points (the sweeps are ``sdekit.studies.work_precision``
    calls), energy distance (next to its noise floor) for the
    stochastic ones; and a numeric-kernel LinearSDE twin of VP solved with dpmpp_2m.

The overhead and dopri5 sections also count, per step / per evaluation, the top-level torch ops
(torch.profiler) and Python calls (cProfile) of sdekit and of its baseline, to show where any
overhead comes from. Timings run with glibc's malloc kept from returning large blocks to the OS
(``--malloc tuned``, the default; see :func:`tune_malloc`) and record minor page faults.

Usage::

    PYTHONPATH=. python benchmarks/solvers.py                  # full run (< ~10 min on 2 cores)
    PYTHONPATH=. python benchmarks/solvers.py --quick          # smoke run (seconds)
    PYTHONPATH=. python benchmarks/solvers.py --only overhead --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torchdiffeq  # noqa: E402
import torchsde  # noqa: E402

import sdekit  # noqa: E402
from sdekit.solvers import make_grid, solve  # noqa: E402
from sdekit.solvers.stats import CountingFunction  # noqa: E402
from sdekit.studies import Reference, StudyProblem, energy_distance, noise_floor, work_precision  # noqa: E402
from sdekit.studies.reference import TIGHT_LOOSEN  # noqa: E402

F64 = torch.float64
SECTIONS = ("overhead", "dopri5", "accuracy")
T_EPS = 1e-3
BETA_MIN, BETA_MAX = 0.1, 20.0

# Reference points quoted in the issue (2-D 4-mode VP mixture, component std 0.1, exact score).
ISSUE_REFERENCE = [
    {"method": "published DPM-Solver++(2M)", "nfe": 20, "median_err": 2.1e-3, "mean_err": None},
    {"method": "published DPM-Solver++(2M)", "nfe": 50, "median_err": None, "mean_err": 5e-3},
    {"method": "torchdiffeq dopri5, tol 1e-3", "nfe": 70, "median_err": None, "mean_err": 4e-3},
]


# ------------------------------------------------------------------------------------------------
# machine and timing helpers
# ------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> Dict:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count()
    try:
        load = list(os.getloadavg())
    except OSError:  # pragma: no cover
        load = None
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": affinity,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torchdiffeq": getattr(torchdiffeq, "__version__", "?"),
        "torchsde": getattr(torchsde, "__version__", "?"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load,
    }


def tune_malloc() -> Dict:
    """Keep freed memory in glibc's heap (no mmap/munmap of large tensors, no heap trimming).

    With glibc's defaults a freed 12 MB tensor may go back to the OS and the next allocation
    page-faults it in again; how often depends on the allocation history (measured: 0.7k to 8k
    minor faults per step for the same Euler-Maruyama loop at 1024 x 3072, up to 40 % of its
    time). That is allocator noise, not solver overhead, so by default both sides of every
    comparison run with the mmap threshold at its maximum (32 MB) and trimming off. Tensors larger
    than 32 MB are still mmapped. ``--malloc default`` keeps glibc's defaults.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
        return {"malloc": "glibc mallopt: M_MMAP_THRESHOLD = 32 MiB, M_TRIM_THRESHOLD = 1 GiB", "applied": ok}
    except (OSError, AttributeError):
        return {"malloc": "default (glibc mallopt unavailable)", "applied": False}


def _minflt() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):  # pragma: no cover - not Unix
        return 0


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                     faults: Dict[str, List[int]] = None) -> Dict[str, List[float]]:
    """Wall times of each callable: ``warmup`` untimed calls each, then ``repeats`` rounds in which
    every callable runs once (interleaved, so a load change on a shared machine hits all alike).
    ``faults``, if given, receives each timed run's count of minor page faults."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            f0 = _minflt()
            tic = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - tic)
            if faults is not None:
                faults.setdefault(k, []).append(_minflt() - f0)
    return out


def op_counts(fn: Callable[[], object]):
    """(Counter of top-level torch ops, number of Python function calls) of one call of ``fn``:
    torch.profiler events without a parent op, and cProfile's call count (builtins included)."""
    import collections
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = collections.Counter(e.name for e in prof.events() if e.cpu_parent is None)
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    return ops, pstats.Stats(pr).total_calls


def per_step_ops(make: Callable[[int], Callable[[], object]], n1: int, n2: int):
    """Torch ops and Python calls per step: the difference of two runs with n1 < n2 steps divided by
    n2 - n1 (fixed per-solve costs cancel)."""
    (o1, p1), (o2, p2) = op_counts(make(n1)), op_counts(make(n2))
    per = {k: (o2[k] - o1[k]) / (n2 - n1) for k in set(o1) | set(o2) if o2[k] != o1[k]}
    return per, (p2 - p1) / (n2 - n1)


def diff_ops(a: Dict[str, float], b: Dict[str, float]) -> Dict[str, float]:
    """Ops (per step) that ``a`` issues more often than ``b``."""
    return {k: round(a.get(k, 0) - b.get(k, 0), 3) for k in sorted(set(a) | set(b))
            if abs(a.get(k, 0) - b.get(k, 0)) > 1e-9}


def med(xs: List[float]) -> float:
    return statistics.median(xs)


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    if v != v:
        return "nan"
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e4):
        return f"{v:.{max(digits - 1, 1)}e}"
    return f"{v:.{digits}g}"


def table(headers: List[str], rows: List[List]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(c) for c in r) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# the overhead problem: VP, data N(0, s0^2 I), exact score -x / v(t)
# ------------------------------------------------------------------------------------------------
def gaussian_score(s0: float = 0.5) -> Callable:
    r"""Exact score of p_t = N(0, v(t) I) for data N(0, s0^2 I) under VP(0.1, 20):
    :math:`v = m^2 s_0^2 + \sigma^2 = 1 + (s_0^2 - 1) m^2`, :math:`m^2 = e^{-(0.1 t + 9.95 t^2)}`.
    ``t`` is the (B,) tensor the solvers pass; a handful of (B,)-sized ops plus one full-size multiply."""
    c = s0 * s0 - 1.0
    a, b = BETA_MIN, 0.5 * (BETA_MAX - BETA_MIN)

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m2 = torch.exp(-(a * t + b * t * t))
        inv = -1.0 / (1.0 + c * m2)
        return x * inv.reshape(-1, *([1] * (x.dim() - 1)))

    return score


def _coef_lists(sde, ts: List[float]):
    """f(t), g(t)^2 at the grid times as Python floats (float64 kernel, one vectorised call)."""
    t = torch.tensor(ts, dtype=F64)
    return sde.f(t).tolist(), sde.g2(t).tolist()


NAIVE, FUSED = "hand loop (naive)", "hand loop (fused, sdekit's ops)"


def _hand_setup(sde, x0, steps):
    ts = make_grid("uniform", sde.T, T_EPS, steps).tolist()
    fs, g2s = _coef_lists(sde, ts)
    tv = [torch.full((x0.shape[0],), t, dtype=x0.dtype) for t in ts]
    return ts, fs, g2s, tv


def hand_em(sde, score, x0, steps, gen, fused=False):
    """Hand-written Euler-Maruyama on the reverse SDE (eta = 1): the same grid, coefficients
    (Python floats), noise stream and score as sdekit.

    ``fused=False`` (naive): ``x + h (f x - g^2 s) + sqrt(g^2) (sqrt|h| z)`` with out-of-place ops,
    as one would first write it. ``fused=True``: the op sequence sdekit's ``euler_maruyama`` issues
    (``torch.add(f x, s, alpha=-g^2)`` for the drift, in-place ``add_`` with ``alpha`` on an owned
    copy of the state, noise drawn into a reused buffer) -- the same arithmetic bit for bit."""
    ts, fs, g2s, tv = _hand_setup(sde, x0, steps)
    shape, dtype = x0.shape, x0.dtype
    if fused:
        x = x0.clone()
        buf = torch.empty_like(x0)
        for i in range(steps):
            h = ts[i + 1] - ts[i]
            g2 = g2s[i]
            x.add_(torch.add(fs[i] * x, score(x, tv[i]), alpha=-g2), alpha=h)  # 0.5 (1 + eta^2) = 1
            x.add_(torch.randn(shape, generator=gen, dtype=dtype, out=buf), alpha=math.sqrt(g2 * abs(h)))
        return x
    x = x0
    for i in range(steps):
        h = ts[i + 1] - ts[i]
        f, g2 = fs[i], g2s[i]
        drift = f * x - g2 * score(x, tv[i])
        dW = math.sqrt(abs(h)) * torch.randn(shape, generator=gen, dtype=dtype)
        x = x + h * drift + math.sqrt(g2) * dW
    return x


def hand_heun(sde, score, x0, steps, fused=False):
    """Hand-written Heun on the probability-flow ODE (same grid, coefficients, score as sdekit).
    ``fused=False``: naive out-of-place ops; ``fused=True``: sdekit's op sequence (``torch.add``
    with ``alpha``, in-place updates of an owned copy)."""
    ts, fs, g2s, tv = _hand_setup(sde, x0, steps)
    if fused:
        x = x0.clone()
        for i in range(steps):
            h = ts[i + 1] - ts[i]
            d = torch.add(fs[i] * x, score(x, tv[i]), alpha=-0.5 * g2s[i])
            x_e = torch.add(x, d, alpha=h)
            d2 = torch.add(fs[i + 1] * x_e, score(x_e, tv[i + 1]), alpha=-0.5 * g2s[i + 1])
            x.add_(d.add_(d2), alpha=0.5 * h)
        return x
    x = x0
    for i in range(steps):
        h = ts[i + 1] - ts[i]
        d = fs[i] * x - (0.5 * g2s[i]) * score(x, tv[i])
        x_e = x + h * d
        d2 = fs[i + 1] * x_e - (0.5 * g2s[i + 1]) * score(x_e, tv[i + 1])
        x = x + (0.5 * h) * (d + d2)
    return x


def bench_overhead(cfg) -> Dict:
    sde = sdekit.VPSDE(BETA_MIN, BETA_MAX)
    score = gaussian_score()
    rev = sde.reverse(score, t_eps=T_EPS)
    pf = sde.probability_flow(score, t_eps=T_EPS)
    L = sde.T - T_EPS
    rows = []
    checks = {}
    for shape, steps, ts_steps in cfg["overhead_cases"]:
        B = shape[0]
        x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
        g1, g2, g3, g4 = (torch.Generator() for _ in range(4))
        adapter = rev.to_torchsde(shape)
        y0 = x0.reshape(B, -1)
        ts_sde = torch.tensor([0.0, L], dtype=torch.float32)
        sh = "x".join(map(str, shape))

        with torch.no_grad():
            # same noise stream -> same result (a correctness check of the hand loops, not timed)
            for g in (g1, g2, g3):
                g.manual_seed(0)
            a = solve(rev, x0, method="euler_maruyama", steps=steps, generator=g1).x
            checks[f"{sh} euler_maruyama max|sdekit - {NAIVE}|"] = float((a - hand_em(sde, score, x0, steps, g2))
                                                                        .abs().max())
            checks[f"{sh} euler_maruyama max|sdekit - {FUSED}|"] = float(
                (a - hand_em(sde, score, x0, steps, g3, fused=True)).abs().max())
            a = solve(pf, x0, method="heun", steps=steps).x
            checks[f"{sh} heun max|sdekit - {NAIVE}|"] = float((a - hand_heun(sde, score, x0, steps)).abs().max())
            checks[f"{sh} heun max|sdekit - {FUSED}|"] = float((a - hand_heun(sde, score, x0, steps, fused=True))
                                                               .abs().max())
            em = {
                "sdekit euler_maruyama": lambda: solve(rev, x0, method="euler_maruyama", steps=steps, generator=g1),
                NAIVE: lambda: hand_em(sde, score, x0, steps, g2),
                FUSED: lambda: hand_em(sde, score, x0, steps, g3, fused=True),
            }
            heun = {
                "sdekit heun": lambda: solve(pf, x0, method="heun", steps=steps),
                NAIVE: lambda: hand_heun(sde, score, x0, steps),
                FUSED: lambda: hand_heun(sde, score, x0, steps, fused=True),
            }
            for k, g in enumerate((g1, g2, g3, g4)):
                g.manual_seed(100 + k)
            f_em, f_heun, f_tsde = {}, {}, {}
            t_em = time_interleaved(em, cfg["repeats"], faults=f_em)
            t_heun = time_interleaved(heun, cfg["repeats"], faults=f_heun)
            # torchsde: fewer steps (it is slow at large batch); per-step time is what is compared
            dt = L / ts_steps
            tsde = {
                NAIVE: lambda: hand_em(sde, score, x0, ts_steps, g2),
                "torchsde.sdeint euler, default BM": lambda: torchsde.sdeint(adapter, y0, ts_sde, method="euler",
                                                                              dt=dt),
                "sdekit torchsde:euler": lambda: solve(rev, x0, method="torchsde:euler", steps=ts_steps,
                                                       generator=g4),
            }
            t_tsde = time_interleaved(tsde, cfg["repeats_torchsde"], faults=f_tsde)

        def add(group, name, times, n_steps, t, nfe_per_step, faults):
            per = med(times) / n_steps
            base = med(t[NAIVE]) / n_steps
            row = {"case": group, "shape": list(shape), "variant": name, "steps": n_steps,
                   "median_s": med(times), "min_s": min(times), "per_step_ms": 1e3 * per,
                   "ratio_vs_hand": per / base, "ratio_vs_hand_min": min(times) / min(t[NAIVE]),
                   "baseline": NAIVE, "overhead_us_per_step": 1e6 * (per - base),
                   "ratio_vs_hand_fused": (med(times) / med(t[FUSED])) if FUSED in t else None,
                   "nfe_per_step": nfe_per_step, "times_s": times,
                   "minor_faults_per_step": med(faults[name]) / n_steps}
            rows.append(row)

        for group, t, f, n, nfe in (("euler_maruyama (reverse SDE)", t_em, f_em, steps, 1),
                                    ("heun (PF ODE)", t_heun, f_heun, steps, 2),
                                    ("euler_maruyama vs torchsde", t_tsde, f_tsde, ts_steps, 1)):
            for k, v in t.items():
                add(group, k, v, n, t, nfe, f)
    # where the time goes: torch ops and Python calls per step (small batch: dispatch-bound)
    shape = cfg["overhead_cases"][0][0]
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    prof = []
    with torch.no_grad():
        pairs = (("euler_maruyama", lambda n: lambda: solve(rev, x0, method="euler_maruyama", steps=n, generator=g),
                  lambda n: lambda: hand_em(sde, score, x0, n, g, fused=True)),
                 ("heun", lambda n: lambda: solve(pf, x0, method="heun", steps=n),
                  lambda n: lambda: hand_heun(sde, score, x0, n, fused=True)))
        for name, mk_sdekit, mk_hand in pairs:
            o_s, p_s = per_step_ops(mk_sdekit, 10, 30)
            o_h, p_h = per_step_ops(mk_hand, 10, 30)
            prof.append({"method": name, "shape": list(shape), "baseline": FUSED,
                         "sdekit_torch_ops_per_step": sum(o_s.values()), "hand_torch_ops_per_step": sum(o_h.values()),
                         "sdekit_python_calls_per_step": p_s, "hand_python_calls_per_step": p_h,
                         "extra_torch_ops_per_step": diff_ops(o_s, o_h), "sdekit_ops": o_s, "hand_ops": o_h})
    return {"problem": "VP(0.1, 20) reverse SDE / PF ODE, data N(0, 0.25 I), exact score -x/v(t), float32, "
                       "uniform grid T=1 -> 1e-3", "rows": rows, "checks": checks, "profile": prof,
            "target": f"sdekit / {NAIVE} <= 1.1"}


def print_overhead(res: Dict) -> str:
    hdr = ["case", "shape", "variant", "steps", "ms/step (median)", "x naive hand (median)", "x naive hand (min)",
           "x fused hand (median)", "page faults/step"]
    rows = [[r["case"], "x".join(map(str, r["shape"])), r["variant"], r["steps"], r["per_step_ms"],
             r["ratio_vs_hand"], r["ratio_vs_hand_min"], r["ratio_vs_hand_fused"], r["minor_faults_per_step"]]
            for r in res["rows"]]
    out = table(hdr, rows)
    if res.get("profile"):
        hdr = ["method", "shape", "torch ops/step sdekit", "fused hand", "Python calls/step sdekit", "fused hand",
               "torch ops sdekit issues in addition"]
        rows = [[r["method"], "x".join(map(str, r["shape"])), r["sdekit_torch_ops_per_step"],
                 r["hand_torch_ops_per_step"], r["sdekit_python_calls_per_step"], r["hand_python_calls_per_step"],
                 ", ".join(f"{k} {v:g}" for k, v in r["extra_torch_ops_per_step"].items()) or "none"]
                for r in res["profile"]]
        out += "\n\nWhere the time goes (top-level torch ops from torch.profiler, Python calls from cProfile, " \
               "per step, against the hand loop issuing sdekit's ops):\n\n" + table(hdr, rows)
    return out


# ------------------------------------------------------------------------------------------------
# dopri5: sdekit's torchdiffeq backend vs torchdiffeq.odeint directly
# ------------------------------------------------------------------------------------------------
# the benchmark mixtures: one definition, in sdekit.studies.named (the named studies use them too)
from sdekit.studies.named import mixture_2d, mixture_nd  # noqa: E402


def bench_dopri5(cfg) -> Dict:
    sde = sdekit.VPSDE(BETA_MIN, BETA_MAX)
    rows, profiles = [], []
    for name, shape, tol, dtype in cfg["dopri5_cases"]:
        if name == "gaussian":
            score = gaussian_score()
            x0 = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
        else:
            gm = mixture_2d()
            score = gm.exact_score(sde)
            x0 = gm.push(sde, sde.T).sample(shape[0], torch.Generator().manual_seed(2), dtype=dtype)
        counter = CountingFunction(score)
        pf = sde.probability_flow(score, t_eps=T_EPS)
        pf_direct = sde.probability_flow(counter, t_eps=T_EPS)
        pf_direct.check_inputs = False  # as the backend does (it validates times once)
        t_out = torch.tensor([sde.T, T_EPS], dtype=F64)
        with torch.no_grad():
            ref = solve(pf, x0, method="torchdiffeq:dopri5", rtol=tol, atol=tol)
            first = ref.stats.extra["first_step"]

            def direct():
                return torchdiffeq.odeint(pf_direct, x0, t_out, rtol=tol, atol=tol, method="dopri5",
                                          options=dict(step_t=torch.tensor([T_EPS], dtype=F64), first_step=first))

            fns = {
                "sdekit solve, first_step given": lambda: solve(pf, x0, method="torchdiffeq:dopri5", rtol=tol,
                                                                atol=tol, first_step=first),
                "torchdiffeq.odeint direct": direct,
                "sdekit solve, default (initial-step probe)": lambda: solve(pf, x0, method="torchdiffeq:dopri5",
                                                                            rtol=tol, atol=tol),
                # the native integrator: torchdiffeq's steps and NFE, sdekit's bookkeeping
                "sdekit solve, method='dopri5' (native)": lambda: solve(pf, x0, method="dopri5", rtol=tol, atol=tol),
            }
            counter.count = 0
            y_direct = direct()[-1]
            nfe_direct = counter.count
            sol_fs = solve(pf, x0, method="torchdiffeq:dopri5", rtol=tol, atol=tol, first_step=first)
            nat = solve(pf, x0, method="dopri5", rtol=tol, atol=tol)
            times = time_interleaved(fns, cfg["repeats"] if x0.numel() > 1e5 else cfg["repeats_short"])
            o_s, p_s = op_counts(fns["sdekit solve, first_step given"])
            o_d, p_d = op_counts(direct)
        nfe = {"sdekit solve, first_step given": sol_fs.stats.nfe, "torchdiffeq.odeint direct": nfe_direct,
               "sdekit solve, default (initial-step probe)": ref.stats.nfe,
               "sdekit solve, method='dopri5' (native)": nat.stats.nfe}
        steps = {"sdekit solve, first_step given": sol_fs.stats.steps, "torchdiffeq.odeint direct": None,
                 "sdekit solve, default (initial-step probe)": ref.stats.steps,
                 "sdekit solve, method='dopri5' (native)": nat.stats.steps}
        # the native solve runs the default initial step, so compare it with the default backend solve
        diff_native = float((nat.x - ref.x).abs().max())
        n_eval = nfe_direct
        profile_row = {"problem": name, "shape": list(shape), "tol": tol, "nfe": n_eval,
                       "sdekit_torch_ops_per_eval": sum(o_s.values()) / n_eval,
                       "direct_torch_ops_per_eval": sum(o_d.values()) / n_eval,
                       "sdekit_python_calls_per_eval": p_s / n_eval, "direct_python_calls_per_eval": p_d / n_eval,
                       "extra_torch_ops_per_eval": {k: round(v / n_eval, 3) for k, v in
                                                    diff_ops(dict(o_s), dict(o_d)).items()}}
        profiles.append(profile_row)
        base = med(times["torchdiffeq.odeint direct"])
        diff = float((sol_fs.x - y_direct).abs().max())
        for k, v in times.items():
            rows.append({"problem": name, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                         "tol": tol, "variant": k, "nfe": nfe[k], "steps": steps[k], "median_s": med(v),
                         "min_s": min(v), "ratio_vs_direct": med(v) / base, "times_s": v,
                         "max_abs_diff_vs_direct": diff if k.startswith("sdekit solve, first") else None,
                         "max_abs_diff_vs_default_backend": diff_native if "native" in k else None,
                         "first_step": first})
    return {"problem": "VP(0.1, 20) PF ODE T=1 -> 1e-3, rtol = atol = tol; 'gaussian': N(0, 0.25 I) data, "
                       "score -x/v(t); 'mixture2d': 2-D 4-mode mixture (std 0.1, means (+-1, +-1)), exact score",
            "rows": rows, "profile": profiles, "target": "sdekit (first_step given) / direct <= 1.05"}


def print_dopri5(res: Dict) -> str:
    hdr = ["problem", "shape", "dtype", "tol", "variant", "NFE", "median s", "x direct", "max abs diff"]
    rows = [[r["problem"], "x".join(map(str, r["shape"])), r["dtype"], r["tol"], r["variant"], r["nfe"],
             r["median_s"], r["ratio_vs_direct"],
             r["max_abs_diff_vs_direct"] if r.get("max_abs_diff_vs_default_backend") is None else
             f"{r['max_abs_diff_vs_default_backend']:.2g} (vs default backend solve)"] for r in res["rows"]]
    out = table(hdr, rows)
    if res.get("profile"):
        hdr = ["problem", "shape", "tol", "torch ops/eval sdekit", "direct", "Python calls/eval sdekit", "direct",
               "extra torch ops/eval in sdekit"]
        rows = [[r["problem"], "x".join(map(str, r["shape"])), r["tol"], r["sdekit_torch_ops_per_eval"],
                 r["direct_torch_ops_per_eval"], r["sdekit_python_calls_per_eval"], r["direct_python_calls_per_eval"],
                 ", ".join(f"{k} {v:g}" for k, v in r["extra_torch_ops_per_eval"].items()
                           if abs(v) >= 0.05) or "none"]
                for r in res["profile"]]
        out += "\n\nWhere the time goes (per score evaluation; sdekit solve with the same first_step vs " \
               "the direct call):\n\n" + table(hdr, rows)
    return out


# ------------------------------------------------------------------------------------------------
# accuracy vs NFE against the exact mixture
# ------------------------------------------------------------------------------------------------
DETERMINISTIC = [("euler", 1), ("heun", 2), ("rk4", 4), ("ddim", 1), ("dpmpp_2m", 1), ("dpmpp_3m", 1)]
STOCHASTIC = [("euler_maruyama", 1), ("pc", 2)]
GRID_METHODS = [("euler", 1), ("heun", 2), ("dpmpp_2m", 1), ("dpmpp_3m", 1)]
GRIDS = ("log_snr", "quadratic", "edm", "uniform")
#: Tolerance of the float64 dopri5 reference of the accuracy section (rtol = atol).
REF_TOL = 1e-10
#: Per-sample error summaries of the deterministic sweeps (studies metrics: median, mean, max).
ERR_METRICS = ["flow", "flow_mean", "flow_max"]


def per_sample_err(x: torch.Tensor, ref: torch.Tensor):
    e = (x - ref).reshape(x.shape[0], -1).norm(dim=1) / math.sqrt(x[0].numel())
    return float(e.median()), float(e.mean()), float(e.max())


def bench_accuracy(cfg) -> Dict:
    sde = sdekit.VPSDE(BETA_MIN, BETA_MAX)
    out = {"setup": "VP(0.1, 20), float64, t: 1 -> 1e-3, start points exact samples of p_1; deterministic "
                    "fixed-step methods on the log-SNR grid, stochastic ones on the uniform grid; error = "
                    "||x - x_ref|| / sqrt(d) per sample against a float64 dopri5 solve at 1e-10 from the same "
                    "start points (sdekit.studies.work_precision, metrics flow / flow_mean / flow_max); "
                    "stochastic: energy distance to exact samples of p_{1e-3}",
           "issue_reference": ISSUE_REFERENCE, "problems": []}
    for prob in cfg["accuracy_problems"]:
        d, n_det, n_sto = prob["d"], prob["n_det"], prob["n_sto"]
        gm = mixture_2d() if d == 2 else mixture_nd(d, prob.get("K", 8))
        score = gm.exact_score(sde)
        pf = sde.probability_flow(score, t_eps=T_EPS)
        rev = sde.reverse(score, t_eps=T_EPS)
        res = {"d": d, "mixture": repr(gm), "n_det": n_det, "n_sto": n_sto, "deterministic": [], "stochastic": []}
        # the deterministic sweeps run on the studies layer: one work_precision call per sweep, the same
        # start points (exact samples of p_T from the seed 10 + d) and a float64 dopri5 reference at 1e-10
        seed = 10 + d
        study = StudyProblem(pf, start=lambda n, g, gm=gm: gm.push(sde, sde.T).sample(n, g), name=f"vp-gmm d={d}",
                             n=n_det)
        wp = dict(reference=Reference.tight(REF_TOL), metrics=ERR_METRICS, seeds=[seed])
        with torch.no_grad():
            xT = gm.push(sde, sde.T).sample(n_det, torch.Generator().manual_seed(seed))
            tic = time.perf_counter()
            budgets = {name: [nfe // evals for nfe in prob["nfe_det"] if nfe // evals >= 1] for name, evals in DETERMINISTIC}
            budgets["torchdiffeq:dopri5"] = list(prob["tols"])
            table = work_precision(study, [m for m, _ in DETERMINISTIC] + ["torchdiffeq:dopri5"], budgets,
                                   grids=["log_snr"], **wp)
            res["reference"] = {"method": f"dopri5, float64, rtol = atol = {REF_TOL:g}",
                                "floor_median_err": table.rows[0]["flow_floor"],
                                "floor": f"median error of the same solve at {TIGHT_LOOSEN:g}x the tolerance",
                                "sweep_wall_s": time.perf_counter() - tic}
            for r in table.rows:
                adaptive = r["budget_kind"] == "tol"
                res["deterministic"].append({
                    "method": f"{r['method']} tol={r['budget']:g}" if adaptive else r["method"],
                    "steps": round(r["steps_mean"]) if adaptive else r["budget"], "nfe": round(r["nfe_mean"]),
                    "median_err": r["flow"], "mean_err": r["flow_mean"], "max_err": r["flow_max"],
                    "wall_s": r["seconds"]})
            ref = solve(pf, xT.to(F64), method="dopri5", rtol=REF_TOL, atol=REF_TOL).x  # for the twin rows
            # numeric-kernel twin of VP: the same f, g given as functions (quintic-Hermite kernel)
            twin = sdekit.LinearSDE(lambda t: -0.5 * (BETA_MIN + (BETA_MAX - BETA_MIN) * t),
                                    lambda t: (BETA_MIN + (BETA_MAX - BETA_MIN) * t).sqrt())
            pf_twin = twin.probability_flow(gm.exact_score(twin), t_eps=T_EPS)
            for nfe in prob["nfe_twin"]:
                a = solve(pf, xT, method="dpmpp_2m", steps=nfe)
                b = solve(pf_twin, xT, method="dpmpp_2m", steps=nfe)
                ea, eb = per_sample_err(a.x, ref), per_sample_err(b.x, ref)
                res.setdefault("twin", []).append({
                    "nfe": nfe, "closed_form_median_err": ea[0], "closed_form_mean_err": ea[1],
                    "numeric_kernel_median_err": eb[0], "numeric_kernel_mean_err": eb[1],
                    "max_abs_diff_between_twins": float((a.x - b.x).abs().max())})
            # grid sensitivity (the fixed-step results above use the log-SNR grid)
            if prob.get("nfe_grids"):
                gt = work_precision(study, [m for m, _ in GRID_METHODS],
                                    {name: [nfe // evals for nfe in prob["nfe_grids"]] for name, evals in GRID_METHODS},
                                    grids=list(GRIDS), **wp)
                res["grids"] = [{"method": r["method"], "grid": r["grid"], "steps": r["budget"], "nfe": round(r["nfe_mean"]),
                                 "median_err": r["flow"], "mean_err": r["flow_mean"], "max_err": r["flow_max"]}
                                for r in gt.rows]
            # stochastic methods: energy distance to exact samples of p_{t_eps}
            target = gm.push(sde, T_EPS)
            floor = noise_floor(lambda n, g: target.sample(n, g), n_sto, repeats=prob["floor_repeats"], seed=7)
            f_mean, f_std = float(floor.mean()), float(floor.std())
            res["noise_floor"] = {"mean": f_mean, "std": f_std, "median": float(floor.median()),
                                  "max": float(floor.max()), "values": floor.tolist()}
            ys = target.sample(n_sto, torch.Generator().manual_seed(99))
            xs = gm.push(sde, sde.T).sample(n_sto, torch.Generator().manual_seed(98))
            for name, evals in STOCHASTIC:
                for nfe in prob["nfe_sto"]:
                    steps = nfe // evals
                    sol = solve(rev, xs, method=name, steps=steps, generator=torch.Generator().manual_seed(nfe))
                    ed = energy_distance(sol.x, ys)
                    res["stochastic"].append({"method": name, "steps": steps, "nfe": sol.stats.nfe,
                                              "energy_distance": ed, "z_vs_floor": (ed - f_mean) / f_std,
                                              "above_floor_max": ed > float(floor.max()),
                                              "wall_s": sol.stats.wall_time})
        out["problems"].append(res)
    return out


def print_accuracy(res: Dict) -> str:
    parts = []
    for p in res["problems"]:
        r = p["reference"]
        if "steps" in r:  # results written before the studies layer: an rk4 reference at two step counts
            ref_txt = (f"{r['method']} {r['steps'][1]} steps, max difference to {r['steps'][0]} steps: "
                       f"{fmt(r['max_err_between_refs'])}")
        else:
            ref_txt = f"{r['method']}; its floor ({r['floor']}): {fmt(r['floor_median_err'])}"
        parts.append(f"**d = {p['d']}** ({p['mixture']}, {p['n_det']} start points; reference {ref_txt})\n")
        hdr = ["method", "steps", "NFE", "median err", "mean err", "max err"]
        rows = [[q["method"], q["steps"], q["nfe"], q["median_err"], q["mean_err"], q["max_err"]]
                for q in p["deterministic"]]
        if p["d"] == 2:
            for q in res["issue_reference"]:
                rows.append([f"*issue: {q['method']}*", "-", q["nfe"], q["median_err"], q["mean_err"], None])
        parts.append(table(hdr, rows))
        parts.append("")
        if p.get("twin"):
            hdr = ["dpmpp_2m NFE", "VPSDE median err", "VPSDE mean err", "numeric-kernel twin median err",
                   "twin mean err", "max abs(x_VP - x_twin)"]
            rows = [[q["nfe"], q["closed_form_median_err"], q["closed_form_mean_err"], q["numeric_kernel_median_err"],
                     q["numeric_kernel_mean_err"], q["max_abs_diff_between_twins"]] for q in p["twin"]]
            parts.append(table(hdr, rows))
            parts.append("")
        if p.get("grids"):
            nfes = sorted({q["nfe"] for q in p["grids"]})
            parts.append(f"Grid sensitivity, d = {p['d']} (median / mean per-sample error):\n")
            hdr = ["method", "grid"] + [f"NFE {n}" for n in nfes]
            rows = []
            for name, _ in GRID_METHODS:
                for grid in GRIDS:
                    qs = {q["nfe"]: q for q in p["grids"] if q["method"] == name and q["grid"] == grid}
                    if qs:
                        rows.append([name, grid] + [f"{fmt(qs[n]['median_err'])} / {fmt(qs[n]['mean_err'])}"
                                                    if n in qs else "-" for n in nfes])
            parts.append(table(hdr, rows))
            parts.append("")
        nf = p["noise_floor"]
        parts.append(f"Stochastic methods, d = {p['d']}: energy distance to {p['n_sto']} exact samples of "
                     f"p_(1e-3), {p['n_sto']} samples generated; noise floor (ED between two exact samples, "
                     f"{len(nf['values'])} repeats): mean {fmt(nf['mean'])}, std {fmt(nf['std'])}, max {fmt(nf['max'])}. "
                     f"z = (ED - floor mean) / floor std.\n")
        hdr = ["method", "steps", "NFE", "energy distance", "z vs floor", "above floor max"]
        rows = [[q["method"], q["steps"], q["nfe"], q["energy_distance"], q["z_vs_floor"],
                 "yes" if q["above_floor_max"] else "no"] for q in p["stochastic"]]
        parts.append(table(hdr, rows))
        parts.append("")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
# configuration and main
# ------------------------------------------------------------------------------------------------
def config(quick: bool) -> Dict:
    if quick:
        return {
            "repeats": 3, "repeats_torchsde": 3, "repeats_short": 3,
            "overhead_cases": [((1024, 2), 20, 10), ((128, 3072), 4, 2)],
            "dopri5_cases": [("mixture2d", (1024, 2), 1e-3, torch.float32)],
            "accuracy_problems": [dict(d=2, n_det=200, n_sto=300, nfe_det=[10, 20],
                                       tols=[1e-2], nfe_twin=[10], nfe_sto=[20], floor_repeats=3, nfe_grids=[20])],
        }
    return {
        "repeats": 5, "repeats_torchsde": 5, "repeats_short": 15,
        # (shape, steps, torchsde steps)
        "overhead_cases": [((1024, 2), 200, 200), ((1024, 3072), 40, 20)],
        "dopri5_cases": [("mixture2d", (1024, 2), 1e-3, torch.float32), ("mixture2d", (1024, 2), 1e-5, torch.float32),
                         ("gaussian", (1024, 3072), 1e-3, torch.float32)],
        "accuracy_problems": [
            dict(d=2, n_det=1000, n_sto=4000, nfe_det=[10, 20, 50, 100, 200, 500],
                 tols=[1e-2, 1e-3, 1e-4, 1e-5], nfe_twin=[10, 20, 50], nfe_sto=[20, 50, 100, 200, 500, 1000],
                 floor_repeats=10, nfe_grids=[10, 20, 50]),
            dict(d=64, K=8, n_det=500, n_sto=1000, nfe_det=[10, 20, 50, 100, 200],
                 tols=[1e-2, 1e-3, 1e-4, 1e-5], nfe_twin=[10, 20, 50], nfe_sto=[20, 50, 100, 200, 500],
                 floor_repeats=10),
        ],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny sizes, few repeats)")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run, from {', '.join(SECTIONS)} (default: all)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "solvers.json"), help="JSON output path")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8),
                    help="torch.set_num_threads (default: the core count, at most 8; on a busy machine use 1: "
                         "OpenMP threads that get descheduled were measured to slow small ops 25x)")
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="'tuned' (default): keep freed memory in glibc's heap so large-batch timings are not "
                         "dominated by page faults (see tune_malloc); 'default': glibc's defaults")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad or not only:
        ap.error(f"--only takes sections from {SECTIONS}, got {args.only!r}")
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    malloc = tune_malloc() if args.malloc == "tuned" else {"malloc": "default", "applied": False}
    cfg = config(args.quick)
    info = machine_info()
    info.update(malloc)
    result = {"machine": info, "quick": args.quick, "sections": only, "config": {
        k: (v if k != "dopri5_cases" else [[c[0], list(c[1]), c[2], str(c[3])] for c in v]) for k, v in cfg.items()}}
    tic0 = time.perf_counter()
    print(f"# sdekit solver benchmarks{' (quick)' if args.quick else ''}\n")
    print(f"Machine: {info['cpu_model']}, {info['cores']} cores, torch {info['torch']}, "
          f"{info['torch_threads']} threads, {info['date']}, load average {info['load_average_start']}, "
          f"malloc: {info['malloc']}\n")
    runners = {"overhead": (bench_overhead, print_overhead), "dopri5": (bench_dopri5, print_dopri5),
               "accuracy": (bench_accuracy, print_accuracy)}
    for sec in SECTIONS:
        if sec not in only:
            continue
        tic = time.perf_counter()
        res = runners[sec][0](cfg)
        res["wall_s"] = time.perf_counter() - tic
        result[sec] = res
        print(f"## {sec} ({res['wall_s']:.1f} s)\n")
        print(runners[sec][1](res))
        print()
    result["runtime_s"] = time.perf_counter() - tic0
    try:
        result["machine"]["load_average_end"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"total {result['runtime_s']:.1f} s; JSON written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
