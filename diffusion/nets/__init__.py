r"""Score networks: plain ``nn.Module``s called as ``net(x, noise_cond, label=None)``.

``noise_cond`` is $u = \log\bar\sigma = -\lambda/2$ ($\lambda$ the log-SNR of the forward
kernel), computed by the caller, so a network is meaningful under any linear process; see
`diffusion.nets.embeddings`. These modules never import sdekit.

Every network has ``.config`` (a JSON-serialisable dict with ``"name"`` and the constructor
arguments) and ``.num_classes`` (``None`` or the class count; the label ``num_classes`` is the
null label, used when ``label=None``). `build_net` rebuilds the architecture from a config.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping

from torch import nn

from .embeddings import GaussianFourierEmbedding, SinusoidalEmbedding
from .mlp import MLPScoreNet
from .unet import UNet

__all__ = ["MLPScoreNet", "UNet", "build_net", "NETS", "SinusoidalEmbedding", "GaussianFourierEmbedding"]

#: Network classes by the ``"name"`` in their config.
NETS: Dict[str, type] = {"MLPScoreNet": MLPScoreNet, "UNet": UNet}


def build_net(config: Mapping[str, Any]) -> nn.Module:
    """Build a network from its ``config`` (as returned by ``net.config``, possibly through JSON).

    Parameters
    ----------
    config:
        A mapping with ``"name"`` (a key of `NETS`) and that class's constructor arguments.

    Returns
    -------
    torch.nn.Module
        A freshly initialised network of the same architecture; load a state_dict for the
        weights.

    Raises
    ------
    ValueError
        Unknown name (the message lists the valid ones) or unknown constructor arguments.
    TypeError
        ``config`` is not a mapping.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping with a 'name' key, got {type(config).__name__}")
    kwargs = dict(config)
    name = kwargs.pop("name", None)
    if name not in NETS:
        raise ValueError(f"unknown network name {name!r} in config; valid names: {sorted(NETS)}")
    cls = NETS[name]
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in kwargs if k not in params or k == "self")
    if unknown:
        raise ValueError(f"config has arguments {unknown} that {name} does not take; "
                         f"valid: {[p for p in params if p != 'self']}")
    return cls(**kwargs)
