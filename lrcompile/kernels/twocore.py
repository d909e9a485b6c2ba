"""Monarch and BTT: y = epilogue(alpha · BTT(x; W1, W2)), two batched block matmuls, no shuffle copies.

Stage 1, per input block a: z[c, :, a·t + τ] = x[:, a·a₀:(a+1)·a₀] · W1[a, :, c, τ] — x's block is read in place
(zero-padded past in_features by the load mask) and the store scatters the (c, τ) columns straight into the
(c₀, N, a₁·t) layout stage 2 reads contiguously. Stage 2, per output block c: y[:, c·c₁:(c+1)·c₁] = z[c] ·
W2[c] with the epilogue on global columns, masked past out_features (Monarch's padding).
"""
from __future__ import annotations

import torch

from ..structures.btt import btt_matmul
from . import runtime
from .bgemm import bgemm
from .op import define, flat


def out_features(tensors) -> int:
    W1, W2 = tensors[:2]
    return tensors[2].shape[-1] if len(tensors) > 2 else W2.shape[0] * W2.shape[-1]


def launch(x, tensors, operands, steps, alpha, out_dtype):
    W1, W2 = tensors[0].contiguous(), tensors[1].contiguous()
    a1, a0, c0, t = W1.shape
    c1 = W2.shape[-1]
    n_out = out_features(tensors)
    x2 = flat(x)
    m, in_f = x2.shape
    z = runtime.alloc((c0, m, a1 * t), W1.dtype, x.device)
    bgemm(x2, (a0 * x2.stride(1), x2.stride(0), x2.stride(1)), W1, (W1.stride(0), W1.stride(1), W1.stride(3)),
          z, (t * z.stride(2), z.stride(1), z.stride(0), z.stride(2)),
          batch=a1, m=m, n=c0 * t, k=a0, n_out=c0 * t, akoff=a0, aklim=in_f, t=t)
    y = runtime.alloc((m, n_out), runtime.out_dtype_of(W1.dtype, out_dtype), x.device)
    bgemm(z, (z.stride(0), z.stride(1), z.stride(2)), W2, (W2.stride(0), W2.stride(2), W2.stride(3)),
          y, (c1 * y.stride(1), y.stride(0), 0, y.stride(1)),
          batch=c0, m=m, n=c1, k=a1 * t, n_out=n_out, cnoff=c1, t=c1, steps=steps, operands=operands, alpha=alpha)
    return y.view(*x.shape[:-1], n_out)


def core(x, W1, W2, *trim):
    return btt_matmul(x, W1, W2, None, out_features([W1, W2, *trim]))


twocore = define("twocore", core, launch, out_features)
