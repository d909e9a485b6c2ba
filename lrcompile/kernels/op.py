"""One factory for every kernel op: `torch.ops.lrcompile.<name>(x, tensors, operands, epilogue, alpha, out_dtype)`.

Semantics, shared by all families: y = epilogue(core(alpha · x.to(compute dtype), tensors)).to(out dtype), where
`core` is the family's own `functional` without bias (the bias is the epilogue's first `add_row`) and the compute
dtype is that of tensors[0]. The op runs its Triton launcher where Triton can run (runtime.use_triton), else the
torch reference. The fake impl gives shape and dtype only.

Backward, in torch (exact for both paths: the kernels compute the same function), and only for the inputs that
need a gradient (a frozen base weight costs no dW GEMM):
  - the epilogue's vjp (elementwise). Steps that need the pre-epilogue value (activations, products) get it by
    calling the op again without the epilogue (fused on a GPU); add-only epilogues need no value at all.
  - the core's: the family's `grads` (closed form: no forward recompute), else the reference's vjp taken only
    with respect to the inputs that need a gradient.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import epilogue as epi
from . import runtime

OPS: dict[str, object] = {}

# grads(x2, tensors, g2, need_x, need_tensors) -> (gx2 | None, [g | None per tensor]); x2 (M, in) and g2
# (M, out) are 2-D, in the compute dtype, x2 already scaled by alpha.
Grads = Callable[[torch.Tensor, list, torch.Tensor, bool, list], tuple]


def reference(core: Callable, x, tensors, operands, epilogue: str, alpha: float, out_dtype):
    steps = epi.parse(epilogue)
    y = core(scaled_input(x, tensors, alpha), *tensors)
    if steps:
        y = epi.apply(y.float(), steps, operands)
    return y.to(runtime.out_dtype_of(tensors[0].dtype, out_dtype))


def scaled_input(x, tensors, alpha: float) -> torch.Tensor:
    xin = x.to(tensors[0].dtype)
    return xin * alpha if alpha != 1.0 else xin


def partial_vjp(f: Callable, prim: list, need: list):
    """(f(*prim), vjp) with the vjp taken only w.r.t. prim[i] where need[i]; vjp(ct) gives a gradient or None
    per primal. The others enter as constants, so autograd never forms their gradients."""
    idx = [i for i, n in enumerate(need) if n]

    def sub(*sel):
        args = list(prim)
        for i, v in zip(idx, sel):
            args[i] = v
        return f(*args)

    out, vjp = torch.func.vjp(sub, *[prim[i] for i in idx])

    def full(ct):
        res: list = [None] * len(prim)
        for i, gi in zip(idx, vjp(ct)):
            res[i] = gi
        return res

    return out, full


def vjp_grads(core: Callable) -> Grads:
    """The reference's vjp with respect to the needed inputs only."""

    def grads(x2, tensors, g2, need_x, need_t):
        if not (need_x or any(need_t)):
            return None, [None] * len(tensors)
        _, vjp = partial_vjp(core, [x2, *tensors], [need_x, *need_t])
        gx, *gt = vjp(g2)
        return gx, gt

    return grads


def _epilogue_vjp(y0, steps, operands, grad, need_ops):
    """(gradient w.r.t. the core's output, gradients of the operands or None)."""
    _, vjp = partial_vjp(lambda y, *ops: epi.apply(y.float(), steps, ops), [y0, *operands], [True, *need_ops])
    gy, *gops = vjp(grad.float())
    return gy, gops


def define(name: str, core: Callable, launch: Callable, out_features: Callable, grads: Optional[Grads] = None):
    """Register lrcompile::<name>. core(x, *tensors) -> (..., out); launch(x, tensors, operands, steps, alpha,
    out_dtype) -> (..., out) with Triton; out_features(tensors) -> int; grads: see `Grads` (default: vjp_grads)."""
    core_grads = grads or vjp_grads(core)

    @torch.library.custom_op(f"lrcompile::{name}", mutates_args=())
    def op(
        x: torch.Tensor,
        tensors: list[torch.Tensor],
        operands: list[torch.Tensor],
        epilogue: str,
        alpha: float,
        out_dtype: Optional[torch.dtype],
    ) -> torch.Tensor:
        steps = epi.parse(epilogue)
        if len(operands) != epi.n_operands(steps):
            raise ValueError(
                f"lrcompile::{name}: epilogue {epilogue!r} takes {epi.n_operands(steps)} operands, got {len(operands)}"
            )
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
        nt = ctx.n_tensors
        x, tensors, operands = saved[0], list(saved[1 : 1 + nt]), list(saved[1 + nt :])
        epilogue, alpha, out_dtype = ctx.meta
        # flat whatever the nesting torch gives it: x, each tensor, each operand, then the non-tensor arguments
        needs = _leaves(ctx.needs_input_grad)
        need_x, need_t, need_o = needs[0], needs[1 : 1 + nt], needs[1 + nt : 1 + nt + len(operands)]
        steps = epi.parse(epilogue)
        cd = tensors[0].dtype
        g_ops: list = [None] * len(operands)
        if steps:
            if epi.needs_value(steps):
                y0 = op(x, tensors, [], "", alpha, None)  # the core's output, as the epilogue saw it
            else:
                y0 = grad.new_zeros((), dtype=cd).expand(grad.shape)  # an add-only epilogue ignores the value
            g, g_ops = _epilogue_vjp(y0, steps, operands, grad, need_o)
        else:
            g = grad
        gx = None
        g_t: list = [None] * nt
        if need_x or any(need_t):
            x2 = flat(scaled_input(x, tensors, alpha))
            gx2, g_t = core_grads(x2, tensors, flat(g.to(cd)), need_x, list(need_t))
            if need_x:
                gx = (gx2 * alpha if alpha != 1.0 else gx2).reshape(x.shape).to(x.dtype)
        return gx, list(g_t), list(g_ops), None, None, None

    op.register_autograd(backward, setup_context=setup_context)
    OPS[name] = op
    return op


def _leaves(xs) -> list:
    """The flags of needs_input_grad in order, however torch nests them (a list per list argument)."""
    if isinstance(xs, (tuple, list)):
        return [leaf for x in xs for leaf in _leaves(x)]
    return [xs]


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])
