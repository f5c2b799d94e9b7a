r"""Exact Gaussian-mixture oracles: marginals, scores, log densities and posterior moments.

If the data distribution is a Gaussian mixture $p_0 = \sum_k \pi_k\,\mathcal N(\mu_k, \Sigma_k)$
and the forward process is linear ($x_t = m(t)x_0 + \sigma(t)\varepsilon$), every marginal
is again a Gaussian mixture,

$$
    p_t = \sum_k \pi_k\,\mathcal N\big(m\mu_k,\ C_k\big),\qquad C_k = m^2\Sigma_k + \sigma^2 I,
$$

with score $\nabla\log p_t(x) = \sum_k r_k(x)\,C_k^{-1}(m\mu_k - x)$ and responsibilities
$r_k(x) = \pi_k\mathcal N(x; m\mu_k, C_k)/p_t(x)$ (see *Concepts*, section 10). This gives
ground truth for score models, Tweedie's formulas, the probability-flow ODE and likelihoods.

**Efficiency.** Each full covariance is diagonalised once, $\Sigma_k = U_k\,\mathrm{diag}(\lambda_k)\,U_k^\top$,
so that $C_k = U_k\,\mathrm{diag}(m^2\lambda_k + \sigma^2)\,U_k^\top$ at *every* t with no
per-t factorisation or inverse. Diagonal and isotropic covariances skip $U$ entirely and use
elementwise arithmetic only (components are processed one at a time with a running log-sum-exp,
so memory stays $O(Bd)$ — fast at $d = 3072$, $B = 1024$).

**Numerics.** Everything is computed in float64 (log-sum-exp over components, responsibilities)
and returned in the dtype of ``x``. All functions are built from differentiable torch operations,
so autograd through them works (divergences and Hessians of `GaussianMixture.exact_score`
and `GaussianMixture.exact_log_prob`, and their derivative in ``t``). The score's backward
pass uses the closed-form Jacobian $\nabla^2\log p_t$ (see `GaussianMixture.exact_score`),
so a vector–Jacobian product costs about one forward pass and a batched exact divergence is cheap;
higher derivatives stay exact (the backward is itself differentiable).

**Shapes.** ``means`` is ``(K, d)`` or ``(K, *event_shape)``; data are ``(B, *event_shape)`` or
``(B, d)`` with ``d = prod(event_shape)`` — images ``(B, C, H, W)`` work by flattening (natural for
diagonal or isotropic covariances; a full covariance is indexed by the flattened coordinates).
Outputs have the shape of the input ``x`` (scores, posterior means) or ``(B,)`` (log densities).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Union

import torch

from ._gaussian import LOG_2PI, gaussian_log_prob
from .processes import LinearSDE
from ._validation import (TimeLike, as_time, check_bool, check_int, check_real, check_state, check_time_range, short,
                          time_for)

__all__ = ["GaussianMixture", "LabelledMixture"]

F64 = torch.float64


def _as_f64(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real tensor, got dtype {value.dtype}")
        out = value.detach().to(device="cpu", dtype=F64)
    else:
        try:
            out = torch.as_tensor(value, dtype=F64)
        except Exception as exc:  # lists of the wrong shape, strings, ...
            raise TypeError(f"{name} must be array-like of real numbers, got {value!r}") from exc
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} must be finite, got {short(out)}")
    return out


def _linear_sde(sde):
    if not isinstance(sde, LinearSDE):
        raise TypeError(
            f"sde must be a sdekit.LinearSDE (the exact marginal needs the Gaussian kernel "
            f"m(t), sigma(t)); got {type(sde).__name__}")
    return sde


class _MixtureScore(torch.autograd.Function):
    r"""The mixture score with an analytic backward pass.

    The score is a gradient, so its Jacobian (the Hessian of $\log p_t$) is symmetric and
    the vector–Jacobian product equals `GaussianMixture._score_jvp` — a handful of
    ``(B, K, d)`` operations on quantities the forward pass already has, instead of autograd's
    replay of every forward operation. ``generate_vmap_rule`` lets batched VJPs
    (``is_grads_batched``: the exact divergence, several Hutchinson probes) run the backward once
    on batched tensors instead of once per vector. For a double backward (``create_graph=True``)
    the backward recomputes the pieces from ``x`` with differentiable operations, so higher
    derivatives stay exact. ``m`` and ``s2`` get no gradient: the caller uses this only when they
    do not require one. Outputs: the score and the (non-differentiable) pieces it was made of.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x64, m, s2, gm):
        r, sk, c, s = gm._score_parts(x64, m, s2)
        return s, r, sk, c

    @staticmethod
    def setup_context(ctx, inputs, output):
        x64, m, s2, gm = inputs
        s, r, sk, c = output
        ctx.gm = gm
        ctx.mark_non_differentiable(r, sk, c)
        ctx.save_for_backward(x64, m, s2, r, sk, c, s)

    @staticmethod
    def backward(ctx, u, _gr, _gsk, _gc):
        x64, m, s2, r, sk, c, s = ctx.saved_tensors
        gm = ctx.gm
        if torch.is_grad_enabled():  # double backward: rebuild the pieces differentiably from x
            r, sk, c, s = gm._score_parts(x64, m, s2)
        return gm._score_jvp(r, sk, c, s, u), None, None, None


class GaussianMixture:
    r"""A Gaussian mixture $\sum_k \pi_k\,\mathcal N(\mu_k, \Sigma_k)$ with exact marginals under linear SDEs.

    Parameters
    ----------
    weights:
        ``(K,)`` positive, finite mixture weights; normalised to sum to 1.
    means:
        ``(K, d)`` component means (or ``(K, *event_shape)`` for image-shaped data).
    covs:
        Either ``(K, d, d)`` full symmetric positive-definite covariances, ``(K, d)`` (or
        ``(K, *event_shape)``) diagonal variances, or ``(K,)`` isotropic variances
        ($\Sigma_k = v_k I$). All variances must be positive.

    Raises
    ------
    ValueError
        Naming the argument and the offending value, for non-finite or non-positive weights,
        mismatched shapes, asymmetric or non-positive-definite covariances.

    Notes
    -----
    Parameters are stored in float64 on the CPU (and copied to other devices on first use).

    Examples
    --------
    >>> import torch, sdekit
    >>> gm = sdekit.GaussianMixture([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [0.5, 0.2])
    >>> sde = sdekit.VPSDE()
    >>> score = gm.exact_score(sde)          # score(x, t) = grad log p_t(x), t batched or scalar
    >>> x = gm.push(sde, 0.5).sample(4)      # exact samples of p_{0.5}
    >>> score(x, torch.full((4,), 0.5, dtype=torch.float64)).shape
    torch.Size([4, 2])
    """

    def __init__(self, weights, means, covs):
        w = _as_f64(weights, "weights")
        if w.dim() != 1 or w.numel() < 1:
            raise ValueError(f"weights must be a non-empty 1-d tensor (K,), got shape {tuple(w.shape)}")
        if (w <= 0).any():
            i = int(torch.nonzero(w <= 0)[0])
            raise ValueError(f"weights must be positive; weights[{i}] = {float(w[i])!r} (weights = {short(w)})")
        K = w.numel()
        mu = _as_f64(means, "means")
        if mu.dim() < 2 or mu.shape[0] != K:
            raise ValueError(f"means must have shape (K, d) with K = {K} (the number of weights); "
                             f"got shape {tuple(mu.shape)}")
        event_shape = tuple(mu.shape[1:])
        d = int(mu[0].numel())
        if d < 1:
            raise ValueError(f"means must have at least one coordinate, got shape {tuple(mu.shape)}")
        mu = mu.reshape(K, d)
        S = _as_f64(covs, "covs")
        if S.dim() == 1:
            kind = "iso"
            if S.shape[0] != K:
                raise ValueError(f"isotropic covs must have shape (K,) = ({K},), got {tuple(S.shape)}")
            lam, U = S.clone(), None
        elif S.dim() == 3 and S.shape == (K, d, d) and not (len(event_shape) == 2 and
                                                             tuple(S.shape[1:]) == event_shape):
            kind = "full"
            scale = S.abs().amax(dim=(1, 2)).clamp_min(1e-300)
            asym = (S - S.transpose(1, 2)).abs().amax(dim=(1, 2)) / scale
            if (asym > 1e-10).any():
                k = int(torch.nonzero(asym > 1e-10)[0])
                raise ValueError(f"covs[{k}] is not symmetric (max |S - S^T| / max |S| = "
                                 f"{float(asym[k]):.3g}); covs[{k}] = {short(S[k])}")
            S = 0.5 * (S + S.transpose(1, 2))
            lam, U = torch.linalg.eigh(S)
        elif tuple(S.shape) in ((K, d), (K,) + event_shape):
            kind = "diag"
            lam, U = S.reshape(K, d).clone(), None
        else:
            raise ValueError(
                f"covs must have shape (K, d, d) = ({K}, {d}, {d}) (full), (K, d) = ({K}, {d}) "
                f"(diagonal) or (K,) = ({K},) (isotropic) for means of shape {tuple(mu.shape)}; "
                f"got {tuple(S.shape)}")
        if kind == "full":
            # eigenvalues relative to the scale: round-off below 1e-14 * max counts as singular
            bad = lam <= 1e-14 * lam.abs().amax(dim=1, keepdim=True)
        else:
            bad = lam <= 0
        if bad.any():
            k = int(torch.nonzero(bad)[0][0])
            low = float(lam[k].min())
            what = {"full": f"not positive definite (smallest eigenvalue {low:.6g})",
                    "diag": f"not positive (smallest variance {low:.6g})",
                    "iso": f"not positive ({low:.6g})"}[kind]
            raise ValueError(f"covs[{k}] is {what}; covs[{k}] = {short(S[k])}")
        self._set(torch.log(w / w.sum()), mu, kind, lam, U, event_shape)

    # -- construction helpers -----------------------------------------------------------------
    def _set(self, log_w, mu, kind, lam, U, event_shape):
        self._log_w, self._mu, self._kind, self._lam, self._U = log_w, mu, kind, lam, U
        self.event_shape = tuple(event_shape)
        self.dim = int(mu.shape[1])
        self.n_components = int(mu.shape[0])
        self._cache: Dict[torch.device, tuple] = {}

    @classmethod
    def _from_parts(cls, log_w, mu, kind, lam, U, event_shape) -> "GaussianMixture":
        obj = cls.__new__(cls)
        obj._set(log_w, mu, kind, lam, U, event_shape)
        return obj

    def _params(self, device):
        device = torch.device(device)
        p = self._cache.get(device)
        if p is None:
            p = tuple(None if v is None else v.to(device)
                      for v in (self._log_w, self._mu, self._lam, self._U))
            self._cache[device] = p
        return p

    # -- parameters ------------------------------------------------------------------------------
    @property
    def cov_type(self) -> str:
        """``"full"``, ``"diag"`` or ``"iso"``."""
        return self._kind

    @property
    def weights(self) -> torch.Tensor:
        """Normalised mixture weights ``(K,)`` (float64)."""
        return torch.exp(self._log_w)

    @property
    def means(self) -> torch.Tensor:
        """Component means ``(K, *event_shape)`` (float64)."""
        return self._mu.reshape((self.n_components,) + self.event_shape).clone()

    @property
    def covs(self) -> torch.Tensor:
        """Covariances in the constructor's layout: ``(K, d, d)``, ``(K, *event_shape)`` or ``(K,)``."""
        if self._kind == "full":
            return self.covariance_matrices()
        if self._kind == "diag":
            return self._lam.reshape((self.n_components,) + self.event_shape).clone()
        return self._lam.clone()

    def covariance_matrices(self) -> torch.Tensor:
        """Component covariances as ``(K, d, d)`` matrices (float64; for moderate d)."""
        if self._kind == "full":
            return torch.einsum("kij,kj,klj->kil", self._U, self._lam, self._U)
        lam = self._lam if self._kind == "diag" else self._lam[:, None].expand(-1, self.dim)
        return torch.diag_embed(lam)

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues ``(K, d)`` of the component covariances (the variances if diagonal)."""
        return self._lam.clone() if self._kind != "iso" else self._lam[:, None].expand(-1, self.dim).clone()

    @property
    def mean(self) -> torch.Tensor:
        r"""Mixture mean $\sum_k\pi_k\mu_k$, shape ``event_shape`` (float64)."""
        return (self.weights[:, None] * self._mu).sum(0).reshape(self.event_shape)

    @property
    def covariance(self) -> torch.Tensor:
        r"""Mixture covariance $\sum_k\pi_k\big(\Sigma_k + (\mu_k-\bar\mu)(\mu_k-\bar\mu)^\top\big)$, ``(d, d)``."""
        w = self.weights
        dm = self._mu - (w[:, None] * self._mu).sum(0)
        within = (w[:, None, None] * self.covariance_matrices()).sum(0)
        return within + torch.einsum("k,ki,kj->ij", w, dm, dm)

    def __repr__(self):
        return (f"GaussianMixture(K={self.n_components}, d={self.dim}, cov_type={self._kind!r}"
                + (f", event_shape={self.event_shape}" if len(self.event_shape) != 1 else "") + ")")

    # -- evaluation core ---------------------------------------------------------------------------
    def _flat(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        x = check_state(x, name)
        tail = tuple(x.shape[1:])
        if tail != self.event_shape and tail != (self.dim,):
            shapes = {f"(B, {', '.join(map(str, self.event_shape))})", f"(B, {self.dim})"}
            raise ValueError(f"{name} must have shape {' or '.join(sorted(shapes))} for this mixture; "
                             f"got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.dim)

    # Below this many (B * K * d [* d for full]) elements all components are evaluated at once
    # (few, larger tensor operations); above it, one component at a time (O(B d) memory).
    _VECTORIZE_LIMIT = 1 << 21

    def _evaluate(self, x64: torch.Tensor, m: torch.Tensor, s2: torch.Tensor, want_score: bool,
                  want_post: bool = False):
        r"""Log density, and optionally the score and the posterior mean E[x_0 | x_t], at (m, s2).

        ``x64`` is ``(B, d)`` float64; ``m``, ``s2`` are float64 0-d or ``(B,)``.
        """
        size = x64.shape[0] * self.n_components * self.dim * (self.dim if self._kind == "full" else 1)
        if size <= self._VECTORIZE_LIMIT:
            return self._evaluate_vectorized(x64, m, s2, want_score, want_post)
        return self._evaluate_loop(x64, m, s2, want_score, want_post)

    def _component_terms(self, x64: torch.Tensor, m: torch.Tensor, s2: torch.Tensor):
        r"""Per component, at (m, s2): ``z`` (B, K, d) — $x - m\mu_k$ in the eigenbasis of
        $\Sigma_k$ —, ``c`` — the eigenvalues $m^2\lambda_k + \sigma^2$ of $C_k$,
        (1|B, K, d) or (1|B, K, 1) — and $q_k = z^\top C_k^{-1} z + \log\det C_k$ (B, K).
        Reductions over the trailing axis are products with a ones vector (much faster than
        ``sum`` over a short last axis for small d)."""
        _, mu, lam, U = self._params(x64.device)
        d = self.dim
        ones_d = torch.ones(d, dtype=F64, device=x64.device)
        m3, s23 = m.reshape(-1, 1, 1), s2.reshape(-1, 1, 1)
        y = x64[:, None, :] - m3 * mu  # (B, K, d)
        if self._kind == "iso":
            c = m3 * m3 * lam[:, None] + s23  # (1 or B, K, 1)
            return y, c, ((y * y) @ ones_d) / c[..., 0] + d * torch.log(c[..., 0])
        c = m3 * m3 * lam + s23  # (1 or B, K, d)
        z = torch.einsum("bki,kij->bkj", y, U) if self._kind == "full" else y
        return z, c, (z * z / c) @ ones_d + torch.log(c) @ ones_d

    def _evaluate_vectorized(self, x64, m, s2, want_score, want_post):
        """All K components at once with (B, K, d) intermediates (`_component_terms`)."""
        log_w, mu, lam, U = self._params(x64.device)
        B, d, K = x64.shape[0], self.dim, self.n_components
        m3 = m.reshape(-1, 1, 1)
        z, c, q = self._component_terms(x64, m, s2)
        lk = log_w - 0.5 * (q + d * LOG_2PI)  # (B, K): q already holds the quadratic form and log det
        M = lk.detach().amax(dim=1, keepdim=True)  # log-sum-exp shift (the result does not depend on it)
        e = torch.exp(lk - M)
        S = e @ torch.ones(K, dtype=F64, device=x64.device)
        logp = torch.log(S) + M[:, 0]
        score = post = None
        if want_score or want_post:
            r = (e / S[:, None])[:, None, :]  # responsibilities (B, 1, K)
            zc = z / c
            if want_score:
                sk = torch.einsum("bkj,kij->bki", zc, U) if self._kind == "full" else zc
                score = -(r @ sk.expand(B, K, d))[:, 0]
            if want_post:
                lz = (lam[:, None] if self._kind == "iso" else lam) * zc
                pk = mu + m3 * (torch.einsum("bkj,kij->bki", lz, U) if self._kind == "full" else lz)
                post = (r @ pk.expand(B, K, d))[:, 0]
        return logp, score, post

    def _evaluate_loop(self, x64, m, s2, want_score, want_post):
        """Components visited one at a time with a running log-sum-exp (max detached: the result
        does not depend on it), so memory is O(B d) for diagonal/isotropic mixtures."""
        log_w, mu, lam, U = self._params(x64.device)
        mb = m.reshape(-1, 1)
        s2b = s2.reshape(-1, 1)
        m2 = mb * mb
        M = None
        S = None
        Vs = None
        Vp = None
        logs = []
        for k in range(self.n_components):
            y = x64 - mb * mu[k]
            c = m2 * lam[k] + s2b  # eigenvalues of C_k: (1 or B, 1) isotropic, (1 or B, d) otherwise
            z = y @ U[k] if self._kind == "full" else y  # x - m mu_k in the eigenbasis of Sigma_k
            lk = (log_w[k] + gaussian_log_prob(z, 0.0, c, event_dims=1)).expand(x64.shape[0])
            logs.append(lk)
            if not (want_score or want_post):
                continue
            zc = z / c
            sk = -(zc @ U[k].transpose(0, 1)) if self._kind == "full" else -zc
            pk = None
            if want_post:
                # mu_k + m Sigma_k C_k^{-1} (x - m mu_k) = mu_k + m U (lam * z / c)
                lz = lam[k] * zc
                pk = mu[k] + mb * (lz @ U[k].transpose(0, 1) if self._kind == "full" else lz)
            ld = lk.detach()
            if M is None:
                M = ld
                S = torch.ones_like(lk) * torch.exp(lk - M)
                Vs = S[:, None] * sk
                Vp = S[:, None] * pk if want_post else None
            else:
                M_new = torch.maximum(M, ld)
                a = torch.exp(M - M_new)
                b = torch.exp(lk - M_new)
                S = S * a + b
                Vs = Vs * a[:, None] + b[:, None] * sk
                if want_post:
                    Vp = Vp * a[:, None] + b[:, None] * pk
                M = M_new
        logp = torch.logsumexp(torch.stack(logs, dim=1), dim=1)
        score = Vs / S[:, None] if want_score else None
        post = Vp / S[:, None] if want_post else None
        return logp, score, post

    def _time_coefs(self, sde, x: torch.Tensor, t: TimeLike):
        t64 = time_for(t, x)
        check_time_range(t64.detach(), sde.T)
        return sde.kernel.m(t64), sde.kernel.sigma2(t64)

    _ONE = torch.tensor(1.0, dtype=F64)
    _ZERO = torch.tensor(0.0, dtype=F64)

    # -- the data distribution -----------------------------------------------------------------
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density at ``x`` (``(B, *event_shape)`` or ``(B, d)``), shape ``(B,)``, in x's dtype."""
        xf = self._flat(x)
        one, zero = self._ONE.to(x.device), self._ZERO.to(x.device)
        return self._evaluate(xf.to(F64), one, zero, False)[0].to(x.dtype)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        r"""$\nabla_x\log p(x)$, shaped like ``x``, in x's dtype."""
        xf = self._flat(x)
        one, zero = self._ONE.to(x.device), self._ZERO.to(x.device)
        return self._evaluate(xf.to(F64), one, zero, True)[1].to(x.dtype).reshape(x.shape)

    def sample(self, n: int, generator: Optional[torch.Generator] = None, dtype: torch.dtype = F64,
               device=None) -> torch.Tensor:
        """``n`` exact samples, shape ``(n, *event_shape)``.

        Draws component labels, then standard normals, from ``generator`` (on the generator's
        device; the same seed gives the same samples), in float64, cast to ``dtype``/``device``.
        """
        n = check_int(n, "n", 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        gdev = generator.device if generator is not None else torch.device("cpu")
        log_w, mu, lam, U = self._params(gdev)
        comp = torch.multinomial(torch.exp(log_w), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=F64, device=gdev)
        out = torch.empty(n, self.dim, dtype=F64, device=gdev)
        for k in range(self.n_components):
            idx = torch.nonzero(comp == k).flatten()
            if idx.numel() == 0:
                continue
            e = eps[idx]
            scaled = torch.sqrt(lam[k]) * e  # iso: lam[k] a scalar; diag and full: per eigen-direction
            out[idx] = mu[k] + (scaled @ U[k].transpose(0, 1) if self._kind == "full" else scaled)
        out = out.reshape((n,) + self.event_shape)
        return out.to(dtype=dtype, device=device if device is not None else gdev)

    # -- conditioning on known coordinates --------------------------------------------------------
    def _known_mask(self, known) -> torch.Tensor:
        """``known`` as a boolean ``(d,)`` mask over the flattened coordinates (checked)."""
        if isinstance(known, torch.Tensor) and known.dtype == torch.bool:
            mask = known.detach().cpu().reshape(-1)
            if mask.numel() != self.dim:
                raise ValueError(f"known must be a boolean mask with {self.dim} entries (one per coordinate, "
                                 f"event shape {self.event_shape}); got shape {tuple(known.shape)}")
        else:
            try:
                idx = torch.as_tensor(known, dtype=torch.long).reshape(-1)
            except Exception as exc:
                raise TypeError(f"known must be a boolean mask or a sequence of coordinate indices, "
                                f"got {known!r}") from exc
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.dim):
                raise ValueError(f"known indices must lie in [0, {self.dim - 1}], got {short(idx)}")
            mask = torch.zeros(self.dim, dtype=torch.bool)
            mask[idx] = True
        n = int(mask.sum())
        if n == 0 or n == self.dim:
            raise ValueError(f"known must select between 1 and {self.dim - 1} of the {self.dim} coordinates "
                             f"(some known, some unknown); got {n}")
        return mask

    def condition(self, known, y) -> "GaussianMixture":
        r"""The exact posterior $p(x_u \mid x_k = y)$ of the unknown coordinates given known ones.

        Each component is conditioned as a Gaussian and the components are reweighted by how
        well they explain the observation:

        $$
            p(x_u \mid x_k = y) = \sum_j \tilde\pi_j\,
            \mathcal N\big(\mu_{j,u} + \Sigma_{j,uk}\Sigma_{j,kk}^{-1}(y - \mu_{j,k}),
            \Sigma_{j,uu} - \Sigma_{j,uk}\Sigma_{j,kk}^{-1}\Sigma_{j,ku}\big),\qquad
            \tilde\pi_j \propto \pi_j\,\mathcal N(y;\ \mu_{j,k}, \Sigma_{j,kk}).
        $$

        Parameters
        ----------
        known:
            The observed coordinates (of the flattened data): a boolean mask ``(d,)`` or a
            sequence of indices; at least one coordinate known and one unknown.
        y:
            Their observed values, ``(n_known,)`` in the order of the coordinates.

        Returns
        -------
        GaussianMixture
            Over the ``d - n_known`` unknown coordinates (in increasing order), full covariances.
        """
        mask = self._known_mask(known)
        obs = _as_f64(y, "y").reshape(-1)
        nk = int(mask.sum())
        if obs.numel() != nk:
            raise ValueError(f"y must hold the {nk} known coordinates, got {obs.numel()} values "
                             f"(shape {tuple(torch.as_tensor(y).shape)})")
        S = self.covariance_matrices()
        ki, ui = torch.nonzero(mask).flatten(), torch.nonzero(~mask).flatten()
        log_w, means, covs = [], [], []
        for j in range(self.n_components):
            Skk, Suk, Suu = S[j][ki][:, ki], S[j][ui][:, ki], S[j][ui][:, ui]
            gain = torch.linalg.solve(Skk, Suk.transpose(0, 1)).transpose(0, 1)  # Σ_uk Σ_kk^{-1}
            means.append(self._mu[j, ui] + gain @ (obs - self._mu[j, ki]))
            c = Suu - gain @ Suk.transpose(0, 1)
            covs.append(0.5 * (c + c.transpose(0, 1)))
            marginal = GaussianMixture(torch.ones(1, dtype=F64), self._mu[j, ki][None], Skk[None])
            log_w.append(self._log_w[j] + marginal.log_prob(obs[None])[0])
        lw = torch.stack(log_w)
        lam, U = torch.linalg.eigh(torch.stack(covs))
        return GaussianMixture._from_parts(lw - torch.logsumexp(lw, 0), torch.stack(means), "full", lam, U,
                                           (int(ui.numel()),))

    def _subset(self, components: torch.Tensor) -> "GaussianMixture":
        """The mixture of the listed components, weights renormalised."""
        lw = self._log_w[components]
        return GaussianMixture._from_parts(lw - torch.logsumexp(lw, 0), self._mu[components], self._kind,
                                           self._lam[components],
                                           None if self._U is None else self._U[components], self.event_shape)

    # -- marginals under a linear SDE ----------------------------------------------------------
    def push(self, sde, t: TimeLike) -> "GaussianMixture":
        r"""The exact marginal $p_t$ at a scalar time t: means $m\mu_k$, covariances
        $m^2\Sigma_k + \sigma^2 I$ (same eigenvectors, eigenvalues $m^2\lambda_k + \sigma^2$)."""
        sde = _linear_sde(sde)
        t64 = as_time(t, "t")
        if t64.dim() == 1:
            if t64.numel() != 1:
                raise ValueError(f"push needs a scalar time t (one marginal); got {short(t)}")
            t64 = t64[0]
        check_time_range(t64, sde.T)
        t64 = t64.detach().cpu()
        m, s2 = sde.kernel.m(t64), sde.kernel.sigma2(t64)
        return GaussianMixture._from_parts(self._log_w.clone(), m * self._mu, self._kind,
                                           m * m * self._lam + s2,
                                           None if self._U is None else self._U.clone(),
                                           self.event_shape)

    def exact_score(self, sde, analytic_vjp: bool = True) -> Callable[[torch.Tensor, TimeLike], torch.Tensor]:
        r"""The exact marginal score ``score(x, t)`` $= \nabla_x\log p_t(x)$ under a linear SDE.

        ``t`` is a float, a 0-d tensor or a ``(B,)`` tensor (float64 or x's dtype), in ``[0, T]``.
        The result has x's shape and dtype and is differentiable in ``x`` (and ``t``), to any order.

        With ``analytic_vjp=True`` (default) backpropagation through the score uses the closed-form
        Jacobian $\nabla^2\log p_t = -\sum_k r_kC_k^{-1} + \sum_k r_ks_ks_k^\top - ss^\top$
        (a few ``(B, K, d)`` operations instead of autograd replaying the forward pass: the
        vector–Jacobian product costs about as much as the forward pass). It applies where all
        components are evaluated at once and ``t`` does not require grad; elsewhere, and with
        ``analytic_vjp=False``, plain autograd runs (same values to rounding).
        """
        sde = _linear_sde(sde)
        check_bool(analytic_vjp, "analytic_vjp")

        def score(x: torch.Tensor, t: TimeLike) -> torch.Tensor:
            xf = self._flat(x)
            m, s2 = self._time_coefs(sde, x, t)
            x64 = xf.to(F64)
            B = x64.shape[0]
            if (analytic_vjp and not (m.requires_grad or s2.requires_grad) and
                    B * self.n_components * self.dim * (self.dim if self._kind == "full" else 1)
                    <= self._VECTORIZE_LIMIT):
                out = _MixtureScore.apply(x64, m, s2, self)[0]  # analytic Jacobian-vector products
            else:  # plain autograd (also differentiable in t)
                out = self._evaluate(x64, m, s2, True)[1]
            return out.to(x.dtype).reshape(x.shape)

        return score

    def _score_parts(self, x64: torch.Tensor, m: torch.Tensor, s2: torch.Tensor):
        r"""Responsibilities ``r`` (B, K), the per-component scores $s_k = -C_k^{-1}(x - m\mu_k)$
        (B, K, d) in the original coordinates, ``c`` (the eigenvalues of $C_k$: (1|B, K, d) or
        (1|B, K, 1)) and the score $s = \sum_k r_k s_k$ (B, d); differentiable torch operations."""
        log_w, _, _, U = self._params(x64.device)
        z, c, q = self._component_terms(x64, m, s2)
        lk = log_w - 0.5 * q  # (B, K); constants cancel in r
        e = torch.exp(lk - lk.detach().amax(dim=1, keepdim=True))  # softmax over k (the shift cancels;
        r = e / (e @ torch.ones(self.n_components, dtype=F64, device=x64.device))[:, None]  # 2.6x faster)
        zc = z / c
        sk = -(torch.einsum("bkj,kij->bki", zc, U) if self._kind == "full" else zc)
        return r, sk, c, self._mix(r, sk)

    def _mix(self, r: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r"""$\sum_k r_k v_k$ for ``r`` (B, K), ``v`` (B, K, d): a batched matrix product for
        small d, a broadcast product and sum otherwise (whichever is faster on the CPU, measured)."""
        if self.dim <= 4:
            return torch.bmm(r[:, None, :], v)[:, 0]
        return (r[..., None] * v).sum(1)

    def _score_jvp(self, r, sk, c, s, u):
        r"""$J u$ for the score's Jacobian $J = \nabla^2\log p_t
        = -\sum_k r_k C_k^{-1} + \sum_k r_k s_k s_k^\top - s s^\top$ (symmetric, so also $u^\top J$):
        $Ju = -\sum_k r_k C_k^{-1}u + \sum_k r_k s_k (s_k\cdot u) - s\,(s\cdot u)$."""
        U = self._params(u.device)[3]
        # (broadcast products and matmul only: this runs under vmap for batched VJPs, and einsum
        # has no batching rule inside a custom backward)
        if self._kind == "full":  # C_k^{-1} u = U_k diag(1/c_k) U_k^T u
            w = torch.matmul(u[:, None, None, :], U)[:, :, 0, :] / c  # (B, K, d): U_k^T u / c_k
            cinv_u = torch.matmul(w[:, :, None, :], U.transpose(1, 2))[:, :, 0, :]
        else:
            cinv_u = u[:, None, :] / c
        if self.dim <= 4:  # a product with ones is ~8x faster than a sum over a size-2 axis on the CPU
            ones_d = torch.ones(self.dim, dtype=u.dtype, device=u.device)
            proj = ((sk * u[:, None, :]) @ ones_d)[..., None]  # (B, K, 1): s_k . u
            su = ((s * u) @ ones_d)[:, None]
        else:  # ... but under vmap (batched VJPs) it runs once per vector, so not for larger d
            proj = (sk * u[:, None, :]).sum(-1, keepdim=True)
            su = (s * u).sum(-1, keepdim=True)
        return self._mix(r, sk * proj - cinv_u) - s * su

    def exact_log_prob(self, sde) -> Callable[[torch.Tensor, TimeLike], torch.Tensor]:
        """The exact marginal log density ``log_prob(x, t)`` (shape ``(B,)``, x's dtype) under a linear SDE.

        Differentiable in ``x`` and in ``t`` (through the kernel), e.g. for Fokker–Planck checks.
        """
        sde = _linear_sde(sde)

        def log_prob(x: torch.Tensor, t: TimeLike) -> torch.Tensor:
            xf = self._flat(x)
            m, s2 = self._time_coefs(sde, x, t)
            return self._evaluate(xf.to(F64), m, s2, False)[0].to(x.dtype)

        return log_prob

    def exact_posterior_mean(self, sde) -> Callable[[torch.Tensor, TimeLike], torch.Tensor]:
        r"""The exact denoiser ``D(x, t)`` $= E[x_0 \mid x_t = x]$ under a linear SDE.

        $\sum_k r_k(x)\big(\mu_k + m\,\Sigma_k C_k^{-1}(x - m\mu_k)\big)$; shaped like x.
        """
        sde = _linear_sde(sde)

        def posterior_mean(x: torch.Tensor, t: TimeLike) -> torch.Tensor:
            xf = self._flat(x)
            m, s2 = self._time_coefs(sde, x, t)
            return self._evaluate(xf.to(F64), m, s2, False, want_post=True)[2].to(x.dtype).reshape(x.shape)

        return posterior_mean

    def exact_posterior_covariance(self, sde) -> Callable[[torch.Tensor, TimeLike], torch.Tensor]:
        r"""The exact $\mathrm{Cov}[x_0 \mid x_t = x]$, ``(B, d, d)`` (for moderate d).

        The posterior is a mixture with weights $r_k(x)$, means
        $a_k = \mu_k + m\Sigma_kC_k^{-1}(x - m\mu_k)$ and covariances
        $P_k = \Sigma_k - m^2\Sigma_kC_k^{-1}\Sigma_k = U_k\,\mathrm{diag}(\sigma^2\lambda_k/(m^2\lambda_k+\sigma^2))\,U_k^\top$;
        its covariance is $\sum_k r_k(P_k + a_k a_k^\top) - \bar a\bar a^\top$.
        """
        sde = _linear_sde(sde)

        def posterior_covariance(x: torch.Tensor, t: TimeLike) -> torch.Tensor:
            xf = self._flat(x).to(F64)
            m, s2 = self._time_coefs(sde, x, t)
            log_w, mu, lam, U = self._params(x.device)
            mb, s2b = m.reshape(-1, 1), s2.reshape(-1, 1)
            B, d = xf.shape
            logs, means, covs = [], [], []
            for k in range(self.n_components):
                lk_lam = lam[k] if self._kind != "iso" else lam[k].expand(d)
                c = mb * mb * lk_lam + s2b  # (1 or B, d)
                y = xf - mb * mu[k]
                z = y @ U[k] if self._kind == "full" else y
                logs.append((log_w[k] + gaussian_log_prob(z, 0.0, c, event_dims=1)).expand(B))
                lz = lk_lam * z / c
                p = s2b * lk_lam / c  # (1 or B, d) eigenvalues of P_k
                if self._kind == "full":
                    means.append(mu[k] + mb * (lz @ U[k].transpose(0, 1)))
                    covs.append(torch.einsum("ij,bj,lj->bil", U[k], p, U[k]).expand(B, d, d))
                else:
                    means.append(mu[k] + mb * lz)
                    covs.append(torch.diag_embed(p).expand(B, d, d))
            r = torch.softmax(torch.stack(logs, 1), dim=1)  # (B, K)
            A = torch.stack(means, 1)  # (B, K, d)
            abar = (r[:, :, None] * A).sum(1)
            dA = A - abar[:, None, :]
            P = (r[:, :, None, None] * torch.stack(covs, 1)).sum(1)
            return (P + torch.einsum("bk,bki,bkj->bij", r, dA, dA)).to(x.dtype)

        return posterior_covariance


LabelLike = Union[int, torch.Tensor]


class LabelledMixture(GaussianMixture):
    r"""A Gaussian mixture whose components carry class labels: exact conditional scores and guidance.

    Component $k$ belongs to class $c_k$; a class is one component or a group of them. With
    $\pi_c = \sum_{k: c_k = c}\pi_k$ the class prior and $p_0(x \mid c) = \sum_{k: c_k = c}
    \pi_k\,\mathcal N(\mu_k, \Sigma_k)/\pi_c$, every class-conditional marginal under a linear SDE
    is again a mixture (the components of class c, pushed by `GaussianMixture.push`), so at every t

    $$
        \log p_t(c \mid x) = \log\pi_c + \log p_t(x \mid c) - \log p_t(x),\qquad
        \nabla_x\log p_t(c \mid x) = \nabla_x\log p_t(x \mid c) - \nabla_x\log p_t(x)
    $$

    are exact, and so is the guided score of scale $w$ (``docs/guidance.md``):

    $$
        \nabla\log p_t(x) + (1 + w)\,\nabla\log p_t(c \mid x)
        = (1 + w)\,\nabla\log p_t(x \mid c) - w\,\nabla\log p_t(x).
    $$

    Every quantity is built from the class sub-mixtures' `GaussianMixture.exact_score` and
    `GaussianMixture.exact_log_prob` (no formula of its own); the unconditional ones are the
    inherited methods.

    Parameters
    ----------
    weights, means, covs:
        As for `GaussianMixture`.
    labels:
        ``(K,)`` class of each component, integers $0..C-1$ with every class used; ``None``
        (default): each component is its own class.

    Examples
    --------
    >>> import sdekit
    >>> from sdekit.oracles import LabelledMixture
    >>> lm = LabelledMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 0.0], [2.0, 2.0]], [0.3, 0.3, 0.3],
    ...                      labels=[0, 1, 1])
    >>> guided = lm.exact_guided_score(sdekit.VPSDE(), w=2.0)   # guided(x, t, label)
    """

    def __init__(self, weights, means, covs, labels: Optional[Sequence[int]] = None):
        super().__init__(weights, means, covs)
        self._set_labels(labels)

    @classmethod
    def from_mixture(cls, mixture: GaussianMixture, labels: Optional[Sequence[int]] = None) -> "LabelledMixture":
        """Label the components of an existing `GaussianMixture` (``None``: one class per component)."""
        if not isinstance(mixture, GaussianMixture):
            raise TypeError(f"mixture must be a sdekit.GaussianMixture, got {type(mixture).__name__}")
        obj = cls._from_parts(mixture._log_w.clone(), mixture._mu.clone(), mixture._kind, mixture._lam.clone(),
                              None if mixture._U is None else mixture._U.clone(), mixture.event_shape)
        obj._set_labels(labels)
        return obj

    def _set_labels(self, labels) -> None:
        K = self.n_components
        if labels is None:
            lab = torch.arange(K)
        else:
            if isinstance(labels, torch.Tensor) and (labels.is_floating_point() or labels.dtype == torch.bool):
                raise TypeError(f"labels must be integers, got a tensor of dtype {labels.dtype}")
            try:
                lab = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
            except Exception as exc:
                raise TypeError(f"labels must be a sequence of K = {K} integers, got {labels!r}") from exc
            if lab.numel() != K:
                raise ValueError(f"labels must give one class per component: {K} entries, got {lab.numel()}")
            if int(lab.min()) < 0:
                raise ValueError(f"labels must be >= 0, got {short(lab)}")
        C = int(lab.max()) + 1
        empty = [c for c in range(C) if not bool((lab == c).any())]
        if empty:
            raise ValueError(f"labels must use every class 0..{C - 1}; class {empty[0]} has no component "
                             f"(labels = {lab.tolist()})")
        self.labels = lab
        self.num_classes = C
        self._classes = [self._subset(torch.nonzero(lab == c).flatten()) for c in range(C)]

    def __repr__(self):
        return super().__repr__()[:-1].replace("GaussianMixture", "LabelledMixture", 1) + \
            f", num_classes={self.num_classes})"

    # -- classes -------------------------------------------------------------------------------
    @property
    def class_weights(self) -> torch.Tensor:
        r"""The class prior $\pi_c$, ``(C,)`` float64."""
        return torch.stack([torch.exp(torch.logsumexp(self._log_w[self.labels == c], 0))
                            for c in range(self.num_classes)])

    def class_mixture(self, label: int) -> GaussianMixture:
        r"""$p_0(x \mid c)$: the components of class ``label``, weights renormalised."""
        return self._classes[self._check_class(label)]

    def _check_class(self, label) -> int:
        if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int):
            raise TypeError(f"label must be an int class index, got {label!r}")
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label must lie in [0, {self.num_classes - 1}] (num_classes = {self.num_classes}); "
                             f"got {label}")
        return label

    def _labels_for(self, label: LabelLike, batch: int, device) -> torch.Tensor:
        """``label`` (an int or a ``(B,)`` integer tensor) as a checked ``(B,)`` long tensor."""
        if isinstance(label, torch.Tensor):
            if label.is_floating_point() or label.is_complex() or label.dtype == torch.bool:
                raise TypeError(f"label must be an int or an integer tensor, got dtype {label.dtype}")
            lab = label.to(device=device, dtype=torch.long)
            if lab.dim() == 0:
                lab = lab.expand(batch)
            if lab.dim() != 1 or lab.shape[0] != batch:
                raise ValueError(f"label must be an int or a ({batch},) tensor to match x; got shape "
                                 f"{tuple(label.shape)}")
            bad = (lab < 0) | (lab >= self.num_classes)
            if bool(bad.any()):
                raise ValueError(f"label must lie in [0, {self.num_classes - 1}] (num_classes = "
                                 f"{self.num_classes}); got {short(lab[bad])}")
            return lab
        return torch.full((batch,), self._check_class(label), dtype=torch.long, device=device)

    def sample_labelled(self, n: int, generator: Optional[torch.Generator] = None, dtype: torch.dtype = F64):
        """``(x, labels)``: ``n`` exact samples of the mixture and their classes (class from the
        class prior, then the class mixture's sample: same seed, same draw)."""
        n = check_int(n, "n", 1)
        gdev = generator.device if generator is not None else torch.device("cpu")
        lab = torch.multinomial(self.class_weights.to(gdev), n, replacement=True, generator=generator)
        x = torch.empty((n,) + self.event_shape, dtype=dtype, device=gdev)
        for c in range(self.num_classes):
            idx = torch.nonzero(lab == c).flatten()
            if idx.numel():
                x[idx] = self._classes[c].sample(int(idx.numel()), generator, dtype=dtype)
        return x, lab

    def push(self, sde, t: TimeLike) -> "LabelledMixture":
        """The exact marginal $p_t$ at a scalar time, labels kept (see `GaussianMixture.push`)."""
        return LabelledMixture.from_mixture(super().push(sde, t), self.labels)

    # -- exact conditional quantities ----------------------------------------------------------
    def _per_class(self, make: Callable, x: torch.Tensor, t: TimeLike, label: LabelLike) -> torch.Tensor:
        """Evaluate ``make(class_mixture)(x, t)`` for each sample's class (one call per class present)."""
        x = check_state(x, "x")
        lab = self._labels_for(label, x.shape[0], x.device)
        present = torch.unique(lab).tolist()
        if len(present) == 1:
            return make(self._classes[present[0]])(x, t)
        tb = t[None].expand(x.shape[0]) if isinstance(t, torch.Tensor) and t.dim() == 0 else t
        parts, order = [], []
        for c in present:
            idx = torch.nonzero(lab == c).flatten()
            tc = tb[idx] if isinstance(tb, torch.Tensor) and tb.dim() == 1 and tb.shape[0] > 1 else tb
            parts.append(make(self._classes[c])(x[idx], tc))
            order.append(idx)
        out = torch.cat(parts)
        inv = torch.empty_like(torch.cat(order))
        inv[torch.cat(order)] = torch.arange(x.shape[0], device=x.device)
        return out[inv]

    def exact_conditional_log_prob(self, sde) -> Callable[[torch.Tensor, TimeLike, LabelLike], torch.Tensor]:
        r"""``log_prob(x, t, label)`` $= \log p_t(x \mid c)$, ``(B,)``; ``label`` an int or a ``(B,)`` tensor."""
        sde = _linear_sde(sde)
        return lambda x, t, label: self._per_class(lambda gm: gm.exact_log_prob(sde), x, t, label)

    def exact_conditional_score(self, sde) -> Callable[[torch.Tensor, TimeLike, LabelLike], torch.Tensor]:
        r"""``score(x, t, label)`` $= \nabla_x\log p_t(x \mid c)$, shaped like x."""
        sde = _linear_sde(sde)
        return lambda x, t, label: self._per_class(lambda gm: gm.exact_score(sde), x, t, label)

    def exact_class_log_posterior(self, sde) -> Callable[[torch.Tensor, TimeLike], torch.Tensor]:
        r"""``log_posterior(x, t)`` $= \log p_t(c \mid x)$ for every class, ``(B, C)`` (rows sum to 1 in
        probability); differentiable in x."""
        sde = _linear_sde(sde)
        cond = [gm.exact_log_prob(sde) for gm in self._classes]
        marg = self.exact_log_prob(sde)

        def log_posterior(x: torch.Tensor, t: TimeLike) -> torch.Tensor:
            log_pc = torch.log(self.class_weights).to(device=x.device, dtype=x.dtype)
            return torch.stack([f(x, t) for f in cond], 1) + log_pc - marg(x, t)[:, None]

        return log_posterior

    def exact_classifier(self, sde) -> Callable[[torch.Tensor, TimeLike, LabelLike], torch.Tensor]:
        r"""``log_prob(x, t, label)`` $= \log p_t(c \mid x)$ of the given class, ``(B,)``: the exact
        noise-conditional classifier (differentiable in x: feed it to classifier guidance)."""
        post = self.exact_class_log_posterior(sde)

        def log_prob(x: torch.Tensor, t: TimeLike, label: LabelLike) -> torch.Tensor:
            lab = self._labels_for(label, x.shape[0], x.device)
            return post(x, t).gather(1, lab[:, None])[:, 0]

        return log_prob

    def exact_classifier_grad(self, sde) -> Callable[[torch.Tensor, TimeLike, LabelLike], torch.Tensor]:
        r"""``grad(x, t, label)`` $= \nabla_x\log p_t(c \mid x) = \nabla\log p_t(x \mid c) - \nabla\log p_t(x)$."""
        cond, marg = self.exact_conditional_score(sde), self.exact_score(sde)
        return lambda x, t, label: cond(x, t, label) - marg(x, t)

    def exact_guided_score(self, sde, w: float) -> Callable[[torch.Tensor, TimeLike, LabelLike], torch.Tensor]:
        r"""The exact guided score ``score(x, t, label)`` $= \nabla\log p_t(x) + (1 + w)\nabla\log p_t(c \mid x)$.

        $w = 0$ is the conditional score $\nabla\log p_t(x \mid c)$, $w = -1$ the unconditional
        one. Written here independently of `sdekit.guidance` (which the tests check against it).
        """
        w = check_real(w, "w")
        marg, grad = self.exact_score(sde), self.exact_classifier_grad(sde)
        return lambda x, t, label: marg(x, t) + (1.0 + w) * grad(x, t, label)
