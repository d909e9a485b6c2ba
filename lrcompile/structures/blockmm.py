"""The last stage of the block-structured families: k GEMMs whose outputs sit side by side as column blocks.

Computing them as one bmm gives (k, n, c) and a transposing copy to (n, k·c) — a full pass over the output, the
largest tensor of the layer (Monarch-4 768→3072: ~15% of the forward). Instead each GEMM writes its column block
of the (n, k·c) result directly (BLAS takes the row stride): in eager inference through `out=` views, and under
tracing / autograd as a `cat` of the GEMMs, which Inductor lowers the same way (each mm realised into its slice
of the cat buffer, no copy).
"""
from __future__ import annotations

from typing import Optional

import torch

# Above this many blocks the per-block calls cost more than the copy they save (BTT's c₀ is ~√out).
MAX_BLOCKS = 16


def _eager(*ts) -> bool:
    """Plain tensors outside any tracer, with no gradient to record (`out=` does not differentiate)."""
    if torch.compiler.is_compiling():
        return False
    if any(type(t) is not torch.Tensor for t in ts if t is not None):
        return False  # FakeTensor / FunctionalTensor: AOT tracing for Inductor
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in ts if t is not None))


def column_blocks(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """a (k, n, K), b (k, K, c), bias (k·c,) or None -> (n, k·c) with block j = a[j] @ b[j] + bias[j·c:(j+1)·c]."""
    k, n, _ = a.shape
    c = b.shape[-1]
    if k > MAX_BLOCKS:
        y = torch.bmm(a, b) if bias is None else torch.baddbmm(bias.view(k, 1, c), a, b)
        return y.transpose(0, 1).reshape(n, k * c)
    bias_j = (lambda j: None) if bias is None else (lambda j: bias[j * c:(j + 1) * c])  # noqa: E731
    if _eager(a, b, bias):
        out = a.new_empty(n, k * c, dtype=torch.result_type(a, b))
        for j in range(k):
            cols = out[:, j * c:(j + 1) * c]
            if bias is None:
                torch.mm(a[j], b[j], out=cols)
            else:
                torch.addmm(bias_j(j), a[j], b[j], out=cols)
        return out
    parts = [torch.mm(a[j], b[j]) if bias is None else torch.addmm(bias_j(j), a[j], b[j]) for j in range(k)]
    return torch.cat(parts, dim=1)
