"""One factory for every kernel op: `torch.ops.lrcompile.<name>(x, tensors, operands, epilogue, alpha, out_dtype)`.

Semantics, shared by all families: y = epilogue(core(alpha · x.to(compute dtype), tensors)).to(out dtype), where
`core` is the family's own `functional` without bias (the bias is the epilogue's first `add_row`) and the compute
dtype is that of tensors[0]. The op runs its Triton launcher where Triton can run (runtime.use_triton), else the
torch reference. The fake impl gives shape and dtype only; the backward is the reference's vjp in torch (exact
for both paths: the kernels compute the same function).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import epilogue as epi
from . import runtime

OPS: dict[str, object] = {}


def reference(core: Callable, x, tensors, operands, epilogue: str, alpha: float, out_dtype):
    steps = epi.parse(epilogue)
    cd = tensors[0].dtype
    xin = x.to(cd)
    if alpha != 1.0:
        xin = xin * alpha
    y = core(xin, *tensors)
    if steps:
        y = epi.apply(y.float(), steps, operands)
    return y.to(runtime.out_dtype_of(cd, out_dtype))


def define(name: str, core: Callable, launch: Callable, out_features: Callable):
    """Register lrcompile::<name>. core(x, *tensors) -> (..., out); launch(x, tensors, operands, steps, alpha,
    out_dtype) -> (..., out) with Triton; out_features(tensors) -> int."""

    @torch.library.custom_op(f"lrcompile::{name}", mutates_args=())
    def op(x: torch.Tensor, tensors: list[torch.Tensor], operands: list[torch.Tensor], epilogue: str,
           alpha: float, out_dtype: Optional[torch.dtype]) -> torch.Tensor:
        steps = epi.parse(epilogue)
        if len(operands) != epi.n_operands(steps):
            raise ValueError(f"lrcompile::{name}: epilogue {epilogue!r} takes {epi.n_operands(steps)} operands, got {len(operands)}")
        if runtime.use_triton(x):
            return launch(x, list(tensors), list(operands), steps, alpha, out_dtype)
        return reference(core, x, tensors, operands, epilogue, alpha, out_dtype).contiguous()

    @op.register_fake
    def _(x, tensors, operands, epilogue, alpha, out_dtype):
        dt = runtime.out_dtype_of(tensors[0].dtype, out_dtype)
        return x.new_empty((*x.shape[:-1], out_features(tensors)), dtype=dt)

    def setup_context(ctx, inputs, output):
        x, tensors, operands, epilogue, alpha, out_dtype = inputs
        ctx.save_for_backward(x, *tensors, *operands)
        ctx.n_tensors = len(tensors)
        ctx.meta = (epilogue, alpha, out_dtype)

    def backward(ctx, grad):
        saved = ctx.saved_tensors
        x, tensors, operands = saved[0], list(saved[1:1 + ctx.n_tensors]), list(saved[1 + ctx.n_tensors:])
        epilogue, alpha, out_dtype = ctx.meta

        def f(x, tensors, operands):
            return reference(core, x, tensors, operands, epilogue, alpha, out_dtype)

        _, vjp = torch.func.vjp(f, x, tensors, operands)
        gx, gt, go = vjp(grad)
        return gx, list(gt), list(go), None, None, None

    op.register_autograd(backward, setup_context=setup_context)
    OPS[name] = op
    return op


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])
