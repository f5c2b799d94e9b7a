"""Native adaptive Runge–Kutta integrator (sdekit.solvers.adaptive): closed-form accuracy, the
time range, NFE bookkeeping, step-for-step agreement with torchdiffeq, failures, bad input."""

import math

import pytest
import torch

from sdekit.solvers.adaptive import NATIVE_ADAPTIVE_METHODS, integrate_adaptive
from sdekit.solvers.backend_torchdiffeq import odeint_counted
from sdekit.solvers.stats import SolverError

F64 = torch.float64


class Linear:
    """dy/dt = -(1 + k t) * rate * y per column (rate differs per column); exact solution
    y(t) = y(t0) exp(-rate (t - t0) - rate k (t^2 - t0^2)/2). Records every call time."""

    def __init__(self, D, k=2.0):
        self.rate = torch.linspace(0.5, 3.0, D, dtype=F64)
        self.k = k
        self.ts = []

    def __call__(self, t, y):
        assert t.dtype == F64 and t.dim() == 0
        self.ts.append(float(t))
        return -(1.0 + self.k * t) * self.rate * y

    def exact(self, y0, t0, t1):
        return y0 * torch.exp(-self.rate * ((t1 - t0) + 0.5 * self.k * (t1 * t1 - t0 * t0)))


def nonlinear(t, y):
    """A nonlinear, time-dependent field with coupling between the two column blocks (growth at
    most linear in either time direction, so no blow-up when integrated backwards)."""
    x, z = y[:, :3], y[:, 3:]
    dx = -2.0 * torch.tanh(x) * (1.0 + 0.5 * torch.sin(4.0 * t)) + 0.5 * x.roll(1, dims=1)
    dz = torch.sin(x).sum(1, keepdim=True) - 0.3 * z
    return torch.cat([dx, dz], 1)


@pytest.mark.parametrize("method", sorted(NATIVE_ADAPTIVE_METHODS))
@pytest.mark.parametrize("t0,t1", [(0.0, 1.5), (1.5, 0.1)])
@pytest.mark.parametrize("tol", [1e-5, 1e-8])
def test_closed_form_accuracy_and_time_range(method, t0, t1, tol):
    f = Linear(4)
    y0 = torch.randn(8, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    y0_copy = y0.clone()
    y1, info = integrate_adaptive(f, y0, t0, t1, method=method, rtol=tol, atol=tol)
    assert torch.equal(y0, y0_copy)  # the input is not modified
    exact = f.exact(y0, t0, t1)
    err = float(((y1 - exact).abs() / (tol + tol * exact.abs())).max())
    # global error within a modest multiple of the tolerance (measured: dopri5 <= 7, bosh3 <= 51;
    # integrating 1.5 -> 0.1 runs the decay backwards, the solution grows by up to e^11 and the
    # local errors are amplified with it)
    assert err < 100.0, err
    lo, hi = min(t0, t1), max(t0, t1)
    assert lo <= min(f.ts) and max(f.ts) <= hi  # never evaluated outside the interval
    assert len(f.ts) == info["nfe"] == 2 + NATIVE_ADAPTIVE_METHODS[method] * info["steps"]
    assert info["steps"] == info["accepted"] + info["rejected"] and info["accepted"] >= 1
    # tighter tolerance, smaller error (the controller really controls it)
    if tol == 1e-5:
        y1b, _ = integrate_adaptive(f, y0, t0, t1, method=method, rtol=1e-9, atol=1e-9)
        assert float((y1b - exact).abs().max()) < float((y1 - exact).abs().max())


@pytest.mark.parametrize("method", sorted(NATIVE_ADAPTIVE_METHODS))
@pytest.mark.parametrize("norm", ["batch", "per-sample"])
@pytest.mark.parametrize("t0,t1", [(0.0, 2.0), (2.0, 0.0)])
def test_same_steps_as_torchdiffeq(method, norm, t0, t1):
    """Same tableau, error ratio, controller and initial step as torchdiffeq through
    odeint_counted (tuple state (x, z) vs our (B, 3 + 1) state with segments=(3,))."""
    y0 = torch.randn(16, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    y1, info = integrate_adaptive(nonlinear, y0, t0, t1, method=method, rtol=1e-6, atol=1e-7, norm=norm,
                                  segments=(3,))

    def tuple_field(t, s):
        out = nonlinear(t, torch.cat(s, 1))
        return out[:, :3], out[:, 3:]

    (x_ref, z_ref), _, ref = odeint_counted(tuple_field, (y0[:, :3], y0[:, 3:]), t0, t1, method=method, rtol=1e-6,
                                            atol=1e-7, norm=norm)
    assert (info["nfe"], info["accepted"], info["rejected"]) == (ref["nfe"], ref["accepted"], ref["rejected"])
    assert info["accepted"] > 3
    torch.testing.assert_close(y1, torch.cat([x_ref, z_ref], 1), rtol=1e-11, atol=1e-11)


def test_first_step_option_and_nfe_without_probe():
    f = Linear(2)
    y0 = torch.ones(3, 2, dtype=F64)
    y1, info = integrate_adaptive(f, y0, 0.0, 1.0, rtol=1e-6, atol=1e-6, first_step=0.01)
    assert info["first_step"] == 0.01 and info["nfe"] == 1 + 6 * info["steps"] == len(f.ts)
    torch.testing.assert_close(y1, f.exact(y0, 0.0, 1.0), rtol=1e-5, atol=1e-6)
    # max_step caps every step: at least ceil(1 / 0.05) accepted steps
    _, info = integrate_adaptive(Linear(2), y0, 0.0, 1.0, rtol=1e-3, atol=1e-3, max_step=0.05)
    assert info["accepted"] >= 20


def test_per_sample_norm_controls_the_worst_sample():
    """One fast sample in a batch of slow ones: the batch RMS dilutes its error, the per-sample
    norm does not (so the fast sample is more accurate with it)."""
    D = 1
    rates = torch.ones(64, 1, dtype=F64)
    rates[0] = 40.0

    def f(t, y):
        return -rates * y

    y0 = torch.ones(64, D, dtype=F64)
    exact = torch.exp(-rates * 1.0)
    yb, ib = integrate_adaptive(f, y0, 0.0, 1.0, rtol=1e-4, atol=1e-8, norm="batch")
    ys, is_ = integrate_adaptive(f, y0, 0.0, 1.0, rtol=1e-4, atol=1e-8, norm="per-sample")
    err_b = float(((yb - exact) / exact).abs()[0])
    err_s = float(((ys - exact) / exact).abs()[0])
    assert is_["nfe"] > ib["nfe"] and err_s < err_b


def test_non_finite_field_and_max_steps_raise_with_stats():
    def bad(t, y):
        return torch.full_like(y, float("nan")) if float(t) > 0.5 else -y

    with pytest.raises(SolverError, match="not finite") as ei:
        integrate_adaptive(bad, torch.ones(2, 2, dtype=F64), 0.0, 1.0, rtol=1e-5, atol=1e-5)
    e = ei.value
    assert e.stats is not None and e.stats.nfe > 0 and e.t is not None and 0.0 <= e.t <= 0.5 and e.step >= 0
    with pytest.raises(SolverError, match="max_steps = 3") as ei:
        integrate_adaptive(Linear(2), torch.ones(2, 2, dtype=F64), 0.0, 1.0, rtol=1e-12, atol=1e-12, max_steps=3)
    assert ei.value.stats.steps == 3 and ei.value.stats.nfe == 2 + 6 * 3


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="dopri8"), "method"),
    (dict(rtol=0.0), "rtol"),
    (dict(atol=float("nan")), "atol"),
    (dict(norm="max"), "norm"),
    (dict(t_end=0.0), "distinct"),
    (dict(segments=(5,)), "segments"),
    (dict(segments=(0,)), "segments"),
    (dict(max_steps=0), "max_steps"),
    (dict(first_step=-1.0), "first_step"),
    (dict(y0=torch.ones(4, dtype=F64)), "y0"),
])
def test_bad_arguments(kwargs, match):
    args = dict(func=lambda t, y: -y, y0=torch.ones(2, 3, dtype=F64), t_start=0.0, t_end=1.0, rtol=1e-5, atol=1e-5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        integrate_adaptive(**args)


def test_wrong_output_shape_raises():
    with pytest.raises(ValueError, match="shape"):
        integrate_adaptive(lambda t, y: y[:, :1], torch.ones(2, 3, dtype=F64), 0.0, 1.0, rtol=1e-5, atol=1e-5)


def test_no_gradient_flows():
    """The integrator is documented as gradient-free: its result carries no graph."""
    w = torch.tensor(0.7, dtype=F64, requires_grad=True)
    y1, _ = integrate_adaptive(lambda t, y: -w * y, torch.ones(2, 2, dtype=F64), 0.0, 1.0, rtol=1e-6, atol=1e-6)
    assert not y1.requires_grad
    assert math.isclose(float(y1[0, 0]), math.exp(-0.7), rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------
# solve(..., method="dopri5" | "bosh3"): the native integrator on a probability-flow ODE
# ---------------------------------------------------------------------------------------------
S0 = 0.5


class GaussScore(torch.nn.Module):
    """Exact score -x / v(t) of data N(0, S0^2 I) under VP, v = m^2 S0^2 + sigma^2; records times."""

    def __init__(self, sde):
        super().__init__()
        self.sde, self.ts = sde, []

    def forward(self, x, t):
        self.ts.append((float(t.min()), float(t.max())))
        return -x / self.var(t[:1]).to(x.dtype)

    def var(self, t):
        m, s = self.sde.marginal(torch.as_tensor(t, dtype=F64))
        return m * m * S0 * S0 + s * s


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
@pytest.mark.parametrize("t0,t1", [(1.0, 1e-3), (1e-3, 1.0)])
def test_solve_native_exact_flow_same_steps_as_torchdiffeq(method, t0, t1):
    import sdekit

    sde = sdekit.VPSDE()
    score = GaussScore(sde)
    pf = sde.probability_flow(score, t_eps=1e-3)
    x = torch.randn(32, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    sol = sdekit.solve(pf, x, t0, t1, method=method, rtol=1e-7, atol=1e-7)
    exact = x * math.sqrt(float(score.var(t1) / score.var(t0)))  # the PF flow of Gaussian data
    assert float((sol.x - exact).abs().max()) < 1e-5
    assert min(a for a, _ in score.ts) >= 1e-3 and max(b for _, b in score.ts) <= 1.0
    assert sol.stats.backend == "native" and sol.stats.nfe == len(score.ts) == 2 + \
        NATIVE_ADAPTIVE_METHODS[method] * sol.stats.steps
    ref = sdekit.solve(pf, x, t0, t1, method=f"torchdiffeq:{method}", rtol=1e-7, atol=1e-7)
    assert (sol.stats.nfe, sol.stats.accepted, sol.stats.rejected) == (ref.stats.nfe, ref.stats.accepted,
                                                                     ref.stats.rejected)
    torch.testing.assert_close(sol.x, ref.x, rtol=1e-12, atol=1e-12)


def test_solve_native_save_at_lands_on_the_times():
    import sdekit

    sde = sdekit.VPSDE()
    score = GaussScore(sde)
    pf = sde.probability_flow(score, t_eps=1e-3)
    x = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    save = [1.0, 0.5, 0.1, 1e-3]
    sol = sdekit.solve(pf, x, method="dopri5", rtol=1e-8, atol=1e-8, save_at=save)
    assert sol.xs.shape == (4, 8, 2) and torch.equal(sol.xs[0], x) and torch.equal(sol.xs[-1], sol.x)
    for k, t in enumerate(save):
        exact = x * math.sqrt(float(score.var(t) / score.var(1.0)))
        assert float((sol.xs[k] - exact).abs().max()) < 1e-6
    assert any(abs(b - 0.5) < 1e-15 for _, b in score.ts)  # a step ended exactly on a save point


def test_solve_native_limits_and_options():
    import sdekit

    sde = sdekit.VPSDE()
    pf = sde.probability_flow(GaussScore(sde), t_eps=1e-3)
    x = torch.ones(4, 2, dtype=F64)
    with pytest.raises(SolverError, match="max_steps") as ei:
        sdekit.solve(pf, x, method="dopri5", rtol=1e-10, atol=1e-10, max_steps=3)
    assert ei.value.stats.steps == 3 and ei.value.stats.nfe == 2 + 6 * 3
    with pytest.raises(SolverError, match="min_step"):
        sdekit.solve(pf, x, method="dopri5", rtol=1e-10, atol=1e-10, min_step=0.05)
    with pytest.raises(ValueError, match="unknown options"):
        sdekit.solve(pf, x, method="dopri5", rtol=1e-5, atol=1e-5, jump_t=[0.5])
    with pytest.raises(ValueError, match="rtol"):
        sdekit.solve(pf, x, method="dopri5", atol=1e-5)
    sol = sdekit.solve(pf, x, method="dopri5", rtol=1e-4, atol=1e-4, max_step=0.05)
    assert sol.stats.accepted >= 20
