"""Persistent autotune cache: one JSON file under `$LRCOMPILE_CACHE_DIR/autotune/`.

{"format": 1, "entries": {key: {"ms": {impl: median ms}, "discarded": {impl: why}, "spec": {...}, "env": {...}}}}.
Keys embed the device, torch/triton versions and the candidates' source hash (see select.py), so entries made
elsewhere or by older code are never hits. Concurrency: writers take an exclusive `fcntl.flock` on a lock file,
re-read the file, merge their entries in and replace it atomically (temp file + `os.replace`): two processes
tuning at once end with the union of their entries, and a reader never sees half a file. A corrupt or
truncated file is renamed `*.corrupt`, a warning says so, and the cache is rebuilt as sites are tuned again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import warnings
from typing import Optional

from ..cache_dir import cache_path
from .candidates import REFERENCE

FORMAT = 1


def path() -> str:
    return cache_path("autotune", "autotune.json")


@contextlib.contextmanager
def _locked(p: str):
    with open(p + ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _valid(data) -> bool:
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        return False
    # every entry holds the reference's time: `pick` compares the others with it
    return all(
        isinstance(e, dict)
        and isinstance(e.get("ms"), dict)
        and REFERENCE in e["ms"]
        and all(isinstance(v, (int, float)) for v in e["ms"].values())
        for e in data["entries"].values()
    )


def _parse(p: str) -> Optional[dict]:
    """Entries of the file at `p`; {} when absent; None when unreadable as an autotune cache."""
    try:
        with open(p) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data["entries"] if _valid(data) else None


def _set_aside(p: str) -> None:
    os.replace(p, p + ".corrupt")
    warnings.warn(f"lrcompile: autotune cache {p} is corrupt; moved to {p}.corrupt and rebuilding", stacklevel=3)


def _write(p: str, entries: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(p), prefix=".autotune-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache is as readable as any other cache file
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# Parsed file per path, reused while its (mtime, size) is unchanged: a compile looks up many sites.
_memo: dict[str, tuple[tuple, dict]] = {}


def entries() -> dict:
    """All entries (read-only view). A corrupt file is set aside (under the lock) and reads as empty."""
    p = path()
    try:
        st = os.stat(p)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    except FileNotFoundError:
        return {}
    hit = _memo.get(p)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    data = _parse(p)
    if data is None:
        with _locked(p):
            data = _parse(p)  # another process may have repaired it meanwhile
            if data is None:
                _set_aside(p)
                data = {}
        return data
    _memo[p] = (stamp, data)
    return data


def lookup(key: str) -> Optional[dict]:
    return entries().get(key)


def store(new: dict) -> None:
    """Merge `new` entries into the file: read under the lock, update, replace atomically."""
    p = path()
    with _locked(p):
        current = _parse(p)
        if current is None:
            _set_aside(p)
            current = {}
        current.update(new)
        _write(p, current)


def clear() -> int:
    """Remove every entry; returns how many there were."""
    p = path()
    with _locked(p):
        n = len(_parse(p) or {})
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)
    _memo.pop(p, None)
    return n


def export(dest: str) -> int:
    data = entries()
    with open(dest, "w") as f:
        json.dump({"format": FORMAT, "entries": data}, f, indent=1, sort_keys=True)
    return len(data)


def import_(src: str) -> int:
    """Merge a file written by `export` (or a copy of another machine's cache) into this cache."""
    try:
        with open(src) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{src}: cannot read autotune cache ({type(e).__name__}: {e})") from None
    if not _valid(data):
        raise ValueError(f"{src}: not an lrcompile autotune cache (format {FORMAT})")
    store(data["entries"])
    return len(data["entries"])
