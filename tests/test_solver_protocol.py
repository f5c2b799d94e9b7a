"""The solver plan and method protocol (issue 8): every registered method declares what it solves,
how it steps, its orders, cost, randomness, default grid and typed options, and the declarations
are true (checked by running each method); unknown options name the method and list the valid
ones; the forward-SDE drift calls are counted; ddim and dpm_solver_1 are the same update; the
method table is data; the likelihood reaches the integrators only through ``integrate_ode``."""

import math
import pathlib
import re

import pytest
import torch

import sdekit
from sdekit.solvers import (GRID_KINDS, METHODS, MethodRow, MethodTable, Plan, integrate_ode, make_plan,
                            method_table, solve)
from sdekit.solvers.registry import PROBLEM_KINDS, STEPPING_MODES

F64 = torch.float64
T_EPS = 1e-3
S0 = 0.5  # data N(0, S0^2 I): exact score under VP


def gauss_score(sde):
    def score(x, t):
        m, s = sde.marginal(t)
        return -x / (m ** 2 * S0 ** 2 + s ** 2).reshape(-1, *([1] * (x.dim() - 1)))
    return score


@pytest.fixture(scope="module")
def vp():
    return sdekit.VPSDE()


def _problem_for(info, vp):
    """A small problem the method accepts, and its end times."""
    score = gauss_score(vp)
    if info.problem == "ode":
        return vp.probability_flow(score, t_eps=T_EPS), None, None
    if info.problem == "sde":
        return vp.reverse(score, t_eps=T_EPS), None, None
    if info.fixed_level:
        return vp.reverse(score, t_eps=T_EPS), 0.5, 0.5
    return vp.reverse(score, t_eps=T_EPS), None, None


def _run(name, vp, seed, **kw):
    info = METHODS[name]
    problem, t0, t1 = _problem_for(info, vp)
    x = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    kw = dict(rtol=1e-3, atol=1e-3, **kw) if info.stepping == ("adaptive",) else dict(steps=4, **kw)
    if name == "annealed_langevin":
        kw["n_inner"] = 2
    if name == "torchsde:reversible_heun":
        kw["force"] = True  # refused on reverse-time SDEs otherwise (unstable near t_eps)
    return solve(problem, x, t0, t1, method=name, generator=torch.Generator().manual_seed(seed), **kw)


# ----------------------------------------------------------------------------------------------
# declarations
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_declares_the_protocol(name):
    info = METHODS[name]
    assert info.problem in PROBLEM_KINDS
    assert isinstance(info.noise, tuple) and (info.noise == ()) == (info.problem == "ode")
    assert isinstance(info.strong_order, float) and info.strong_order >= 0
    assert info.weak_order is None or isinstance(info.weak_order, float)
    assert (info.weak_order is None) == (info.problem == "ode" or info.fixed_level or name == "annealed_langevin")
    assert isinstance(info.evals_per_step, int) and info.evals_per_step >= 1
    assert info.stepping and set(info.stepping) <= set(STEPPING_MODES)
    assert (info.default_grid is None) == (info.stepping == ("adaptive",))
    assert info.default_grid is None or info.default_grid in GRID_KINDS
    assert isinstance(info.stochastic, bool) and callable(info.run)
    assert (info.body is not None) == ("grid" in info.stepping)
    assert info.backend in ("native", "torchdiffeq", "torchsde")
    for opt in info.options:  # every default passes its own declaration
        assert opt.validate(opt.default, name) == opt.default


@pytest.mark.parametrize("name", sorted(METHODS))
def test_declarations_are_true(name, vp):
    """NFE per step (fixed steps) and stochasticity, observed by running the method."""
    info = METHODS[name]
    a, b = _run(name, vp, seed=1), _run(name, vp, seed=2)
    st = a.stats
    if "adaptive" not in info.stepping or info.fixed_step:
        per_level = 2 if name == "annealed_langevin" else info.evals_per_step  # n_inner=2 in _run
        levels = 5 if name == "annealed_langevin" else 4
        start = 1 if name == "torchsde:reversible_heun" else 0  # one drift call to start its extrapolation
        assert st.nfe == per_level * levels + start and st.steps == 4, (name, st)
    else:
        assert st.nfe == 2 + info.evals_per_step * st.steps, (name, st)
    assert (not torch.equal(a.x, b.x)) == info.is_stochastic(info.validate_options({})), name


@pytest.mark.parametrize("name,opts", [("ddim", {"eta": 0.5}), ("heun", {"churn": 5.0}),
                                       ("dpmpp_2m_sde", {"eta": 0.0})])
def test_stochasticity_follows_the_declared_option(name, opts, vp):
    info = METHODS[name]
    a, b = _run(name, vp, seed=1, **opts), _run(name, vp, seed=2, **opts)
    assert (not torch.equal(a.x, b.x)) == info.is_stochastic(info.validate_options(opts))
    assert info.is_stochastic(info.validate_options(opts)) == (float(opts[info.stochastic_option]) > 0)


def test_ddim_with_noise_refuses_to_encode_but_deterministic_ddim_may(vp):
    pf = vp.probability_flow(gauss_score(vp), t_eps=T_EPS)
    x = torch.randn(4, 2, dtype=F64)
    assert solve(pf, x, T_EPS, 1.0, method="ddim", steps=4).stats.nfe == 4
    with pytest.raises(ValueError, match="high to low noise.*eta=0"):
        solve(pf, x, T_EPS, 1.0, method="ddim", steps=4, eta=0.3)


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,valid", [("euler", "none"), ("ddim", "eta"), ("dopri5", "dfactor, first_step"),
                                        ("torchsde:euler", "adaptive, bm, force"),
                                        ("torchdiffeq:dopri5", "adjoint, adjoint_params")])
def test_unknown_option_names_method_option_and_valid_ones(name, valid, vp):
    info = METHODS[name]
    problem, t0, t1 = _problem_for(info, vp)
    x = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(ValueError) as e:
        solve(problem, x, t0, t1, method=name, steps=3, foo=1)
    msg = str(e.value)
    assert f"method {name!r}" in msg and "'foo'" in msg and valid in msg, msg
    assert "unexpected keyword" not in msg


def test_option_types_and_values_are_checked_before_any_work(vp):
    calls = []

    def score(x, t):
        calls.append(1)
        return -x

    pf = vp.probability_flow(score, t_eps=T_EPS)
    x = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(TypeError, match=r"option 'eta' of method 'ddim' must be a real number.*str"):
        solve(pf, x, method="ddim", steps=3, eta="0.5")
    with pytest.raises(TypeError, match=r"option 'n_corrector' of method 'pc' must be an integer"):
        solve(vp.reverse(score), x, method="pc", steps=3, n_corrector=1.5)
    with pytest.raises(ValueError, match=r"eta must be a finite number >= 0.*option 'eta' of method 'ddim'"):
        solve(pf, x, method="ddim", steps=3, eta=-1.0)
    with pytest.raises(ValueError, match=r"snr_norm must be one of"):
        solve(vp.reverse(score), x, method="pc", steps=3, snr_norm="global")
    assert not calls


def test_defaults_come_from_the_method_bodies():
    import inspect

    for info in METHODS.values():
        if info.body is None:
            continue
        params = list(inspect.signature(info.body).parameters.values())[2:]
        assert [(p.name, p.default) for p in params] == [(o.name, o.default) for o in info.options], info.name


# ----------------------------------------------------------------------------------------------
# NFE of a forward SDE (a mutant that dropped the count survived the old suite)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,per_step", [("euler_maruyama", 1), ("stochastic_heun", 2), ("torchsde:euler", 1),
                                             ("torchsde:srk", 10)])
def test_forward_linear_sde_counts_drift_calls(method, per_step):
    sde = sdekit.VPSDE()  # linear: the native methods take the fast coefficient path
    x = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    sol = solve(sde, x, method=method, steps=10, generator=torch.Generator().manual_seed(1))
    assert sol.stats.nfe == per_step * 10 and sol.stats.steps == 10


def test_forward_general_sde_counts_drift_calls_at_the_drift():
    calls = []

    def drift(x, t):
        calls.append(1)
        return -x

    sde = sdekit.SDE(drift, lambda x, t: torch.ones(x.shape[0], dtype=x.dtype), noise="isotropic")
    x = torch.zeros(4, 2, dtype=F64)
    for method, per_step in (("euler_maruyama", 1), ("stochastic_heun", 2)):
        calls.clear()
        sol = solve(sde, x, 0.0, 1.0, method=method, steps=10, generator=torch.Generator().manual_seed(0))
        assert sol.stats.nfe == len(calls) == 10 * per_step


# ----------------------------------------------------------------------------------------------
# ddim and dpm_solver_1: one update, two default grids
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", ["uniform", "log_snr", "edm"])
def test_ddim_equals_dpm_solver_1_on_the_same_grid(grid, vp):
    pf = vp.probability_flow(gauss_score(vp), t_eps=T_EPS)
    x = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    a = solve(pf, x, method="ddim", steps=12, grid=grid).x
    b = solve(pf, x, method="dpm_solver_1", steps=12, grid=grid).x
    c = solve(pf, x, method="dpm_solver_1", steps=12, grid=grid, predict="data").x
    assert float((a - b).abs().max()) < 1e-12 and float((a - c).abs().max()) < 1e-12


def test_ddim_and_dpm_solver_1_default_grids_are_documented(vp):
    assert METHODS["ddim"].default_grid == "uniform" and METHODS["dpm_solver_1"].default_grid == "log_snr"
    pf = vp.probability_flow(gauss_score(vp), t_eps=T_EPS)
    x = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(solve(pf, x, method="ddim", steps=8).x, solve(pf, x, method="ddim", steps=8, grid="uniform").x)
    assert torch.equal(solve(pf, x, method="dpm_solver_1", steps=8).x,
                       solve(pf, x, method="dpm_solver_1", steps=8, grid="log_snr").x)
    doc = (pathlib.Path(__file__).parents[1] / "docs" / "solvers.md").read_text()
    assert "ddim" in doc and "dpm_solver_1" in doc and "same update" in doc


# ----------------------------------------------------------------------------------------------
# the method table is data; the docs print it
# ----------------------------------------------------------------------------------------------
def test_method_table_is_data_and_prints_the_docs_table():
    table = method_table()
    assert isinstance(table, MethodTable) and all(isinstance(r, MethodRow) for r in table)
    assert table.names() == list(METHODS)
    row = {r.name: r for r in table}
    assert row["ddim"].stochastic == "if eta > 0" and row["euler"].stochastic == "no"
    assert row["dpmpp_2m"].default_grid == "log_snr" and row["dopri5"].stepping == ("adaptive",)
    text = str(table)
    assert text == table.format("markdown") and text.count("\n") == len(METHODS) + 1
    doc = (pathlib.Path(__file__).parents[1] / "docs" / "solvers.md").read_text()
    assert text in doc, "docs/solvers.md's method table is stale: paste print(sdekit.solvers.method_table())"


# ----------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------
def test_make_plan_is_computed_once_without_evaluations(vp):
    calls = []

    def score(x, t):
        calls.append(1)
        return -x

    rev = vp.reverse(score, t_eps=T_EPS)
    x = torch.zeros(3, 2, dtype=F64)
    plan = make_plan(rev, x, method="euler_maruyama", steps=5, save_at=[1.0, T_EPS])
    assert isinstance(plan, Plan) and not calls
    assert plan.direction == -1 and plan.mode == "grid" and plan.grid.shape == (6,)
    assert dict(plan.save_idx) == {0: 0, 5: 1} and plan.options == {}
    with pytest.raises(Exception):
        plan.t_end = 0.5  # frozen
    p2 = make_plan(rev, x, method="torchsde:euler", steps=4, rtol=1e-3, atol=1e-3, options={"adaptive": True})
    assert p2.mode == "adaptive" and math.isclose(p2.dt, (1.0 - T_EPS) / 4) and p2.grid is None
    with pytest.raises(ValueError, match="grid= applies"):
        make_plan(rev, x, method="torchsde:euler", steps=4, grid="log_snr")


# ----------------------------------------------------------------------------------------------
# integrate_ode and the import graph
# ----------------------------------------------------------------------------------------------
def test_integrate_ode_backends_agree_on_a_tuple_state():
    A = torch.tensor([[-1.0, 2.0], [-2.0, -0.5]], dtype=F64)

    def field(t, y):
        x, _ = y
        return x @ A.T * torch.cos(t), (x ** 2).sum(1, keepdim=True)

    y0 = (torch.tensor([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]], dtype=F64), torch.zeros(3, 1, dtype=F64))
    (xn, zn), ni = integrate_ode(field, y0, 0.0, 2.0, rtol=1e-7, atol=1e-9, norm="per-sample")
    (xt, zt), ti = integrate_ode(field, y0, 0.0, 2.0, rtol=1e-7, atol=1e-9, norm="per-sample",
                                 backend="torchdiffeq")
    assert ni["backend"] == "native" and ti["backend"] == "torchdiffeq"
    assert (ni["nfe"], ni["accepted"], ni["rejected"]) == (ti["nfe"], ti["accepted"], ti["rejected"])
    torch.testing.assert_close(xn, xt, rtol=0, atol=1e-10)
    torch.testing.assert_close(zn, zt, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match=r"backend='native' cannot run.*dopri8.*adjoint=True"):
        integrate_ode(field, y0, 0.0, 1.0, method="dopri8", rtol=1e-5, atol=1e-5, backend="native", adjoint=True,
                      adjoint_params=())
    xg = (y0[0].clone().requires_grad_(True), y0[1])
    (x1, _), gi = integrate_ode(field, xg, 0.0, 1.0, rtol=1e-5, atol=1e-5, needs_grad=True)
    assert gi["backend"] == "torchdiffeq" and x1.requires_grad


def _imports(path: pathlib.Path):
    return re.findall(r"^\s*(?:from|import)\s+([\w.]+)", path.read_text(), re.M)


def test_layering_of_the_solver_modules():
    root = pathlib.Path(sdekit.__file__).parent
    backends = {"backend_torchdiffeq.py", "backend_torchsde.py"}
    for p in sorted(root.rglob("*.py")):
        private = [m for m in _imports(p) if re.match(r"(torchdiffeq|torchsde)\._", m)]
        assert not private or p.name in backends, (p, private)
    assert not [m for m in _imports(root / "solvers" / "adaptive.py") if "backend" in m]
    lik = _imports(root / "likelihood" / "ode.py")
    assert not [m for m in lik if re.search(r"backend_|adaptive", m)], lik
    for name in ("registry.py", "stats.py", "grids.py", "_checks.py", "brownian.py"):  # the bottom layer
        assert not [m for m in _imports(root / "solvers" / name) if m.startswith(".") and m != ".._validation"], name
