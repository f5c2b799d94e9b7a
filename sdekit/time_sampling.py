r"""Sampling diffusion times $t \in [t_\varepsilon, T]$ for Monte-Carlo time integrals.

Denoising score matching losses and the ELBO are integrals over time,
$\int_{t_\varepsilon}^T h(t)\,dt$, estimated as $\frac1n\sum_i h(t_i)/q(t_i)$ with $t_i \sim q$.
`sample_times` draws the $t_i$ and returns the density $q(t_i)$ of the scheme on
$[t_\varepsilon, T]$ next to them, so every caller weights by $1/q$ the same way.

Schemes
-------
- ``"uniform"``: $q = 1/(T - t_\varepsilon)$.
- ``"importance"``: $q(t) \propto g(t)^2/\sigma(t)^2 = -\lambda'(t)$ ($\lambda = \log(m^2/\sigma^2)$
  the log-SNR), drawn by inverting the log-SNR: $\lambda \sim U[\lambda(T), \lambda(t_\varepsilon)]$,
  $t = \lambda^{-1}(\lambda)$, so $q(t) = -\lambda'(t)/\Lambda$ with
  $\Lambda = \lambda(t_\varepsilon) - \lambda(T)$. With this $q$ the likelihood weighting $g^2$
  of a score-space error $\|s_\theta - \nabla\log p(x_t|x_0)\|^2 = \|\hat\varepsilon - \varepsilon\|^2/\sigma^2$
  has the constant estimator weight $g^2/(q\sigma^2) = \Lambda$.
- ``"stratified"``, ``"importance_stratified"``: the same densities, but the $n$ uniforms that
  drive the draws are stratified: one in each of the $n$ equal-probability cells
  $[k/n, (k+1)/n)$, assigned to positions by a random permutation. Each $t_i$ still has density
  $q$ (so $\mathrm{mean}(h/q)$ stays unbiased) and the variance of the estimate of $\int h$
  drops from $O(1/n)$ to $O(1/n^3)$ for smooth $h$.
- ``"mixture"``: defensive importance sampling: each draw is from ``"importance"`` or
  ``"uniform"`` with probability $1/2$, and $q$ is the mixture density
  $\tfrac12 q_{imp} + \tfrac12 q_{unif}$ (the second moment of $h/q$ is at most twice that under
  either scheme).

Every quantity comes from the process's kernel (`sde.kernel.log_snr`, `t_from_log_snr`,
`dlog_snr`), so the same code serves closed-form and numeric kernels. ``"uniform"`` and
``"stratified"`` need only ``sde.T`` and also work for non-linear processes.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

from ._validation import check_positive

__all__ = ["sample_times", "SCHEMES", "time_density"]

F64 = torch.float64
SCHEMES = ("uniform", "importance", "stratified", "importance_stratified", "mixture")
_NEEDS_KERNEL = ("importance", "importance_stratified", "mixture")


def _check(sde, t_eps, scheme) -> Tuple[float, float]:
    T = getattr(sde, "T", None)
    if T is None:
        raise TypeError(f"sde must be a sdekit process with an end time T, got {type(sde).__name__}")
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme in _NEEDS_KERNEL and not getattr(sde, "is_linear", False):
        raise TypeError(f"scheme={scheme!r} needs a linear SDE (its kernel's log-SNR); got "
                        f"{type(sde).__name__}. Use 'uniform' or 'stratified' for a non-linear process")
    t_eps = check_positive(t_eps, "t_eps")
    if not t_eps < T:
        raise ValueError(f"t_eps must lie in (0, T) = (0, {T}); got {t_eps!r}")
    return t_eps, float(T)


def _log_snr_range(sde, t_eps: float, T: float, device) -> Tuple[float, float]:
    ker = sde.kernel
    ends = ker.log_snr(torch.tensor([t_eps, T], dtype=F64, device=device))
    lam_s, lam_T = float(ends[0]), float(ends[1])
    Lam = lam_s - lam_T
    if not (math.isfinite(Lam) and Lam > 0):
        raise ValueError(f"the log-SNR must decrease on [t_eps, T]: lambda(t_eps)={lam_s:.6g}, "
                         f"lambda(T)={lam_T:.6g}")
    return lam_s, Lam


def time_density(sde, t: torch.Tensor, *, t_eps: float, scheme: str = "uniform") -> torch.Tensor:
    r"""The density $q(t)$ on $[t_\varepsilon, T]$ of a scheme of `sample_times` (float64).

    Stratification does not change the density of each draw, so ``"stratified"`` has the
    ``"uniform"`` density and ``"importance_stratified"`` the ``"importance"`` one.

    Parameters
    ----------
    sde:
        The process (linear for the importance schemes).
    t:
        Times in $[t_\varepsilon, T]$, any shape.
    t_eps:
        As in `sample_times`.
    scheme:
        As in `sample_times`.

    Returns
    -------
    torch.Tensor
        Float64, of ``t``'s shape.
    """
    t_eps, T = _check(sde, t_eps, scheme)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    t = t.to(F64)
    q_unif = torch.full_like(t, 1.0 / (T - t_eps))
    if scheme in ("uniform", "stratified"):
        return q_unif
    _, Lam = _log_snr_range(sde, t_eps, T, t.device)
    q_imp = -sde.kernel.dlog_snr(t) / Lam
    if scheme == "mixture":
        return 0.5 * q_imp + 0.5 * q_unif
    return q_imp


def _uniforms(n: int, stratified: bool, generator, device) -> torch.Tensor:
    gdev = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, dtype=F64, device=gdev)
    if stratified:
        cell = torch.randperm(n, generator=generator, device=gdev).to(F64)
        u = (cell + u) / n
    return u.to(device)


def sample_times(sde, n: int, *, t_eps: float, scheme: str = "uniform",
                 generator: Optional[torch.Generator] = None,
                 device: Union[str, torch.device, None] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Draw ``n`` times in $[t_\varepsilon, T]$ and their density $q$ under the scheme.

    $\int_{t_\varepsilon}^T h(t)\,dt$ is estimated without bias by ``(h(t) / q).mean()``.

    Parameters
    ----------
    sde:
        The process: a `sdekit.LinearSDE` (closed-form or numeric kernel) for the importance
        schemes; any process with ``T`` for ``"uniform"`` / ``"stratified"``.
    n:
        Number of draws (an integer >= 1).
    t_eps:
        Lower end of the time interval, in $(0, T)$.
    scheme:
        ``"uniform"``, ``"importance"`` ($q \propto g^2/\sigma^2$), ``"stratified"``,
        ``"importance_stratified"`` or ``"mixture"`` (module docs).
    generator:
        ``torch.Generator`` for all randomness (draws happen on its device, then move to
        ``device``); the same seed gives the same times.
    device:
        Device of the returned tensors (default: the generator's device, else CPU).

    Returns
    -------
    tuple of torch.Tensor
        ``(t, q)``: float64 tensors of shape ``(n,)``, the times and the scheme's density at them.

    Raises
    ------
    ValueError, TypeError
        For ``n < 1``, ``t_eps`` outside $(0, T)$, an unknown scheme, an importance scheme on a
        non-linear process, or a log-SNR that does not decrease on $[t_\varepsilon, T]$.
    """
    t_eps, T = _check(sde, t_eps, scheme)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    n = int(n)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)

    stratified = scheme in ("stratified", "importance_stratified")
    u = _uniforms(n, stratified, generator, device)
    if scheme in ("uniform", "stratified"):
        t = t_eps + (T - t_eps) * u
        return t.clamp(t_eps, T), torch.full_like(t, 1.0 / (T - t_eps))

    lam_s, Lam = _log_snr_range(sde, t_eps, T, device)
    ker = sde.kernel
    t_imp = ker.t_from_log_snr(lam_s - u * Lam).clamp(t_eps, T)
    if scheme == "mixture":
        coin = _uniforms(n, False, generator, device) < 0.5
        t = torch.where(coin, t_imp, t_eps + (T - t_eps) * u).clamp(t_eps, T)
        q = 0.5 * (-ker.dlog_snr(t) / Lam) + 0.5 / (T - t_eps)
        return t, q
    return t_imp, -ker.dlog_snr(t_imp) / Lam
