"""CPU benchmark: accuracy against cost for `log_likelihood`, including the accuracy-targeted mode
(``target_stderr``, `sdekit.likelihood.targeted`).

Not a test. Prints two markdown tables and writes JSON (default
``benchmarks/results/likelihood_accuracy.json``).

Problem 1 (``mixture``): the d = 64, B = 128 VP mixture of ``benchmarks/likelihood_cpu.py``
(``make_problem``), its EXACT score, t_eps = 1e-5 and the exact p_T as the prior, so every error
is the ODE solve plus the divergence estimator, against the oracle's exact log density.

Problem 2 (``full-rank``): the same score plus a small random MLP (fixed seed), whose Jacobian is
full rank (the mixture's score Jacobian is diagonal + rank 3). Its exact density is unknown; the
reference is the exact divergence (``exact_dim_limit=64``) at rtol = atol = 1e-7.

Rows: the peer (one Rademacher probe at tol 1e-5: ``log_likelihood(..., n_probes=1)``, and the
score_sde recipe ``classic_likelihood`` of ``likelihood_cpu.py`` on problem 1), hand-picked
settings (K probes x tol; with ``resample_probes=True``, a fresh probe at every evaluation, with
dopri5 and with bosh3) and the targeted mode at a few targets (the default, and with the
opt-in control variate for the two tightest). Columns: per-sample RMS and max
error (nats/dim), the mean reported stderr (nats/dim), the coverage of |err| <= 1.96 stderr, NFE
(score evaluations of the batched solves; for the targeted mode summed over its solves, pilot and
check included), wall time end to end (best of the interleaved repeats; each repeat draws fresh
probes), and the RMS error ratio peer / row.

Usage::

    PYTHONPATH=. python benchmarks/likelihood_accuracy.py            # full run (minutes on 2 cores)
    PYTHONPATH=. python benchmarks/likelihood_accuracy.py --quick    # smoke run (seconds)
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sdekit  # noqa: E402
from sdekit.likelihood import log_likelihood  # noqa: E402
from sdekit.likelihood.targeted import targeted_log_likelihood  # noqa: E402
from likelihood_cpu import classic_likelihood, make_problem  # noqa: E402

F64 = torch.float64
T_EPS = 1e-5


def perturbed_score(score, d, seed, scale=0.3, width=64):
    """``score(x, t) + scale * tanh MLP(x)``: a random 2-layer perturbation (fixed seed) with a
    full-rank Jacobian. ``scale`` 0.3 moves the log density by O(1) nats/dim: a different model,
    not a rounding change."""
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(d, width, generator=g) / math.sqrt(d)
    W2 = torch.randn(width, d, generator=g) / math.sqrt(width)

    def s(x, t):
        return score(x, t) + scale * torch.tanh(x @ W1) @ W2

    return s


#: `log_likelihood(resample_probes=True)`: a fresh probe at every evaluation, steps on the state alone
RESAMPLE = {"resample_probes": True}
#: ... with Bogacki-Shampine 3(2): its weights (2/9, 1/3, 4/9) spread the probe noise over the stages
#: evenly (effective independent draws per step (sum b)^2 / sum b^2 = 2.8 of 3 new evaluations, against
#: 1.3 of 6 for dopri5, whose weights are uneven)
RESAMPLE_BOSH3 = {"resample_probes": True, "method": "bosh3"}


def rows_for(quick):
    """(label, kind, settings): kind 'classic' | 'fixed' (n_probes, tol) | 'targeted' (target)."""
    rows = [("peer: 1 probe, tol 1e-5", "fixed", (1, 1e-5)),
            ("score_sde recipe (scipy RK45), 1 probe, tol 1e-5", "classic", None),
            ("4 probes, tol 1e-3", "fixed", (4, 1e-3)),
            ("16 probes, tol 1e-3", "fixed", (16, 1e-3)),
            ("16 probes, tol 1e-5", "fixed", (16, 1e-5)),
            ("resampled probes: 1 probe, dopri5, tol 1e-5", "fixed", (1, 1e-5, RESAMPLE)),
            ("resampled probes: 1 probe, bosh3, tol 1e-4", "fixed", (1, 1e-4, RESAMPLE_BOSH3)),
            ("resampled probes: 1 probe, bosh3, tol 5e-5", "fixed", (1, 5e-5, RESAMPLE_BOSH3)),
            ("resampled probes: 2 probes, bosh3, tol 1e-4", "fixed", (2, 1e-4, RESAMPLE_BOSH3)),
            ("resampled probes: 3 probes, bosh3, tol 3e-4", "fixed", (3, 3e-4, RESAMPLE_BOSH3)),
            ("resampled probes: 4 probes, bosh3, tol 5e-4", "fixed", (4, 5e-4, RESAMPLE_BOSH3)),
            ("resampled probes: 4 probes, bosh3, tol 1e-4", "fixed", (4, 1e-4, RESAMPLE_BOSH3))]
    targets = (0.008, 0.004) if quick else (0.016, 0.008, 0.004, 0.002)
    rows += [(f"targeted, target_stderr={t}", "targeted", (t, False)) for t in targets]
    rows += [(f"targeted with control variate, target_stderr={t}", "targeted", (t, True)) for t in targets[-2:]]
    return rows


def run_problem(name, sde, score, x, reference, prior, repeats, quick):
    d, B = int(x[0].numel()), int(x.shape[0])
    rows = [r for r in rows_for(quick) if not (r[1] == "classic" and name != "mixture")]
    acc = {r[0]: {"walls": [], "nfes": [], "err": [], "se": []} for r in rows}
    for rep in range(repeats):  # interleaved: slow drifts of the machine hit all rows alike
        for label, kind, setting in rows:
            gen = torch.Generator().manual_seed(1000 + rep)
            t0 = time.perf_counter()
            if kind == "classic":
                logp, nfev, _ = classic_likelihood(sde, score, x, prior.log_prob, t_eps=T_EPS, generator=gen)
                nfe, se = 2 * nfev, torch.full((B,), math.inf, dtype=F64)
            elif kind == "fixed":
                K, tol = setting[:2]
                extra = setting[2] if len(setting) > 2 else {}
                r = log_likelihood(sde, score, x, t_eps=T_EPS, n_probes=K, rtol=tol, atol=tol, prior=prior,
                                   divergence="hutchinson", generator=gen, **extra)
                logp, nfe, se = r.log_prob, r.stats.nfe, r.stderr
            else:
                target, cv = setting
                r = targeted_log_likelihood(sde, score, x, t_eps=T_EPS, target_stderr=target, prior=prior,
                                            generator=gen, control_variate=cv)  # = log_likelihood(target_stderr=)
                logp, nfe, se = r.log_prob, r.stats.nfe, r.stderr
            a = acc[label]
            a["walls"].append(time.perf_counter() - t0)
            a["nfes"].append(nfe)
            a["err"].append((logp.detach().to(F64) - reference) / d)
            a["se"].append(se.detach().to(F64) / d)
    out = []
    for label, kind, setting in rows:
        a = acc[label]
        err, se = torch.cat(a["err"]), torch.cat(a["se"])
        row = {"problem": name, "row": label, "kind": kind, "setting": setting, "d": d, "B": B,
               "err_rms": float(err.pow(2).mean().sqrt()), "err_max": float(err.abs().max()),
               "stderr_mean": float(se.mean()) if bool(torch.isfinite(se).all()) else math.inf,
               "coverage": float((err.abs() <= 1.96 * se).to(F64).mean()),
               "nfe": statistics.median(a["nfes"]), "wall_s": min(a["walls"]),
               "wall_s_median": statistics.median(a["walls"]), "wall_s_per_repeat": a["walls"], "repeats": repeats}
        out.append(row)
    peer = out[0]
    for row in out:
        row["err_ratio_vs_peer"] = peer["err_rms"] / row["err_rms"]
        row["wall_ratio_vs_peer"] = row["wall_s"] / peer["wall_s"]
    return out


def table(rows):
    lines = ["| row | RMS err [nats/dim] | max err | mean stderr | coverage (1.96 se) | NFE | wall [s] | "
             "error ratio vs peer | wall / peer |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        se = "inf" if math.isinf(r["stderr_mean"]) else f"{r['stderr_mean']:.2e}"
        lines.append(f"| {r['row']} | {r['err_rms']:.2e} | {r['err_max']:.2e} | {se} | {r['coverage']:.3f} | "
                     f"{r['nfe']:.0f} | {r['wall_s']:.3f} | {r['err_ratio_vs_peer']:.2f}x | "
                     f"{r['wall_ratio_vs_peer']:.2f}x |")
    return "\n".join(lines)


def run(quick, repeats, threads):
    if threads:
        torch.set_num_threads(threads)
    sde = sdekit.VPSDE()
    d, B = (24, 32) if quick else (64, 128)
    gm, x = make_problem(d, B, seed=d)
    score = gm.exact_score(sde)
    prior = gm.push(sde, sde.T)
    log_likelihood(sde, score, x[:4], rtol=1e-2, atol=1e-2, prior=prior)  # warm-up, untimed
    classic_likelihood(sde, score, x[:4], prior.log_prob, rtol=1e-2, atol=1e-2)
    exact = gm.exact_log_prob(sde)(x.to(F64), T_EPS)
    rows = run_problem("mixture", sde, score, x, exact, prior, repeats, quick)
    pert = perturbed_score(score, d, seed=7)
    t0 = time.perf_counter()
    ref = log_likelihood(sde, pert, x, t_eps=T_EPS, divergence="exact", exact_dim_limit=d, rtol=1e-7, atol=1e-7,
                         prior=prior).log_prob.to(F64)
    ref_wall = time.perf_counter() - t0
    rows += run_problem("full-rank", sde, pert, x, ref, prior, repeats, quick)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads"
    for name, title in (("mixture", "exact mixture score (Jacobian diagonal + rank 3); reference: exact density"),
                        ("full-rank", "mixture score + random MLP (full-rank Jacobian); reference: exact "
                                      "divergence at tol 1e-7")):
        print(f"\n### Accuracy vs cost, d = {d}, B = {B}, VP, {title} ({machine}; {repeats} interleaved repeats, "
              f"best wall time, errors pooled)\n")
        print(table([r for r in rows if r["problem"] == name]))
    return {"machine": machine, "quick": quick, "d": d, "B": B, "t_eps": T_EPS, "reference_wall_s": ref_wall,
            "rows": rows, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="d = 24, B = 32, one repeat, two targets (seconds)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "likelihood_accuracy.json"))
    a = p.parse_args(argv)
    repeats = a.repeats if a.repeats is not None else (1 if a.quick else 3)
    res = run(a.quick, repeats, a.threads)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nwrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
