"""Attention dataflow: from an attention site's q/k/v operands back to the linear projections that make them.

Through views, transposes, RoPE, KV-cache concatenation and GPT-2's split of a fused c_attn, to the first
linear site on each path (with the rows it contributes when the path went through a split of the last dim).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from ..capture.sites import SDPA_TARGETS, Site, _through
from ..compat import example_value
from ..passes.projection import Part

_WALK_LIMIT = 400  # nodes visited per operand before giving up (a projection is a few ops away)


def _arg(node: fx.Node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def operands(site: Site) -> Optional[tuple[fx.Node, fx.Node, fx.Node]]:
    """(q, k, v) nodes of an attention site; for the hand-written form k is the operand before its transpose."""
    node = site.node
    if site.form == "sdpa" or (node.op == "call_function" and node.target in SDPA_TARGETS):
        return _arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 2, "value")
    qk = _through(node.args[0], up=True)
    pv = _through(next(iter(node.users)), up=False)
    if qk is None or pv is None:
        return None
    kt = qk.args[1]
    k = kt.args[0] if isinstance(kt, fx.Node) and kt.op in ("call_method", "call_function") and kt.args else kt
    return qk.args[0], k, pv.args[1]


def _val(node):
    return example_value(node) if isinstance(node, fx.Node) else None


def _split_rows(node: fx.Node) -> Optional[tuple[fx.Node, tuple[int, int]]]:
    """`split(y, n, dim=-1)[i]` / `chunk(y, c, -1)[i]` -> (y, rows of y's last dim), else None."""
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int)):
        return None
    src = node.args[0]
    if not isinstance(src, fx.Node) or src.target not in ("split", "chunk", torch.split, torch.chunk):
        return None
    y = src.args[0]
    size, dim = (
        _arg(src, 1, "split_size_or_sections" if src.target in ("split", torch.split) else "chunks"),
        _arg(src, 2, "dim"),
    )
    val = _val(y)
    if val is None or not isinstance(dim, int) or dim % val.ndim != val.ndim - 1:
        return None
    n = int(val.shape[-1])
    if src.target in ("chunk", torch.chunk):
        size = -(-n // size)
    sizes = list(size) if isinstance(size, (list, tuple)) else [size] * (-(-n // size))
    i = node.args[1]
    a = sum(sizes[:i])
    return y, (a, min(a + sizes[i], n))


def sources(node: fx.Node, by_node: dict) -> list[Part]:
    """The linear sites (and their rows) that the value of `node` is computed from, nearest first."""
    found, seen, stack = [], set(), [(node, None)]
    while stack and len(seen) < _WALK_LIMIT:
        n, rows = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n in by_node:
            s = by_node[n]
            if rows is not None and (_val(n) is None or int(_val(n).shape[-1]) != s.out_features):
                rows = None  # the split was not over this projection's features
            found.append((s, rows or (0, s.out_features)))
            continue
        split = _split_rows(n)
        if split is not None:
            stack.append((split[0], split[1]))
            continue
        stack.extend((a, rows) for a in n.all_input_nodes)
    return found


def projections(site: Site, roles: tuple[str, ...], by_node: dict) -> tuple[Optional[list[Part]], Optional[str]]:
    ops = operands(site)
    if ops is None:
        return None, "q/k/v operands not found"
    parts = []
    for role, node in zip("qkv", ops):
        if role not in roles:
            continue
        src = {(id(s), ab): (s, ab) for s, ab in sources(node, by_node)}
        if len(src) != 1:
            what = ", ".join(s.fqn for s, _ in src.values()) or "none"
            return None, f"{role} comes from {len(src)} linear projections ({what}), not one"
        parts.append(next(iter(src.values())))
    if len({id(s.input_node) for s, _ in parts}) != 1:
        return None, f"the {'/'.join(roles)} projections read different inputs"
    if any(s.installed for s, _ in parts):
        return None, "a projection was already rewritten by lrcompile"
    spans = sorted((id(s), ab) for s, ab in parts)
    if any(x[0] == y[0] and x[1][1] > y[1][0] for x, y in zip(spans, spans[1:])):
        return None, f"the {'/'.join(roles)} projections overlap"
    return parts, None
