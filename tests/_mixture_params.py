"""Well-conditioned random Gaussian-mixture parameters in numpy, shared by the oracle and
Fokker–Planck tests (an independent source of parameters: no sdekit code involved)."""

import numpy as np


def random_params(kind, d, K, seed, ev=(0.2, 2.0), mean_scale=2.0):
    """Weights (K,), means (K, d) and covariances in ``kind`` layout: ``"full"`` (K, d, d) with
    eigenvalues in ``ev``, ``"diag"`` (K, d), ``"iso"`` (K,)."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.2, 1.0, K)
    mu = rng.normal(0.0, mean_scale, (K, d))
    if kind == "full":
        covs = []
        for _ in range(K):
            Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
            covs.append(Q @ np.diag(rng.uniform(*ev, d)) @ Q.T)
        S = np.array(covs)
    elif kind == "diag":
        S = rng.uniform(*ev, (K, d))
    else:
        S = rng.uniform(*ev, K)
    return w, mu, S
