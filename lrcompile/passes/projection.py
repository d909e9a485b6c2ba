"""Shared step of the fused_qkv and shared_kv passes: several projections of one input become one matmul.

A part is (site, (a, b)): output features a..b of a linear site (a whole nn.Linear, or the K rows of GPT-2's
fused c_attn). The parts' stacked weight runs as one projection — dense (the sites' own weights concatenated
in the graph: they keep training) or through the factors' own `project` (low rank: x·Vᵀ once, then one matmul
with the stacked U; a structured family: its functional) — and each site node is replaced by its rows of the
result; rows of a site that no part claims stay dense.
"""

from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..capture.sites import Site

Part = tuple[Site, tuple[int, int]]


def _rows(graph: fx.Graph, vm: dict, site: Site, a: int, b: int) -> fx.Node:
    w = vm[site.weight_node]
    if site.transposed:
        w = graph.call_method("t", (w,))
    if (a, b) != (0, site.out_features):
        w = graph.call_function(torch.narrow, (w, 0, a, b - a))
    return w


def _bias(graph: fx.Graph, vm: dict, site: Site, a: int, b: int) -> Optional[fx.Node]:
    if site.bias_node is None:
        return None
    bias = vm[site.bias_node]
    if (a, b) != (0, site.out_features):
        bias = graph.call_function(torch.narrow, (bias, 0, a, b - a))
    return bias


def _stacked_bias(graph: fx.Graph, vm: dict, parts: list[Part]) -> Optional[fx.Node]:
    if all(s.bias_node is None for s, _ in parts):
        return None
    pieces = []
    for s, (a, b) in parts:
        piece = _bias(graph, vm, s, a, b)
        if piece is None:  # a part without bias beside one with: zeros keep the stack aligned
            piece = graph.call_function(torch.zeros, (b - a,), {"dtype": s.weight.dtype, "device": s.weight.device})
        pieces.append(piece)
    return pieces[0] if len(pieces) == 1 else graph.call_function(torch.cat, (pieces, 0))


Project = Callable[[fx.Graph, fx.Node, Optional[fx.Node]], fx.Node]  # (graph, x, stacked bias) -> y


def stack_projection(gm: fx.GraphModule, vm: dict, parts: list[Part], project: Optional[Project]) -> dict:
    """Rewrite, in place, the site nodes (mapped through `vm`) of `parts`. `project` inserts the compressed
    stacked projection (AttnFactors.project), None for the dense one. Returns {erased node: replacement}."""
    graph = gm.graph
    sites = list({id(s): s for s, _ in parts}.values())
    nodes = [vm[s.node] for s in sites]
    order = {n: i for i, n in enumerate(graph.nodes)}
    first = min(nodes, key=order.__getitem__)
    x = vm[parts[0][0].input_node]
    meta = {k: v for k, v in first.meta.items() if k in ("nn_module_stack", "stack_trace")}
    replaced = {}
    with graph.inserting_before(first):
        bias = _stacked_bias(graph, vm, parts)
        if project is None:
            ws = [_rows(graph, vm, s, a, b) for s, (a, b) in parts]
            w = ws[0] if len(ws) == 1 else graph.call_function(torch.cat, (ws, 0))
            y = graph.call_function(F.linear, (x, w, bias))
        else:
            y = project(graph, x, bias)
        sizes = [b - a for _, (a, b) in parts]
        if len(parts) > 1:
            split = graph.call_function(torch.split, (y, sizes, -1))
            chunks = [graph.call_function(operator.getitem, (split, i)) for i in range(len(parts))]
        else:
            chunks = [y]
        for site, node in zip(sites, nodes):
            mine = sorted(((ab, c) for (s, ab), c in zip(parts, chunks) if s is site), key=lambda t: t[0])
            pieces, at = [], 0
            for (a, b), c in mine + [((site.out_features, site.out_features), None)]:
                if a > at:  # rows no part claims (GPT-2's Q rows under shared_kv) stay dense
                    pieces.append(
                        graph.call_function(F.linear, (x, _rows(graph, vm, site, at, a), _bias(graph, vm, site, at, a)))
                    )
                if c is not None:
                    pieces.append(c)
                at = b
            out = pieces[0] if len(pieces) == 1 else graph.call_function(torch.cat, (pieces, -1))
            out.meta.update(meta)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            replaced[node] = out
    return replaced
