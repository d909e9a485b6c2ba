"""FX pass: low-rank K and V projections sharing one basis, [W_k; W_v] ≈ [U_k; U_v] V.

h = x·Vᵀ is computed once; one matmul with the stacked [U_k; U_v] gives K and V (the same numbers as U_k and
U_v applied separately, in one GEMM). Q is untouched; for a fused QKV projection (GPT-2's c_attn) only its K
and V rows are replaced and the Q rows stay dense.
"""

from __future__ import annotations

import torch.fx as fx

from .projection import Part, Project, stack_projection

ROLES = ("k", "v")


def rewrite_shared_kv(gm: fx.GraphModule, vm: dict, parts: list[Part], project: Project) -> dict:
    """`parts` in k, v order; `project` the shared basis' stacked projection. Returns {erased node: replacement}."""
    return stack_projection(gm, vm, parts, project)
