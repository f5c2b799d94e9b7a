"""Benchmark (exploration): which time variable the likelihood ODE's state should be integrated in.

Not a test. Prints one line per (process, size, state, time variable) with the NFE per sample
and the worst / mean per-sample SOLVER error in nats/dim (against a rtol = atol = 1e-11 solve of the
same problem with the SAME Hutchinson probe, so the probe's own variance cancels), for the shared
step (``norm="batch"``) and per-sample stepping (``"independent"``).

State: the raw ``x`` or the Gaussian-preconditioned ``u = (x - m mu)/nu`` (mu = 0, c^2 = 1) of
``sdekit.likelihood.ode._FlatLinearField``. Time variable tau: ``t``; ``sigma`` = sigma(t)/m(t)
(k-diffusion's sigma, exp(-lambda/2)); ``logsigma``; ``pow0.5`` = sqrt(sigma/m). The field in tau is
F(t(tau), y) dt/dtau with dt/dsigma = 2 sigma_k^2 / (sigma g^2) (from d lambda/dt = -g^2/sigma_k^2).
With ``--kdiff`` also the k-diffusion recipe of ``likelihood_cpu.py`` (VE, kernel std 0.01 -> sigma(T)).

    PYTHONPATH=. python benchmarks/likelihood_time_variable.py VE,VP [--kdiff]
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sdekit  # noqa: E402
from sdekit.likelihood import ode as L  # noqa: E402
from likelihood_cpu import kdiffusion_likelihood, make_problem  # noqa: E402

F64 = torch.float64

PROCESSES = {
    "VE": lambda: sdekit.VESDE(), "VP": lambda: sdekit.VPSDE(), "sub-VP": lambda: sdekit.SubVPSDE(),
    "cosine": lambda: sdekit.CosineVPSDE(),
}


def time_map(sde, kind):
    """(tau(t), t(tau), dt/dtau) for the time variable ``kind``."""
    k = sde.kernel

    def tau_sig(t):
        return torch.sqrt(k.sigma2(t)) / k.m(t)

    def t_of_sig(s):
        return k.t_from_log_snr(-2.0 * torch.log(s))

    def dtdsig(s):
        t = t_of_sig(s)
        return 2 * k.sigma2(t) / (s * k.g2(t))

    if kind == "t":
        return (lambda t: t), (lambda tau: tau), (lambda tau: torch.ones_like(tau))
    if kind == "sigma":
        return tau_sig, t_of_sig, dtdsig
    if kind == "logsigma":
        return (lambda t: torch.log(tau_sig(t))), (lambda v: t_of_sig(torch.exp(v))), \
            (lambda v: dtdsig(torch.exp(v)) * torch.exp(v))
    if kind == "pow0.5":
        return (lambda t: tau_sig(t).sqrt()), (lambda u: t_of_sig(u * u)), (lambda u: dtdsig(u * u) * 2 * u)
    raise KeyError(kind)


class _InTau:
    def __init__(self, field, t_of, dt):
        self.field, self.t_of, self.dt = field, t_of, dt

    def __call__(self, tau, y, index=None):
        t = self.t_of(tau)
        if tau.dim() == 1:
            return self.field(t, y, index) * self.dt(tau).unsqueeze(1)
        return self.field(t, y) * float(self.dt(tau))


def solve(sde, gm, x, kind, norm, tol, seed, pre, t_eps, mode, score):
    d, B = x.shape[1], x.shape[0]
    probes = (L.draw_probes(tuple(x.shape), 1, "rademacher", torch.Generator().manual_seed(seed), x.dtype, x.device)
              if mode == "hutchinson" else None)
    moments = (torch.zeros((), dtype=F64), torch.ones((), dtype=F64)) if pre else (None, None)
    f = L._FlatLinearField(sde, score, x, mode, probes, 1, *moments)
    tau_of, t_of, dt = time_map(sde, kind)
    t0, t1 = torch.tensor(t_eps, dtype=F64), torch.tensor(sde.T, dtype=F64)
    y0 = torch.cat([f.from_x(x.to(F64), t0), torch.zeros(B, 1, dtype=F64)], 1)
    y1, info = L.integrate_ode(_InTau(f, t_of, dt), y0, float(tau_of(t0)), float(tau_of(t1)), method="dopri5",
                               rtol=tol, atol=tol, norm=norm, backend="native", segments=(d,),
                               sample_index=norm == "independent")
    z = f.to_x(y1[:, :d], t1)
    lp = gm.push(sde, sde.T).log_prob(z) + y1[:, d] + (f.log_nu_sum(t1) - f.log_nu_sum(t0))
    return lp, (info["sample_evals"] / B if "sample_evals" in info else info["nfe"])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    names = argv[0].split(",") if argv and not argv[0].startswith("--") else list(PROCESSES)
    kdiff = "--kdiff" in argv
    cases = [(64, 128, "hutchinson", 1e-5), (2, 512, "hutchinson", 1e-5), (8, 64, "exact", 1e-6)]
    for name in names:
        sde = PROCESSES[name]()
        t_eps = 1e-5
        if name == "VE" and kdiff:  # k-diffusion's interval: kernel std 0.01
            t_eps = float(sde.kernel.t_from_log_snr(torch.tensor(-2.0 * math.log(0.01), dtype=F64)))
        for d, B, mode, tol in cases:
            gm, x = make_problem(d, B, seed=d)
            # the VE score a little past T (torchdiffeq interpolates back from beyond the end)
            sc_sde = (sdekit.VESDE(0.01, 0.01 * 5000 ** 1.5, T=1.5) if name == "VE" else sde)
            score = gm.exact_score(sc_sde)
            ref, _ = solve(sde, gm, x, "t", "independent", 1e-11, 100, False, t_eps, mode, score)
            if name == "VE" and kdiff and mode == "hutchinson":
                lp, nfe, _ = kdiffusion_likelihood(sde, score, x, gm.push(sde, sde.T).log_prob, sigma_min=0.01,
                                                   sigma_max=float(sde.kernel.sigma(torch.tensor(1.0, dtype=F64))),
                                                   generator=torch.Generator().manual_seed(100))
                e = ((lp - ref) / d).abs()
                print(f"{name:7s} d={d:2d} k-diffusion recipe        | nfe={nfe:6.1f} max={float(e.max()):.1e} "
                      f"mean={float(e.mean()):.1e}", flush=True)
            for pre, kind in [(False, "t"), (True, "t"), (False, "sigma"), (True, "sigma"), (True, "logsigma"),
                              (True, "pow0.5")]:
                out = []
                for norm in ["batch", "independent"]:
                    lp, nfe = solve(sde, gm, x, kind, norm, tol, 100, pre, t_eps, mode, score)
                    e = ((lp - ref) / d).abs()
                    out.append(f"{norm[:5]} nfe={nfe:6.1f} max={float(e.max()):.1e} mean={float(e.mean()):.1e}")
                print(f"{name:7s} d={d:2d} {mode[:5]} pre={int(pre)} {kind:8s} | " + " | ".join(out), flush=True)


if __name__ == "__main__":
    main()
