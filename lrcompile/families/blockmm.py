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


def eager_inference(*ts) -> bool:
    """Plain tensors outside any tracer, with no gradient to record (`out=` does not differentiate)."""
    if torch.compiler.is_compiling():
        return False
    if any(type(t) is not torch.Tensor for t in ts if t is not None):
        return False  # FakeTensor / FunctionalTensor: AOT tracing for Inductor
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in ts if t is not None))


# a rank-t row of t elements moved as one wider element: (bytes) -> dtype of that size
_WIDE = {2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}


def swap_block_axes(z: torch.Tensor) -> torch.Tensor:
    """(a, n, c, t) -> contiguous (c, n, a, t): BTT's shuffle between its cores. With small t (BTT's rank, ~4)
    torch's strided copy moves t floats at a time; in eager each row of t is reinterpreted as one element of
    t·itemsize bytes, which halves the copy (BTT 768→3072: 15 → 8 ms). Traced graphs keep the plain permute
    (Inductor generates its own copy loop and does not take complex dtypes)."""
    a, n, c, t = z.shape
    wide = _WIDE.get(t * z.element_size()) if eager_inference(z) else None  # (traced sizes may be symbolic)
    if wide is None or not z.is_contiguous() or (wide.is_complex and z.device.type != "cpu"):
        return z.permute(2, 1, 0, 3).contiguous()
    return z.view(wide).view(a, n, c).permute(2, 1, 0).contiguous().view(z.dtype).view(c, n, a, t)


def column_blocks(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """a (k, n, K), b (k, K, c), bias (k·c,) or None -> (n, k·c) with block j = a[j] @ b[j] + bias[j·c:(j+1)·c]."""
    k, n, _ = a.shape
    c = b.shape[-1]
    if not isinstance(k, int) or k > MAX_BLOCKS:  # symbolic block counts (dynamic shapes): one bmm
        y = torch.bmm(a, b) if bias is None else torch.baddbmm(bias.view(k, 1, c), a, b)
        return y.transpose(0, 1).reshape(n, k * c)
    bias_j = (lambda j: None) if bias is None else (lambda j: bias[j * c : (j + 1) * c])  # noqa: E731
    if eager_inference(a, b, bias):
        out = a.new_empty(n, k * c, dtype=torch.result_type(a, b))
        for j in range(k):
            cols = out[:, j * c : (j + 1) * c]
            if bias is None:
                torch.mm(a[j], b[j], out=cols)
            else:
                torch.addmm(bias_j(j), a[j], b[j], out=cols)
        return out
    parts = [torch.mm(a[j], b[j]) if bias is None else torch.addmm(bias_j(j), a[j], b[j]) for j in range(k)]
    return torch.cat(parts, dim=1)
