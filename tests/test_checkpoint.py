"""Checkpoints: exact round trips, atomic pairs, pruning, and every torn / corrupt / mismatched pair
detected by name (``load_checkpoint`` raises, ``latest_checkpoint`` skips with a warning).
Nothing is ever unpickled."""

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from diffusion.checkpoint import (
    CheckpointError,
    flatten_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_state,
)


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 4, generator=g)
    return {
        "w": base,
        "w_view": base[2:4],  # shares storage with "w": saved as a copy
        "d64": torch.randn(3, generator=g, dtype=torch.float64),
        "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "i64": torch.arange(7),
        "u8": torch.Generator().manual_seed(seed).get_state(),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 2),
    }


def _save(d, step, seed=0, keep_last=3):
    return save_checkpoint(d, _tensors(seed), {"step": step, "note": "x", "nested": {"a": [1, 2.5, None]}},
                           keep_last=keep_last)


def test_round_trip_is_exact(tmp_path):
    path = _save(tmp_path, 7)
    assert path == tmp_path / "ckpt-00000007.json"
    assert (tmp_path / "ckpt-00000007.safetensors").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temporary files left
    want = _tensors()
    for p in (path, tmp_path / "ckpt-00000007.safetensors", tmp_path / "ckpt-00000007", tmp_path):
        tensors, meta = load_checkpoint(p)
        assert meta == {"step": 7, "note": "x", "nested": {"a": [1, 2.5, None]}}
        assert set(tensors) == set(want)
        for k, v in want.items():
            assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v), k
    manifest = json.loads(path.read_text())
    assert manifest["tensors_file"] == "ckpt-00000007.safetensors"
    assert manifest["tensors_bytes"] == (tmp_path / "ckpt-00000007.safetensors").stat().st_size
    assert len(manifest["tensors_sha256"]) == 64


def test_step_defaults_to_zero(tmp_path):
    p = save_checkpoint(tmp_path, {"w": torch.ones(2)}, {"kind": "model"})
    assert p.name == "ckpt-00000000.json" and load_checkpoint(tmp_path)[1] == {"kind": "model"}


def test_keep_last(tmp_path):
    for s in (10, 20, 30, 40, 50):
        _save(tmp_path, s, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000040.json", "ckpt-00000050.json"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000040.json", "ckpt-00000040.safetensors",
                                           "ckpt-00000050.json", "ckpt-00000050.safetensors"]
    for s in (60, 70):
        _save(tmp_path, s, keep_last=None)
    assert len(list_checkpoints(tmp_path)) == 4
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000070.json"


def test_bad_arguments_write_nothing(tmp_path):
    d = tmp_path / "c"
    with pytest.raises(ValueError, match="meta\\['step'\\]"):
        save_checkpoint(d, _tensors(), {"step": "3"})
    with pytest.raises(ValueError, match="meta\\['step'\\]"):
        save_checkpoint(d, _tensors(), {"step": -1})
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(d, _tensors(), {"step": 1}, keep_last=0)
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(d, _tensors(), {"step": 1, "loss": float("nan")})
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(d, _tensors(), {"step": 1, "obj": object()})
    with pytest.raises(TypeError, match="tensors\\['x'\\]"):
        save_checkpoint(d, {"x": [1.0]}, {"step": 1})
    assert not d.exists()


def _torn(tmp_path):
    """Good checkpoints at 10 and 20; returns the paths of the step-20 pair."""
    _save(tmp_path, 10, seed=1)
    p = _save(tmp_path, 20, seed=2)
    return p, p.with_suffix(".safetensors")


def _expect_skip(tmp_path, match):
    with pytest.warns(RuntimeWarning, match=match):
        assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000010.json"


def test_truncated_tensors(tmp_path):
    js, st = _torn(tmp_path)
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ckpt-00000020.safetensors has .* bytes .*truncated"):
        load_checkpoint(js)
    _expect_skip(tmp_path, "truncated")


def test_corrupt_tensors_same_size(tmp_path):
    js, st = _torn(tmp_path)
    data = bytearray(st.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte inside a tensor: only the hash sees it
    st.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="ckpt-00000020.safetensors do not match the SHA-256"):
        load_checkpoint(js)
    _expect_skip(tmp_path, "SHA-256")


def test_tensors_from_another_checkpoint(tmp_path):
    js, st = _torn(tmp_path)
    # a later writer replaced the tensors (same size, other values) and died before the manifest
    save_checkpoint(tmp_path / "other", _tensors(3), {"step": 20})
    os.replace(tmp_path / "other" / st.name, st)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(js)
    _expect_skip(tmp_path, "ckpt-00000020")


def test_manifest_without_tensors(tmp_path):
    js, st = _torn(tmp_path)
    st.unlink()
    with pytest.raises(CheckpointError, match="has no tensors: .*ckpt-00000020.safetensors is missing"):
        load_checkpoint(js)
    _expect_skip(tmp_path, "missing")


def test_truncated_manifest(tmp_path):
    js, st = _torn(tmp_path)
    js.write_text(js.read_text()[:40])
    with pytest.raises(CheckpointError, match="ckpt-00000020.json is not valid JSON"):
        load_checkpoint(js)
    _expect_skip(tmp_path, "not valid JSON")


def test_tensors_without_manifest(tmp_path):
    _save(tmp_path, 10, seed=1)
    save_checkpoint(tmp_path / "other", _tensors(3), {"step": 20})
    os.replace(tmp_path / "other" / "ckpt-00000020.safetensors", tmp_path / "ckpt-00000020.safetensors")
    _expect_skip(tmp_path, "ckpt-00000020.safetensors has no manifest")


def test_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path / "nope") is None
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_checkpoint(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "ckpt-00000001.json")


class _Payload:
    def __reduce__(self):  # what a malicious pickle does on load
        return (os.system, ("touch PWNED",))


def test_never_unpickles(tmp_path, monkeypatch):
    """A pickle posing as a tensors file, with a manifest vouching for it, is refused, not run."""
    monkeypatch.chdir(tmp_path)
    js = _save(tmp_path, 5)
    st = js.with_suffix(".safetensors")
    with open(st, "wb") as f:
        pickle.dump({"w": _Payload()}, f)
    import hashlib
    manifest = json.loads(js.read_text())
    manifest["tensors_sha256"] = hashlib.sha256(st.read_bytes()).hexdigest()
    manifest["tensors_bytes"] = st.stat().st_size
    js.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cannot read checkpoint tensors"):
        load_checkpoint(js)
    assert not (tmp_path / "PWNED").exists()


def _train_steps(params, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        x = torch.randn(8, 3, generator=g)
        loss = ((x @ params[0] + params[1]) ** 2).mean()
        loss.backward()
        opt.step()


def test_optimizer_state_round_trip(tmp_path):
    torch.manual_seed(0)
    p1 = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    opt1 = torch.optim.AdamW(p1, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    _train_steps(p1, opt1, 5, seed=1)
    sd = opt1.state_dict()
    tensors, structure = flatten_state(sd, "optim")
    assert "optim.state.0.exp_avg" in tensors
    save_checkpoint(tmp_path, tensors, {"step": 5, "optim": structure})
    t2, meta = load_checkpoint(tmp_path)
    restored = unflatten_state(meta["optim"], t2)
    assert restored["param_groups"][0]["betas"] == (0.8, 0.95)  # tuples survive JSON
    assert set(restored["state"]) == {0, 1}  # integer keys survive JSON

    p2 = [torch.nn.Parameter(p.detach().clone()) for p in p1]
    opt2 = torch.optim.AdamW(p2, lr=1.0)
    opt2.load_state_dict(restored)
    _train_steps(p1, opt1, 4, seed=2)
    _train_steps(p2, opt2, 4, seed=2)
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)


def test_flatten_state_special_values():
    state = {"a": (1, 2.5, float("inf")), 3: [float("-inf"), None, True, "s"], "__odd": torch.ones(2),
             "nan": float("nan")}
    tensors, structure = flatten_state(state, "p")
    text = json.dumps(structure, allow_nan=False)
    back = unflatten_state(json.loads(text), tensors)
    assert back["a"] == (1, 2.5, float("inf")) and back[3] == [float("-inf"), None, True, "s"]
    assert torch.equal(back["__odd"], torch.ones(2)) and np.isnan(back["nan"])
    with pytest.raises(TypeError, match="p.x of type object"):
        flatten_state({"x": object()}, "p")
    with pytest.raises(CheckpointError, match="'p.t'"):
        unflatten_state({"t": {"__tensor__": "p.t"}}, {})


def test_rng_state_round_trip():
    g = torch.Generator().manual_seed(3)
    torch.randn(5, generator=g)
    tensors, meta = rng_state({"noise": g})
    meta = json.loads(json.dumps(meta, allow_nan=False))

    def draw():
        return (torch.randn(4, generator=g), torch.randn(4), random.random(), np.random.rand(3))

    first = draw()
    draw()
    set_rng_state(tensors, meta, {"noise": g})
    again = draw()
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[2] == again[2] and np.array_equal(first[3], again[3])
    with pytest.raises(CheckpointError, match="'batch'"):
        set_rng_state(tensors, meta, {"batch": torch.Generator()})
