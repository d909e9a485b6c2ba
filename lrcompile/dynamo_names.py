"""Dynamo's names for the user's objects, and how they lead back to them.

Dynamo names modules and parameters by expressions over the compiled frame's locals (`L['self'].encoder.layer.0`,
`L['s']._modules['blk']._parameters['w']`). These helpers turn such an expression into a module path and, while a
backend call runs (the frame's translator is still current), evaluate its root against the frame's locals
(compat.frame_locals).
"""
from __future__ import annotations

import re

from .compat import source_name

_ROOT = re.compile(r"^([A-Za-z_]+(?:\[[^\]]*\])+)")


def strip_root(expr: str) -> str:
    """`L['self'].encoder.layer.0` -> `encoder.layer.0`; `L['args'][0]` -> ``."""
    rest = _ROOT.sub("", expr, count=1)
    return rest[1:] if rest.startswith(".") else rest


def source_path(source) -> str:
    """Module path of a parameter from its Dynamo source (or the source's expression):
    `L['s']._modules['blk']._parameters['w']` -> `blk.w`."""
    name = source_name(source)
    parts = re.findall(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)", name)
    return ".".join(a or b for a, b in parts)


def eval_root(expr: str, f_locals: dict):
    """The object the root of `expr` (`L['self']`, `L['args'][0]`) names in `f_locals`, or None."""
    m = _ROOT.match(expr)
    if m is None:
        return None
    try:
        return eval(m.group(1), {"__builtins__": {}}, {"L": f_locals})  # noqa: S307 - Dynamo's own subscript expression
    except Exception:
        return None
