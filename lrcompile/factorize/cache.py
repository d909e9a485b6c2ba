"""Factor cache on disk: compiling the same weights with the same site config again reuses the factors.

The key covers the weight's bytes, dtype and shape, the family and its resolved config (init included), the
hash of the site's calibration statistics, and the versions of lrcompile, torch and the factorisation code (the
family's module and the SVD / whitening code, by content), so a changed weight, config or code never hits a
stale entry. Entries are safetensors files written atomically (temp file + rename); an entry's metadata keeps
what the factorisation reported (kept energy, the init and SVD algorithm used) so that a hit reports the same as
the miss that made it.

The cache directory is untrusted (shared, stale, garbled or planted): only regular files are opened; an entry is
used only if the checksum of its tensors (names, dtypes, shapes, bytes) matches the one stored with it, and the
caller checks the shapes against the family's. A bad, unreadable or unwritable entry is a miss with one warning,
and a bad entry is removed so it is rebuilt. Temp files of killed writers are removed after an hour.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import sys
import tempfile
import time
import warnings
from typing import Any, NamedTuple, Optional

import torch

from ..cache_dir import cache_path, cache_root

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


_code_versions: dict = {}


def code_version(family: str) -> str:
    """lrcompile's and torch's versions and a hash of the code that computes a family's factors: its module and
    the shared SVD / whitening modules."""
    if family not in _code_versions:
        import lrcompile

        from ..families import FAMILIES

        mods = [sys.modules[FAMILIES[family].__module__]] if family in FAMILIES else []
        from ..families import whitening_blocks
        from . import svd, whiten

        h = hashlib.blake2b(digest_size=16)
        h.update(f"{lrcompile.__version__} {torch.__version__}".encode())
        for m in [*mods, svd, whiten, whitening_blocks]:
            with open(m.__file__, "rb") as f:
                h.update(f.read())
        _code_versions[family] = h.hexdigest()
    return _code_versions[family]


def key(weight: torch.Tensor, family: str, cfg, stats_digest: Optional[str]) -> str:
    cfg_s = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    h = hashlib.blake2b(digest_size=16)
    for part in (weight_digest(weight), family, cfg_s, stats_digest or "-", code_version(family)):
        h.update(part.encode())
    return h.hexdigest()


def payload_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for n in sorted(tensors):
        t = tensors[n]
        h.update(f"{n} {t.dtype} {tuple(t.shape)};".encode())
        _update(h, t)
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


CHECKSUM = "lrcompile_checksum"  # metadata key of the payload digest
STALE_TMP_S = 3600  # a temp file this old belongs to a writer that died
_warned: set = set()


def _warn(what: str, path: str, why: str) -> None:
    """One warning per kind of cache trouble and directory: a broken cache is a miss, not a flood."""
    k = (what, os.path.dirname(os.path.dirname(path)))
    if k not in _warned:
        _warned.add(k)
        warnings.warn(f"lrcompile: factor cache {what} {path} ({why}); computing the factors instead", stacklevel=4)


def _file(k: str) -> str:
    return cache_path("factors", k[:2], f"{k}.safetensors")


class Entry(NamedTuple):
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]  # JSON values stored with the factors (safetensors metadata is str -> str)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def lookup(k: str) -> Optional[Entry]:
    try:
        path = _file(k)
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:  # the cache root is not a directory, or cannot be read
        _warn("unusable at", getattr(e, "filename", None) or "cache", f"{type(e).__name__}: {e.strerror}")
        return None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        _warn("entry is not a regular file:", path, "ignored")
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {n: f.get_tensor(n) for n in f.keys()}
        meta = {n: json.loads(v) for n, v in raw.items() if n != CHECKSUM}
        if raw.get(CHECKSUM) != payload_digest(tensors):
            raise ValueError("checksum mismatch")
        return Entry(tensors, meta)
    except Exception as e:  # truncated, garbled or planted: a miss, and the entry is rebuilt
        _warn("entry unreadable or garbled:", path, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        _remove(path)
        return None


def evict(k: str) -> None:
    """Remove an entry its user found wrong (shapes that do not fit the family)."""
    try:
        _remove(_file(k))
    except OSError:
        pass


def _sweep(directory: str) -> None:
    now = time.time()
    try:
        for name in os.listdir(directory):
            if name.endswith(".tmp"):
                p = os.path.join(directory, name)
                try:
                    if now - os.lstat(p).st_mtime > STALE_TMP_S:
                        os.remove(p)
                except OSError:
                    pass
    except OSError:
        pass


def store(k: str, tensors: dict[str, torch.Tensor], meta: Optional[dict[str, Any]] = None) -> None:
    """Write an entry; a cache that cannot be written is one warning, never a failed site."""
    from safetensors.torch import save_file

    payload = {n: t.detach().contiguous().cpu() for n, t in tensors.items()}
    metadata = {n: json.dumps(v) for n, v in (meta or {}).items()}
    metadata[CHECKSUM] = payload_digest(payload)
    tmp = None
    try:
        path = _file(k)
        _sweep(os.path.dirname(path))
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(fd)
        save_file(payload, tmp, metadata=metadata)
        os.replace(tmp, path)
    except Exception as e:  # read-only directory, a file at the cache path, a full disk
        if tmp is not None:
            _remove(tmp)
        _warn("not writable at", getattr(e, "filename", None) or "cache", f"{type(e).__name__}: {e}".splitlines()[0])


def _entries():
    """(path, stat) of every regular file in the factor cache; links and other kinds are never followed."""
    for top, _dirs, files in os.walk(os.path.join(cache_root(), "factors")):
        for name in files:
            p = os.path.join(top, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and name.endswith((".safetensors", ".tmp")):
                yield p, st


def summary() -> tuple[int, int]:
    """(entries, bytes) in the factor cache."""
    n = size = 0
    for p, st in _entries():
        n += p.endswith(".safetensors")
        size += st.st_size
    return n, size


def clear() -> int:
    """Remove every entry (and left-over temp file); returns how many entries there were."""
    n = 0
    for p, _ in list(_entries()):
        n += p.endswith(".safetensors")
        _remove(p)
    return n
