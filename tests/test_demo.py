"""`python -m sdekit demo` runs, quickly, and prints what it promises."""

import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sdekit", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


def number(pattern, text):
    m = re.search(pattern, text)
    assert m, f"missing line matching {pattern!r} in demo output:\n{text}"
    return float(m.group(1))


def test_demo_runs_and_reports():
    proc, wall = run_cli("demo", "--seed", "3")
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert "sdekit demo (seed 3)" in out
    # 1. kernel table: numeric kernel vs scipy quad
    assert "NumericKernel(" in out and "m(t) quad" in out and "sigma(t) quad" in out
    assert number(r"max relative error of the numeric kernel vs quad: (\S+)", out) < 1e-9
    # 2. the exact mixture marginal solves the Fokker-Planck equation
    assert number(r"Fokker-Planck residual max: (\S+)", out) < 1e-8
    # 3. both samplers report mean and covariance next to the exact ones
    for label in ("exact       mean", "reverse SDE mean", "PF ODE      mean"):
        assert label in out
    assert "euler_maruyama, 500 steps" in out and "torchdiffeq:dopri5" in out
    assert number(r"max \|moment error\|: reverse SDE (\S+),", out) < 0.25
    assert number(r"max \|moment error\|: reverse SDE \S+, PF ODE (\S+) ", out) < 0.25
    assert number(r"done in (\S+) s", out) > 0  # reports its time (speed is benchmarked, never asserted)


def test_demo_seed_reproducible():
    # in-process and small, to keep the suite fast; the subprocess run above covers the CLI
    from sdekit.demo import run_demo

    def lines(seed):
        buf = []
        run_demo(seed=seed, n_samples=300, sde_steps=40, out=buf.append)
        return [x for x in buf if not x.startswith("done in")]

    a, b = lines(5), lines(5)
    assert a == b
    assert lines(6) != a  # the seed matters


def test_cli_without_command_prints_help(capsys):
    from sdekit.__main__ import main

    assert main([]) == 2 and "demo" in capsys.readouterr().out
    try:
        main(["nonsense"])
    except SystemExit as exc:
        assert exc.code != 0
    else:  # pragma: no cover
        raise AssertionError("an unknown command must exit with an error")
    assert "invalid choice" in capsys.readouterr().err
