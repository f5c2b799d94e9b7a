"""Fast paths must compute what the plain formulas compute: the lean Euler–Maruyama loop on a
linear reverse SDE (deferred non-finite check that still names the first bad step) and the
likelihood's precomputed augmented field / preconditioned state."""

from __future__ import annotations

import math

import pytest
import torch

import sdekit
from sdekit.solvers import SolverError
from sdekit.solvers.grids import make_grid

F64 = torch.float64


def _hand_em(sde, score, x0, ts, gen):
    """Euler–Maruyama on the reverse SDE (eta = 1) written from the formulas: the reference."""
    x = x0.clone()
    t64 = torch.tensor(ts, dtype=F64)
    f, g2 = sde.kernel.f(t64).tolist(), sde.kernel.g2(t64).tolist()
    for i in range(len(ts) - 1):
        h = ts[i + 1] - ts[i]
        tv = torch.full((x.shape[0],), ts[i], dtype=x.dtype)
        x = x + h * (f[i] * x - g2[i] * score(x, tv)) + math.sqrt(g2[i] * abs(h)) * torch.randn(
            x.shape, generator=gen, dtype=x.dtype)
    return x


@pytest.mark.parametrize("sde", [sdekit.VPSDE(), sdekit.VESDE()], ids=["vp", "ve"])
def test_lean_euler_maruyama_matches_the_formula(sde):
    score = lambda x, t: -x / (1.0 + t.reshape(-1, 1))  # noqa: E731  (depends on t: catches a wrong time)
    x0 = torch.randn(64, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    sol = sdekit.solve(sde.reverse(score), x0, method="euler_maruyama", steps=40,
                       generator=torch.Generator().manual_seed(1))
    ts = make_grid("uniform", sde.T, sdekit.SAMPLING_T_EPS, 40).tolist()
    ref = _hand_em(sde, score, x0, ts, torch.Generator().manual_seed(1))
    assert sol.stats.nfe == 40 and sol.stats.steps == 40
    assert torch.allclose(sol.x, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t_bad", [0.5, 0.8123, 0.03])  # inside a check block, early, the last step
def test_lean_euler_maruyama_names_the_first_bad_step(t_bad):
    calls = []

    def score(x, t):
        calls.append(float(t[0]))
        return -x * float("nan") if float(t[0]) < t_bad else -x

    sde = sdekit.VPSDE()
    steps = 50
    ts = make_grid("uniform", sde.T, sdekit.SAMPLING_T_EPS, steps).tolist()
    first = next(i for i in range(steps) if ts[i] < t_bad)  # the first step whose score is NaN
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(SolverError, match="non-finite") as e:
        sdekit.solve(sde.reverse(score), x0, method="euler_maruyama", steps=steps,
                     generator=torch.Generator().manual_seed(2))
    err = e.value
    assert err.step == first and err.t == ts[first + 1]
    assert err.stats.steps == first + 1 and err.stats.nfe == len(calls)
