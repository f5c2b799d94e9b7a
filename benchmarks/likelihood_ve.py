"""Benchmark: the Gaussian-preconditioned likelihood state (``precondition``) on several linear processes.

Not a test. Prints a markdown table and writes JSON (default ``benchmarks/results/likelihood_ve.json``).

For each process (VE, VP, sub-VP, cosine VP, and two numeric-kernel ``LinearSDE``s: a VP-like one
with ``m^2 + sigma^2 = 1`` and a VE-like one with growing noise), a Gaussian-mixture data set with
its EXACT score and EXACT log density (``GaussianMixture.exact_score`` / ``exact_log_prob``), the
exact marginal at T as the prior (so that only the ODE is compared), t_eps = 1e-5, and
``log_likelihood`` with ``precondition=False`` (integrate x), the default (``"auto"``: the
preconditioned state u = (x - m mu)/nu on drift-free processes only), ``precondition=True`` with
the default moments mu = 0, c^2 = 1, and with the data's per-dimension moments (``data_moments=``,
estimated from a separate draw of 20 000 samples, never from the batch being evaluated). Same
probe for every row of a repeat.

Errors are per sample in nats per dimension against the exact log density. ``d <= 16`` uses the
exact divergence, larger ``d`` one Rademacher probe (the error then includes the probe's
variance, the same for all rows since the probe is shared). Wall times are end to end, repeats
interleaved across the rows; the ratio column is the median of the per-repeat ratios against
``precondition=False``.

Usage::

    PYTHONPATH=. python benchmarks/likelihood_ve.py            # full run
    PYTHONPATH=. python benchmarks/likelihood_ve.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sdekit  # noqa: E402
from sdekit.likelihood import log_likelihood  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from likelihood_cpu import make_problem as cpu_problem  # noqa: E402  (one definition of the mixtures)

F64 = torch.float64
T_EPS = 1e-5


def processes():
    return {
        "VE": sdekit.VESDE(),
        "VP": sdekit.VPSDE(),
        "sub-VP": sdekit.SubVPSDE(),
        "cosine": sdekit.CosineVPSDE(),
        "custom VP-like": sdekit.LinearSDE(lambda t: -0.5 * (1 + torch.sin(3 * t)), lambda t: (1 + torch.sin(3 * t)).sqrt()),
        "custom VE-like": sdekit.LinearSDE(lambda t: -0.1 + 0 * t, lambda t: 3 * torch.exp(2 * t)),
    }


def make_problem(d, B, seed, K=4):
    """likelihood_cpu.py's mixture and points, plus per-dimension data moments from 20000 fresh draws."""
    gm, x = cpu_problem(d, B, seed, K)
    ref = gm.sample(20000, generator=torch.Generator().manual_seed(seed + 1))
    return gm, x, (ref.mean(0), ref.var(0))


def run(quick: bool, repeats: int, out, tol: float):
    torch.set_num_threads(1)
    cases = [(2, 512), (64, 128)] if not quick else [(2, 64)]
    names = list(processes()) if not quick else ["VE", "VP"]
    rows = []
    gm0, x0, _ = make_problem(2, 8, seed=0)  # warm-up, untimed: torch's first autograd.grad imports sympy
    log_likelihood(sdekit.VPSDE(), gm0.exact_score(sdekit.VPSDE()), x0, rtol=1e-2, atol=1e-2)
    for d, B in cases:
        gm, x, moments = make_problem(d, B, seed=d)
        for name in names:
            sde = processes()[name]
            score = gm.exact_score(sde)
            exact = gm.exact_log_prob(sde)(x.to(F64), T_EPS)
            pT = gm.push(sde, sde.T)
            variants = {"precondition=False": dict(precondition=False),
                        "default (auto)": dict(),
                        "precondition=True (mu=0, c^2=1)": dict(precondition=True),
                        "precondition=True, data_moments (per dim)": dict(precondition=True, data_moments=moments)}
            acc = {k: {"wall": [], "nfe": [], "err_mean": [], "err_max": []} for k in variants}
            div = "exact" if d <= 16 else "hutchinson"
            for rep in range(repeats):
                for k, kw in variants.items():
                    gen = torch.Generator().manual_seed(100 + rep)
                    t0 = time.perf_counter()
                    r = log_likelihood(sde, score, x, t_eps=T_EPS, rtol=tol, atol=tol, divergence=div,
                                       generator=gen, prior=pT, **kw)
                    acc[k]["wall"].append(time.perf_counter() - t0)
                    e = (r.log_prob - exact).abs() / d
                    acc[k]["nfe"].append(r.stats.nfe)
                    acc[k]["err_mean"].append(float(e.mean()))
                    acc[k]["err_max"].append(float(e.max()))
                    acc[k]["precondition"] = r.stats.extra.get("precondition")
            base = acc["precondition=False"]["wall"]
            for k, a in acc.items():
                row = {"process": name, "d": d, "B": B, "divergence": div, "variant": k,
                       "preconditioned": a["precondition"], "nfe": int(statistics.median(a["nfe"])),
                       "err_mean": statistics.mean(a["err_mean"]), "err_max": max(a["err_max"]),
                       "wall_s": min(a["wall"]), "wall_per_repeat": a["wall"],
                       "speedup_paired_median": statistics.median(b / w for b, w in zip(base, a["wall"]))}
                rows.append(row)
                print(f"  {name} d={d} {k}: nfe={row['nfe']} err={row['err_mean']:.2e} "
                      f"x{row['speedup_paired_median']:.2f}", file=sys.stderr)
    lines = ["| process | d | B | divergence | variant | preconditioned | NFE | err mean [nats/dim] | err max | "
             "wall [s] (best) | "
             "speed-up vs precondition=False (paired median) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['process']} | {r['d']} | {r['B']} | {r['divergence']} | {r['variant']} | "
                     f"{'yes' if r['preconditioned'] else 'no'} | {r['nfe']} | "
                     f"{r['err_mean']:.2e} | {r['err_max']:.2e} | {r['wall_s']:.3f} | "
                     f"{r['speedup_paired_median']:.2f}x |")
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"1 thread, load average {os.getloadavg()[0]:.1f}")
    print(f"\n### Preconditioned likelihood state ({machine}; tol {tol:g}, t_eps {T_EPS:g}, exact mixture score "
          f"and prior, {repeats} interleaved repeats)\n")
    print("\n".join(lines))
    payload = {"machine": machine, "quick": quick, "tol": tol, "t_eps": T_EPS, "rows": rows,
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"\nwrote {out}")
    return payload


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="d = 2, VE and VP, one repeat (smoke test)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3, quick 1)")
    p.add_argument("--tol", type=float, default=1e-5, help="rtol = atol")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/likelihood_ve.json; "
                                               "none for --quick unless given)")
    a = p.parse_args(argv)
    out = a.out
    if out is None and not a.quick:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "likelihood_ve.json")
    run(a.quick, a.repeats or (1 if a.quick else 3), out, a.tol)


if __name__ == "__main__":
    main()
