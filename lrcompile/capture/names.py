"""Dynamo's names for the user's objects, and how they lead back to them.

Dynamo names modules and parameters by expressions over the compiled frame's locals (`L['self'].encoder.layer.0`,
`L['s']._modules['blk']._parameters['w']`). These helpers turn such an expression into a module path and, while a
backend call runs (the frame's translator is still current), evaluate its root against the frame's locals
(compat.frame_locals).
"""

from __future__ import annotations

import re

from ..compat import source_name

_ROOT = re.compile(r"^([A-Za-z_]+(?:\[[^\]]*\])+)")


def strip_root(expr: str) -> str:
    """`L['self'].encoder.layer.0` -> `encoder.layer.0`; `L['args'][0]` -> ``."""
    rest = _ROOT.sub("", expr, count=1)
    return rest[1:] if rest.startswith(".") else rest


_TOKEN = re.compile(r"\.([A-Za-z_]\w*)|\[\s*'([^']*)'\s*\]|\[\s*\"([^\"]*)\"\s*\]|\[\s*(\d+)\s*\]")
# attribute hops that lead into a module's containers, not to a named child
_CONTAINERS = {"_modules", "_parameters", "_buffers", "__dict__"}


def source_path(source) -> str:
    """Module path of a parameter from its Dynamo source (or the source's expression):
    `L['s']._modules['blk']._parameters['w']` -> `blk.w`;
    `L['self'].__dict__['_modules']['layers'][0]` (Swin's form) -> `layers.0`."""
    name = source_name(source)
    parts = []
    for attr, key1, key2, index in _TOKEN.findall(_ROOT.sub("", name, count=1)):
        part = attr or key1 or key2 or index
        if part in _CONTAINERS:
            continue
        parts.append(part)
    return ".".join(parts)


def eval_root(expr: str, f_locals: dict):
    """The object the root of `expr` (`L['self']`, `L['args'][0]`) names in `f_locals`, or None."""
    m = _ROOT.match(expr)
    if m is None:
        return None
    try:
        return eval(m.group(1), {"__builtins__": {}}, {"L": f_locals})  # noqa: S307 - Dynamo's own subscript expression
    except Exception:
        return None
