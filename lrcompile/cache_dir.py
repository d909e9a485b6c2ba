"""Every lrcompile cache (factors, autotune results, shape logs) lives under one root."""

from __future__ import annotations

import os


def cache_root() -> str:
    """`$LRCOMPILE_CACHE_DIR`, default `~/.cache/lrcompile` (read at each call: tests and users may change it)."""
    return os.environ.get("LRCOMPILE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lrcompile")


def cache_path(*parts: str) -> str:
    path = os.path.join(cache_root(), *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path
