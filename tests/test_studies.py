"""Work-precision studies: a small study end to end, a wrong method ranks worse, observed orders
of Euler–Maruyama, the ``study`` command's outputs, bad input.

Statistical checks and their false-alarm rates (fixed seeds here, so each test is deterministic):

- Observed orders (``test_em_observed_orders``): the checks were run on 60 independent seed
  triples (seeds 100..279) with the same settings: the expected order was inside the reported
  interval ± `ORDER_TOLERANCE` in 60/60 for each of the three checks (OU strong 1.0, OU weak 1.0,
  GBM strong 0.5), and the wrong order (0.5 for OU strong, 1.0 for GBM strong) was accepted in
  0/60: false-alarm rate per check below 5 % (95 % upper bound from 0/60).
- The other tests compare errors that differ by more than 10x; their noise is far smaller.
"""

from __future__ import annotations

import csv
import io
import json
import os

import pytest
import torch

import sdekit
from sdekit.__main__ import main as cli_main
from sdekit.studies import (MethodSpec, Reference, StudyProblem, StudyTable, observed_order, work_precision)
from sdekit.studies.metrics import mode_occupancy, sliced_wasserstein, weak_error
from sdekit.studies.named import mixture_2d, mixture_study, ou_exact_on_path
from sdekit.studies.order import ORDER_TOLERANCE

F64 = torch.float64


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vp2d():
    sde = sdekit.VPSDE(0.1, 20.0)
    return sde, mixture_2d(), mixture_study("vp2d", sde, mixture_2d(), n=150, t_eps=1e-2)


# ------------------------------------------------------------------------------------------------
# a small study end to end, and a wrong method
# ------------------------------------------------------------------------------------------------
def test_small_study_end_to_end_and_wrong_method_ranks_worse(vp2d):
    sde, gm, sp = vp2d
    flipped = sde.probability_flow(lambda x, t: -gm.exact_score(sde)(x, t), t_eps=sp.t_end)  # sign-flipped score
    methods = ["euler", "heun", MethodSpec("euler", label="euler-flipped", problem=flipped), "dopri5"]
    budgets = {"euler": [10, 20, 40], "heun": [5, 10, 20], "euler-flipped": [10, 20, 40], "dopri5": [1e-3, 1e-5]}
    tab = work_precision(sp, methods, budgets, reference="tight", metrics=["flow", "nll", "modes"], seeds=[0, 1])
    assert isinstance(tab, StudyTable) and len(tab) == 3 + 3 + 3 + 2 and len(tab.records) == 2 * len(tab)
    for r in tab.rows:  # NFE: steps x evaluations per step for fixed-step methods; the adaptive run's own count
        if r["budget_kind"] == "steps":
            per = sdekit.solvers.get_method(r["method"]).evals_per_step
            assert r["nfe_min"] == r["nfe_max"] == r["budget"] * per
        else:
            assert r["grid"] == "adaptive" and r["nfe_min"] > 0
        assert r["flow_floor"] < 1e-6  # the tight reference agrees with a 100x looser one
    e = {(r["label"], r["budget"]): r["flow"] for r in tab.rows}
    assert e[("euler", 10)] > e[("euler", 20)] > e[("euler", 40)]  # error falls with the budget
    assert e[("heun", 5)] > e[("heun", 10)] > e[("heun", 20)]
    assert e[("dopri5", 1e-5)] < e[("dopri5", 1e-3)]
    # the deliberately wrong method ranks worse on every budget, and is never "at floor" (mode
    # occupancy cannot see it: the flipped flow maps the symmetric mixture onto itself)
    for b in (10, 20, 40):
        bad = tab.select(label="euler-flipped", budget=b)[0]
        good = tab.select(label="euler", budget=b)[0]
        for m in ("flow", "nll"):
            assert bad[m] > 10 * good[m] and not bad[f"{m}_at_floor"], (b, m, bad[m], good[m])
    ranked = sorted({r["label"] for r in tab.rows}, key=lambda lab: min(r["flow"] for r in tab.select(label=lab)))
    assert ranked[-1] == "euler-flipped"
    # an unresolved metric is reported as "at floor", never as a value
    good = tab.select(label="heun", budget=20)[0]
    assert good["modes_at_floor"] and good["modes"] <= good["modes_floor"]
    md = tab.to_markdown()
    line = next(ln for ln in md.splitlines() if ln.startswith("| `heun` | uniform | 20 |"))
    assert "(at floor)" in line
    # exports
    rows = list(csv.DictReader(io.StringIO(tab.to_csv())))
    assert len(rows) == len(tab) and {"nfe_mean", "flow", "flow_std", "flow_floor", "flow_at_floor"} <= set(rows[0])
    js = json.loads(tab.to_json())
    assert len(js["rows"]) == len(tab) and js["meta"]["reference"]["kind"] == "tight"


# ------------------------------------------------------------------------------------------------
# observed orders of Euler-Maruyama
# ------------------------------------------------------------------------------------------------
def _orders(tab):
    return {r.metric: r for r in observed_order(tab)}


def _covers(r, value):
    return r.ci_low - ORDER_TOLERANCE <= value <= r.ci_high + ORDER_TOLERANCE


def test_em_observed_orders():
    """OU (additive noise): strong 1 (Euler-Maruyama coincides with Milstein; the registry's 0.5
    is the general-noise order, so the verdict is "above declared"), weak 1. Geometric Brownian
    motion (multiplicative noise, exact solution $x_0 e^{(\\mu - \\sigma^2/2)t + \\sigma W_t}$):
    strong 0.5 as declared."""
    seeds = [0, 1, 2]
    theta, sig = 0.5, 1.0
    ou = sdekit.OrnsteinUhlenbeck(theta, sig, T=1.0)
    sp = StudyProblem(ou, lambda n, g: torch.ones(n, 1, dtype=F64), exact=ou_exact_on_path(theta, sig), n=1000)
    o = _orders(work_precision(sp, ["euler_maruyama"], [8, 16, 32, 64], reference="exact",
                               metrics=["strong", "weak"], seeds=seeds))
    assert _covers(o["strong"], 1.0) and not _covers(o["strong"], 0.5), o["strong"]
    assert o["strong"].declared == 0.5 and o["strong"].verdict == "above declared"
    assert _covers(o["weak"], 1.0) and o["weak"].verdict == "consistent", o["weak"]
    assert o["strong"].ci_high - o["strong"].ci_low < 0.3 and o["weak"].ci_high - o["weak"].ci_low < 0.5

    mu, s = 0.5, 0.5
    gbm = sdekit.SDE(lambda x, t: mu * x, lambda x, t: s * x, noise="diagonal", T=1.0)
    gsp = StudyProblem(gbm, lambda n, g: torch.ones(n, 1, dtype=F64), n=1000,
                       exact=lambda x0, bp: x0 * torch.exp((mu - s * s / 2) * 1.0 + s * bp.increment(0.0, 1.0)))
    g = _orders(work_precision(gsp, ["euler_maruyama"], [8, 16, 32, 64, 128], reference="exact", metrics=["strong"],
                               seeds=seeds))
    assert _covers(g["strong"], 0.5) and not _covers(g["strong"], 1.0) and g["strong"].verdict == "consistent", g


def test_metric_floors_flag_exact_samples():
    """Exact samples against exact samples sit at the floor; a shifted sample does not."""
    gm = mixture_2d()
    x = gm.sample(400, torch.Generator().manual_seed(1))
    y = gm.sample(400, torch.Generator().manual_seed(2))
    v, fl = weak_error(x, y)
    assert v <= fl
    v2, fl2 = weak_error(x + 1.0, y)
    assert v2 > 3 * fl2
    assert sliced_wasserstein(x + 1.0, y) > 2 * sliced_wasserstein(x, y)
    tv, shares = mode_occupancy(x, gm)
    assert tv < 0.1 and abs(float(shares.sum()) - 1) < 1e-12
    assert mode_occupancy(x[x[:, 0] > 0], gm)[0] > 0.45  # half the modes dropped


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------
USER_FILE = '''
import torch, sdekit
sde = sdekit.LinearSDE(lambda t: -0.5 * (0.1 + 19.9 * t), lambda t: (0.1 + 19.9 * t).sqrt())
mixture = sdekit.GaussianMixture([1.0, 2.0], [[-1.0, 0.0], [1.0, 0.5]], [0.05, 0.02])
methods = ["euler", "dpmpp_2m"]
budgets = [8, 16, 32]
t_eps = 1e-2
quick = {"n": 100, "seeds": [0]}
'''


def _check_outputs(out):
    from sdekit.studies.cli import OUTPUT_FILES

    for name in OUTPUT_FILES:
        p = out / name
        assert p.is_file() and p.stat().st_size > 0, name
    assert (out / "work_precision.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    js = json.loads((out / "study.json").read_text())
    assert js["rows"] and js["orders"] and js["meta"]["quick"] is True
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert len(rows) == len(js["rows"])
    assert "observed order" in (out / "orders.md").read_text()
    return js


def test_cli_study_writes_every_output(tmp_path, capsys):
    """A user study file (custom LinearSDE + mixture) through ``python -m sdekit study``. (The
    named studies run the same code path; ``ou-strong-weak``'s settings are exercised by
    `test_em_observed_orders`.)"""
    f = tmp_path / "my_study.py"
    f.write_text(USER_FILE)
    out = tmp_path / "mine"
    assert cli_main(["study", str(f), "--quick", "--out", str(out)]) == 0
    js = _check_outputs(out)
    assert {r["label"] for r in js["rows"]} == {"euler", "dpmpp_2m"} and js["meta"]["n"] == 100
    assert {r["budget"] for r in js["rows"]} == {8, 16, 32}
    printed = capsys.readouterr().out
    assert os.path.abspath(out) in printed and "work_precision.png" in printed


@pytest.mark.parametrize("argv,needle", [
    (["study", "no-such-study", "--quick"], "unknown study"),
    (["study", "ou-strong-weak", "--quick", "--methods", "nope"], "unknown method"),
    (["study", "ou-strong-weak", "--quick", "--metrics", "fid"], "unknown metric"),
    (["study", "ou-strong-weak", "--quick", "--seeds", ","], "seeds must not be empty"),
])
def test_cli_bad_input_one_line_exit_2(argv, needle, tmp_path, capsys):
    assert cli_main(argv + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------
# bad input of the library
# ------------------------------------------------------------------------------------------------
def test_work_precision_bad_input(vp2d):
    sde, gm, sp = vp2d
    kw = dict(reference="tight", metrics=["flow"], seeds=[0])
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        work_precision(sp, ["nope"], [10], **kw)
    with pytest.raises(ValueError, match="unknown metric"):
        work_precision(sp, ["euler"], [10], reference="tight", metrics=["fid"], seeds=[0])
    with pytest.raises(ValueError, match="fixed steps.*tolerance 0.001"):
        work_precision(sp, ["euler"], [1e-3], **kw)
    with pytest.raises(ValueError, match="adaptive.*tolerances"):
        work_precision(sp, ["dopri5"], [20], **kw)
    with pytest.raises(ValueError, match="seeds must not be empty"):
        work_precision(sp, ["euler"], [10], reference="tight", metrics=["flow"], seeds=[])
    with pytest.raises(ValueError, match="does not cover"):
        y = gm.sample(50, torch.Generator().manual_seed(0))
        work_precision(sp, ["euler"], [10], reference=Reference.samples(y, 0.5), metrics=["modes"], seeds=[0])
    with pytest.raises(ValueError, match="exact solution map"):
        work_precision(sp, ["euler"], [10], reference="exact", metrics=["flow"], seeds=[0])
    ou = sdekit.OrnsteinUhlenbeck(0.5, 1.0)
    osp = StudyProblem(ou, lambda n, g: torch.ones(n, 1, dtype=F64), exact=ou_exact_on_path(0.5, 1.0), n=10)
    with pytest.raises(ValueError, match="do not divide"):
        work_precision(osp, ["euler_maruyama"], [8, 12], reference="exact", metrics=["strong"], seeds=[0],
                       fine_steps=64)
    with pytest.raises(ValueError, match="draws its own noise"):
        work_precision(osp, ["torchsde:euler"], [8], reference="exact", metrics=["strong"], seeds=[0])
    with pytest.raises(ValueError, match="'tight' is an adaptive ODE solve"):
        work_precision(osp, ["euler_maruyama"], [8], reference="tight", metrics=["strong"], seeds=[0])


def test_grid_callable_is_used_like_a_grid_kind():
    """A grids entry may be a callable (method, steps) -> times (how a tuned grid plugs in): a
    callable returning the uniform grid reproduces the "uniform" rows exactly, a different one does not."""
    from sdekit.solvers import make_grid

    ou = sdekit.OrnsteinUhlenbeck(0.5, 1.0)
    sp = StudyProblem(ou, lambda n, g: torch.ones(n, 1, dtype=F64), exact=ou_exact_on_path(0.5, 1.0), n=50)
    grids = {"uniform": "uniform", "mine": lambda m, n: make_grid("uniform", 0.0, 1.0, n),
             "quad": lambda m, n: make_grid("quadratic", 0.0, 1.0, n)}
    tab = work_precision(sp, ["euler_maruyama"], [4, 8], reference="exact", metrics=["strong"],
                         seeds=[0], grids=grids, fine_steps=64)
    for b in (4, 8):
        u, m, q = (tab.select(grid=g, budget=b)[0] for g in ("uniform", "mine", "quad"))
        assert u["strong"] == m["strong"] and u["nfe_mean"] == m["nfe_mean"] == b
        assert q["strong"] != u["strong"]


def test_benchmark_report_regenerates_tables(tmp_path, monkeypatch):
    """benchmarks/report.py turns every results JSON into a section with its machine and tables."""
    import glob
    import importlib.util
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))  # report.py puts benchmarks/ first: undone afterwards
    monkeypatch.delitem(sys.modules, "solvers", raising=False)

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("benchmarks_report", os.path.join(root, "benchmarks", "report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    out = tmp_path / "tables.md"
    assert report.main(["--out", str(out)]) == 0
    text = out.read_text()
    files = glob.glob(os.path.join(root, "benchmarks", "results", "*.json"))
    for p in files:
        assert f"## `{os.path.basename(p)}`" in text
    assert text.count("Machine:") == len(files)
    assert "| method | steps | NFE | median err |" in text  # the solver benchmark's own accuracy table
