"""Factor cache on disk: compiling the same weights with the same site config again reuses the factors.

The key covers the weight's bytes, dtype and shape, the family and its resolved config (init included) and the
hash of the site's calibration statistics, so a changed weight or config can never hit a stale entry.
Entries are safetensors files written atomically (temp file + rename): a crash leaves no half entry, and a
corrupt file is treated as a miss and replaced. An entry's metadata keeps what the factorisation reported
(kept energy, the init and SVD algorithm used) so that a hit reports the same as the miss that made it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from typing import Any, NamedTuple, Optional

import torch

from .cache_dir import cache_path


# A strided (e.g. Conv1D's transposed) or non-CPU weight is hashed one slice of rows at a time, so computing the
# key never holds a second full copy of the weight; the byte stream, and so the digest, is the same either way.
CHUNK_BYTES = 64 << 20


def _pieces(t: torch.Tensor):
    """The tensor's bytes in row-major order, as buffers hashlib reads in place (a contiguous CPU tensor: one
    buffer over its own storage; otherwise copies of at most CHUNK_BYTES, or one row if a row is larger)."""
    t = t.detach()
    if t.numel() == 0:
        return
    if t.dim() == 0:
        t = t.reshape(1)
    if t.device.type == "cpu" and t.is_contiguous():
        yield t.reshape(-1).view(torch.uint8).numpy()
        return
    row = t[0].numel() * t.element_size()
    for part in t.split(max(1, CHUNK_BYTES // max(row, 1))):
        yield part.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


def _update(h, t: torch.Tensor) -> None:
    for buf in _pieces(t):
        h.update(buf)


def weight_digest(weight: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{weight.dtype}{tuple(weight.shape)}".encode())
    _update(h, weight)
    return h.hexdigest()


def key(weight: torch.Tensor, family: str, cfg, stats_digest: Optional[str]) -> str:
    cfg_s = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    h = hashlib.blake2b(digest_size=16)
    for part in (weight_digest(weight), family, cfg_s, stats_digest or "-"):
        h.update(part.encode())
    return h.hexdigest()


def stats_digest(stats) -> Optional[str]:
    """Hash of one site's calibration statistics (any tensors and ints it carries). Fields that are no part of
    the statistics' value (`compare=False`: the site name CalibrationStats.get sets) stay out of the key."""
    if stats is None:
        return None
    skip = {f.name for f in dataclasses.fields(stats) if not f.compare} if dataclasses.is_dataclass(stats) else set()
    h = hashlib.blake2b(digest_size=16)
    for name, value in sorted(vars(stats).items()):
        if name in skip:
            continue
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            _update(h, value)
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def _file(k: str) -> str:
    return cache_path("factors", k[:2], f"{k}.safetensors")


class Entry(NamedTuple):
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]  # JSON values stored with the factors (safetensors metadata is str -> str)


def lookup(k: str) -> Optional[Entry]:
    path = _file(k)
    if not os.path.exists(path):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = {n: json.loads(v) for n, v in (f.metadata() or {}).items()}
            return Entry({n: f.get_tensor(n) for n in f.keys()}, meta)
    except Exception as e:  # truncated or corrupt: a miss, and the entry is rebuilt
        warnings.warn(f"lrcompile: factor cache entry {path} unreadable ({type(e).__name__}); recomputing", stacklevel=2)
        try:
            os.remove(path)
        except OSError:
            pass
        return None


def store(k: str, tensors: dict[str, torch.Tensor], meta: Optional[dict[str, Any]] = None) -> None:
    from safetensors.torch import save_file

    path = _file(k)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, tmp,
                  metadata={n: json.dumps(v) for n, v in (meta or {}).items()})
        os.replace(tmp, path)
    except Exception:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
