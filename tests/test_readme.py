"""Every code block of README.md runs on its own, as written, and reproducibly.

Python blocks are exec'd each in a fresh namespace (twice for the examples whose output is
random: the printed lines must agree exactly). The command-line block is run line by line
through `diffusion.cli.main` in a temporary folder. The two commands of the Quick start are what
CI itself runs (`.ci/run`: the install + the tests; the quickstart's `--quick` run is in
tests/test_cli.py).
"""

import contextlib
import io
import pathlib
import re
import shlex

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text(encoding="utf-8")


def section(title):
    m = re.search(rf"^## {re.escape(title)}[^\n]*\n(.*?)(?=^## |\Z)", TEXT, re.S | re.M)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


def blocks(text, lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def run_block(code, name):
    ns = {"__name__": "__readme__"}
    buf = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: intra-op threads only add contention on busy CI hosts
    try:
        with contextlib.redirect_stdout(buf):
            exec(compile(code, f"{README}:{name}", "exec"), ns)
    finally:
        torch.set_num_threads(threads)
    return ns, buf.getvalue()


def test_readme_top_has_exactly_the_two_commands():
    qs = blocks(section("Quick start"), "bash")
    assert len(qs) == 1
    cmds = [ln for ln in qs[0].splitlines() if ln.strip() and not ln.startswith("#")]
    assert cmds == ['pip install torch==2.13.0 && pip install -e . && python -m diffusion quickstart',
                    'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q']


def test_example_blocks_run_on_their_own_and_reproducibly():
    bl = blocks(section("Example"), "python")
    assert len(bl) == 2
    code = "\n".join(bl)
    for needle in ("LinearSDE(", "marginal(", "marginal_sample(", "reverse(", "probability_flow(", "torchdiffeq",
                   "BrownianInterval"):
        assert needle in code, needle
    ns, out = run_block(bl[0], "Example-1")
    assert "reverse SDE sample std" in out and "PF ODE sample std" in out
    # the example's claims: data N(0, 0.5^2) are recovered by both samplers
    assert float(ns["ys"][-1].std()) == pytest.approx(0.5, rel=0.1)
    assert float(ns["x_eps"].std()) == pytest.approx(0.5, rel=0.1)
    assert torch.isfinite(ns["x_t"]).all()
    _, again = run_block(bl[0], "Example-1")
    assert again == out, "the torchsde example prints different numbers on a second run"
    ns, out2 = run_block(bl[1], "Example-2")
    assert "dpmpp_2m: 20 NFE" in out2 and "Euler-Maruyama: 200 NFE" in out2
    assert float((ns["res"].log_prob - ns["exact"]).abs().max()) < 1e-3
    _, again = run_block(bl[1], "Example-2")
    assert again == out2


def test_training_example_runs_and_is_better_than_untrained():
    bl = blocks(section("Training a score model"), "python")
    assert len(bl) == 1
    ns, out = run_block(bl[0], "Training")
    assert "NLL gap" in out and "dpmpp_2m" in out
    assert torch.isfinite(ns["sol"].x).all()
    assert 0.0 <= ns["report"]["nll_gap"] < 0.5, ns["report"]


def test_command_line_block_runs(tmp_path, monkeypatch, capsys):
    from diffusion.cli import main

    bl = blocks(section("Command line"), "bash")
    assert len(bl) == 1
    monkeypatch.chdir(tmp_path)
    lines = [ln.split("#")[0].strip() for ln in bl[0].splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for ln in lines:
            argv = shlex.split(ln)
            assert argv[:3] == ["python", "-m", "diffusion"], ln
            assert main(argv[3:]) == 0, ln
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert (tmp_path / "runs" / "moons" / "model").is_dir()
    assert list((tmp_path / "runs" / "moons").glob("samples-dpmpp_2m.*"))
    assert "nats/dim" in out


def test_benchmark_commands_name_existing_scripts():
    bl = blocks(section("Benchmarks"), "bash")
    root = README.parent
    for b in bl:
        for ln in b.splitlines():
            for script in re.findall(r"benchmarks/\w+\.py", ln):
                assert (root / script).is_file(), script
