"""The python blocks of ``docs/studies.md`` (the tutorial "Run an NFE study on your own SDE")
run, in order, in one namespace, and produce the plot and the command-line outputs they promise."""

from __future__ import annotations

import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "studies.md")


def python_blocks(path: str):
    return re.findall(r"^```python\n(.*?)^```", open(path).read(), flags=re.S | re.M)


def test_studies_tutorial_runs(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(DOC)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ns: dict = {}
        for i, code in enumerate(blocks):
            exec(compile(code, f"{DOC}:block{i}", "exec"), ns)
    finally:
        torch.set_num_threads(n)
    assert (tmp_path / "my_study.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("table.csv", "table.md", "study.json", "orders.md", "orders.csv", "work_precision.png"):
        assert (tmp_path / "study-my-sde" / name).stat().st_size > 0
    out = capsys.readouterr().out
    assert "best fixed-step run" in out and "(at floor)" in out
