"""Batched GEMM whose operand and output layouts are index arithmetic, not copies.

C_b = epilogue(alpha · A_b B_b) for b over the grid's third axis. A_b's columns can be a window of a wider
row (x's b-th block: column b·AKOFF + k, masked past AKLIM: implicit zero padding); the output column n of batch b
lands at n // T · SCN_HI + n % T · SCN_LO (a shuffle written by the store) and is global column b·CNOFF + n for
the epilogue and the N_OUT mask. The structured families (twocore.py, blast.py) are built from it.
"""

from __future__ import annotations

from . import epilogue as epi
from . import runtime

TEMPLATE = """
import triton
import triton.language as tl
{DOT}

@triton.jit
def bgemm_kernel(a, b, c, alpha, M, N, K, N_OUT, AKOFF, AKLIM, CNOFF, T,
                 sab, sam, sak, sbb, sbk, sbn, scb, scm, scn_hi, scn_lo, {EPI_ARGS}
                 UPCAST: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    bat = tl.program_id(2)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rl = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a += bat * sab
    b += bat * sbb
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        kmask = (kk < K) & (bat * AKOFF + kk < AKLIM)
        x = tl.load(a + rm[:, None] * sam + kk[None, :] * sak, mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        w = tl.load(b + kk[:, None] * sbk + rl[None, :] * sbn, mask=(kk[:, None] < K) & (rl[None, :] < N), other=0.0)
        acc = _dot(x.to(w.dtype), w, acc, UPCAST, PREC)
    acc = acc * alpha
    rn = bat * CNOFF + rl
    mask = (rm[:, None] < M) & (rl[None, :] < N) & (rn[None, :] < N_OUT)
{EPILOGUE}
    out = c + bat * scb + rm[:, None] * scm + (rl[None, :] // T) * scn_hi + (rl[None, :] % T) * scn_lo
    tl.store(out, acc.to(c.dtype.element_ty), mask=mask)
"""

CONFIGS = [
    ({"BM": bm, "BN": bn, "BK": bk}, w, s)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (128, 32, 64, 4, 4),
    ]
]
SMALL = {"BM": 16, "BN": 16, "BK": 16}


def bgemm(
    a,
    a_strides,
    b,
    b_strides,
    c,
    c_strides,
    *,
    batch: int,
    m: int,
    n: int,
    k: int,
    n_out: int,
    akoff: int = 0,
    aklim: int = 2**31 - 1,
    cnoff: int = 0,
    t: int = 2**31 - 1,
    steps=(),
    operands=(),
    alpha: float = 1.0,
) -> None:
    """Writes into `c`. *_strides: (batch, row, col) of A and B; c_strides: (batch, row, col_hi, col_lo)."""
    if m == 0 or batch == 0:
        return
    views = epi.operand_views(operands, steps, m, n_out)
    src = TEMPLATE.format(DOT=runtime.DOT_SOURCE, EPI_ARGS=epi.signature(steps), EPILOGUE=epi.source(steps))
    args = (
        a,
        b,
        c,
        float(alpha),
        m,
        n,
        k,
        n_out,
        akoff,
        aklim,
        cnoff,
        t,
        *a_strides,
        *b_strides,
        *c_strides,
        *epi.operand_args(views),
    )

    def grid(meta):
        return (runtime.cdiv(m, meta["BM"]), runtime.cdiv(n, meta["BN"]), batch)

    runtime.launch(
        runtime.load("bgemm", src),
        "bgemm_kernel",
        grid,
        args,
        runtime.dot_flags(b.dtype),
        CONFIGS,
        ["M", "N", "K"],
        SMALL,
    )
