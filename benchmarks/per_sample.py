"""Per-sample adaptive stepping (``norm="independent"``) against the shared step (``"batch"``,
``"per-sample"``). Not a test. Prints markdown tables and writes JSON (default
``benchmarks/results/per_sample.json``).

Part A — sampling (the case of issue 14): native ``dopri5`` on the VP probability-flow ODE of a
2-D Gaussian mixture with its exact score, T -> t_eps = 1e-3, rtol = atol = 1e-5, float64. For
one sample and for a batch of 1024: batched evaluations (``nfe``: what a GPU pays), rows
evaluated (``sample_evals``: what a CPU pays; ``nfe x B`` for a shared step), and the worst
sample's error against a tight reference (the same flow at rtol = atol = 1e-11, per-sample
stepping), in the norm the controller targets: max over samples of the per-sample RMS of
``|x - x_ref| / (atol + rtol |x_ref|)``, and in absolute terms. Also the wall-clock ratio of
the compacted active set (the default) against masking, interleaved repeats.

Part B — likelihood exactness at rtol = atol = 1e-6, exact divergence, float64: the worst
sample's |log p - exact| / d (nats/dim) against ``GaussianMixture.exact_log_prob`` on mixtures for
d in {1, 2, 8, 16} and VP, VE, sub-VP and a custom numeric LinearSDE, for each norm, with
the prior set to the exact marginal at T (``gm.push(sde, T)``) so that only the solver's error is
measured (the default prior's bias is a property of the process, not of the integrator).

Part C — cost at equal worst-sample error: a tolerance sweep for each norm on a few cases (256
samples: the batch norm's dilution grows with the batch; mixture means scaled by 2 for harder
cases); for each norm and error level the cheapest tolerance whose worst-sample error meets it,
and its cost (rows evaluated per sample, batched evaluations, wall time).

NFE and errors are deterministic; timings are noisy on a shared machine (ratios are reported).

Usage::

    PYTHONPATH=. python benchmarks/per_sample.py            # full run (~10 min on 2 busy cores)
    PYTHONPATH=. python benchmarks/per_sample.py --quick    # smoke run (under a minute)
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
from sdekit.oracles import GaussianMixture  # noqa: E402
from sdekit.solvers.adaptive import _config  # noqa: E402
from sdekit.solvers.adaptive_per_sample import integrate_per_sample  # noqa: E402

F64 = torch.float64
NORMS = ("batch", "per-sample", "independent")
T_EPS_LIK = 1e-5
LEVELS = (1e-4, 1e-5, 1e-6)  # worst-sample error levels (nats/dim) at which costs are compared


def mixture(d: int, seed: int, K: int = 3, scale: float = 1.0) -> GaussianMixture:
    """Random mixture as in tests/test_likelihood.py: full covariances (diagonal for d = 1),
    means ``scale`` times standard normal."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(K, generator=g, dtype=F64) + 0.5
    mu = scale * torch.randn(K, d, generator=g, dtype=F64)
    if d > 1:
        A = torch.randn(K, d, d, generator=g, dtype=F64)
        covs = 0.3 * A @ A.transpose(1, 2) / d + 0.2 * torch.eye(d, dtype=F64)
    else:
        covs = 0.2 + 0.5 * torch.rand(K, d, generator=g, dtype=F64)
    return GaussianMixture(w, mu, covs)


def sin_sde():
    """A custom process: a numeric-kernel LinearSDE from two lambdas (as in the tests)."""
    return sdekit.LinearSDE(lambda t: -0.5 * (1.0 + 0.8 * torch.sin(3.0 * t)),
                            lambda t: torch.sqrt(1.0 + 0.8 * torch.sin(3.0 * t)))


SDES = {"vp": sdekit.VPSDE, "ve": lambda: sdekit.VESDE(0.01, 50.0), "subvp": sdekit.SubVPSDE, "custom": sin_sde}


# ------------------------------------------------------------------------------------------------
# Part A
# ------------------------------------------------------------------------------------------------
def part_a(batch: int, repeats: int) -> dict:
    sde = sdekit.VPSDE()
    gm = GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -0.5]], [[0.05, 0.3], [0.4, 0.1]])
    pf = sde.probability_flow(gm.exact_score(sde), t_eps=1e-3)
    x = torch.randn(batch, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * sde.prior_std()
    tol = 1e-5
    ref = sdekit.solve(pf, x, method="dopri5", rtol=1e-11, atol=1e-11, norm="independent").x
    rows = []
    for norm in NORMS:
        for n in (1, batch):
            xs = x[:n]
            sol = sdekit.solve(pf, xs, method="dopri5", rtol=tol, atol=tol, norm=norm)
            r = ref[:n]
            scaled = ((sol.x - r) / (tol + tol * r.abs())).square().mean(1).sqrt()
            ev = sol.stats.sample_evals if sol.stats.sample_evals is not None else sol.stats.nfe * n
            rows.append(dict(norm=norm, batch=n, nfe=sol.stats.nfe, sample_evals=ev, evals_per_sample=ev / n,
                             worst_scaled_error=float(scaled.max()),
                             worst_abs_error=float((sol.x - r).abs().max())))
    # compacting the active set vs masking finished rows (same steps), interleaved repeats
    f = lambda t, y: pf(t, y)  # noqa: E731
    cfg = _config("dopri5", x, tol, tol, "independent", sde.T, 1e-3, (), None, float("inf"), 0.9, 10.0, 0.2,
                  None, None, ())
    times = {"compact": [], "mask": []}
    outs = {}
    for _ in range(repeats):
        for mode in times:
            tic = time.perf_counter()
            with torch.no_grad():
                outs[mode] = integrate_per_sample(f, x, cfg, compact=mode == "compact")
            times[mode].append(time.perf_counter() - tic)
    same = bool(torch.equal(outs["compact"][0], outs["mask"][0])) and \
        bool(torch.equal(outs["compact"][1]["nfe_per_sample"], outs["mask"][1]["nfe_per_sample"]))
    ratios = [m / c for m, c in zip(times["mask"], times["compact"])]
    # wall time per norm at batch size (interleaved)
    wt = {nm: [] for nm in NORMS}
    for _ in range(repeats):
        for nm in NORMS:
            tic = time.perf_counter()
            sdekit.solve(pf, x, method="dopri5", rtol=tol, atol=tol, norm=nm)
            wt[nm].append(time.perf_counter() - tic)
    return dict(rows=rows, tol=tol, compact_s=min(times["compact"]), mask_s=min(times["mask"]),
                mask_over_compact_median=statistics.median(ratios), compact_equals_mask=same,
                wall_best_s={k: min(v) for k, v in wt.items()},
                wall_ratio_vs_batch_median={k: statistics.median([a / b for a, b in zip(v, wt["batch"])])
                                            for k, v in wt.items()})


# ------------------------------------------------------------------------------------------------
# Parts B and C
# ------------------------------------------------------------------------------------------------
def lik_case(name: str, d: int, n: int, norm: str, tol: float, scale: float = 1.0) -> dict:
    sde = SDES[name]()
    gm = mixture(d, seed=100 + d, scale=scale)
    x = gm.sample(n, generator=torch.Generator().manual_seed(d))
    res = log_likelihood(sde, gm.exact_score(sde), x, t_eps=T_EPS_LIK, rtol=tol, atol=tol, divergence="exact",
                         prior=gm.push(sde, sde.T), norm=norm)
    err = (res.log_prob - gm.exact_log_prob(sde)(x, T_EPS_LIK)).abs() / d
    st = res.stats
    ev = st.sample_evals if st.sample_evals is not None else st.nfe * n
    return dict(sde=name, d=d, n=n, scale=scale, norm=norm, tol=tol, worst=float(err.max()),
                median=float(err.median()),
                nfe=st.nfe, sample_evals=ev, evals_per_sample=ev / n, wall_s=st.wall_time)


def part_b(dims, names, n: int) -> list:
    rows = []
    for name in names:
        for d in dims:
            for norm in NORMS:
                rows.append(lik_case(name, d, n, norm, 1e-6))
                r = rows[-1]
                print(f"  B {name:6s} d={d:2d} {norm:11s} worst {r['worst']:.2e} nfe {r['nfe']:4d} "
                      f"evals/sample {r['evals_per_sample']:.0f}", flush=True)
    return rows


def part_c(cases, tols, n: int) -> list:
    rows = []
    for name, d, scale in cases:
        for tol in tols:
            for norm in NORMS:
                rows.append(lik_case(name, d, n, norm, tol, scale))
                r = rows[-1]
                print(f"  C {name:6s} d={d:2d} x{scale:g} {norm:11s} tol {tol:.0e} worst {r['worst']:.2e} "
                      f"nfe {r['nfe']:4d} evals/sample {r['evals_per_sample']:.0f} wall {r['wall_s']:.2f}s",
                      flush=True)
    return rows


def cheapest(rows, name, d, scale, norm, level):
    """The cheapest row (evals per sample) of a sweep whose worst error is at most ``level``."""
    ok = [r for r in rows if (r["sde"], r["d"], r["scale"], r["norm"]) == (name, d, scale, norm)
          and r["worst"] <= level]
    return min(ok, key=lambda r: r["evals_per_sample"]) if ok else None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, seconds")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/per_sample.json, "
                                                 "or per_sample_quick.json with --quick)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        batch, repeats, n, n_c = 64, 1, 8, 8
        dims, names = (2,), ("vp",)
        cases, tols = [("vp", 2, 1.0)], (1e-6,)
    else:
        batch, repeats, n, n_c = 1024, 3, 64, 256
        dims, names = (1, 2, 8, 16), tuple(SDES)
        cases, tols = [("vp", 8, 2.0), ("ve", 8, 2.0), ("vp", 2, 1.0)], (1e-5, 3e-6, 1e-6, 3e-7, 1e-7)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    out = dict(machine=dict(platform=platform.platform(), torch=torch.__version__, threads=1, load_1min=load),
               quick=args.quick)
    print(f"load average (1 min): {load}")
    a = part_a(batch, repeats)
    out["sampling"] = a
    print(f"\n## A. dopri5, VP PF-ODE, 2-D mixture, rtol = atol = {a['tol']:g}\n")
    print("| norm | batch | nfe (batched calls) | evals / sample | worst scaled error | worst abs error |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in a["rows"]:
        print(f"| {r['norm']} | {r['batch']} | {r['nfe']} | {r['evals_per_sample']:.1f} | "
              f"{r['worst_scaled_error']:.3g} | {r['worst_abs_error']:.2e} |")
    print(f"\nmask / compact wall time (median of {repeats}): {a['mask_over_compact_median']:.2f} "
          f"(identical results: {a['compact_equals_mask']}); wall time vs batch norm: "
          + ", ".join(f"{k} {v:.2f}" for k, v in a["wall_ratio_vs_batch_median"].items()))
    b = part_b(dims, names, n)
    out["exactness"] = b
    print(f"\n## B. log_likelihood, exact divergence, rtol = atol = 1e-6, float64, worst of {n} samples "
          f"(nats/dim; evals/sample)\n")
    print("| process | d | " + " | ".join(NORMS) + " |")
    print("|---|---:|" + "---:|" * len(NORMS))
    for name in names:
        for d in dims:
            cells = []
            for norm in NORMS:
                r = next(r for r in b if r["sde"] == name and r["d"] == d and r["norm"] == norm)
                cells.append(f"{r['worst']:.2e} ({r['evals_per_sample']:.0f})")
            print(f"| {name} | {d} | " + " | ".join(cells) + " |")
    c = part_c(cases, tols, n_c)
    out["equal_error"] = c
    print(f"\n## C. equal worst-sample error (worst of {n_c}): the cheapest tolerance of the sweep "
          f"{list(tols)} whose worst error is at most the level; evals/sample, batched nfe, tol, wall s\n")
    print("| process | d | mean scale | level (nats/dim) | " + " | ".join(NORMS) + " |")
    print("|---|---:|---:|---:|" + "---|" * len(NORMS))
    summary = []
    for name, d, scale in cases:
        for level in LEVELS:
            cells = []
            for norm in NORMS:
                r = cheapest(c, name, d, scale, norm, level)
                summary.append(dict(sde=name, d=d, scale=scale, level=level, norm=norm, best=r))
                cells.append("not met" if r is None else
                             f"{r['evals_per_sample']:.0f} / {r['nfe']} / {r['tol']:.0e} / {r['wall_s']:.1f}")
            print(f"| {name} | {d} | {scale:g} | {level:g} | " + " | ".join(cells) + " |")
    out["equal_error_summary"] = summary
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    "per_sample_quick.json" if args.quick else "per_sample.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"\nwrote {path}")
    return out


if __name__ == "__main__":
    main()
