"""The trainer with local stand-ins (``_train_standins``): bit-for-bit resume, divergence, the
shape check, schedules, EMA warm-up, evaluation and the log; and a training subprocess killed
with SIGKILL that resumes from its last complete checkpoint."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from _train_standins import TinyModel, ToyData, kill_test_config, toy_data, toy_loss
from diffusion.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from diffusion.train import TrainConfig, Trainer, TrainingDivergedError, ema_decay_at, lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**kw):
    base = dict(steps=20, batch_size=14, lr=1e-2, warmup=4, schedule="cosine", grad_clip=0.5, ema_decay=0.9,
                seed=3, log_every=3, eval_every=0, ckpt_every=5, keep_last=2, device="cpu", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _log(path):
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def _train_losses(records):
    return {r["step"]: r["loss"] for r in records if r["event"] == "train"}


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("steps", 2.5), ("batch_size", 0), ("lr", 0.0), ("lr", float("nan")), ("lr", -1e-3),
    ("weight_decay", -0.1), ("warmup", -1), ("warmup", 11), ("schedule", "linear"), ("grad_clip", 0.0),
    ("ema_decay", 1.0), ("ema_decay", -0.5), ("ema_warmup", 1), ("precision", "fp16"), ("compile", "yes"),
    ("seed", -1), ("log_every", 0), ("eval_every", -1), ("ckpt_every", -5), ("keep_last", 0),
    ("device", 0), ("betas", (0.9,)), ("betas", (0.9, 1.0)), ("adam_eps", 0.0), ("min_lr", 1.0),
    ("progress", None),
])
def test_config_rejects_out_of_range(field, value):
    with pytest.raises(ValueError) as e:
        TrainConfig(**{"steps": 10, "lr": 1e-3, field: value})
    assert f"TrainConfig.{field}" in str(e.value) and repr(value) in str(e.value)


def test_config_round_trip():
    cfg = _cfg(betas=(0.8, 0.95), grad_clip=None)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig fields \\['nope'\\]"):
        TrainConfig.from_dict({**d, "nope": 1})


def test_lr_schedule_and_ema_decay():
    cfg = TrainConfig(steps=14, lr=1.0, warmup=4, min_lr=0.1, schedule="cosine")
    assert [lr_at(cfg, k) for k in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert lr_at(cfg, 5) == 1.0  # cosine starts at the peak after warm-up ...
    assert math.isclose(lr_at(cfg, 10), 0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(cfg, 14) > 0.1 and lr_at(cfg, 14) - 0.1 < 0.03  # ... and ends near min_lr
    lrs = [lr_at(cfg, k) for k in range(5, 15)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    const = TrainConfig(steps=14, lr=1.0, warmup=2, schedule="constant")
    assert [lr_at(const, k) for k in (1, 2, 3, 14)] == [0.5, 1.0, 1.0, 1.0]
    ema = TrainConfig(steps=10, ema_decay=0.999)
    assert ema_decay_at(ema, 1) == 2 / 11 and ema_decay_at(ema, 90) == 91 / 100
    assert ema_decay_at(ema, 10**6) == 0.999
    assert ema_decay_at(TrainConfig(steps=10, ema_decay=0.999, ema_warmup=False), 1) == 0.999


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def _run(out, cfg=None, resume=False, until=None, **kw):
    trainer = Trainer(TinyModel(), toy_data(), toy_loss, cfg or _cfg(), out, **kw)
    hist = trainer.train(resume=resume, until=until)
    return trainer, hist


def test_resume_is_bit_for_bit(tmp_path):
    straight, h1 = _run(tmp_path / "a")
    _, part = _run(tmp_path / "b", until=10)
    assert part["step"] == list(range(1, 11))
    resumed, h2 = _run(tmp_path / "b", resume=True)  # a new process would do exactly this
    assert h1 == h2  # per-step loss, lr and gradient norm, exactly
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema_model.state_dict().values(), resumed.ema_model.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(next(straight.model.parameters()), next(straight.ema_model.parameters()))
    # the log of the resumed run reads as one run
    la, lb = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [3, 6, 9, 12, 15, 18, 20]
    assert _train_losses(la) == _train_losses(lb)
    assert la[1]["loss"] == sum(h1["loss"][3:6]) / 3
    # checkpoints: every 5 steps, the last 2 kept
    assert [p.name for p in list_checkpoints(tmp_path / "a" / "checkpoints")] == \
        ["ckpt-00000015.json", "ckpt-00000020.json"]
    _, meta = load_checkpoint(tmp_path / "a" / "checkpoints")
    assert meta["step"] == 20 and meta["config"] == _cfg().to_dict() and meta["model_class"] == "TinyModel"


def test_resume_with_the_wrong_data_or_fresh_start_over_checkpoints(tmp_path):
    _run(tmp_path, until=5)
    with pytest.raises(ValueError, match="already holds checkpoints .*resume=True"):
        _run(tmp_path)
    with pytest.raises(ValueError, match="40 samples but dataset has 30"):
        Trainer(TinyModel(), toy_data(30), toy_loss, _cfg(), tmp_path).train(resume=True)
    with pytest.warns(RuntimeWarning, match="changed config: lr: 0.01 -> 0.02"):
        _run(tmp_path, cfg=_cfg(lr=2e-2), resume=True, until=6)


class NaNAt:
    """``toy_loss`` that returns NaN at training step ``step`` (calls in train mode)."""

    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, model, x0, label=None, generator=None):
        loss = toy_loss(model, x0, label=label, generator=generator)
        if model.training:
            self.calls += 1
            if self.calls == self.step:
                return loss * float("nan")
        return loss


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = Trainer(TinyModel(), toy_data(), NaNAt(13), _cfg(ckpt_every=5, keep_last=3), tmp_path)
    with pytest.raises(TrainingDivergedError, match="diverged at step 13: the loss is nan") as e:
        trainer.train()
    ckdir = tmp_path / "checkpoints"
    assert e.value.step == 13 and e.value.checkpoint == ckdir / "ckpt-00000010.json"
    assert str(ckdir / "ckpt-00000010.json") in str(e.value)
    assert latest_checkpoint(ckdir) == ckdir / "ckpt-00000010.json"  # nothing written after the NaN
    assert trainer.step == 12 and len(trainer.history["loss"]) == 12
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # no NaN update applied
    assert _log(tmp_path)[-1] == {"event": "diverged", "step": 13, "loss": "nan"}
    # the last good checkpoint resumes and reproduces the clean run
    ok = Trainer(TinyModel(), toy_data(), toy_loss, _cfg(ckpt_every=5, keep_last=3), tmp_path)
    h = ok.train(resume=True, until=15)
    _, clean = _run(tmp_path / "clean", until=15)
    assert h["loss"] == clean["loss"]


def test_data_that_does_not_fit_the_model_fails_before_the_first_step(tmp_path):
    model = TinyModel(dim=2)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, toy_data(dim=3), toy_loss, _cfg(), tmp_path)
    with pytest.raises(ValueError, match="event shape \\(3,\\).*does the data fit the model"):
        trainer.train()
    assert trainer.step == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert latest_checkpoint(tmp_path / "checkpoints") is None


def test_bad_inputs(tmp_path):
    d = toy_data()
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        Trainer(lambda x: x, d, toy_loss, _cfg(), tmp_path)
    with pytest.raises(TypeError, match="loss must be callable"):
        Trainer(TinyModel(), d, "dsm", _cfg(), tmp_path)
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        Trainer(TinyModel(), d, toy_loss, {"steps": 3}, tmp_path)
    bad = d.data.clone()
    bad[7, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite values \\(first at sample 7\\)"):
        Trainer(TinyModel(), ToyData(bad), toy_loss, _cfg(), tmp_path)
    with pytest.raises(ValueError, match="dataset.labels must be None or a LongTensor of shape \\(40,\\)"):
        Trainer(TinyModel(), ToyData(d.data, torch.zeros(39, dtype=torch.long)), toy_loss, _cfg(), tmp_path)
    with pytest.raises(ValueError, match="dataset.data must have shape \\(N, ...\\)"):
        Trainer(TinyModel(), ToyData(torch.zeros(5)), toy_loss, _cfg(), tmp_path)
    with pytest.raises(ValueError, match="TrainConfig.precision='bf16' needs a CUDA device"):
        Trainer(TinyModel(), d, toy_loss, _cfg(precision="bf16"), tmp_path)
    with pytest.raises(ValueError, match="until must be an int in \\[1, steps=20\\]"):
        Trainer(TinyModel(), d, toy_loss, _cfg(), tmp_path).train(until=21)
    with pytest.raises(ValueError, match="loss\\(model, x0, ...\\) must return a scalar"):
        Trainer(TinyModel(), d, lambda m, x, label=None, generator=None: (m(x, x[:, 0]) ** 2),
                _cfg(), tmp_path).train()


def test_ema_warmup_first_update(tmp_path):
    model = TinyModel()
    init = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, toy_data(), toy_loss, _cfg(steps=1, warmup=0, ema_decay=0.999), None)
    trainer.train()
    d = 2 / 11  # min(0.999, (1 + 1) / (10 + 1))
    for p0, p, e in zip(init, model.parameters(), trainer.ema_model.parameters()):
        assert not torch.equal(p0, p)
        torch.testing.assert_close(e, d * p0 + (1 - d) * p.detach(), rtol=0, atol=1e-7)


def test_evaluation_and_log(tmp_path):
    calls = []

    def evaluate(model, ema_model, step):
        calls.append((step, model.training, ema_model.training))
        torch.randn(3)  # consumes global randomness: must not change training
        return {"custom": torch.tensor(step * 1.5)}

    held = toy_data(24, seed=9)
    trainer, hist = _run(tmp_path / "e", cfg=_cfg(steps=12, eval_every=4), eval_data=held, evaluate=evaluate)
    assert calls == [(4, False, False), (8, False, False), (12, False, False)]
    assert [r["step"] for r in hist["eval"]] == [4, 8, 12]
    r = hist["eval"][-1]
    assert r["custom"] == 18.0 and r["heldout_loss"] > 0 and r["heldout_loss_ema"] > 0
    assert r["heldout_loss"] == trainer.run_evaluation()["heldout_loss"]  # same noise at every evaluation
    evals = [x for x in _log(tmp_path / "e") if x["event"] == "eval"]
    assert [x["step"] for x in evals] == [4, 8, 12] and evals[0]["custom"] == 6.0
    train = [x for x in _log(tmp_path / "e") if x["event"] == "train"]
    assert {"step", "loss", "lr", "grad_norm", "it_s", "elapsed_s"} <= set(train[0])
    # evaluation consumes no training randomness
    _, plain = _run(tmp_path / "p", cfg=_cfg(steps=12))
    assert plain["loss"] == hist["loss"]


# ------------------------------------------------------------------------------------------------
# a training process killed with SIGKILL
# ------------------------------------------------------------------------------------------------
def test_sigkill_mid_run_resumes_from_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    ckdir = out / "checkpoints"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "tests", "_train_standins.py")
    proc = subprocess.Popen([sys.executable, script, str(out), "--sleep", "0.003"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(list(ckdir.glob("ckpt-*.json"))) < 2:  # at least 2 checkpoints written
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoints after 60 s"
            time.sleep(0.005)
        time.sleep(0.02)  # land somewhere mid-interval
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    cfg = kill_test_config()
    reached = max(r["step"] for r in _log(out))  # the last step the killed run logged
    last = latest_checkpoint(ckdir)
    c = load_checkpoint(last)[1]["step"]
    assert c >= reached - cfg.ckpt_every and c % cfg.ckpt_every == 0  # lost at most one interval

    # torn files by hand, newer than the last complete checkpoint: never read
    st = last.with_suffix(".safetensors").read_bytes()
    (ckdir / f"ckpt-{c + 10**6:08d}.safetensors").write_bytes(st[: len(st) // 3])  # truncated, no manifest
    m = json.loads(last.read_text())
    m.update(step=c + 2 * 10**6, tensors_file=f"ckpt-{c + 2 * 10**6:08d}.safetensors")
    (ckdir / f"ckpt-{c + 2 * 10**6:08d}.json").write_text(json.dumps(m))  # a manifest without its tensors
    (ckdir / f"ckpt-{c + 4 * 10**6:08d}.json").write_text(last.read_text())  # another step's manifest, renamed
    trunc = last.read_text()
    (ckdir / f"ckpt-{c + 3 * 10**6:08d}.safetensors").write_bytes(st)
    (ckdir / f"ckpt-{c + 3 * 10**6:08d}.json").write_text(trunc[: len(trunc) // 2])  # torn manifest

    end = c + 12
    from _train_standins import SlowLoss

    with pytest.warns(RuntimeWarning, match="skipping torn checkpoint") as w:
        resumed = Trainer(TinyModel(), toy_data(), SlowLoss(0.0), cfg, out)
        hist = resumed.train(resume=True, until=end)
    text = " ".join(str(x.message) for x in w)
    assert f"ckpt-{c + 10**6:08d}.safetensors has no manifest" in text
    assert "is missing" in text and "not valid JSON" in text and "belongs to another checkpoint" in text

    straight = Trainer(TinyModel(), toy_data(), SlowLoss(0.0), cfg, tmp_path / "straight")
    ref = straight.train(until=end)
    assert hist["loss"] == ref["loss"] and len(ref["loss"]) == end
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)
    # the log continues the killed run's: steps 1..end once each, the losses of the uninterrupted run
    log = [(r["step"], r["loss"]) for r in _log(out) if r["event"] == "train"]
    assert [s for s, _ in log] == list(range(1, end + 1))  # lines after the checkpoint were cut
    assert log == [(r["step"], r["loss"]) for r in _log(tmp_path / "straight") if r["event"] == "train"]


def test_labels_go_to_conditional_models_only(tmp_path):
    seen = []

    def loss(model, x0, label=None, generator=None):
        seen.append(label)
        return toy_loss(model, x0, generator=generator)

    d = toy_data()
    labelled = ToyData(d.data, (d.data[:, 0] > 0).long())
    Trainer(TinyModel(), labelled, loss, _cfg(steps=2, warmup=0), None).train()
    assert seen and all(lab is None for lab in seen)  # TinyModel declares no num_classes
    seen.clear()
    conditional = TinyModel()
    conditional.num_classes = 2
    Trainer(conditional, labelled, loss, _cfg(steps=2, warmup=0, batch_size=40), None).train()
    assert seen[-1].shape == (40,) and sorted(seen[-1].tolist()) == sorted(labelled.labels.tolist())
    with pytest.raises(ValueError, match="use_labels=True but the dataset has no labels"):
        Trainer(TinyModel(), d, loss, _cfg(), None, use_labels=True)


def test_declared_event_shape_is_checked_first(tmp_path):
    model = TinyModel(dim=2)
    model.event_shape = (3,)
    with pytest.raises(ValueError, match="event shape \\(2,\\) .* but the network expects \\(3,\\)"):
        Trainer(model, toy_data(), toy_loss, _cfg(), None).train()
