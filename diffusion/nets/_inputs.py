"""Input checks shared by the networks (no sdekit import: networks are plain ``nn.Module``s).

Every check raises ``ValueError`` (wrong shape or value) or ``TypeError`` (wrong type or dtype)
naming the argument and what was received, before any computation.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["check_x", "check_noise_cond", "check_label", "activation", "positive_int", "ACTIVATIONS"]

ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (one of `ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}: {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_x(x: Any, event_shape: Sequence[int], what: str) -> torch.Tensor:
    """``x`` must be a floating tensor of shape ``(B, *event_shape)`` with B ≥ 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    expected = tuple(event_shape)
    if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected or x.shape[0] < 1:
        raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}) for this {what}; "
                         f"got shape {tuple(x.shape)}")
    return x


def check_noise_cond(noise_cond: Any, batch: int) -> torch.Tensor:
    """``noise_cond`` must be a real ``(B,)`` tensor (a 0-d tensor or a number broadcasts to B)."""
    if isinstance(noise_cond, bool):
        raise TypeError(f"noise_cond must be a (B,) float tensor, got {noise_cond!r}")
    if isinstance(noise_cond, numbers.Real):
        noise_cond = torch.tensor(float(noise_cond))
    if not isinstance(noise_cond, torch.Tensor):
        raise TypeError(f"noise_cond must be a (B,) float tensor, got {type(noise_cond).__name__}")
    if not noise_cond.is_floating_point():
        raise TypeError(f"noise_cond must be a floating-point tensor, got dtype {noise_cond.dtype}")
    if noise_cond.dim() == 0:
        noise_cond = noise_cond.expand(batch)
    if noise_cond.dim() != 1 or noise_cond.shape[0] != batch:
        raise ValueError(f"noise_cond must have shape (B,) = ({batch},) to match x; "
                         f"got shape {tuple(noise_cond.shape)}")
    return noise_cond


def check_label(label: Any, batch: int, num_classes: Optional[int], device: torch.device) -> Optional[torch.Tensor]:
    """The label tensor to embed, ``(B,)`` int64 in ``[0, num_classes]`` (``num_classes`` = null).

    ``label=None`` means the null label (all ``num_classes``) for a conditional net and nothing for
    an unconditional one; a label given to an unconditional net is an error.
    """
    if num_classes is None:
        if label is not None:
            raise ValueError("label was given but this network is unconditional (num_classes=None); "
                             "build it with num_classes=... to condition on labels")
        return None
    if label is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    if isinstance(label, bool):
        raise TypeError(f"label must be an integer tensor (B,) or None, got {label!r}")
    if isinstance(label, numbers.Integral):
        label = torch.tensor(int(label))
    if not isinstance(label, torch.Tensor):
        raise TypeError(f"label must be an integer tensor (B,) or None, got {type(label).__name__}")
    if label.is_floating_point() or label.is_complex() or label.dtype == torch.bool:
        raise TypeError(f"label must be an integer tensor, got dtype {label.dtype}")
    if label.dim() == 0:
        label = label.expand(batch)
    if label.dim() != 1 or label.shape[0] != batch:
        raise ValueError(f"label must have shape (B,) = ({batch},) to match x; got shape {tuple(label.shape)}")
    bad = (label < 0) | (label > num_classes)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"label must lie in [0, {num_classes}] (0..{num_classes - 1} are classes, "
                         f"{num_classes} is the null label); label[{i}] = {int(label[i])}")
    return label.to(device=device, dtype=torch.long)


def as_int_tuple(value: Any, name: str) -> Tuple[int, ...]:
    """A tuple of positive ints (from a list or tuple; JSON turns tuples into lists)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of positive integers, got {value!r}")
    return tuple(positive_int(v, f"{name}[{i}]") for i, v in enumerate(value))


def conditioning(net, x: torch.Tensor, noise_cond: Any, label: Any, dtype: torch.dtype) -> torch.Tensor:
    """The pre-activation conditioning vector of ``net``: ``emb_mlp(embed(noise_cond))`` plus the
    label embedding when the net is conditional (inputs checked against the batch of ``x``).

    ``net`` provides ``embed``, ``emb_mlp``, ``label_emb`` and ``num_classes``.
    """
    u = check_noise_cond(noise_cond, x.shape[0]).to(x.device)
    y = check_label(label, x.shape[0], net.num_classes, x.device)
    c = net.emb_mlp(net.embed(u).to(dtype))
    return c if y is None else c + net.label_emb(y)
