"""torchdiffeq / torchsde backends: accuracy, time range, NFE bookkeeping, norms, limits, refusals."""

import math

import pytest
import torch

import sdekit
from sdekit.solvers import SolverError, solve
from sdekit.solvers.backend_torchdiffeq import ADAPTIVE_METHODS, odeint_counted

F64 = torch.float64
T_EPS = 1e-3
S0 = 0.5  # data ~ N(0, S0^2 I)


# ---------------------------------------------------------------------------------------------
# helpers: VP with Gaussian data (closed forms)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vp():
    return sdekit.VPSDE()


def gauss_var(sde, t, s0=S0):
    """v(t) = m(t)^2 s0^2 + sigma(t)^2: the variance of p_t for data N(0, s0^2 I)."""
    m, s = sde.marginal(torch.as_tensor(t, dtype=F64))
    return m * m * s0 * s0 + s * s


class RecordingScore(torch.nn.Module):
    """Exact Gaussian score -x / v(t); records every time it is called with."""

    def __init__(self, sde, s0=S0):
        super().__init__()
        self.sde, self.s0 = sde, s0
        self.t_seen = []
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        t = t.detach()
        self.t_seen.append((float(t.min()), float(t.max())))
        v = gauss_var(self.sde, t[:1], self.s0)  # t is the same for every sample in these solves
        return -x / v.to(x.dtype)

    def t_range(self):
        return min(a for a, _ in self.t_seen), max(b for _, b in self.t_seen)


def flow_map(sde, x, t_from, t_to, s0=S0):
    """Exact PF-ODE flow of Gaussian data: x_s = x_t sqrt(v_s / v_t)."""
    return x * math.sqrt(float(gauss_var(sde, t_to, s0) / gauss_var(sde, t_from, s0)))


# ---------------------------------------------------------------------------------------------
# torchdiffeq: accuracy, time range, NFE
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tol", [1e-4, 1e-6])
@pytest.mark.parametrize("direction", ["T->eps", "eps->T"])
def test_dopri5_pf_ode_exact_flow_and_time_range(vp, tol, direction):
    score = RecordingScore(vp)
    ode = vp.probability_flow(score, t_eps=T_EPS)
    t0, t1 = (vp.T, T_EPS) if direction == "T->eps" else (T_EPS, vp.T)
    x = torch.randn(256, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    x = x * math.sqrt(float(gauss_var(vp, t0)))
    sol = solve(ode, x, t0, t1, method="torchdiffeq:dopri5", rtol=tol, atol=tol)
    exact = flow_map(vp, x, t0, t1)
    # mixed error measure |err| / (atol + rtol |exact|); dopri5's global error stays within 10x tol
    ratio = ((sol.x - exact).abs() / (tol * (1.0 + exact.abs()))).max().item()
    assert ratio <= 10.0, ratio
    lo, hi = score.t_range()
    assert T_EPS <= lo and hi <= vp.T, (lo, hi)  # plain torchdiffeq probes t = -29.9 / steps to 1.044 here
    st = sol.stats
    assert st.backend == "torchdiffeq" and st.nfe == score.calls
    assert st.steps == st.accepted + st.rejected
    assert st.nfe == 2 + 6 * st.steps  # f0 + initial-step probe, then 6 new stages per attempt (FSAL)


def test_nfe_formula_all_adaptive_methods_and_rejections(vp):
    x = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    total_rejected = 0
    for name, stages in ADAPTIVE_METHODS.items():
        if f"torchdiffeq:{name}" not in sdekit.solvers.METHODS:
            continue
        score = RecordingScore(vp)
        ode = vp.probability_flow(score, t_eps=T_EPS)
        sol = solve(ode, x, method=f"torchdiffeq:{name}", rtol=1e-4, atol=1e-4)
        st = sol.stats
        assert st.nfe == score.calls == 2 + stages * (st.accepted + st.rejected), (name, st)
        total_rejected += st.rejected
    assert total_rejected > 0  # the formula is exercised with rejected steps too
    # an explicit first step removes the probe: 1 + 6 * steps
    score = RecordingScore(vp)
    sol = solve(vp.probability_flow(score, t_eps=T_EPS), x, method="torchdiffeq:dopri5", rtol=1e-5, atol=1e-5,
                first_step=0.01)
    assert sol.stats.nfe == score.calls == 1 + 6 * sol.stats.steps


def test_round_trip_and_save_at(vp):
    score = RecordingScore(vp)
    ode = vp.probability_flow(score, t_eps=T_EPS)
    x0 = torch.randn(128, 3, dtype=F64, generator=torch.Generator().manual_seed(2)) * S0
    fwd = solve(ode, x0, T_EPS, vp.T, method="torchdiffeq:dopri5", rtol=1e-8, atol=1e-8, save_at=[0.5, 0.25])
    back = solve(ode, fwd.x, vp.T, T_EPS, method="torchdiffeq:dopri5", rtol=1e-8, atol=1e-8)
    assert (back.x - x0).abs().max().item() < 1e-6
    assert fwd.xs.shape == (2, 128, 3) and fwd.ts.tolist() == [0.5, 0.25]  # order as given
    for j, t in enumerate([0.5, 0.25]):
        assert torch.allclose(fwd.xs[j], flow_map(vp, x0, T_EPS, t), atol=1e-6)
    lo, hi = score.t_range()
    assert T_EPS <= lo and hi <= vp.T


def test_float32_state_times_stay_in_range(vp):
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    seen = []

    def func(t, y):
        assert t.dtype == F64 and t.dim() == 0
        seen.append(float(t))
        v = gauss_var(vp, t)
        return (vp.f(t) + 0.5 * vp.g2(t) / v).to(y.dtype) * y

    for a, b in ((vp.T, T_EPS), (T_EPS, vp.T)):
        seen.clear()
        y, _, info = odeint_counted(func, x, a, b, method="dopri5", rtol=1e-5, atol=1e-5)
        assert y.dtype == torch.float32
        assert T_EPS <= min(seen) and max(seen) <= vp.T
        assert info["max_time_clamp"] <= 1e-6 and info["nfe"] == len(seen) == 2 + 6 * info["steps"]


# ---------------------------------------------------------------------------------------------
# per-sample norm
# ---------------------------------------------------------------------------------------------
def mixture_score(sde, means, var):
    """Exact score of p_t for data sum_k w_k N(mu_k, var I) (equal weights) under a linear SDE."""
    mu = torch.as_tensor(means, dtype=F64)

    def score(x, t):
        m, s = sde.marginal(t[:1].to(F64))
        v = m * m * var + s * s
        diff = x.unsqueeze(1) - m * mu  # (B, K, d)
        logit = -(diff ** 2).sum(-1) / (2 * v)  # equal weights and variances
        r = (logit - logit.logsumexp(1, keepdim=True)).exp()
        return -(r.unsqueeze(-1) * diff).sum(1) / v

    return score


def test_per_sample_norm_bounds_the_worst_sample(vp):
    # two narrow modes: samples near the decision boundary are much harder than the rest
    ode = vp.probability_flow(mixture_score(vp, [[-2.0, 0.0], [2.0, 0.0]], 0.05), t_eps=T_EPS)
    x = torch.randn(512, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    ref, _, _ = odeint_counted(ode, x, vp.T, T_EPS, method="dopri5", rtol=1e-9, atol=1e-9, norm="per-sample")
    tol = 1e-5
    worst = {}
    for norm in ("batch", "per-sample"):
        sol = solve(ode, x, method="torchdiffeq:dopri5", rtol=tol, atol=tol, norm=norm)
        worst[norm] = (sol.x - ref).norm(dim=1).max().item()
    # measured: batch 4.1e-4 (the shared RMS lets a hard sample's error grow with the batch), per-sample 1.5e-5
    assert worst["per-sample"] <= 10 * tol, worst
    assert worst["batch"] > 10 * tol and worst["batch"] > 5 * worst["per-sample"], worst


def test_tuple_state_per_sample_norm_and_tuple_save_at():
    # (y, z) with y' = -y, z' = y: z(t) = z0 + y0 (1 - e^{-t})
    def func(t, s):
        y, z = s
        return -y, y.sum(1)

    y0 = torch.randn(8, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    z0 = torch.zeros(8, dtype=F64)
    (y, z), ys, info = odeint_counted(func, (y0, z0), 0.0, 1.0, method="dopri5", rtol=1e-9, atol=1e-9,
                                      norm="per-sample", save_at=[0.5])
    e = math.exp(-1.0)
    assert torch.allclose(y, y0 * e, atol=1e-8) and torch.allclose(z, y0.sum(1) * (1 - e), atol=1e-8)
    assert ys[0].shape == (1, 8, 3) and ys[1].shape == (1, 8)
    assert info["nfe"] == 2 + 6 * info["steps"]


# ---------------------------------------------------------------------------------------------
# limits and failures
# ---------------------------------------------------------------------------------------------
def test_max_steps_and_min_step_raise_with_stats(vp):
    score = RecordingScore(vp)
    ode = vp.probability_flow(score, t_eps=T_EPS)
    x = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    with pytest.raises(SolverError, match="max_steps=3") as ei:
        solve(ode, x, method="torchdiffeq:dopri5", rtol=1e-10, atol=1e-10, max_steps=3)
    e = ei.value
    assert e.stats is not None and e.stats.steps == 3 and e.stats.nfe == score.calls == 2 + 6 * 3
    assert e.step == 3 and T_EPS <= e.t <= vp.T
    with pytest.raises(SolverError, match="min_step") as ei:
        solve(ode, x, method="torchdiffeq:dopri5", rtol=1e-10, atol=1e-10, min_step=0.05)
    assert ei.value.stats.nfe > 0 and ei.value.t is not None


def test_non_finite_vector_field_raises(vp):
    def bad(x, t):
        return torch.full_like(x, float("nan")) if float(t[0]) < 0.5 else -x

    ode = vp.probability_flow(bad, t_eps=T_EPS)
    with pytest.raises(SolverError, match="non-finite|collapsed"):
        solve(ode, torch.ones(4, 2, dtype=F64), method="torchdiffeq:dopri5", rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise_value_error(vp):
    ode = vp.probability_flow(RecordingScore(vp), t_eps=T_EPS)
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="step_t"):
        odeint_counted(ode, x, 1.0, 0.5, method="dopri5", rtol=1e-3, atol=1e-3, options={"step_t": [0.7]})
    with pytest.raises(ValueError, match="seminorm"):
        odeint_counted(ode, x, 1.0, 0.5, method="dopri5", rtol=1e-3, atol=1e-3, norm="seminorm")
    with pytest.raises(ValueError, match="step_size or grid"):
        odeint_counted(ode, x, 1.0, 0.5, method="rk4")
    with pytest.raises(ValueError, match="rtol"):
        odeint_counted(ode, x, 1.0, 0.5, method="dopri5", atol=1e-3)


# ---------------------------------------------------------------------------------------------
# adjoint and fixed-grid torchdiffeq methods
# ---------------------------------------------------------------------------------------------
class ParamScore(RecordingScore):
    def __init__(self, sde):
        super().__init__(sde)
        self.log_s0 = torch.nn.Parameter(torch.tensor(math.log(S0), dtype=F64))

    def forward(self, x, t):
        self.calls += 1
        t = t.detach()
        self.t_seen.append((float(t.min()), float(t.max())))
        m, s = self.sde.marginal(t[:1].to(F64))
        return -x / (m * m * torch.exp(2 * self.log_s0) + s * s)


@pytest.mark.parametrize("norm", ["batch", "seminorm"])
def test_adjoint_gradient_matches_backprop_and_stays_in_range(vp, norm):
    x = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    grads = []
    for adjoint in (False, True):
        sc = ParamScore(vp)
        ode = vp.probability_flow(sc, t_eps=T_EPS)
        ode.check_inputs = False
        y, ys, info = odeint_counted(ode, x, vp.T, T_EPS, method="dopri5", rtol=1e-8, atol=1e-8, adjoint=adjoint,
                                     norm=norm if adjoint else "batch", save_at=[0.5, 0.1])
        (y.pow(2).sum() + ys.pow(2).sum()).backward()
        grads.append(sc.log_s0.grad.item())
        lo, hi = sc.t_range()
        assert T_EPS <= lo and hi <= vp.T, (adjoint, lo, hi)
        if adjoint:
            adj = info["adjoint"]
            assert adj["nfe"] > 0 and adj["steps"] == adj["accepted"] + adj["rejected"]
            assert adj["max_time_clamp"] <= 1e-12  # backward pass: step_t/first_step keep it inside
    assert grads[1] == pytest.approx(grads[0], rel=1e-5)


@pytest.mark.parametrize("name,evals", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_fixed_grid_methods_step_on_the_solve_grid(vp, name, evals):
    score = RecordingScore(vp)
    ode = vp.probability_flow(score, t_eps=T_EPS)
    x = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(7))
    grid = torch.linspace(vp.T, T_EPS, 41, dtype=F64)
    sol = solve(ode, x, method=f"torchdiffeq:{name}", grid=grid, save_at=[float(grid[20])])
    assert sol.stats.nfe == score.calls == evals * 40 and sol.stats.steps == 40
    # every evaluation at a grid point or a stage inside a grid interval; never outside
    lo, hi = score.t_range()
    assert T_EPS <= lo and hi <= vp.T
    if name == "euler":  # euler evaluates exactly at the left grid points
        assert sorted({round(a, 12) for a, _ in score.t_seen}) == sorted({round(t, 12) for t in grid[:-1].tolist()})
    native = {"euler": "euler", "rk4": None, "midpoint": None}[name]
    if native is not None:
        ref = solve(vp.probability_flow(RecordingScore(vp), t_eps=T_EPS), x, method=native, grid=grid)
        assert torch.allclose(sol.x, ref.x, atol=1e-12)
    exact = flow_map(vp, x, vp.T, T_EPS)
    assert (sol.x - exact).abs().max().item() < {"euler": 5e-2, "midpoint": 2e-3, "rk4": 1e-5}[name]
    assert torch.allclose(sol.xs[0], flow_map(vp, x, vp.T, float(grid[20])), atol=5e-2)


# ---------------------------------------------------------------------------------------------
# torchsde
# ---------------------------------------------------------------------------------------------
def _em_chain_variance(sde, t0, t1, n, v0=1.0, s0=S0):
    """Exact variance of the Euler–Maruyama chain of the reverse VP SDE with the exact score
    (linear Gaussian recursion: y' = y - h (f + g^2 / v) y + g sqrt(h) xi, evaluated at left points)."""
    h = (t0 - t1) / n
    ts = t0 - h * torch.arange(n, dtype=F64)
    a = 1.0 - h * (sde.f(ts) + sde.g2(ts) / gauss_var(sde, ts, s0))
    V = v0
    for k in range(n):
        V = float(a[k] ** 2 * V + sde.g2(ts[k]) * h)
    return V


@pytest.mark.parametrize("shape", [(4000, 2), (500, 2, 2, 2)])
def test_torchsde_euler_reverse_vp_variance(vp, shape):
    """Sample variance vs the exact variance of the discrete chain (so no bias allowance is needed).
    sum x^2 / V ~ chi^2_N; |S/N - 1| <= 4 sqrt(2/N): two-sided false-alarm rate 6e-5 (fixed seed)."""
    score = RecordingScore(vp)
    rsde = vp.reverse(score, t_eps=T_EPS)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=F64, generator=g)  # VP prior N(0, I)
    n = 200
    sol = solve(rsde, x, method="torchsde:euler", steps=n, generator=g)
    assert sol.x.shape == shape
    V = _em_chain_variance(vp, vp.T, T_EPS, n)
    assert abs(V / float(gauss_var(vp, T_EPS)) - 1.0) < 0.01  # the chain is close to p_{t_eps} too
    N = sol.x.numel()
    stat = float((sol.x ** 2).sum()) / V / N
    assert abs(stat - 1.0) <= 4.0 * math.sqrt(2.0 / N), stat
    st = sol.stats
    assert st.backend == "torchsde" and st.steps == st.accepted == n and st.nfe == n  # validation call excluded
    assert score.calls == n + 1  # ... which torchsde's shape check made once
    lo, hi = score.t_range()
    assert T_EPS <= lo and hi <= vp.T
    # same seed, same result
    g2 = torch.Generator().manual_seed(0)
    x2 = torch.randn(shape, dtype=F64, generator=g2)
    again = solve(rsde, x2, method="torchsde:euler", steps=n, generator=g2)
    assert torch.equal(again.x, sol.x)


def test_torchsde_strong_order_ou_shared_brownian_path():
    torchsde = pytest.importorskip("torchsde")
    theta, sig, T = 2.0, 1.0, 1.0
    ou = sdekit.OrnsteinUhlenbeck(theta=theta, sigma=sig, T=T)
    B, D = 500, 2
    x0 = torch.randn(B, D, dtype=F64, generator=torch.Generator().manual_seed(0))
    bm = torchsde.BrownianInterval(t0=0.0, t1=T, size=(B, D), dtype=F64, entropy=1234,
                                   levy_area_approximation="space-time")
    # exact OU solution on the same path up to O(theta^2 h^2): x <- e^{-theta h} x + sig (dW - theta U),
    # U = int (W_u - W_t) du = int (t + h - u) dW_u (the space-time Levy area term of the path)
    nf = 512
    hf = T / nf
    ref = x0.clone()
    for k in range(nf):
        dW, U = bm(k * hf, (k + 1) * hf, return_U=True)
        ref = math.exp(-theta * hf) * ref + sig * (dW - theta * U)
    orders = {}
    for method in ("srk", "euler"):
        errs = []
        for n in (4, 8, 16, 32):
            sol = solve(ou, x0, 0.0, T, method=f"torchsde:{method}", steps=n, bm=bm)
            errs.append((sol.x - ref).norm(dim=1).mean().item())
        assert all(a > b for a, b in zip(errs, errs[1:])), (method, errs)
        orders[method] = math.log2(errs[0] / errs[-1]) / 3
    # measured: srk 2.06 (additive noise, with Levy area), euler 1.08 (additive noise)
    assert orders["srk"] >= 0.9 and orders["euler"] >= 0.9, orders
    assert orders["srk"] > orders["euler"] + 0.5, orders


def test_torchsde_adaptive_counts_and_save_at(vp):
    rsde = vp.reverse(RecordingScore(vp), t_eps=T_EPS)
    x = torch.randn(256, 2, dtype=F64, generator=torch.Generator().manual_seed(8))
    sol = solve(rsde, x, method="torchsde:euler", dt=0.05, adaptive=True, rtol=1e-2, atol=1e-2,
                generator=torch.Generator().manual_seed(1), save_at=[0.5, 0.1])
    st = sol.stats
    assert st.steps == st.accepted + st.rejected and st.accepted > 0
    assert st.nfe == 3 * st.steps  # step doubling: a full step and two half steps per attempt
    assert sol.xs.shape == (2, 256, 2)
    with pytest.raises(SolverError, match="max_steps"):
        solve(rsde, x, method="torchsde:euler", dt=0.05, adaptive=True, rtol=1e-4, atol=1e-4, max_steps=5,
              generator=torch.Generator().manual_seed(1))


def test_torchsde_refusals(vp):
    rsde = vp.reverse(RecordingScore(vp), t_eps=T_EPS)
    x = torch.randn(8, 2, dtype=F64)
    diag = sdekit.SDE(lambda x, t: -x, lambda x, t: 0.5 * torch.sqrt(1 + x ** 2), noise="diagonal")
    with pytest.raises(ValueError, match="Stratonovich"):
        solve(diag, x, method="torchsde:heun", steps=10)
    with pytest.raises(ValueError, match="unstable on reverse-time"):
        solve(rsde, x, method="torchsde:reversible_heun", steps=10)
    with pytest.raises(ValueError, match="needs dt"):
        solve(rsde, x, method="torchsde:euler")
    with pytest.raises(ValueError, match="only with adaptive=True"):
        solve(rsde, x, method="torchsde:euler", steps=10, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="one torch.Generator"):
        solve(rsde, x, method="torchsde:euler", steps=10, generator=[torch.Generator() for _ in range(8)])
    with pytest.raises(ValueError, match="bm="):
        solve(rsde, x, method="torchsde:euler", steps=10, brownian=sdekit.solvers.BrownianPath((8, 2), 0, 1, 10))
    # allowed where Ito = Stratonovich (isotropic noise), and reversible_heun with force=True
    assert solve(rsde, x, method="torchsde:heun", steps=10).stats.nfe == 20
    assert solve(rsde, x, method="torchsde:reversible_heun", steps=10, force=True).stats.nfe == 11
    assert solve(diag, x, method="torchsde:milstein", steps=10).stats.nfe == 10


def test_no_other_module_imports_the_backends():
    import pathlib
    import re

    root = pathlib.Path(sdekit.__file__).parent
    allowed = {root / "solvers" / "backend_torchdiffeq.py", root / "solvers" / "backend_torchsde.py"}
    offenders = [str(p.relative_to(root.parent)) for p in sorted(root.rglob("*.py")) if p not in allowed and
                 re.search(r"^\s*(import|from)\s+(torchdiffeq|torchsde)\b", p.read_text(), re.M)]
    assert not offenders, (f"project rule: only sdekit/solvers/backend_torch{{diffeq,sde}}.py import torchdiffeq/"
                           f"torchsde (use solve(method='torchdiffeq:...') or backend_torchdiffeq.odeint_counted); "
                           f"offenders: {offenders}")
