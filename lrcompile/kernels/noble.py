"""Fused NOBLE: y = epilogue([x, h]·[W; W_up]ᵀ) with h = CosNet(x W_downᵀ + b_down).

The shrink kernel owns whole rows: the cosine needs the complete W_down x sum, so K is never split; the sum,
both cosines and the r×r middle linear run in fp32 on chip, and only h (M × r) reaches memory. The expand rides
the base GEMM as a second K loop (gemm.py). alpha (an absorbed input scale) is applied to x up front: the branch
is not linear in x. Ranks whose (BM × r) tile would not fit on chip (above MAX_R) form h in torch; the expand
and the epilogue still ride the base GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..families.adapters.noble import NOBLE
from . import runtime
from .gemm import gemm
from .op import define, flat, partial_vjp

MAX_R = 128

TEMPLATE = """
import triton
import triton.language as tl
{DOT}

@triton.jit
def cosnet_kernel(x, down, db, w1, p1, mid, mb, w2, p2, h, M, K, R, sxm, sxk, sdr, sdk, smo, smi, shm, shr,
                  UPCAST: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    rk = tl.arange(0, BK)
    rmask = rr < R
    z = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(x + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        dt = tl.load(down + rr[None, :] * sdr + kk[:, None] * sdk, mask=rmask[None, :] & (kk[:, None] < K), other=0.0)
        z = _dot(a.to(dt.dtype), dt, z, UPCAST, PREC)
    z = z + tl.load(db + rr, mask=rmask, other=0.0).to(tl.float32)[None, :]
    c1 = tl.cos(tl.load(w1 + rr, mask=rmask, other=0.0).to(tl.float32)[None, :] * z
                + tl.load(p1 + rr, mask=rmask, other=0.0).to(tl.float32)[None, :])
    # padded channels hold cos(0) = 1: the zero-padded rows of midᵀ keep them out of the sum
    midt = tl.load(mid + rr[None, :] * smo + rr[:, None] * smi, mask=rmask[None, :] & rmask[:, None], other=0.0)
    g = tl.dot(c1, midt.to(tl.float32), input_precision="ieee")
    g = g + tl.load(mb + rr, mask=rmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.cos(tl.load(w2 + rr, mask=rmask, other=0.0).to(tl.float32)[None, :] * g
                + tl.load(p2 + rr, mask=rmask, other=0.0).to(tl.float32)[None, :])
    tl.store(h + rm[:, None] * shm + rr[None, :] * shr, c2.to(h.dtype.element_ty), mask=(rm[:, None] < M) & rmask[None, :])
"""

CONFIGS = [({"BM": bm, "BK": bk}, w, s) for bm, bk, w, s in [(64, 64, 4, 3), (128, 64, 8, 3), (32, 128, 4, 3)]]
SMALL = {"BM": 16, "BK": 16}


def cosnet_torch(x2, down, down_bias, omega1, phi1, mid, mid_bias, omega2, phi2) -> torch.Tensor:
    """h = CosNet(x W_downᵀ + b_down) as NOBLE.functional computes it (fp32 inside, x's dtype out): the rank
    fallback and the backward's branch."""
    z = F.linear(x2, down, down_bias).float()
    h = torch.cos(torch.addcmul(phi1.float(), z, omega1.float()))
    h = F.linear(h, mid.float(), mid_bias.float())
    return torch.cos(torch.addcmul(phi2.float(), h, omega2.float())).to(x2.dtype)


def cosnet(x2: torch.Tensor, down, down_bias, omega1, phi1, mid, mid_bias, omega2, phi2) -> torch.Tensor:
    """h = CosNet(x W_downᵀ + b_down): (M, r) in W_down's dtype."""
    m, k = x2.shape
    r = down.shape[0]
    if runtime.pow2(r) > MAX_R:
        return cosnet_torch(x2.to(down.dtype), down, down_bias, omega1, phi1, mid, mid_bias, omega2, phi2)
    h = runtime.alloc((m, r), down.dtype, x2.device)
    if m == 0:
        return h
    args = (
        x2,
        down,
        down_bias,
        omega1,
        phi1,
        mid,
        mid_bias,
        omega2,
        phi2,
        h,
        m,
        k,
        r,
        x2.stride(0),
        x2.stride(1),
        down.stride(0),
        down.stride(1),
        mid.stride(0),
        mid.stride(1),
        h.stride(0),
        h.stride(1),
    )
    consts = {"BR": runtime.pow2(r), **runtime.dot_flags(down.dtype)}
    src = TEMPLATE.format(DOT=runtime.DOT_SOURCE)
    runtime.launch(
        runtime.load("noble", src),
        "cosnet_kernel",
        lambda meta: (runtime.cdiv(m, meta["BM"]),),
        args,
        consts,
        CONFIGS,
        ["M", "K", "R"],
        SMALL,
    )
    return h


def launch(x, tensors, operands, steps, alpha, out_dtype):
    W, *branch, up = tensors
    x2 = flat(x).to(W.dtype)
    if alpha != 1.0:
        x2 = x2 * alpha
    h = cosnet(x2, *branch)
    y = gemm(x2, W, h, up, steps=steps, operands=operands, out_dtype=out_dtype)
    return y.view(*x.shape[:-1], W.shape[0])


def core(x, W, *tensors):
    return NOBLE.functional(x, W, None, *tensors)


def grads(x, tensors, g, need_x, need_t):
    """Base part in closed form (gx = g W, gW = gᵀx, only if needed); the branch through the vjp of its CosNet,
    taken w.r.t. the needed inputs only (recomputing h costs O(M·in·r), not the base GEMM)."""
    W, *branch, up = tensors
    need_W, *need_b, need_up = need_t
    gx = g @ W if need_x else None
    g_b: list = [None] * len(branch)
    g_up = None
    if need_x or need_up or any(need_b):
        h, vjp = partial_vjp(cosnet_torch, [x, *branch], [need_x, *need_b])
        g_up = g.t() @ h if need_up else None
        if need_x or any(need_b):
            gxb, *g_b = vjp(g @ up)
            gx = gx + gxb if need_x else None
    return gx, [g.t() @ x if need_W else None, *g_b, g_up]


noble = define("noble", core, launch, lambda t: t[0].shape[0], grads)
