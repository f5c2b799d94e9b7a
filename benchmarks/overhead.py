"""Benchmark: bookkeeping overhead of the likelihood's augmented field and of native Euler–Maruyama.

Not a test. Prints markdown tables and writes JSON (default ``benchmarks/results/overhead.json``).

``field``
    Time per function evaluation of the likelihood's augmented field — the field the native
    integrator calls at every stage — against a bare loop doing only what any implementation must:
    cast the float64 solver state to the data's dtype, evaluate the score at a (B,) time vector,
    one vector–Jacobian product with the Rademacher probe and the probe contraction. Rows: the
    tuple field ``(x, Δ)`` behind the generic path (``_AugmentedField`` with the split/cat the
    native integrator's tuple adapter adds), and the flat field of the native linear path
    (``_FlatLinearField``), without and with the preconditioned state. Same inputs, same probe;
    the stage times come as 0-d views of one stage-time vector per step, as the native
    integrator passes them. Scores: the Gaussian-mixture oracle's exact score (``analytic`` VJP
    and plain ``autograd`` backward). Timed with ``time.thread_time`` (CPU time of this thread,
    robust to a loaded machine) and wall clock; the ratio is the median over interleaved repeats
    of (field / bare) — the target is <= 1.10.

``euler_maruyama``
    ``sdekit.solve(rev, x, method="euler_maruyama", steps=1000)`` on a reverse VP SDE, x of shape
    1024 x 2, score ``-x``, against a minimal hand-written loop computing beta(t) inline (same
    grid, same noise stream): per-repeat ratio, median over interleaved repeats — target <= 1.10.

Usage::

    PYTHONPATH=. python benchmarks/overhead.py             # full run
    PYTHONPATH=. python benchmarks/overhead.py --quick     # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sdekit  # noqa: E402
from sdekit.likelihood import ode as L  # noqa: E402
from sdekit.likelihood.divergence import draw_probes  # noqa: E402
from sdekit.oracles import GaussianMixture  # noqa: E402
from sdekit.solvers.grids import make_grid  # noqa: E402

F64 = torch.float64
#: Dormand-Prince stage nodes (one stage-time vector per step, as the native integrator builds it)
STAGES = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)


def _mixture(d, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(4, generator=g, dtype=F64) + 0.5
    gm = GaussianMixture(w, torch.randn(4, d, generator=g, dtype=F64),
                         0.3 + 0.7 * torch.rand(4, d, generator=g, dtype=F64))
    return gm, gm.sample(B, generator=g).to(torch.float32)


def _interleaved(fns, repeats, clock):
    res = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = clock()
            f()
            res[k].append(clock() - t0)
    return res


def bench_field(quick, repeats):
    cases = [(64, 128), (2, 512)] if not quick else [(8, 32)]
    steps = 8 if not quick else 2
    rows = []
    for d, B in cases:
        gm, x = _mixture(d, B)
        for sname, sde in (("VE", sdekit.VESDE()), ("VP", sdekit.VPSDE())):
            for oracle in ("analytic", "autograd"):
                score = gm.exact_score(sde, analytic_vjp=oracle == "analytic")
                probes = draw_probes(tuple(x.shape), 1, "rademacher", torch.Generator().manual_seed(0), x.dtype,
                                     x.device)
                eps = probes[0]
                y = torch.cat([x.to(F64), torch.zeros(B, 1, dtype=F64)], 1)
                starts = torch.linspace(0.05, 0.8, steps, dtype=F64).tolist()
                h = 0.1

                def stage_times():  # fresh 1-D stage-time vectors, iterated as 0-d views
                    for t0 in starts:
                        for t in torch.tensor([t0 + c * h for c in STAGES], dtype=F64):
                            yield t

                def bare():
                    for t in stage_times():
                        xx = y[:, :d].to(torch.float32).requires_grad_(True)
                        with torch.enable_grad():
                            s = score(xx, t.to(torch.float32).expand(B))
                            (g,) = torch.autograd.grad(s, xx, eps)
                        (g * eps).sum(1)

                pf = sde.probability_flow(score, 1e-5)
                pf.check_inputs = False
                old = L._AugmentedField(pf, x.dtype, "hutchinson", probes, needs_graph=False, shape=tuple(x.shape))

                def tuple_field():
                    with torch.no_grad():
                        for t in stage_times():
                            parts = torch.split(y, [d, 1], dim=1)
                            out = old(t, (parts[0].reshape(x.shape), parts[1]))
                            torch.cat([o.reshape(B, -1) for o in out], 1)

                flat = L._FlatLinearField(sde, score, x, "hutchinson", probes, 1, None, None)
                pre = L._FlatLinearField(sde, score, x, "hutchinson", probes, 1, torch.zeros((), dtype=F64),
                                         torch.ones((), dtype=F64))

                def run(field):
                    def go():
                        with torch.no_grad():
                            for t in stage_times():
                                field(t, y)
                    return go

                fns = {"bare score + VJP": bare, "tuple field (generic path)": tuple_field,
                       "flat field": run(flat), "flat field, preconditioned": run(pre)}
                n = steps * len(STAGES)
                for clock_name, clock in (("cpu", time.thread_time), ("wall", time.perf_counter)):
                    res = _interleaved(fns, repeats, clock)
                    base = res["bare score + VJP"]
                    for k, ts in res.items():
                        rows.append({"d": d, "B": B, "sde": sname, "oracle": oracle, "clock": clock_name,
                                     "variant": k, "us_per_nfe_min": 1e6 * min(ts) / n,
                                     "us_per_nfe_median": 1e6 * statistics.median(ts) / n,
                                     "ratio_vs_bare_median": statistics.median(a / b for a, b in zip(ts, base)),
                                     "ratio_vs_bare_min": min(ts) / min(base)})
                print(f"  field d={d} {sname} {oracle} done", file=sys.stderr)
    return rows


def bench_em(quick, repeats):
    sde = sdekit.VPSDE()
    score = lambda x, t: -x  # noqa: E731
    rev = sde.reverse(score)
    B, d, N = (1024, 2, 1000) if not quick else (256, 2, 100)
    x0 = torch.randn(B, d, generator=torch.Generator().manual_seed(0))
    ts = make_grid("uniform", sde.T, sdekit.SAMPLING_T_EPS, N).tolist()
    b0, b1 = sde.kernel.beta_min, sde.kernel.beta_max

    def hand():  # minimal loop: beta(t) inline, in-place updates, noise into a reused buffer
        gen = torch.Generator().manual_seed(1)
        x = x0.clone()
        buf = torch.empty_like(x)
        for i in range(N):
            t, s = ts[i], ts[i + 1]
            h = s - t
            beta = b0 + t * (b1 - b0)
            x.add_(torch.add(-0.5 * beta * x, score(x, t), alpha=-beta), alpha=h)
            x.add_(torch.randn(x.shape, generator=gen, out=buf), alpha=math.sqrt(beta * abs(h)))
        return x

    def sk():
        return sdekit.solve(rev, x0, method="euler_maruyama", steps=N, generator=torch.Generator().manual_seed(1)).x

    diff = float((hand() - sk()).abs().max())
    rows = []
    for clock_name, clock in (("cpu", time.thread_time), ("wall", time.perf_counter)):
        res = _interleaved({"hand loop": hand, "sdekit.solve": sk}, repeats, clock)
        rows.append({"clock": clock_name, "steps": N, "B": B, "d": d,
                     "hand_ms_min": 1e3 * min(res["hand loop"]), "sdekit_ms_min": 1e3 * min(res["sdekit.solve"]),
                     "ratio_median": statistics.median(b / a for a, b in zip(res["hand loop"], res["sdekit.solve"])),
                     "ratio_min": min(res["sdekit.solve"]) / min(res["hand loop"]),
                     "max_abs_diff_vs_hand": diff})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke test)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 15, quick 2)")
    p.add_argument("--only", default="field,euler_maruyama", help="sections, comma-separated")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/overhead.json; none for "
                                               "--quick unless given)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    repeats = a.repeats or (2 if a.quick else 15)
    only = set(a.only.split(","))
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"1 thread, load average {os.getloadavg()[0]:.1f}")
    payload = {"machine": machine, "quick": a.quick, "repeats": repeats, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if "field" in only:
        rows = payload["field"] = bench_field(a.quick, repeats)
        print(f"\n### Likelihood field per NFE vs bare score + VJP ({machine}; {repeats} interleaved repeats)\n")
        print("| d | B | process | oracle backward | variant | CPU us/NFE (min) | CPU ratio (median) | "
              "wall ratio (median) |\n|---|---|---|---|---|---|---|---|")
        cpu = [r for r in rows if r["clock"] == "cpu"]
        wall = {(r["d"], r["sde"], r["oracle"], r["variant"]): r for r in rows if r["clock"] == "wall"}
        for r in cpu:
            w = wall[(r["d"], r["sde"], r["oracle"], r["variant"])]
            print(f"| {r['d']} | {r['B']} | {r['sde']} | {r['oracle']} | {r['variant']} | {r['us_per_nfe_min']:.0f} | "
                  f"{r['ratio_vs_bare_median']:.3f} | {w['ratio_vs_bare_median']:.3f} |")
    if "euler_maruyama" in only:
        rows = payload["euler_maruyama"] = bench_em(a.quick, repeats)
        print(f"\n### Native Euler-Maruyama vs a minimal hand loop ({machine})\n")
        print("| clock | steps | B x d | hand [ms] (min) | sdekit [ms] (min) | ratio (median of pairs) | ratio (min/min) | "
              "max abs diff |\n|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['clock']} | {r['steps']} | {r['B']} x {r['d']} | {r['hand_ms_min']:.1f} | "
                  f"{r['sdekit_ms_min']:.1f} | {r['ratio_median']:.3f} | {r['ratio_min']:.3f} | "
                  f"{r['max_abs_diff_vs_hand']:.1e} |")
    out = a.out
    if out is None and not a.quick:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "overhead.json")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
