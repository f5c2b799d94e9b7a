"""Small local stand-ins for the trainer tests: a model, a loss with the ``DSMLoss`` call
signature, and a dataset with ``.data`` / ``.labels``. Also runnable as a training subprocess
(``python tests/_train_standins.py OUT_DIR ...``) for the SIGKILL test.

The loss is an epsilon-prediction denoising loss on the VE-like path $x_t = x_0 + t\\,\\varepsilon$
with $t \\sim U[t_{min}, 1]$ drawn from the given generator; the model has dropout so that the
global torch generator matters for bit-for-bit resumption.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

T_MIN = 1e-2


class TinyModel(nn.Module):
    def __init__(self, dim: int = 2, width: int = 16, dropout: float = 0.1, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Dropout(dropout), nn.Linear(width, dim))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], 1))


def toy_loss(model, x0, label=None, generator=None, sleep: float = 0.0):
    if sleep:
        time.sleep(sleep)
    t = T_MIN + (1 - T_MIN) * torch.rand(x0.shape[0], generator=generator, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    pred = model(x0 + t[:, None] * eps, t)
    return ((pred - eps) ** 2).sum(1).mean()


class SlowLoss:
    """``toy_loss`` that sleeps a little per call (a subprocess that is killed mid-run)."""

    def __init__(self, sleep: float):
        self.sleep = sleep

    def __call__(self, model, x0, label=None, generator=None):
        return toy_loss(model, x0, label=label, generator=generator, sleep=self.sleep)


@dataclass
class ToyData:
    data: torch.Tensor
    labels: Optional[torch.Tensor] = None


def toy_data(n: int = 40, dim: int = 2, seed: int = 0) -> ToyData:
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[1.0] * dim, [-1.0] * dim])
    x = centers[torch.randint(2, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g)
    return ToyData(x)


def kill_test_config(**kw):
    from diffusion.train import TrainConfig

    base = dict(steps=100_000, batch_size=6, lr=5e-3, warmup=5, schedule="cosine", grad_clip=1.0,
                ema_decay=0.99, seed=7, log_every=1, eval_every=0, ckpt_every=5, keep_last=3, device="cpu",
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def main(argv=None):
    from diffusion.train import Trainer

    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--until", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    trainer = Trainer(TinyModel(), toy_data(), SlowLoss(a.sleep), kill_test_config(), a.out_dir)
    trainer.train(resume=a.resume, until=a.until)


if __name__ == "__main__":
    sys.exit(main())
