"""CPU benchmark: sdekit.likelihood.log_likelihood against the classic score_sde recipe (VP) and the
k-diffusion recipe (VE, section ``ve``: see `kdiffusion_likelihood`).

Not a test. Prints a markdown table and writes JSON (default ``benchmarks/results/likelihood_cpu.json``).

Problem: the VP SDE (beta 0.1 -> 20, T = 1) with a Gaussian-mixture data distribution and its
EXACT score (``GaussianMixture.exact_score``), t_eps = 1e-5, tolerances 1e-5, data float32 (as in
score_sde). Errors are per sample, in nats per dimension, against the oracle's exact
log p_{t_eps}(x). Both recipes use the same prior so that the comparison isolates the ODE and the
divergence estimator: the EXACT marginal p_T (``gm.push(sde, T)``); the bias the default prior
N(0, sigma(T)^2 I) would add (the same for both recipes) is reported separately.

The classic recipe is re-implemented here after score_sde's ``likelihood.py`` (Song et al. 2021):
flatten the state to numpy, ``scipy.integrate.solve_ivp`` (RK45, rtol = atol = 1e-5) on
[x, delta_logp], one Rademacher probe drawn once, and an ODE function that converts numpy <-> torch
on every call, evaluates the PF drift, and computes the Hutchinson estimate with
``torch.autograd.grad`` through a SECOND evaluation of the drift (as score_sde's ``drift_fn`` /
``div_fn`` pair does). NFE below counts score evaluations (the project's convention), so the
classic recipe's NFE is 2 x scipy's ``nfev``.

Rows: the classic recipe and ``log_likelihood`` (default backend: the native Dormand-Prince
integrator on CPU), plus two ablations — ``backend="torchdiffeq"`` (same steps and NFE, torchdiffeq's
bookkeeping) and both recipes on the oracle with plain-autograd backward passes
(``exact_score(sde, analytic_vjp=False)``; a VJP then costs ~2x a forward pass, as for a network)
instead of its closed-form Jacobian products. Speed-ups are against the classic recipe on the same
oracle. Repeats are interleaved across the rows and timed end to end (validation included); the
table gives best-of and the median of the per-repeat ratios.

Usage::

    PYTHONPATH=. python benchmarks/likelihood_cpu.py            # full run (a few minutes on 2 cores)
    PYTHONPATH=. python benchmarks/likelihood_cpu.py --quick    # smoke run (seconds)
    PYTHONPATH=. python benchmarks/likelihood_cpu.py --only ve --sweep --threads 1   # VE tolerance sweep

``--sweep`` (section ve only; `run_ve_sweep`): the k-diffusion recipe, ``log_likelihood`` (defaults:
per-sample stepping) and ``log_likelihood(norm="batch")`` at rtol = atol = tol over a tolerance grid,
each with NFE, wall time (best of interleaved repeats) and the per-sample SOLVER error against a
rtol = atol = 1e-11 solve of the same recipe with the same probe (float64 data there), then the wall
time each needs to reach a solver error E (log-log interpolation) and the speed-ups at equal error.
JSON: ``benchmarks/results/likelihood_cpu_ve_sweep.json`` (none for --quick unless --out is given).
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

import numpy as np
import torch
from scipy import integrate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sdekit  # noqa: E402
from sdekit.likelihood import log_likelihood  # noqa: E402
from sdekit.oracles import GaussianMixture  # noqa: E402

F64 = torch.float64


# ------------------------------------------------------------------------------------------------
# the classic recipe (score_sde likelihood.py, re-implemented on the same score and process)
# ------------------------------------------------------------------------------------------------
def classic_likelihood(sde, score, data, prior_log_prob, *, t_eps=1e-5, rtol=1e-5, atol=1e-5, method="RK45",
                       generator=None):
    """score_sde's ``get_likelihood_fn`` with one Rademacher probe; returns (log_prob, nfev, wall)."""
    shape = data.shape
    B = shape[0]

    def drift_fn(x, t):  # PF drift f(x,t) - 1/2 g(t)^2 score(x,t)  (score_sde: rsde.sde(x, t)[0])
        g2 = sde.g2(t).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return sde.drift(x, t) - 0.5 * g2 * score(x, t)

    def div_fn(x, t, eps):  # score_sde get_div_fn: Hutchinson with torch.autograd.grad
        with torch.enable_grad():
            x.requires_grad_(True)
            fn_eps = torch.sum(drift_fn(x, t) * eps)
            grad_fn_eps = torch.autograd.grad(fn_eps, x)[0]
        x.requires_grad_(False)
        return torch.sum(grad_fn_eps * eps, dim=tuple(range(1, len(x.shape))))

    t0 = time.perf_counter()
    with torch.no_grad():
        epsilon = torch.randint(0, 2, shape, generator=generator).to(data.dtype) * 2.0 - 1.0

        def ode_func(t, x):
            sample = torch.from_numpy(x[:-B].reshape(shape)).to(data.device).type(torch.float32)
            vec_t = torch.ones(sample.shape[0], device=sample.device, dtype=F64) * t
            drift = drift_fn(sample, vec_t).detach().cpu().numpy().reshape((-1,))
            logp_grad = div_fn(sample, vec_t, epsilon).detach().cpu().numpy().reshape((-1,))
            return np.concatenate([drift, logp_grad], axis=0)

        init = np.concatenate([data.detach().cpu().numpy().reshape((-1,)), np.zeros((B,))], axis=0)
        solution = integrate.solve_ivp(ode_func, (t_eps, sde.T), init, rtol=rtol, atol=atol, method=method)
        zp = solution.y[:, -1]
        z = torch.from_numpy(zp[:-B].reshape(shape)).to(data.device).type(torch.float32)
        delta_logp = torch.from_numpy(zp[-B:]).to(data.device)
        logp = prior_log_prob(z.to(F64)).to(F64) + delta_logp
    return logp, int(solution.nfev), time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# the k-diffusion recipe (k_diffusion/sampling.py ``log_likelihood``, re-implemented on the same
# score and process): the PF ODE in sigma-time, dx/dsigma = (x - D(x, sigma)) / sigma with the
# denoiser D = x + sigma^2 s, integrated by torchdiffeq's dopri5 from sigma_min to sigma_max on the
# tuple state (x, delta), one Rademacher probe drawn once, the divergence by one autograd.grad of
# (d * v).sum(). For a VE process (m = 1) sigma is the kernel std and t(sigma) its inverse.
# ------------------------------------------------------------------------------------------------
def kdiffusion_likelihood(sde, score, data, prior_log_prob, *, sigma_min, sigma_max, rtol=1e-5, atol=1e-5,
                          generator=None, probe=None):
    """k-diffusion's ``log_likelihood`` on a VE process; returns (log_prob, nfe, wall).

    ``probe``: a given ``data``-shaped Rademacher probe instead of drawing one from ``generator``
    (the ``--sweep`` mode passes the very probe ``log_likelihood`` drew)."""
    import torchdiffeq

    kernel = sde.kernel
    t0 = time.perf_counter()
    s_in = data.new_ones([data.shape[0]])
    if probe is None:
        v = torch.randint(0, 2, data.shape, generator=generator).to(data.dtype) * 2 - 1
    else:
        v = probe.reshape(data.shape).to(data.dtype)
    fevals = 0

    def t_of(sigma):  # the time at which the VE kernel std is sigma (log-SNR = -2 log sigma)
        return kernel.t_from_log_snr(-2.0 * torch.log(sigma.to(F64)))

    def ode_fn(sigma, state):
        nonlocal fevals
        with torch.enable_grad():
            x = state[0].detach().requires_grad_()
            t = t_of(sigma) * s_in.to(F64)
            denoised = x + sigma.to(x.dtype) ** 2 * score(x, t)
            d = (x - denoised) / sigma.to(x.dtype)  # k-diffusion's to_d
            fevals += 1
            grad = torch.autograd.grad((d * v).sum(), x)[0]
            d_ll = (v * grad).flatten(1).sum(1)
        return d.detach(), d_ll

    with torch.no_grad():
        x_min = data, data.new_zeros([data.shape[0]])
        ts = data.new_tensor([sigma_min, sigma_max])
        sol = torchdiffeq.odeint(ode_fn, x_min, ts, atol=atol, rtol=rtol, method="dopri5")
        latent, delta_ll = sol[0][-1], sol[1][-1]
        logp = prior_log_prob(latent.to(F64)).to(F64) + delta_ll.to(F64)
    return logp, fevals, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# problem
# ------------------------------------------------------------------------------------------------
def make_problem(d, B, seed, K=4):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(K, generator=g, dtype=F64) + 0.5
    mu = torch.randn(K, d, generator=g, dtype=F64)
    var = 0.3 + 0.7 * torch.rand(K, d, generator=g, dtype=F64)
    gm = GaussianMixture(w, mu, var)
    x = gm.sample(B, generator=g).to(torch.float32)
    return gm, x


def errors(logp, exact, d):
    e = ((logp.to(F64) - exact.to(F64)) / d).abs()
    return {"err_mean": float(e.mean()), "err_rms": float(e.pow(2).mean().sqrt()), "err_max": float(e.max())}


# (label, recipe, divergence, norm, backend, oracle backward)
_VARIANTS = [
    ("classic (scipy RK45, numpy<->torch)", "classic", "hutchinson", None, None, "analytic"),
    ("sdekit log_likelihood", "sdekit", "hutchinson", "batch", "auto", "analytic"),
    ("sdekit, backend=torchdiffeq", "sdekit", "hutchinson", "batch", "torchdiffeq", "analytic"),
    ("classic, autograd oracle", "classic", "hutchinson", None, None, "autograd"),
    ("sdekit, autograd oracle", "sdekit", "hutchinson", "batch", "auto", "autograd"),
    ("sdekit log_likelihood", "sdekit", "exact", "batch", "auto", "analytic"),
    ("sdekit log_likelihood, norm=per-sample", "sdekit", "exact", "per-sample", "auto", "analytic"),
]


def run(quick: bool, repeats: int, threads: int | None):
    if threads:
        torch.set_num_threads(threads)
    sde = sdekit.VPSDE()
    t_eps, tol = 1e-5, 1e-5
    cases = [(64, 128), (2, 512)] if not quick else [(8, 16), (2, 32)]
    rows = []
    for d, B in cases:
        gm, x = make_problem(d, B, seed=d)
        scores = {"analytic": gm.exact_score(sde), "autograd": gm.exact_score(sde, analytic_vjp=False)}
        exact = gm.exact_log_prob(sde)(x.to(F64), t_eps)
        pT = gm.push(sde, sde.T)
        if not rows:  # warm-up, untimed: torch's first autograd.grad imports sympy (~1.5 s)
            for sc in scores.values():
                classic_likelihood(sde, sc, x[:4], pT.log_prob, t_eps=t_eps, rtol=1e-2, atol=1e-2)
                log_likelihood(sde, sc, x[:4], t_eps=t_eps, rtol=1e-2, atol=1e-2, prior=pT)
        acc = {v: {"walls": [], "nfes": [], "errs": [], "res": None} for v in _VARIANTS}
        # repeats interleaved across variants (ABAB...): slow drifts of the machine hit all alike
        for rep in range(repeats):
            for v in _VARIANTS:
                name, recipe, div, norm, backend, oracle = v
                gen = torch.Generator().manual_seed(100 + rep)  # a fresh probe per repeat, same for all
                score = scores[oracle]
                t0 = time.perf_counter()  # end to end: validation and preflight included
                if recipe == "classic":
                    logp, nfev, _ = classic_likelihood(sde, score, x, pT.log_prob, t_eps=t_eps, rtol=tol, atol=tol,
                                                       generator=gen)
                    res = {"logp": logp, "nfe": 2 * nfev, "backend": "scipy"}
                else:
                    r = log_likelihood(sde, score, x, t_eps=t_eps, rtol=tol, atol=tol, divergence=div, n_probes=1,
                                       generator=gen, prior=pT, exact_dim_limit=max(d, 16), norm=norm,
                                       backend=backend)
                    res = {"logp": r.log_prob, "nfe": r.stats.nfe, "z": r.z, "backend": r.stats.backend}
                a = acc[v]
                a["walls"].append(time.perf_counter() - t0)
                a["nfes"].append(res["nfe"])
                a["errs"].append(errors(res["logp"], exact, d))
                a["res"] = res
        for v in _VARIANTS:
            name, recipe, div, norm, backend, oracle = v
            a = acc[v]
            walls, errs = a["walls"], a["errs"]
            row = {"recipe": name, "d": d, "B": B, "divergence": div, "probes": 1 if div == "hutchinson" else 0,
                   "oracle_backward": oracle, "backend": a["res"]["backend"],
                   "nfe": int(statistics.median(a["nfes"])), "nfe_per_repeat": a["nfes"], "wall_s": min(walls),
                   "wall_s_median": statistics.median(walls), "wall_s_per_repeat": walls, "repeats": repeats,
                   # errors pooled over the repeats (fresh probes each): mean/rms over all samples, max over all
                   "err_mean": statistics.mean(e["err_mean"] for e in errs),
                   "err_rms": math.sqrt(statistics.mean(e["err_rms"] ** 2 for e in errs)),
                   "err_max": max(e["err_max"] for e in errs)}
            if "z" in a["res"] and div == "exact":  # what the default prior N(0, sigma_T^2) would add
                z = a["res"]["z"].to(F64)
                gap = ((sde.prior_log_prob(z) - pT.log_prob(z)) / d).abs()
                row["default_prior_bias_mean"] = float(gap.mean())
            # speed-up against the classic recipe on the same oracle: best against best, and the
            # median of the per-repeat ratios (each pair measured back to back)
            ref = acc[next(u for u in _VARIANTS if u[1] == "classic" and u[5] == oracle)]["walls"]
            row["speedup_vs_classic"] = min(ref) / min(walls)
            row["speedup_paired_median"] = statistics.median(c / w for c, w in zip(ref, walls))
            rows.append(row)
            print(f"  done: {name} d={d} B={B} {div}: {row['wall_s']:.3f}s nfe={row['nfe']} "
                  f"err={row['err_mean']:.3g} x{row['speedup_vs_classic']:.2f}", file=sys.stderr)

    lines = ["| recipe | oracle backward | d | B | divergence | NFE (score evals, median) | wall [s] (best) | "
             "speed-up (best / paired median) | err mean [nats/dim] | err rms | err max |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['oracle_backward']} | {r['d']} | {r['B']} | {r['divergence']}"
                     f"{' (1 Rademacher)' if r['divergence'] == 'hutchinson' else ''} | {r['nfe']} | "
                     f"{r['wall_s']:.3f} | {r['speedup_vs_classic']:.2f}x / {r['speedup_paired_median']:.2f}x | "
                     f"{r['err_mean']:.2e} | {r['err_rms']:.2e} | {r['err_max']:.2e} |")
    bias = [r for r in rows if "default_prior_bias_mean" in r]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads"
    print(f"\n### Likelihood on CPU ({machine}; VP SDE, exact mixture score, tol 1e-5, t_eps 1e-5, "
          f"{repeats} interleaved repeats, wall time end to end; errors pooled over the repeats, each with a "
          f"fresh probe)\n")
    print("\n".join(lines))
    for r in [r for r in bias if r["recipe"] == "sdekit log_likelihood"]:
        print(f"\nDefault prior N(0, sigma(T)^2 I) instead of the exact p_T would add a bias of "
              f"{r['default_prior_bias_mean']:.2e} nats/dim (mean |.|) at d = {r['d']} (same for both recipes).")
    return {"machine": machine, "quick": quick, "sde": repr(sde), "t_eps": t_eps, "tol": tol,
            "rows": rows, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}


_VE_VARIANTS = [
    # (label, recipe, norm, oracle backward)
    ("k-diffusion recipe (sigma-time dopri5, torchdiffeq)", "kdiff", None, "analytic"),
    ("sdekit log_likelihood (defaults)", "sdekit", "auto", "analytic"),
    ("sdekit log_likelihood, norm=batch", "sdekit", "batch", "analytic"),
    ("k-diffusion recipe, autograd oracle", "kdiff", None, "autograd"),
    ("sdekit, autograd oracle (defaults)", "sdekit", "auto", "autograd"),
]


def run_ve(quick: bool, repeats: int):
    """VE: ``log_likelihood`` against the k-diffusion recipe on the same interval (kernel std from
    k-diffusion's sigma_min = 0.01 to sigma(T)), the same exact prior p_T, tolerances and probe
    distribution (one Rademacher probe, fresh per repeat, the same for both recipes)."""
    sde = sdekit.VESDE(sigma_min=0.01, sigma_max=50.0)
    tol, sigma_lo = 1e-5, 0.01
    t_eps = float(sde.kernel.t_from_log_snr(torch.tensor(-2.0 * math.log(sigma_lo), dtype=F64)))
    sigma_hi = float(sde.kernel.sigma(torch.tensor(sde.T, dtype=F64)))
    cases = [(64, 128), (2, 512)] if not quick else [(2, 32)]
    rows = []
    for d, B in cases:
        gm, x = make_problem(d, B, seed=d)
        # torchdiffeq steps past the end time and interpolates back, so the k-diffusion recipe
        # evaluates the score a little beyond sigma(T) (a network takes any sigma). The oracle's
        # process is therefore the same VE kernel continued to T' = 1.5 (sigma_max' chosen so that
        # sigma(t) is the same function of t); both recipes get this one score.
        ext = sdekit.VESDE(sigma_min=sde.sigma_min, sigma_max=sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** 1.5,
                           T=1.5)
        scores = {"analytic": gm.exact_score(ext), "autograd": gm.exact_score(ext, analytic_vjp=False)}
        exact = gm.exact_log_prob(sde)(x.to(F64), t_eps)
        pT = gm.push(sde, sde.T)
        for sc in scores.values():  # warm-up, untimed
            kdiffusion_likelihood(sde, sc, x[:4], pT.log_prob, sigma_min=sigma_lo, sigma_max=sigma_hi, rtol=1e-2,
                                  atol=1e-2)
            log_likelihood(sde, sc, x[:4], t_eps=t_eps, rtol=1e-2, atol=1e-2, prior=pT)
        acc = {v: {"walls": [], "nfes": [], "errs": []} for v in _VE_VARIANTS}
        for rep in range(repeats):
            for v in _VE_VARIANTS:
                name, recipe, norm, oracle = v
                gen = torch.Generator().manual_seed(100 + rep)
                t0 = time.perf_counter()
                if recipe == "kdiff":
                    logp, nfe, _ = kdiffusion_likelihood(sde, scores[oracle], x, pT.log_prob, sigma_min=sigma_lo,
                                                         sigma_max=sigma_hi, rtol=tol, atol=tol, generator=gen)
                else:
                    r = log_likelihood(sde, scores[oracle], x, t_eps=t_eps, rtol=tol, atol=tol,
                                       divergence="hutchinson", n_probes=1, generator=gen, prior=pT, norm=norm)
                    logp = r.log_prob
                    nfe = r.stats.nfe if r.stats.sample_evals is None else r.stats.sample_evals / B
                acc[v]["walls"].append(time.perf_counter() - t0)
                acc[v]["nfes"].append(nfe)
                acc[v]["errs"].append(errors(logp, exact, d))
        for v in _VE_VARIANTS:
            name, recipe, norm, oracle = v
            a = acc[v]
            ref = acc[next(u for u in _VE_VARIANTS if u[1] == "kdiff" and u[3] == oracle)]["walls"]
            row = {"recipe": name, "d": d, "B": B, "oracle_backward": oracle, "norm": norm,
                   "nfe_per_sample": float(statistics.median(a["nfes"])), "wall_s": min(a["walls"]),
                   "wall_s_median": statistics.median(a["walls"]), "wall_s_per_repeat": a["walls"],
                   "err_mean": statistics.mean(e["err_mean"] for e in a["errs"]),
                   "err_max": max(e["err_max"] for e in a["errs"]),
                   "speedup_vs_kdiffusion": min(ref) / min(a["walls"]),
                   "speedup_paired_median": statistics.median(c / w for c, w in zip(ref, a["walls"]))}
            rows.append(row)
            print(f"  done: VE {name} d={d} B={B}: {row['wall_s']:.3f}s nfe={row['nfe_per_sample']:.1f} "
                  f"err={row['err_mean']:.3g} x{row['speedup_vs_kdiffusion']:.2f}", file=sys.stderr)
    lines = ["| recipe | oracle backward | d | B | NFE per sample (median) | wall [s] (best) | "
             "speed-up vs k-diffusion (best / paired median) | err mean [nats/dim] | err max |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['oracle_backward']} | {r['d']} | {r['B']} | {r['nfe_per_sample']:.1f} | "
                     f"{r['wall_s']:.3f} | {r['speedup_vs_kdiffusion']:.2f}x / {r['speedup_paired_median']:.2f}x | "
                     f"{r['err_mean']:.2e} | {r['err_max']:.2e} |")
    print(f"\n### VE likelihood vs the k-diffusion recipe ({sde!r}; kernel std {sigma_lo} -> {sigma_hi:.2f}, "
          f"t_eps = {t_eps:.4g}; tol {tol:g}; exact mixture score; one Rademacher probe; exact p_T prior; "
          f"{repeats} interleaved repeats, wall time end to end)\n")
    print("\n".join(lines))
    return {"sde": repr(sde), "t_eps": t_eps, "sigma_min": sigma_lo, "sigma_max": sigma_hi, "tol": tol,
            "rows": rows}


# ------------------------------------------------------------------------------------------------
# --sweep: speed at equal accuracy (VE, the k-diffusion recipe against log_likelihood)
# ------------------------------------------------------------------------------------------------
SWEEP_TOLS = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7)
SWEEP_TOLS_QUICK = (1e-3, 1e-4, 1e-5)
SWEEP_REF_TOL = 1e-11
SWEEP_TARGETS = (1e-3, 1e-4, 1e-5)
SWEEP_PROBE_SEED = 100
_SWEEP_RECIPES = [
    # (label, recipe, norm)
    ("k-diffusion recipe", "kdiff", None),
    ("sdekit (defaults)", "sdekit", "auto"),
    ("sdekit, norm=batch", "sdekit", "batch"),
]


class _ProbeRecorder:
    """Wraps ``sdekit.likelihood.ode.draw_probes`` for one call and keeps what it drew."""

    def __enter__(self):
        from sdekit.likelihood import ode as _ode
        self._mod, self._orig, self.probes = _ode, _ode.draw_probes, []

        def rec(*args, **kw):
            p = self._orig(*args, **kw)
            self.probes.append(p.detach().clone())
            return p

        _ode.draw_probes = rec
        return self

    def __exit__(self, *exc):
        self._mod.draw_probes = self._orig
        return False


def _sweep_solve(recipe, norm, sde, score, x, pT, *, t_eps, sigma_lo, sigma_hi, tol, probe, f64=False):
    """One solve of a sweep recipe; returns (log_prob (B,) float64, info dict). The k-diffusion
    recipe runs on the given ``probe`` (the one sdekit draws from the same seed), in the data's
    float32 as k-diffusion does; so does ``log_likelihood``, whose score runs in the data's dtype
    (``f64=True``: float64 data and probe for both, for the reference solves)."""
    B = x.shape[0]
    if recipe == "kdiff":
        xx = x.to(F64) if f64 else x
        logp, nfe, _ = kdiffusion_likelihood(sde, score, xx, pT.log_prob, sigma_min=sigma_lo, sigma_max=sigma_hi,
                                             rtol=tol, atol=tol, probe=probe.to(xx.dtype))
        return logp.to(F64), {"nfe": int(nfe), "nfe_per_sample_mean": float(nfe), "nfe_per_sample_max": float(nfe),
                              "sample_evals": int(nfe) * B, "backend": "torchdiffeq",
                              "dtype": str(xx.dtype).replace("torch.", "")}
    # log_likelihood evaluates the score in the data's dtype: float64 data for the reference solve
    r = log_likelihood(sde, score, x.to(F64) if f64 else x, t_eps=t_eps, rtol=tol, atol=tol, divergence="hutchinson",
                       n_probes=1,
                       generator=torch.Generator().manual_seed(SWEEP_PROBE_SEED), prior=pT, norm=norm)
    st = r.stats
    if st.nfe_per_sample is not None:
        nps = torch.as_tensor(st.nfe_per_sample, dtype=F64)
        mean_, max_, evals = float(nps.mean()), float(nps.max()), int(st.sample_evals)
    else:
        mean_, max_, evals = float(st.nfe), float(st.nfe), int(st.nfe) * B
    return r.log_prob.detach().to(F64), {"nfe": int(st.nfe), "nfe_per_sample_mean": mean_, "nfe_per_sample_max": max_,
                                         "sample_evals": evals, "backend": st.backend,
                                         "norm_resolved": st.extra.get("norm"), "dtype": "float64 (internal)"}


def _interp_at(points, E, key):
    """Wall time and NFE per sample at which the error ``key`` first reaches ``E``, by log-log
    interpolation between adjacent sweep points (ordered loose -> tight tolerance). Returns a dict
    (``status``: "interpolated" / "at_loosest" (the loosest tolerance already reaches E: an upper
    bound) / "not_reached")."""
    pts = [p for p in points if not p.get("failed") and p[key] is not None and math.isfinite(p[key])]
    pts.sort(key=lambda p: -p["tol"])
    i = next((k for k, p in enumerate(pts) if p[key] <= E), None)
    if i is None:
        return {"status": "not_reached", "wall_s": None, "nfe_per_sample": None, "tol": None,
                "recrosses": False}
    recross = any(p[key] > E for p in pts[i + 1:])  # a tighter tolerance is above E again
    if i == 0:
        p = pts[0]
        return {"status": "at_loosest", "wall_s": p["wall_s"], "nfe_per_sample": p["nfe_per_sample_mean"],
                "tol": p["tol"], "recrosses": recross}
    a, b = pts[i - 1], pts[i]
    la, lb, lE = math.log(a[key]), math.log(max(b[key], 1e-300)), math.log(E)
    w = (lE - la) / (lb - la)  # in [0, 1]: a[key] > E >= b[key]

    def li(u, v):
        return math.exp(math.log(u) + w * (math.log(v) - math.log(u)))

    return {"status": "interpolated", "wall_s": li(a["wall_s"], b["wall_s"]),
            "nfe_per_sample": li(a["nfe_per_sample_mean"], b["nfe_per_sample_mean"]), "tol": li(a["tol"], b["tol"]),
            "between_tols": [a["tol"], b["tol"]], "recrosses": recross}


def _non_monotone(points, key):
    """Tolerances at which the error ``key`` is LARGER than at the next looser tolerance."""
    pts = sorted((p for p in points if not p.get("failed")), key=lambda p: -p["tol"])
    return [b["tol"] for a, b in zip(pts, pts[1:]) if b[key] > a[key]]


def run_ve_sweep(quick: bool, repeats: int, tols=None, cases=None):
    """Tolerance sweep on the VE problem of `run_ve`: for each recipe and tolerance the NFE, wall time
    (best of interleaved repeats, end to end) and the per-sample SOLVER error against a
    rtol = atol = 1e-11 solve of the same recipe with the same probe; then the wall time each
    recipe needs for a given solver error (log-log interpolation) and the speed-ups there."""
    sde = sdekit.VESDE(sigma_min=0.01, sigma_max=50.0)
    sigma_lo = 0.01
    t_eps = float(sde.kernel.t_from_log_snr(torch.tensor(-2.0 * math.log(sigma_lo), dtype=F64)))
    sigma_hi = float(sde.kernel.sigma(torch.tensor(sde.T, dtype=F64)))
    tols = tuple(sorted(tols or (SWEEP_TOLS_QUICK if quick else SWEEP_TOLS), reverse=True))
    cases = cases or ([(64, 128), (2, 512)] if not quick else [(2, 32), (8, 16)])
    # the score past T for torchdiffeq's overshoot (see run_ve)
    ext = sdekit.VESDE(sigma_min=sde.sigma_min, sigma_max=sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** 1.5,
                       T=1.5)
    kw = dict(t_eps=t_eps, sigma_lo=sigma_lo, sigma_hi=sigma_hi)
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    cases_out, points = [], []
    for d, B in cases:
        gm, x = make_problem(d, B, seed=d)
        score = gm.exact_score(ext)
        exact = gm.exact_log_prob(sde)(x.to(F64), t_eps)
        pT = gm.push(sde, sde.T)
        for _label, recipe, norm in _SWEEP_RECIPES:  # warm-up, untimed
            _sweep_solve(recipe, norm, sde, score, x[:4], pT, tol=1e-2, probe=torch.ones(4, d), **kw)
        # the probe: sdekit draws it from Generator(seed); the k-diffusion recipe gets that very
        # tensor (and we check that its own draw from the same seed would be identical)
        with _ProbeRecorder() as pr:
            r = log_likelihood(sde, score, x, t_eps=t_eps, rtol=1e-2, atol=1e-2, divergence="hutchinson", n_probes=1,
                               generator=torch.Generator().manual_seed(SWEEP_PROBE_SEED), prior=pT)
        probe = pr.probes[0].reshape(B, d)
        kd_own = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(SWEEP_PROBE_SEED)).to(
            x.dtype) * 2 - 1  # what kdiffusion_likelihood(generator=Generator(seed)) draws
        probe_identical = bool(torch.equal(kd_own.to(probe.dtype), probe))
        # references: each recipe at rtol = atol = 1e-11, the same probe (the k-diffusion recipe in float64)
        refs, ref_info = {}, {}
        for label, recipe, norm in _SWEEP_RECIPES:
            t0 = time.perf_counter()
            with _ProbeRecorder() as pr:
                lp, info = _sweep_solve(recipe, norm, sde, score, x, pT, tol=SWEEP_REF_TOL, probe=probe, f64=True,
                                        **kw)
            if recipe == "sdekit":  # the probe of this solve is the one checked above
                assert torch.equal(pr.probes[0].reshape(B, d).to(F64), probe.to(F64)), "sdekit drew another probe"
            info["wall_s"] = time.perf_counter() - t0
            refs[label], ref_info[label] = lp, info
            print(f"  sweep ref: VE d={d} B={B} {label} tol={SWEEP_REF_TOL:g}: {info['wall_s']:.2f}s "
                  f"nfe/sample={info['nfe_per_sample_mean']:.1f}", file=sys.stderr)
        labels = [v[0] for v in _SWEEP_RECIPES]
        ref_spread = max(float(((refs[a] - refs[b]) / d).abs().max()) for a in labels for b in labels)
        ref_exact = {k: float(((v - exact) / d).abs().mean()) for k, v in refs.items()}
        # the timed sweep: repeats interleaved across tolerances and recipes
        acc = {(v[0], tol): {"walls": [], "res": None, "drift": 0.0} for v in _SWEEP_RECIPES for tol in tols}
        for rep in range(repeats):
            for tol in tols:
                for label, recipe, norm in _SWEEP_RECIPES:
                    a = acc[(label, tol)]
                    if isinstance(a["res"], dict):  # failed at an earlier repeat
                        continue
                    t0 = time.perf_counter()
                    try:
                        lp, info = _sweep_solve(recipe, norm, sde, score, x, pT, tol=tol, probe=probe, **kw)
                    except Exception as e:  # e.g. torchdiffeq's "underflow in dt" in float32 at tight tol
                        a["res"] = {"failed": f"{type(e).__name__}: {e}"[:300]}
                        continue
                    a["walls"].append(time.perf_counter() - t0)
                    if a["res"] is None:
                        a["res"] = (lp, info)
                    else:  # deterministic: the same probe and problem every repeat
                        a["drift"] = max(a["drift"], float((lp - a["res"][0]).abs().max()))
        case_points = []
        for tol in tols:
            for label, recipe, norm in _SWEEP_RECIPES:
                a = acc[(label, tol)]
                pt = {"d": d, "B": B, "recipe": label, "norm": norm, "tol": tol}
                if isinstance(a["res"], dict):
                    pt.update(failed=a["res"]["failed"], wall_s=None, solver_err_max=None, solver_err_mean=None)
                else:
                    lp, info = a["res"]
                    se = ((lp - refs[label]) / d).abs()
                    ee = ((lp - exact) / d).abs()
                    pt.update(info)
                    pt.update(wall_s=min(a["walls"]), wall_s_median=statistics.median(a["walls"]),
                              wall_s_per_repeat=a["walls"], repeats=len(a["walls"]),
                              solver_err_max=float(se.max()), solver_err_mean=float(se.mean()),
                              exact_err_max=float(ee.max()), exact_err_mean=float(ee.mean()),
                              repeat_max_abs_diff=a["drift"])
                case_points.append(pt)
                msg = (f"{pt['wall_s']:.3f}s nfe/sample={pt['nfe_per_sample_mean']:.1f} "
                       f"solver err max={pt['solver_err_max']:.2e}" if not pt.get("failed") else pt["failed"])
                print(f"  sweep: VE d={d} B={B} {label} tol={tol:g}: {msg}", file=sys.stderr)
        # equal accuracy
        eq, notes = [], []
        for key in ("solver_err_max", "solver_err_mean"):
            for label in labels:
                nm = _non_monotone([p for p in case_points if p["recipe"] == label], key)
                if nm:
                    notes.append(f"d={d}: {label}: {key} is non-monotone in tol (larger than at the next looser "
                                 f"tol at tol = {', '.join(f'{t:g}' for t in nm)}); interpolated on the first crossing")
            for E in SWEEP_TARGETS:
                row = {"d": d, "B": B, "metric": key, "target": E, "recipes": {}}
                for label in labels:
                    row["recipes"][label] = _interp_at([p for p in case_points if p["recipe"] == label], E, key)
                kd = row["recipes"][labels[0]]
                for label in labels[1:]:
                    sk = row["recipes"][label]
                    ok = kd["wall_s"] is not None and sk["wall_s"] is not None
                    row.setdefault("speedup_vs_kdiffusion", {})[label] = kd["wall_s"] / sk["wall_s"] if ok else None
                eq.append(row)
        cases_out.append({"d": d, "B": B, "probe_seed": SWEEP_PROBE_SEED, "probe_identical_to_kdiffusion_draw":
                          probe_identical, "references": ref_info, "reference_spread_max": ref_spread,
                          "reference_exact_err_mean": ref_exact, "equal_accuracy": eq, "notes": notes})
        points += case_points

    # ---- tables -----------------------------------------------------------------------------------
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads"
    print(f"\n### VE likelihood: tolerance sweep, the k-diffusion recipe vs `log_likelihood` ({machine}; {sde!r}; "
          f"kernel std {sigma_lo} -> {sigma_hi:.2f}; exact mixture score; one Rademacher probe (seed "
          f"{SWEEP_PROBE_SEED}, the same for all); exact p_T prior; rtol = atol = tol; {repeats} interleaved repeats, "
          f"wall time end to end, best of; solver error per sample against a rtol = atol = {SWEEP_REF_TOL:g} solve "
          f"of the same recipe with the same probe)\n")
    lines = ["| d | B | recipe | tol | NFE per sample (mean / max) | NFE (batched) | wall [s] (best) | "
             "solver err max [nats/dim] | solver err mean | err vs exact max | err vs exact mean |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        if p.get("failed"):
            lines.append(f"| {p['d']} | {p['B']} | {p['recipe']} | {p['tol']:g} | failed: {p['failed'][:60]} "
                         f"| | | | | | |")
            continue
        lines.append(f"| {p['d']} | {p['B']} | {p['recipe']} | {p['tol']:g} | {p['nfe_per_sample_mean']:.1f} / "
                     f"{p['nfe_per_sample_max']:.0f} | {p['nfe']} | {p['wall_s']:.4f} | {p['solver_err_max']:.2e} | "
                     f"{p['solver_err_mean']:.2e} | {p['exact_err_max']:.2e} | {p['exact_err_mean']:.2e} |")
    print("\n".join(lines))
    labels = [v[0] for v in _SWEEP_RECIPES]

    def cell(r):
        if r["status"] == "not_reached":
            return "not reached"
        s = ("≤ " if r["status"] == "at_loosest" else "") + f"{r['wall_s']:.4f} (NFE {r['nfe_per_sample']:.0f})"
        return s + (" †" if r["recrosses"] else "")

    print("\n### Equal accuracy: wall time [s] (NFE per sample) to reach a per-sample solver error E "
          "(log-log interpolation between adjacent tolerances; speed-up = k-diffusion recipe's wall / sdekit's)\n")
    lines = ["| d | B | error | E | " + " | ".join(labels) + " | " +
             " | ".join(f"speed-up {lb}" for lb in labels[1:]) + " |",
             "|---|---|---|---|" + "---|" * (2 * len(labels) - 1)]
    for c in cases_out:
        for row in c["equal_accuracy"]:
            sp = []
            for lb in labels[1:]:
                v = row["speedup_vs_kdiffusion"][lb]
                bound = any(row["recipes"][k]["status"] == "at_loosest" for k in (labels[0], lb))
                sp.append("—" if v is None else f"{v:.2f}x" + (" (bound)" if bound else ""))
            lines.append(f"| {row['d']} | {row['B']} | {'worst sample' if row['metric'] == 'solver_err_max' else 'mean'}"
                         f" | {row['target']:g} | " + " | ".join(cell(row["recipes"][lb]) for lb in labels) + " | " +
                         " | ".join(sp) + " |")
    print("\n".join(lines))
    print("\n≤: the loosest tolerance of the sweep already reaches E (its wall time is an upper bound; a speed-up "
          "involving it is marked (bound)). †: a tighter tolerance is above E again (non-monotone error).")
    for c in cases_out:
        print(f"\nd = {c['d']}, B = {c['B']}: probe identical to the k-diffusion recipe's own draw from the same seed: "
              f"{c['probe_identical_to_kdiffusion_draw']}; the three 1e-11 references agree to "
              f"{c['reference_spread_max']:.1e} nats/dim (worst sample).")
        for n in c["notes"]:
            print(f"  note: {n}")
    load1 = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"machine": machine, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "loadavg_start": load0, "loadavg_end": load1,
            "quick": quick, "repeats": repeats, "sde": repr(sde), "t_eps": t_eps, "sigma_min": sigma_lo,
            "sigma_max": sigma_hi, "tols": list(tols), "ref_tol": SWEEP_REF_TOL, "targets": list(SWEEP_TARGETS),
            "recipes": [{"label": a, "recipe": b, "norm": c} for a, b, c in _SWEEP_RECIPES],
            "cases": cases_out, "points": points, "runtime_s": time.perf_counter() - t_start}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny problems, one repeat (smoke test)")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats, interleaved across recipes (best and paired median are reported); default 7, quick 1")
    p.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/likelihood_cpu.json; "
                                               "none for --quick unless given)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--only", default="vp,ve", help="sections: vp (vs score_sde's recipe), ve (vs k-diffusion's)")
    p.add_argument("--sweep", action="store_true",
                   help="VE only: tolerance sweep of the k-diffusion recipe and log_likelihood, speed at equal solver "
                        "error (JSON default benchmarks/results/likelihood_cpu_ve_sweep.json)")
    p.add_argument("--tols", default=None, help="--sweep: comma-separated tolerances (default 1e-3 ... 1e-7; quick "
                                                "1e-3,1e-4,1e-5)")
    p.add_argument("--cases", default=None, help="--sweep: comma-separated dxB cases (default 64x128,2x512; quick "
                                                 "2x32,8x16)")
    a = p.parse_args(argv)
    repeats = a.repeats or (1 if a.quick else 7)
    if a.sweep:
        only = {x.strip() for x in a.only.split(",") if x.strip()}
        if "ve" not in only:
            p.error("--sweep runs section ve only")
        if a.threads:
            torch.set_num_threads(a.threads)
        tols = [float(t) for t in a.tols.split(",") if t.strip()] if a.tols else None
        cases = [tuple(int(v) for v in c.lower().split("x")) for c in a.cases.split(",") if c.strip()] \
            if a.cases else None
        payload = run_ve_sweep(a.quick, repeats, tols, cases)
        out = a.out
        if out is None and not a.quick:
            out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "likelihood_cpu_ve_sweep.json")
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w") as f:
                json.dump(payload, f, indent=2)
            print(f"\nwrote {out}")
        return
    out = a.out
    if out is None and not a.quick:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "likelihood_cpu.json")
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    if not only or only - {"vp", "ve"}:
        p.error(f"--only takes vp and/or ve, got {a.only!r}")
    payload = run(a.quick, repeats, a.threads) if "vp" in only else {}
    if "ve" in only:
        if a.threads:
            torch.set_num_threads(a.threads)
        payload["ve"] = run_ve(a.quick, repeats)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
