"""Shape log: every site shape a compile met, as JSON lines under `$LRCOMPILE_CACHE_DIR/shapes/`.

`lrcompile warmup --from-log` tunes them all ahead of time. A line is a Spec (select.py) as a dict; a spec is
appended once (lines already in the file are not written again), under an exclusive flock so that lines of
concurrent compiles never interleave. Unreadable lines (a crash mid-write) are skipped when read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

from ..cache_dir import cache_path

_logged: dict[str, set] = {}  # log path -> keys already in it
_collectors: list[list] = []  # open `collect()` blocks


@contextlib.contextmanager
def collect():
    """Every spec recorded inside the block, in order (warmup --model tunes exactly what a compile met)."""
    got: list[dict] = []
    _collectors.append(got)
    try:
        yield got
    finally:
        _collectors.remove(got)


def path() -> str:
    return cache_path("shapes", "shapes.jsonl")


def _key(d: dict) -> str:
    return json.dumps(d, sort_keys=True)


def record(spec: dict) -> None:
    k = _key(spec)
    for got in _collectors:
        if k not in {_key(s) for s in got}:
            got.append(spec)
    p = path()
    known = _logged.get(p)
    if known is None:
        known = _logged[p] = {_key(s) for s in read()}
    if k in known:
        return
    with open(p, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            # a line a crashed writer left without its newline would swallow this one
            if os.path.getsize(p) > 0 and not _ends_with_newline(p):
                f.write("\n")
            f.write(k + "\n")
            f.flush()
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    known.add(k)


def _ends_with_newline(p: str) -> bool:
    with open(p, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read() -> list[dict]:
    """Distinct specs in the log, in first-seen order."""
    p = path()
    if not os.path.exists(p):
        return []
    out, seen = [], set()
    with open(p) as f:
        for line in f:
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if isinstance(d, dict) and _key(d) not in seen:
                seen.add(_key(d))
                out.append(d)
    return out


def clear() -> None:
    p = path()
    if os.path.exists(p):
        os.remove(p)
    _logged.pop(p, None)
