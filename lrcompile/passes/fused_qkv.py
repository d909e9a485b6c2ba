"""FX pass: the Q, K and V projections of one attention site that read the same input become one projection.

Dense (no rank): one matmul with [W_q; W_k; W_v] concatenated in the graph from the sites' own weights (they
keep training, nothing new is stored), outputs split back. Low rank (`rank`): [W_q; W_k; W_v] ≈ U V, so
x·Vᵀ is computed once and one matmul with U gives Q, K and V. Structured (`structure`): the stacked weight as
a linear family (e.g. Monarch), one call of its functional gives Q, K and V.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx

from .projection import Part, Project, stack_projection

ROLES = ("q", "k", "v")


def refuse(parts: list[Part], low_rank: bool) -> Optional[str]:
    """Why the dense fusion has nothing to do (a low-rank one always changes the graph)."""
    sites = {id(s) for s, _ in parts}
    if not low_rank and len(sites) == 1:
        s, _ = parts[0]
        covered = sorted(ab for _, ab in parts)
        if (
            covered[0][0] == 0
            and covered[-1][1] == s.out_features
            and all(x[1] == y[0] for x, y in zip(covered, covered[1:]))
        ):
            return f"q, k and v already come from one projection ({s.fqn})"
    return None


def rewrite_fused_qkv(gm: fx.GraphModule, vm: dict, parts: list[Part], project: Optional[Project] = None) -> dict:
    """`parts` in q, k, v order; `project` the compressed stacked projection (None: dense). Returns {erased: new}."""
    return stack_projection(gm, vm, parts, project)
