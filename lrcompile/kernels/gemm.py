"""The dense building block: C = epilogue(alpha · s · (A1 B1ᵀ + A2 B2ᵀ)), one kernel, one store.

The second product is the concatenated-K trick of fused adapters: [x, h]·[W; B]ᵀ runs as two K loops into the
same accumulator, so the branch never makes its own pass over the (M, N) output. A is read in its own dtype and
converted to B's on load (an absorbed input cast); `s` is an optional scalar read from memory (LoRA's scaling is
a tensor so that hot-swapping alpha recompiles nothing).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import epilogue as epi
from . import runtime

TEMPLATE = """
import triton
import triton.language as tl
{DOT}

@triton.jit
def gemm_kernel(a1, b1, a2, b2, c, s_ptr, alpha, M, N_OUT, K1, K2,
                sa1m, sa1k, sb1n, sb1k, sa2m, sa2k, sb2n, sb2k, scm, scn, {EPI_ARGS}
                HAS_A2: tl.constexpr, HAS_S: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped tile order: neighbouring programs share A rows in L2
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N_OUT, BN)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K1, BK):
        kk = k0 + rk
        a = tl.load(a1 + rm[:, None] * sa1m + kk[None, :] * sa1k, mask=(rm[:, None] < M) & (kk[None, :] < K1), other=0.0)
        b = tl.load(b1 + rn[None, :] * sb1n + kk[:, None] * sb1k, mask=(rn[None, :] < N_OUT) & (kk[:, None] < K1), other=0.0)
        acc = _dot(a.to(b.dtype), b, acc, UPCAST, PREC)
    if HAS_A2:
        for k0 in range(0, K2, BK):
            kk = k0 + rk
            a = tl.load(a2 + rm[:, None] * sa2m + kk[None, :] * sa2k, mask=(rm[:, None] < M) & (kk[None, :] < K2), other=0.0)
            b = tl.load(b2 + rn[None, :] * sb2n + kk[:, None] * sb2k, mask=(rn[None, :] < N_OUT) & (kk[:, None] < K2), other=0.0)
            acc = _dot(a.to(b.dtype), b, acc, UPCAST, PREC)
    if HAS_S:
        acc = acc * tl.load(s_ptr).to(tl.float32)
    acc = acc * alpha
    mask = (rm[:, None] < M) & (rn[None, :] < N_OUT)
{EPILOGUE}
    tl.store(c + rm[:, None] * scm + rn[None, :] * scn, acc.to(c.dtype.element_ty), mask=mask)
"""

CONFIGS = [
    ({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, w, s)
    for bm, bn, bk, w, s in [
        (128, 256, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 3),
    ]
]
SMALL = {"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 4}


def module(steps):
    src = TEMPLATE.format(DOT=runtime.DOT_SOURCE, EPI_ARGS=epi.signature(steps), EPILOGUE=epi.source(steps))
    return runtime.load("gemm", src)


def gemm(
    a1: torch.Tensor,
    b1: torch.Tensor,
    a2: Optional[torch.Tensor] = None,
    b2: Optional[torch.Tensor] = None,
    steps=(),
    operands=(),
    alpha: float = 1.0,
    s: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """a1 (M, K1), b1 (N, K1), a2 (M, K2), b2 (N, K2): 2-D strided views; returns (M, N) in out_dtype or b1's."""
    m, k1 = a1.shape
    n = b1.shape[0]
    c = runtime.alloc((m, n), runtime.out_dtype_of(b1.dtype, out_dtype), a1.device)
    if m == 0 or n == 0:
        return c
    has2 = a2 is not None
    a2_, b2_ = (a2, b2) if has2 else (a1, b1)
    views = epi.operand_views(operands, steps, m, n)
    args = (
        a1,
        b1,
        a2_,
        b2_,
        c,
        s if s is not None else c,
        float(alpha),
        m,
        n,
        k1,
        a2.shape[1] if has2 else 0,
        a1.stride(0),
        a1.stride(1),
        b1.stride(0),
        b1.stride(1),
        a2_.stride(0),
        a2_.stride(1),
        b2_.stride(0),
        b2_.stride(1),
        c.stride(0),
        c.stride(1),
        *epi.operand_args(views),
    )
    consts = {"HAS_A2": has2, "HAS_S": s is not None, **runtime.dot_flags(b1.dtype)}

    def grid(meta):
        return (runtime.cdiv(m, meta["BM"]) * runtime.cdiv(n, meta["BN"]),)

    runtime.launch(module(tuple(steps)), "gemm_kernel", grid, args, consts, CONFIGS, ["M", "N_OUT", "K1", "K2"], SMALL)
    return c
