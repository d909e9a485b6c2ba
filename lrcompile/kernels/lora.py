"""Fused LoRA: y = epilogue(alpha · [x, h]·[W; B]ᵀ) with h = s · x Aᵀ (the shrink, one small GEMM).

The expand is folded into the base GEMM as a second K loop (concatenated K): the branch adds r/in to the base
GEMM's work and never re-reads or re-writes the (M, out) output. s is read from memory inside the shrink.
"""

from __future__ import annotations

import torch

from ..families.adapters.lora import LoRA
from .gemm import gemm
from .op import define, flat


def fused(x2, W, A, B, s, steps, operands, alpha, out_dtype, head=(), head_operands=()):
    """The LoRA product with `head` steps (DoRA's column scale) before the user's epilogue."""
    h = gemm(x2, A, s=s)
    return gemm(
        x2, W, h, B, steps=(*head, *steps), operands=[*head_operands, *operands], alpha=alpha, out_dtype=out_dtype
    )


def launch(x, tensors, operands, steps, alpha, out_dtype):
    W, A, B, s = tensors
    y = fused(flat(x), W, A, B, s, steps, operands, alpha, out_dtype)
    return y.view(*x.shape[:-1], W.shape[0])


def core(x, W, A, B, s):
    return LoRA.functional(x, W, None, A, B, s)


def grads(x, tensors, g, need_x, need_t):
    """y = x Wᵀ + s·(x Aᵀ) Bᵀ in closed form, only the needed gradients: a frozen W costs no gᵀx GEMM."""
    W, A, B, s = tensors
    need_W, need_A, need_B, need_s = need_t
    gb = g @ B if need_x or need_A or need_s else None  # (M, r): what reaches the branch's s·h
    h = x @ A.t() if need_B or need_s else None
    gx = torch.addmm(g @ W, gb * s, A) if need_x else None
    gs = (gb.float() * h.float()).sum().reshape(s.shape).to(s.dtype) if need_s else None
    return gx, [
        g.t() @ x if need_W else None,
        (gb * s).t() @ x if need_A else None,
        (g.t() @ h) * s if need_B else None,
        gs,
    ]


lora = define("lora", core, launch, lambda t: t[0].shape[0], grads)
