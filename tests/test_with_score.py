"""`problem.with_score(fn)`: a copy of a reverse SDE / probability-flow ODE driven by another
score, sharing everything else and leaving the original untouched (the solvers use it to count
score evaluations)."""

import pytest
import torch

import sdekit

F64 = torch.float64
SDE = sdekit.VPSDE()
X = torch.tensor([[0.3, -1.2], [2.0, 0.5]], dtype=F64)


def score_a(x, t):
    return -x


def score_b(x, t):
    return -2.0 * x + 0.1


class Net(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(scale, dtype=F64))

    def forward(self, x, t):
        return -self.w * x


def drift(problem, x, t):
    return problem.velocity(x, t) if isinstance(problem, sdekit.ProbabilityFlowODE) else problem.drift(x, t)


@pytest.mark.parametrize("make", [lambda s: SDE.reverse(s, eta=0.7, t_eps=1e-2),
                                  lambda s: SDE.probability_flow(s, t_eps=1e-2)], ids=["reverse", "pf"])
def test_with_score_swaps_only_the_score(make):
    orig = make(score_a)
    new = orig.with_score(score_b)
    assert type(new) is type(orig) and new is not orig
    assert orig.score_fn is score_a and new.score_fn is score_b
    assert new.sde is orig.sde and new.t_eps == orig.t_eps and new.t_start == orig.t_start
    ref = make(score_b)  # built from scratch with the new score
    for t in (0.05, 0.6):
        assert torch.equal(drift(new, X, t), drift(ref, X, t))
        assert torch.equal(drift(orig, X, t), drift(make(score_a), X, t))
        assert not torch.equal(drift(new, X, t), drift(orig, X, t))
    if isinstance(orig, sdekit.ReverseSDE):
        assert new.eta == 0.7 and torch.equal(new.diffusion(X, 0.3), orig.diffusion(X, 0.3))


def test_with_score_keeps_and_isolates_module_parameters():
    net, other = Net(1.5), Net(0.5)
    pf = SDE.probability_flow(net)
    params = list(pf.parameters())
    assert params == [net.w]
    counted = pf.with_score(lambda x, t: net(x, t))  # a wrapper: the model's parameters stay visible
    assert list(counted.parameters()) == [net.w]
    swapped = pf.with_score(other)  # a new model: its parameters, and the original keeps its own
    assert list(swapped.parameters()) == [other.w]
    assert list(pf.parameters()) == [net.w] and pf.score_fn is net
    assert torch.equal(swapped(torch.tensor(0.3, dtype=F64), X), SDE.probability_flow(other)(0.3, X))


def test_with_score_rejects_a_non_callable():
    with pytest.raises(TypeError, match=r"score must be callable.*got int"):
        SDE.reverse(score_a).with_score(3)


def test_solvers_count_through_with_score_and_leave_the_problem_alone():
    pf = SDE.probability_flow(score_a)
    sol = sdekit.solve(pf, X, method="euler", steps=7)
    assert sol.stats.nfe == 7 and pf.score_fn is score_a
