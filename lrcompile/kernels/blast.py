"""BLAST: y = epilogue(alpha · BLAST(x; U, V, s)) in two launches.

Right factors: z_j = x_j V_j for every column block (bgemm, x's blocks read in place). Then one kernel per
(block row i, tile): the coupling w_i = Σ_j s_ij ⊙ z_j is formed on chip, chunk by chunk of the rank, and fed
straight into w_i U_iᵀ with the epilogue — the (b₁, N, r) mixed tensor never reaches memory.
"""

from __future__ import annotations

from ..families.blast import blast_matmul
from . import epilogue as epi
from . import runtime
from .bgemm import bgemm
from .op import define, flat

TEMPLATE = """
import triton
import triton.language as tl
{DOT}

@triton.jit
def blast_kernel(z, s, u, c, alpha, M, N_OUT, P, R, B2, szb, szm, szr, ssi, ssj, ssr, sub, sup, sur, scm, scn,
                 {EPI_ARGS} UPCAST: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr):
    i = tl.program_id(2)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rp = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, R, BK):
        kk = k0 + rk
        w = tl.zeros((BM, BK), dtype=tl.float32)
        for j in range(0, B2):
            sv = tl.load(s + i * ssi + j * ssj + kk * ssr, mask=kk < R, other=0.0).to(tl.float32)
            zt = tl.load(z + j * szb + rm[:, None] * szm + kk[None, :] * szr, mask=(rm[:, None] < M) & (kk[None, :] < R), other=0.0)
            w += sv[None, :] * zt.to(tl.float32)
        ut = tl.load(u + i * sub + rp[None, :] * sup + kk[:, None] * sur, mask=(rp[None, :] < P) & (kk[:, None] < R), other=0.0)
        acc = _dot(w.to(ut.dtype), ut, acc, UPCAST, PREC)
    acc = acc * alpha
    rn = i * P + rp
    mask = (rm[:, None] < M) & (rp[None, :] < P)
{EPILOGUE}
    tl.store(c + rm[:, None] * scm + rn[None, :] * scn, acc.to(c.dtype.element_ty), mask=mask)
"""

CONFIGS = [
    ({"BM": bm, "BN": bn, "BK": bk}, w, s)
    for bm, bn, bk, w, s in [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 3), (128, 64, 64, 4, 3)]
]
SMALL = {"BM": 16, "BN": 16, "BK": 16}


def launch(x, tensors, operands, steps, alpha, out_dtype):
    U, V, s = tensors
    b1, p, r = U.shape
    b2, q, _ = V.shape
    x2 = flat(x)
    m = x2.shape[0]
    z = runtime.alloc((b2, m, r), V.dtype, x.device)
    bgemm(
        x2,
        (q * x2.stride(1), x2.stride(0), x2.stride(1)),
        V,
        (V.stride(0), V.stride(1), V.stride(2)),
        z,
        (z.stride(0), z.stride(1), 0, z.stride(2)),
        batch=b2,
        m=m,
        n=r,
        k=q,
        n_out=r,
        t=r,
    )
    y = runtime.alloc((m, b1 * p), runtime.out_dtype_of(U.dtype, out_dtype), x.device)
    if m == 0:
        return y.view(*x.shape[:-1], b1 * p)
    views = epi.operand_views(operands, steps, m, b1 * p)
    src = TEMPLATE.format(DOT=runtime.DOT_SOURCE, EPI_ARGS=epi.signature(steps), EPILOGUE=epi.source(steps))
    args = (
        z,
        s,
        U,
        y,
        float(alpha),
        m,
        b1 * p,
        p,
        r,
        b2,
        z.stride(0),
        z.stride(1),
        z.stride(2),
        s.stride(0),
        s.stride(1),
        s.stride(2),
        U.stride(0),
        U.stride(1),
        U.stride(2),
        y.stride(0),
        y.stride(1),
        *epi.operand_args(views),
    )

    def grid(meta):
        return (runtime.cdiv(m, meta["BM"]), runtime.cdiv(p, meta["BN"]), b1)

    runtime.launch(
        runtime.load("blast", src),
        "blast_kernel",
        grid,
        args,
        runtime.dot_flags(U.dtype),
        CONFIGS,
        ["M", "P", "R", "B2"],
        SMALL,
    )
    return y.view(*x.shape[:-1], b1 * p)


def core(x, U, V, s):
    return blast_matmul(x, U, V, s, None)


blast = define("blast", core, launch, lambda t: t[0].shape[0] * t[0].shape[1])
