"""Fused DoRA: the fused LoRA product with the magnitude column scale g = m / ‖W + s·BA‖_row as the first
epilogue step, so y = g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b is one output pass. g is an (out,) vector computed in torch
(the detached norm needs W Aᵀ and B A Aᵀ: O(out·in·r), small next to the GEMM)."""

from __future__ import annotations

from ..families.adapters.dora import DoRA, dora_row_norm
from .lora import fused
from .op import define, flat


def launch(x, tensors, operands, steps, alpha, out_dtype):
    W, A, B, m, s = tensors
    g = (m / dora_row_norm(W, A, B, s)).float()
    y = fused(flat(x), W, A, B, s, steps, operands, alpha, out_dtype, head=("mul_row",), head_operands=(g,))
    return y.view(*x.shape[:-1], W.shape[0])


def core(x, W, A, B, m, s):
    return DoRA.functional(x, W, None, A, B, m, s)


dora = define("dora", core, launch, lambda t: t[0].shape[0])
