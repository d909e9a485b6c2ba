"""Monarch and BTT: y = epilogue(alpha · BTT(x; W1, W2)), W1 (a₁, a₀, c₀, t), W2 (c₀, a₁, t, c₁).

One kernel where an output block fits on chip (`one_kernel`, c₁ ≤ ONE_MAX_C1 and t ≤ ONE_MAX_T, e.g. BTT with an
even split at d = 4096: c₁ = 64): a program owns BM rows of one output block c. For each input block a it forms
z = x[:, a·a₀:(a+1)·a₀] · W1[a, :, c, :] (BM × t) in registers and feeds it straight into acc += z · W2[c, a]:
the shuffle between the two cores is only which W1 slice is read, and the intermediate never leaves the chip.

Two launches otherwise (`two_launch`, e.g. Monarch-4 at d = 4096: c₁ = 1024, t = 256). A program must hold its
fp32 accumulator for every output column it produces; covering a whole block needs BM × c₁ (64 × 1024 fp32 =
256 KiB, the whole register file of an SM), and tiling c₁ into BN-wide tiles instead makes every tile recompute
the block's z = x_a W1[a, :, c, :] — ⌈c₁/BN⌉ = 8× the first core's FLOPs at BN = 128, which costs more than the
intermediate's round trip through memory (N × a₁·c₀·t elements, written once and read once). So: stage 1, per
input block a: z[c, :, a·t + τ] = x_a · W1[a, :, c, τ] — x's block is read in place (zero-padded past
in_features by the load mask) and the store scatters the (c, τ) columns straight into the (c₀, N, a₁·t) layout
stage 2 reads contiguously; stage 2, per output block c: y[:, c·c₁:(c+1)·c₁] = z[c] · W2[c] with the epilogue on
global columns, masked past out_features (Monarch's padding).
"""

from __future__ import annotations

import torch

from ..families.btt import btt_matmul
from . import epilogue as epi
from . import runtime
from .bgemm import bgemm
from .op import define, flat

ONE_MAX_C1 = 128  # BM × c₁ fp32 accumulator plus the BM × t tile of z stay in registers
ONE_MAX_T = 64

TEMPLATE = """
import triton
import triton.language as tl
{DOT}

@triton.jit
def btt_kernel(x, w1, w2, c, alpha, M, IN, N_OUT, A1, A0, C0, T, C1, sxm, sxk, s1a, s1k, s1c, s1t,
               s2c, s2a, s2t, s2j, scm, scn, {EPI_ARGS}
               UPCAST: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
               BC: tl.constexpr):
    # output block fastest: the programs sharing a row tile run together and share its x rows in L2
    blk = tl.program_id(0) % C0
    rm = (tl.program_id(0) // C0) * BM + tl.arange(0, BM)
    rt = tl.arange(0, BT)
    rj = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BC), dtype=tl.float32)
    for a in range(0, A1):
        z = tl.zeros((BM, BT), dtype=tl.float32)
        for k0 in range(0, A0, BK):
            kk = k0 + rk
            col = a * A0 + kk
            xa = tl.load(x + rm[:, None] * sxm + col[None, :] * sxk,
                         mask=(rm[:, None] < M) & ((kk < A0) & (col < IN))[None, :], other=0.0)
            wa = tl.load(w1 + a * s1a + kk[:, None] * s1k + blk * s1c + rt[None, :] * s1t,
                         mask=(kk[:, None] < A0) & (rt[None, :] < T), other=0.0)
            z = _dot(xa.to(wa.dtype), wa, z, UPCAST, PREC)
        wb = tl.load(w2 + blk * s2c + a * s2a + rt[:, None] * s2t + rj[None, :] * s2j,
                     mask=(rt[:, None] < T) & (rj[None, :] < C1), other=0.0)
        # z rounded to the compute dtype, as the unfused graph stores it
        acc = _dot(z.to(wb.dtype), wb, acc, UPCAST, PREC)
    acc = acc * alpha
    rn = blk * C1 + rj
    mask = (rm[:, None] < M) & (rj[None, :] < C1) & (rn[None, :] < N_OUT)
{EPILOGUE}
    tl.store(c + rm[:, None] * scm + rn[None, :] * scn, acc.to(c.dtype.element_ty), mask=mask)
"""

CONFIGS = [
    ({"BM": bm, "BK": bk}, w, s) for bm, bk, w, s in [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4), (32, 64, 4, 3)]
]
SMALL = {"BM": 16, "BK": 16}


def out_features(tensors) -> int:
    W1, W2 = tensors[:2]
    return tensors[2].shape[-1] if len(tensors) > 2 else W2.shape[0] * W2.shape[-1]


def fits_one_kernel(W1: torch.Tensor, W2: torch.Tensor) -> bool:
    return runtime.pow2(W2.shape[-1]) <= ONE_MAX_C1 and runtime.pow2(W1.shape[-1]) <= ONE_MAX_T


def one_kernel(x2, W1, W2, n_out, steps, operands, alpha, out_dtype) -> torch.Tensor:
    a1, a0, c0, t = W1.shape
    c1 = W2.shape[-1]
    m, in_f = x2.shape
    y = runtime.alloc((m, n_out), runtime.out_dtype_of(W1.dtype, out_dtype), x2.device)
    if m == 0:
        return y
    views = epi.operand_views(operands, steps, m, n_out)
    src = TEMPLATE.format(DOT=runtime.DOT_SOURCE, EPI_ARGS=epi.signature(steps), EPILOGUE=epi.source(steps))
    args = (
        x2,
        W1,
        W2,
        y,
        float(alpha),
        m,
        in_f,
        n_out,
        a1,
        a0,
        c0,
        t,
        c1,
        x2.stride(0),
        x2.stride(1),
        *W1.stride(),
        *W2.stride(),
        y.stride(0),
        y.stride(1),
        *epi.operand_args(views),
    )
    consts = {"BT": runtime.pow2(t), "BC": runtime.pow2(c1), **runtime.dot_flags(W1.dtype)}

    def grid(meta):
        return (c0 * runtime.cdiv(m, meta["BM"]),)

    runtime.launch(
        runtime.load("btt", src),
        "btt_kernel",
        grid,
        args,
        consts,
        CONFIGS,
        ["M", "IN", "N_OUT", "A1", "T", "C1"],
        SMALL,
    )
    return y


def two_launch(x2, W1, W2, n_out, steps, operands, alpha, out_dtype) -> torch.Tensor:
    W1, W2 = W1.contiguous(), W2.contiguous()
    a1, a0, c0, t = W1.shape
    c1 = W2.shape[-1]
    m, in_f = x2.shape
    z = runtime.alloc((c0, m, a1 * t), W1.dtype, x2.device)
    bgemm(
        x2,
        (a0 * x2.stride(1), x2.stride(0), x2.stride(1)),
        W1,
        (W1.stride(0), W1.stride(1), W1.stride(3)),
        z,
        (t * z.stride(2), z.stride(1), z.stride(0), z.stride(2)),
        batch=a1,
        m=m,
        n=c0 * t,
        k=a0,
        n_out=c0 * t,
        akoff=a0,
        aklim=in_f,
        t=t,
    )
    y = runtime.alloc((m, n_out), runtime.out_dtype_of(W1.dtype, out_dtype), x2.device)
    bgemm(
        z,
        (z.stride(0), z.stride(1), z.stride(2)),
        W2,
        (W2.stride(0), W2.stride(2), W2.stride(3)),
        y,
        (c1 * y.stride(1), y.stride(0), 0, y.stride(1)),
        batch=c0,
        m=m,
        n=c1,
        k=a1 * t,
        n_out=n_out,
        cnoff=c1,
        t=c1,
        steps=steps,
        operands=operands,
        alpha=alpha,
    )
    return y


def launch(x, tensors, operands, steps, alpha, out_dtype):
    W1, W2 = tensors[0], tensors[1]
    run = one_kernel if fits_one_kernel(W1, W2) else two_launch
    y = run(flat(x), W1, W2, out_features(tensors), steps, operands, alpha, out_dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


def core(x, W1, W2, *trim):
    return btt_matmul(x, W1, W2, None, out_features([W1, W2, *trim]))


twocore = define("twocore", core, launch, out_features)
