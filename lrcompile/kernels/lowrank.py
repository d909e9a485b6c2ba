"""Low-rank chain y = epilogue(alpha · (x Vᵀ) Uᵀ): x·Vᵀ stays on chip.

One program owns BM rows: it accumulates h = x Vᵀ (BM × r, padded to a power of two) over the input, rounds it
to the compute dtype (as the unfused graph stores it), then sweeps the output columns, h Uᵀ plus the epilogue per
tile. Ranks above CHAIN_MAX_R would not fit in registers: two launches of the shared GEMM (h goes through memory,
the epilogue still rides the second).
"""

from __future__ import annotations

import torch

from ..families.lowrank import LowRank
from . import epilogue as epi
from . import runtime
from .gemm import gemm
from .op import define, flat

CHAIN_MAX_R = 128

TEMPLATE = """
import triton
import triton.language as tl
{DOT}

@triton.jit
def chain_kernel(x, v, u, c, alpha, M, N_OUT, K, R, sxm, sxk, svr, svk, sun, sur, scm, scn, {EPI_ARGS}
                 UPCAST: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 BR: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    rk = tl.arange(0, BK)
    h = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(x + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        vt = tl.load(v + rr[None, :] * svr + kk[:, None] * svk, mask=(rr[None, :] < R) & (kk[:, None] < K), other=0.0)
        h = _dot(a.to(vt.dtype), vt, h, UPCAST, PREC)
    h = h.to(v.dtype.element_ty)
    for n0 in range(0, N_OUT, BN):
        rn = n0 + tl.arange(0, BN)
        ut = tl.load(u + rn[None, :] * sun + rr[:, None] * sur, mask=(rn[None, :] < N_OUT) & (rr[:, None] < R), other=0.0)
        acc = _dot(h, ut, tl.zeros((BM, BN), dtype=tl.float32), UPCAST, PREC)
        acc = acc * alpha
        mask = (rm[:, None] < M) & (rn[None, :] < N_OUT)
{EPILOGUE}
        tl.store(c + rm[:, None] * scm + rn[None, :] * scn, acc.to(c.dtype.element_ty), mask=mask)
"""

CONFIGS = [
    ({"BM": bm, "BN": bn, "BK": bk}, w, s)
    for bm, bn, bk, w, s in [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3), (32, 128, 64, 4, 3)]
]
SMALL = {"BM": 16, "BN": 16, "BK": 16}


def chain(x2: torch.Tensor, U: torch.Tensor, V: torch.Tensor, steps, operands, alpha: float, out_dtype) -> torch.Tensor:
    m, k = x2.shape
    n, r = U.shape
    c = runtime.alloc((m, n), runtime.out_dtype_of(U.dtype, out_dtype), x2.device)
    if m == 0:
        return c
    views = epi.operand_views(operands, steps, m, n)
    src = TEMPLATE.format(DOT=runtime.DOT_SOURCE, EPI_ARGS=epi.signature(steps), EPILOGUE=epi.source(steps, " " * 8))
    args = (
        x2,
        V,
        U,
        c,
        float(alpha),
        m,
        n,
        k,
        r,
        x2.stride(0),
        x2.stride(1),
        V.stride(0),
        V.stride(1),
        U.stride(0),
        U.stride(1),
        c.stride(0),
        c.stride(1),
        *epi.operand_args(views),
    )
    consts = {"BR": runtime.pow2(r), **runtime.dot_flags(U.dtype)}
    runtime.launch(
        runtime.load("lowrank", src),
        "chain_kernel",
        lambda meta: (runtime.cdiv(m, meta["BM"]),),
        args,
        consts,
        CONFIGS,
        ["M", "N_OUT", "K", "R"],
        SMALL,
    )
    return c


def launch(x, tensors, operands, steps, alpha, out_dtype):
    U, V = tensors
    x2 = flat(x)
    if runtime.pow2(U.shape[1]) <= CHAIN_MAX_R:
        y = chain(x2, U, V, steps, operands, alpha, out_dtype)
    else:
        h = gemm(x2, V)
        y = gemm(h, U, steps=steps, operands=operands, alpha=alpha, out_dtype=out_dtype)
    return y.view(*x.shape[:-1], U.shape[0])


def core(x, U, V):
    return LowRank.functional(x, None, None, U, V)


def grads(x, tensors, g, need_x, need_t):
    """y = (x Vᵀ) Uᵀ: gU = gᵀ(x Vᵀ), gV = (g U)ᵀ x, gx = (g U) V; only the needed ones."""
    U, V = tensors
    need_U, need_V = need_t
    gh = g @ U if need_x or need_V else None
    return (gh @ V if need_x else None), [g.t() @ (x @ V.t()) if need_U else None, gh.t() @ x if need_V else None]


lowrank = define("lowrank", core, launch, lambda t: t[0].shape[0], grads)
