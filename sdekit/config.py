"""A JSON-serialisable description of a forward process, and its inverse.

A checkpoint must record which process a score model was trained on. ``process_config(sde)``
returns a small dict of plain numbers (and, for a discrete DDPM table, a list of floats) that
``json.dumps`` writes exactly, and ``process_from_config(cfg)`` rebuilds a process with the
same kernel: $m(t)$, $\\sigma(t)$ and $g^2(t)$ agree bit for bit on every grid, because the
same constructor runs on the same float64 numbers (Python's ``json`` round-trips floats exactly).

Described: ``VPSDE``, ``SubVPSDE``, ``VESDE``, ``CosineVPSDE``, ``OrnsteinUhlenbeck`` and
``LinearSDE.from_alphas_cumprod`` tables. A process built from user callables
(``LinearSDE(f, g)``, ``LinearSDE.from_kernel(m, sigma)``, ``SDE(drift, diffusion)``) or a user
subclass has no such description: ``process_config`` raises ``TypeError`` and the process must be
passed again when a model is loaded.

Examples
--------
>>> import json, sdekit
>>> from sdekit.config import process_config, process_from_config
>>> cfg = process_config(sdekit.VPSDE(0.1, 20.0))
>>> cfg
{'type': 'VPSDE', 'beta_min': 0.1, 'beta_max': 20.0, 'T': 1.0}
>>> process_from_config(json.loads(json.dumps(cfg)))
VPSDE(beta_min=0.1, beta_max=20.0, T=1.0)
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import torch

from . import kernels as K
from .processes import SDE, VESDE, VPSDE, CosineVPSDE, LinearSDE, OrnsteinUhlenbeck, SubVPSDE

__all__ = ["process_config", "process_from_config", "PROCESS_TYPES"]

#: the ``"type"`` of a table-defined process (``LinearSDE.from_alphas_cumprod``)
TABLE_TYPE = "LinearSDE.from_alphas_cumprod"

# exact class -> constructor arguments, each an attribute of the instance of the same name
_PARAMETERS: Dict[type, Tuple[str, ...]] = {
    VPSDE: ("beta_min", "beta_max", "T"),
    SubVPSDE: ("beta_min", "beta_max", "T"),
    VESDE: ("sigma_min", "sigma_max", "T"),
    CosineVPSDE: ("s", "T"),
    OrnsteinUhlenbeck: ("theta", "sigma", "T"),
}
_BY_NAME: Dict[str, type] = {cls.__name__: cls for cls in _PARAMETERS}

#: every ``"type"`` that ``process_from_config`` accepts
PROCESS_TYPES: Tuple[str, ...] = tuple(_BY_NAME) + (TABLE_TYPE,)


def _table_of(kernel: K.DiscreteVPKernel) -> list:
    """The $\\bar\\alpha_n$ table of a discrete kernel as a list of Python floats.

    The kernel keeps the table it was built from (``alphas_cumprod``); older kernels kept only
    the knots $\\tfrac12\\log\\bar\\alpha_n$, from which the table is recovered to within an ulp.
    """
    a = getattr(kernel, "alphas_cumprod", None)
    if a is None:
        a = torch.exp(2.0 * kernel.log_m_knots[1:])
    return [float(v) for v in torch.as_tensor(a, dtype=torch.float64).flatten().tolist()]


def process_config(sde: SDE) -> Dict[str, Any]:
    """A JSON-serialisable description of a built-in or table-defined forward process.

    Parameters
    ----------
    sde:
        A ``VPSDE``, ``SubVPSDE``, ``VESDE``, ``CosineVPSDE``, ``OrnsteinUhlenbeck``, or a
        ``LinearSDE`` built by ``LinearSDE.from_alphas_cumprod``.

    Returns
    -------
    dict
        ``{"type": <class name>, <constructor arguments>...}``, e.g.
        ``{"type": "VPSDE", "beta_min": 0.1, "beta_max": 20.0, "T": 1.0}``; for a table
        ``{"type": "LinearSDE.from_alphas_cumprod", "alphas_cumprod": [...], "T": ...}``.

    Raises
    ------
    TypeError
        If ``sde`` is not an sdekit process, or is defined by user callables (or is a user
        subclass): such a process cannot be written down and must be passed again at load.
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdekit process (an SDE), got {type(sde).__name__}: {sde!r}")
    cls = type(sde)
    if cls in _PARAMETERS:
        cfg: Dict[str, Any] = {"type": cls.__name__}
        cfg.update({name: float(getattr(sde, name)) for name in _PARAMETERS[cls]})
        return cfg
    if cls is LinearSDE and isinstance(sde.kernel, K.DiscreteVPKernel):
        return {"type": TABLE_TYPE, "alphas_cumprod": _table_of(sde.kernel), "T": float(sde.T)}
    raise TypeError(
        f"{cls.__name__} ({sde!r}) cannot be described by a config: it is defined by user callables "
        f"or is a user subclass (only {', '.join(PROCESS_TYPES)} are). Pass the process again at load "
        f"(e.g. ScoreModel.load(directory, sde=...)).")


def process_from_config(cfg: Mapping[str, Any]) -> SDE:
    """Rebuild the process described by ``process_config`` (the inverse).

    Parameters
    ----------
    cfg:
        A mapping with a ``"type"`` in ``PROCESS_TYPES`` and exactly that type's arguments.

    Returns
    -------
    SDE
        A new process whose kernel equals the described one's bit for bit.

    Raises
    ------
    TypeError
        If ``cfg`` is not a mapping.
    ValueError
        If the type is unknown, an argument is missing or unexpected, or a value is out of range
        (the process's own constructor validates it).
    """
    if not isinstance(cfg, Mapping):
        raise TypeError(f"cfg must be a mapping (a process config dict), got {type(cfg).__name__}: {cfg!r}")
    kind = cfg.get("type")
    if kind not in PROCESS_TYPES:
        raise ValueError(f"cfg['type'] must be one of {PROCESS_TYPES}, got {kind!r}")
    expected = ("alphas_cumprod", "T") if kind == TABLE_TYPE else _PARAMETERS[_BY_NAME[kind]]
    args = {k: v for k, v in cfg.items() if k != "type"}
    missing = [k for k in expected if k not in args]
    unknown = sorted(set(args) - set(expected))
    if missing or unknown:
        raise ValueError(f"a {kind} config needs exactly the keys {('type',) + tuple(expected)}; "
                         f"missing {missing}, unexpected {unknown} (got {sorted(cfg)})")
    if kind == TABLE_TYPE:
        table = args["alphas_cumprod"]
        if not isinstance(table, (list, tuple)):
            raise ValueError(f"cfg['alphas_cumprod'] must be a list of floats, got {type(table).__name__}")
        return LinearSDE.from_alphas_cumprod(torch.tensor(table, dtype=torch.float64), T=args["T"])
    return _BY_NAME[kind](**args)
