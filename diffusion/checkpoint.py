"""Checkpoints as safetensors + JSON: atomic, verified, never unpickled.

A checkpoint at step $k$ is a pair of files in one directory,

- ``ckpt-{k:08d}.safetensors``: every tensor (model, EMA, optimizer moments, RNG states, ...), in
  the safetensors format;
- ``ckpt-{k:08d}.json``: the manifest: the user's JSON metadata (config, step, schedule position,
  RNG states of Python and NumPy, ...) plus the SHA-256 and byte size of the tensors file.

Each file is written to a temporary file in the same directory, flushed and ``fsync``-ed, then
renamed over its final name with ``os.replace`` (atomic on POSIX and Windows), and the directory
is ``fsync``-ed so that the rename itself survives a crash. The tensors file goes first and the
manifest last, so a manifest exists only once its tensors are on disk, and the hash it carries
detects every other inconsistency: a truncated or corrupt tensors file, a tensors file replaced
by another step's, a manifest whose tensors are missing. Such a pair raises ``CheckpointError``
from ``load_checkpoint`` and is skipped (with a warning) by ``latest_checkpoint``.

Loading uses ``safetensors.torch.load_file`` and ``json``: nothing is ever unpickled, so loading
a checkpoint from an untrusted source cannot execute code.

One writer per directory is assumed (a trainer and its checkpoints).

Helpers turn the non-tensor state a trainer needs into these two parts: ``flatten_state`` /
``unflatten_state`` for nested structures such as ``optimizer.state_dict()`` (tensors out, the
rest as JSON, exactly restored: tuples, integer keys and non-finite floats included), and
``rng_state`` / ``set_rng_state`` for the torch (CPU and CUDA), NumPy and Python generators.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "flatten_state",
    "unflatten_state",
    "rng_state",
    "set_rng_state",
]

PathLike = Union[str, os.PathLike]

FORMAT = "diffusion.checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d+)\.(json|safetensors)$")
_TMP_PREFIX = ".ckpt-"
_TMP_SUFFIX = ".tmp"
_HASH_CHUNK = 1 << 20  # bytes read at a time when hashing


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not match its manifest."""


# ------------------------------------------------------------------------------------------------
# file names
# ------------------------------------------------------------------------------------------------
def _stem(step: int) -> str:
    return f"ckpt-{step:08d}"


def _step_of(path: Path) -> Optional[int]:
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else None


def _check_step(meta: Mapping[str, Any]) -> int:
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict (JSON-serialisable), got {type(meta).__name__}")
    step = meta.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"meta['step'] must be a non-negative int (it names the files), got {step!r}")
    return int(step)


# ------------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _tmp_path(directory: Path, final: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + final.name + ".", suffix=_TMP_SUFFIX, dir=directory)
    os.close(fd)
    return Path(tmp)


def _sha256(path: Path, fsync: bool = False) -> Tuple[str, int]:
    """SHA-256 and size of a file (with ``fsync``: after forcing its contents to disk)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "r+b" if fsync else "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _sha256_and_fsync(path: Path) -> Tuple[str, int]:
    """SHA-256 and size of a file, after forcing its contents to disk."""
    return _sha256(path, fsync=True)


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors that share no storage (safetensors refuses aliases)."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict of name -> torch.Tensor, got {type(tensors).__name__}")
    out: Dict[str, torch.Tensor] = {}
    seen = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"tensors[{name!r}] has layout {t.layout}; only dense tensors can be saved")
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
            else:
                seen.add(ptr)
        out[name] = t
    return out


def save_checkpoint(directory: PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                    keep_last: Optional[int] = 3) -> Path:
    """Write ``ckpt-{step:08d}.safetensors`` and ``ckpt-{step:08d}.json`` atomically.

    Parameters
    ----------
    directory:
        Where the checkpoints live (created if missing).
    tensors:
        Name -> tensor. Moved to the CPU; tensors sharing storage are stored as copies.
    meta:
        JSON-serialisable metadata; ``meta["step"]`` (a non-negative int, default 0: a model
        saved outside training) names the files.
        Non-finite floats are refused (strict JSON); encode them with ``flatten_state``.
    keep_last:
        Keep only the newest ``keep_last`` checkpoints (by step) after writing; ``None`` keeps all.

    Returns
    -------
    Path
        The manifest (``.json``) of the new checkpoint; pass it (or the directory) to
        ``load_checkpoint``.

    Raises
    ------
    TypeError, ValueError
        Bad ``tensors``, ``meta`` (not JSON-serialisable, no valid ``step``) or ``keep_last``.
        Nothing is written in that case.
    """
    step = _check_step(meta)
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")
    prepared = _prepare_tensors(tensors)
    try:
        meta_text = json.dumps(dict(meta), allow_nan=False)  # validate before touching the disk
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"meta must be JSON-serialisable with finite floats: {exc}") from exc
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = _stem(step)
    tensors_path, manifest_path = directory / (stem + ".safetensors"), directory / (stem + ".json")

    # 1. the tensors: temporary file, fsync, rename
    tmp = _tmp_path(directory, tensors_path)
    try:
        save_file(prepared, str(tmp), metadata={"format": FORMAT, "step": str(step)})
        digest, size = _sha256_and_fsync(tmp)
        os.replace(tmp, tensors_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)

    # 2. the manifest, last: it vouches for the tensors file by hash and size
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "tensors_file": tensors_path.name,
                "tensors_sha256": digest, "tensors_bytes": size, "meta": json.loads(meta_text)}
    tmp = _tmp_path(directory, manifest_path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, allow_nan=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, manifest_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)

    _prune(directory, keep_last, step)
    return manifest_path


def _prune(directory: Path, keep_last: Optional[int], current: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, orphans older than the kept ones, and
    temporary files left by a writer that died (one writer per directory)."""
    for p in directory.glob(_TMP_PREFIX + "*" + _TMP_SUFFIX):
        p.unlink(missing_ok=True)
    if keep_last is None:
        return
    steps = sorted({s for p in directory.iterdir() if (s := _step_of(p)) is not None and p.suffix == ".json"})
    kept = steps[-keep_last:]
    oldest_kept = kept[0] if kept else current
    for s in steps[:-keep_last]:
        (directory / (_stem(s) + ".json")).unlink(missing_ok=True)  # manifest first: never a dangling one
        (directory / (_stem(s) + ".safetensors")).unlink(missing_ok=True)
    for p in directory.glob("ckpt-*.safetensors"):  # tensors whose manifest never came
        s = _step_of(p)
        if s is not None and s < oldest_kept:
            p.unlink(missing_ok=True)
    _fsync_dir(directory)


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def _manifest_path(path: PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise CheckpointError(f"no complete checkpoint in directory {p}")
        return found
    if p.suffix == ".safetensors":
        return p.with_suffix(".json")
    if p.suffix == ".json":
        return p
    if p.with_name(p.name + ".json").exists():  # a stem: .../ckpt-00000010
        return p.with_name(p.name + ".json")
    raise CheckpointError(f"{p} is not a checkpoint: expected a ckpt-*.json / ckpt-*.safetensors file or a "
                          f"directory of checkpoints")


def _verify(manifest_path: Path) -> Tuple[Dict[str, Any], Path]:
    """Read and check a manifest and its tensors file; returns (manifest, tensors path)."""
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint manifest {manifest_path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read checkpoint manifest {manifest_path}: {exc}") from exc
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is not valid JSON (truncated or corrupt): "
                              f"{exc}") from exc
    required = ("format", "step", "tensors_file", "tensors_sha256", "tensors_bytes", "meta")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or any(k not in manifest for k in required):
        raise CheckpointError(f"{manifest_path} is not a {FORMAT} manifest (needs keys {required})")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path} has format version {manifest['version']}; this code reads "
                              f"versions <= {FORMAT_VERSION}")
    name = manifest["tensors_file"]
    if not isinstance(name, str) or Path(name).name != name:
        raise CheckpointError(f"{manifest_path}: tensors_file must be a file name, got {name!r}")
    named = _step_of(manifest_path)
    if named is not None and (manifest["step"] != named or name != _stem(named) + ".safetensors"):
        raise CheckpointError(f"{manifest_path.name} records step {manifest['step']} and tensors {name!r}: it "
                              f"belongs to another checkpoint (copied or renamed)")
    tensors_path = manifest_path.parent / name
    if not tensors_path.exists():
        raise CheckpointError(f"checkpoint {manifest_path} has no tensors: {tensors_path} is missing")
    size = tensors_path.stat().st_size
    if size != manifest["tensors_bytes"]:
        raise CheckpointError(f"checkpoint tensors {tensors_path} has {size} bytes but its manifest "
                              f"{manifest_path.name} records {manifest['tensors_bytes']} (truncated or replaced)")
    digest, _ = _sha256(tensors_path)
    if digest != manifest["tensors_sha256"]:
        raise CheckpointError(f"checkpoint tensors {tensors_path} do not match the SHA-256 recorded in "
                              f"{manifest_path.name} (corrupt, or from another checkpoint)")
    return manifest, tensors_path


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu"
                    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Load a verified checkpoint: ``(tensors, meta)``.

    Parameters
    ----------
    path:
        The ``.json`` manifest, the ``.safetensors`` file, or a directory (its newest complete
        checkpoint, as ``latest_checkpoint`` finds it).
    device:
        Where to put the tensors.

    Returns
    -------
    tuple
        ``tensors`` (name -> tensor, as saved) and ``meta`` (the dict given to ``save_checkpoint``).

    Raises
    ------
    CheckpointError
        The manifest or tensors file is missing, truncated, corrupt, or the two do not match
        (size or SHA-256); the message names the file and what is wrong.
    """
    manifest_path = _manifest_path(path)
    manifest, tensors_path = _verify(manifest_path)
    try:
        tensors = load_file(str(tensors_path), device=str(device))
    except Exception as exc:  # the hash matched, so the writer produced an unreadable file
        raise CheckpointError(f"cannot read checkpoint tensors {tensors_path}: {exc}") from exc
    return tensors, manifest["meta"]


def list_checkpoints(directory: PathLike) -> List[Path]:
    """Manifests (``ckpt-*.json``) in ``directory``, oldest step first (not verified)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(s, p) for p in directory.glob("ckpt-*.json") if (s := _step_of(p)) is not None]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: PathLike) -> Optional[Path]:
    """The manifest of the newest complete, valid checkpoint in ``directory``, or ``None``.

    Torn checkpoints (a tensors file without its manifest, a manifest without its tensors, a
    truncated or mismatched pair) are skipped with a ``RuntimeWarning`` naming the file.
    """
    directory = Path(directory)
    manifests = list_checkpoints(directory)
    have = {_step_of(p) for p in manifests}
    newest_valid: Optional[Path] = None
    for p in reversed(manifests):
        try:
            _verify(p)
        except CheckpointError as exc:
            warnings.warn(f"skipping torn checkpoint: {exc}", RuntimeWarning, stacklevel=2)
            continue
        newest_valid = p
        break
    floor = _step_of(newest_valid) if newest_valid is not None else -1
    if directory.is_dir():
        for p in sorted(directory.glob("ckpt-*.safetensors")):
            s = _step_of(p)
            if s is not None and s > floor and s not in have:
                warnings.warn(f"skipping torn checkpoint: {p} has no manifest (the writer stopped before "
                              f"{p.with_suffix('.json').name})", RuntimeWarning, stacklevel=2)
    return newest_valid


# ------------------------------------------------------------------------------------------------
# nested state <-> (tensors, JSON)
# ------------------------------------------------------------------------------------------------
def _encode(obj: Any, path: str, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else {"__float__": repr(v)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, f"{path}.key{i}", tensors), _encode(v, f"{path}.{k}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"cannot store {path} of type {type(obj).__name__} in a checkpoint (tensors, numbers, "
                    f"strings, None, lists, tuples and dicts only)")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (key, val), = obj.items()
            if key == "__tensor__":
                if val not in tensors:
                    raise CheckpointError(f"checkpoint state refers to tensor {val!r}, which the tensors file lacks")
                return tensors[val]
            if key == "__tuple__":
                return tuple(_decode(v, tensors) for v in val)
            if key == "__float__":
                return float(val)
            if key == "__dict__":
                return {_decode(k, tensors): _decode(v, tensors) for k, v in val}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def flatten_state(state: Any, prefix: str) -> Tuple[Dict[str, torch.Tensor], Any]:
    """Split a nested structure (e.g. ``optimizer.state_dict()``) into tensors and JSON.

    Parameters
    ----------
    state:
        Nested dicts / lists / tuples of tensors, numbers, strings, booleans and ``None``.
    prefix:
        Prefix of the tensor names (``"optim"`` gives ``"optim.state.0.exp_avg"``...).

    Returns
    -------
    tuple
        ``(tensors, structure)``: name -> tensor, and a JSON-serialisable structure in which each
        tensor is ``{"__tensor__": name}``; tuples, non-string dict keys and non-finite floats are
        tagged so that ``unflatten_state`` restores them exactly.
    """
    tensors: Dict[str, torch.Tensor] = {}
    structure = _encode(state, prefix, tensors)
    return tensors, structure


def unflatten_state(structure: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of ``flatten_state``.

    Raises
    ------
    CheckpointError
        If the structure refers to a tensor that ``tensors`` lacks.
    """
    return _decode(structure, tensors)


# ------------------------------------------------------------------------------------------------
# random number generators
# ------------------------------------------------------------------------------------------------
def rng_state(generators: Optional[Mapping[str, torch.Generator]] = None
              ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The state of every random number generator a training step may draw from.

    Parameters
    ----------
    generators:
        Named ``torch.Generator`` objects (CPU or CUDA), e.g. ``{"batch": g1, "noise": g2}``.

    Returns
    -------
    tuple
        ``(tensors, meta)``: ``rng.torch`` (the global CPU generator), ``rng.cuda.<i>`` per CUDA
        device when CUDA is initialised, ``rng.gen.<name>`` per named generator (uint8 tensors);
        ``meta`` holds Python's ``random`` and NumPy's legacy global state as JSON.
    """
    tensors: Dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for name, g in (generators or {}).items():
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generators[{name!r}] must be a torch.Generator, got {type(g).__name__}")
        tensors[f"rng.gen.{name}"] = g.get_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    _, py = flatten_state(random.getstate(), "python")
    meta = {"python": py, "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos),
                                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    return tensors, meta


def set_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                  generators: Optional[Mapping[str, torch.Generator]] = None) -> None:
    """Restore what ``rng_state`` captured (the named generators must be given again).

    Raises
    ------
    CheckpointError
        If a named generator's state is missing from ``tensors``.
    """
    torch.set_rng_state(tensors["rng.torch"].cpu())
    cuda = [tensors[k].cpu() for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                             key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"checkpoint holds {len(cuda)} CUDA RNG states but {torch.cuda.device_count()} devices "
                          f"are visible; CUDA RNG states not restored", RuntimeWarning, stacklevel=2)
    for name, g in (generators or {}).items():
        key = f"rng.gen.{name}"
        if key not in tensors:
            raise CheckpointError(f"checkpoint has no state for generator {name!r} ({key})")
        g.set_state(tensors[key].cpu())
    if "python" in meta:
        random.setstate(unflatten_state(meta["python"], {}))
    if "numpy" in meta:
        n = meta["numpy"]
        np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
