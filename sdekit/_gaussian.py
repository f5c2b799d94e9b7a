r"""The one diagonal-Gaussian log-density of the package (and its constant $\log 2\pi$).

Every module that evaluates $\log\mathcal N(x; \mu, \mathrm{diag}(v))$ — the prior, the
perturbation kernel, the mixture oracle's components, the ELBO's prior term — calls
`gaussian_log_prob`, so the normalising constant is written once.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

__all__ = ["LOG_2PI", "gaussian_log_prob"]

LOG_2PI = math.log(2.0 * math.pi)

Number = Union[float, torch.Tensor]


def gaussian_log_prob(x: torch.Tensor, mean: Number = 0.0, var: Number = 1.0,
                      event_dims: Optional[int] = None) -> torch.Tensor:
    r"""$\sum_i \log\mathcal N(x_i; \mu_i, v_i)$ over the last ``event_dims`` dimensions of ``x``.

    $= -\tfrac12\sum_i\big[(x_i - \mu_i)^2/v_i + \log v_i + \log 2\pi\big]$.

    Parameters
    ----------
    x:
        Points, a tensor.
    mean:
        A number or a tensor broadcastable to ``x``.
    var:
        A number or a tensor broadcastable to ``x`` (``var > 0``; not checked: callers
        validate). A ``var`` that is constant along an event dimension (size 1 there, or a
        number) costs one logarithm per distinct value, not one per coordinate.
    event_dims:
        How many trailing dimensions form one event (summed over); default ``x.dim() - 1``
        (everything but the leading batch dimension).

    Returns
    -------
    torch.Tensor
        The log densities, with the shape of the leading (batch) dimensions of ``x`` broadcast
        against those of ``mean`` and ``var``.
    """
    k = x.dim() - 1 if event_dims is None else int(event_dims)
    dims = tuple(range(-k, 0))
    n = math.prod(x.shape[x.dim() - k:])
    var_t = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    r = x if isinstance(mean, (int, float)) and mean == 0 else x - mean
    quad = (r * r / var_t).sum(dims) if k else r * r / var_t
    log_v = torch.log(var_t)
    log_v = log_v.reshape((1,) * max(0, x.dim() - log_v.dim()) + tuple(log_v.shape))
    distinct = math.prod(log_v.shape[log_v.dim() - k:])  # entries of var per event
    log_det = log_v.sum(dims) * (n // distinct) if k else log_v
    return -0.5 * (quad + log_det + n * LOG_2PI)
