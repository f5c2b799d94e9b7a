r"""The package's default end times ``t_eps`` (one place; the rule is in ``docs/concepts.md``).

Every time interval of sdekit ends at a small $t_\varepsilon > 0$ on the data side, because the
score of data with a density concentrated near a lower-dimensional set blows up like
$1/\sigma(t)$ as $t \to 0$. The defaults differ on purpose:

* ``SAMPLING_T_EPS = 1e-3`` — sampling (`SDE.reverse`, `SDE.probability_flow`). What matters is
  the samples: stopping at $\sigma(t_\varepsilon)$ of order $10^{-2}$ (VP) leaves noise well below
  any data resolution, and a final Tweedie step (``denoise=True``) removes it; going lower costs
  steps in the stiffest part of the path and gains nothing visible (Song et al. 2021 use 1e-3).
* ``LIKELIHOOD_T_EPS = 1e-5`` — likelihoods (`log_likelihood`, `elbo`). What is computed is
  $\log p_{t_\varepsilon}$, the density of the *noised* data, which approaches $\log p_0$ only as
  $t_\varepsilon \to 0$; the smaller value keeps that gap small, and it is the value the
  likelihood literature reports at (Song et al. 2021), so numbers compare.

Pass ``t_eps`` explicitly to compare a sampler's endpoint with a likelihood's.
"""

SAMPLING_T_EPS = 1e-3
LIKELIHOOD_T_EPS = 1e-5

__all__ = ["SAMPLING_T_EPS", "LIKELIHOOD_T_EPS"]
