"""Test networks with the diffusion net signature ``net(x, noise_cond, label=None)``, local to the
tests (no dependency on diffusion.nets).

* `OracleNet`: the exact optimal network for a Gaussian-mixture oracle in any prediction space,
  written from first principles here: it recovers t from the noise condition log σ̄ = −λ/2, takes
  the exact posterior mean E[x0|x_t] from the oracle, and forms ε̂ = (x − m x̂0)/σ,
  v̂ = m ε̂ − σ x̂0, or EDM's F = (x̂0 − c_skip x/m)/c_out with c_skip, c_out from EDM's formulas in
  σ̄ = σ/m.
* `AffineNet`: a tiny trainable net, affine in x with coefficients that are small MLPs of the
  noise condition — it can represent the exact optimum for Gaussian data in every space.
"""


import torch
from torch import nn

F64 = torch.float64


class OracleNet(nn.Module):
    def __init__(self, gm, sde, predict, precondition=None, sigma_data=1.0):
        super().__init__()
        self.gm, self.sde, self.predict, self.precondition, self.sd = gm, sde, predict, precondition, sigma_data
        self.dim = gm.dim
        self.calls = []

    def forward(self, x, noise_cond, label=None):
        self.calls.append(self.training)
        t = self.sde.kernel.t_from_log_snr(-2.0 * noise_cond.to(F64))
        m = self.sde.kernel.m(t)[:, None]
        s = self.sde.kernel.sigma(t)[:, None]
        sbar2 = (s / m) ** 2
        if self.precondition == "edm":  # undo c_in = 1/(m sqrt(σ̄² + σd²)) to recover x_t
            x = x * m * torch.sqrt(sbar2 + self.sd**2)
        x0 = self.gm.exact_posterior_mean(self.sde)(x.to(F64), t)
        if self.precondition == "edm":
            c_skip = self.sd**2 / (sbar2 + self.sd**2)
            c_out = torch.sqrt(sbar2) * self.sd / torch.sqrt(sbar2 + self.sd**2)
            return ((x0 - c_skip * x / m) / c_out).to(x.dtype)
        eps = (x - m * x0) / s
        out = {"x0": x0, "eps": eps, "v": m * eps - s * x0, "score": -eps / s}[self.predict]
        return out.to(x.dtype)


class AffineNet(nn.Module):
    """out = a(c) * x + b(c), with a, b: (B, d) from a 1 -> width -> 2d MLP of the noise condition c."""

    def __init__(self, dim, width=32, num_classes=None):
        super().__init__()
        self.dim = dim
        self.num_classes = num_classes
        self.mlp = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2 * dim))
        self.modes = []

    def forward(self, x, noise_cond, label=None):
        self.modes.append(self.training)
        h = self.mlp(noise_cond[:, None].to(x.dtype) / 4.0)
        a, b = h[:, : self.dim], h[:, self.dim:]
        return a * x + b


class MLPNet(nn.Module):
    """A small MLP on [x, noise_cond] (for sliced score matching on a non-linear process)."""

    def __init__(self, dim, width=64):
        super().__init__()
        self.dim = dim
        self.body = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                  nn.Linear(width, dim))

    def forward(self, x, noise_cond, label=None):
        return self.body(torch.cat([x, noise_cond[:, None].to(x.dtype)], 1))
