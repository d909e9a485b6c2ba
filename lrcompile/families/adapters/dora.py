"""DoRA (Liu et al.; reference semantics: HF PEFT `use_dora=True`): weight-decomposed LoRA.

y = g ⊙ (W x + s·B A x) + b with g = m / ‖W + s·BA‖_row, m (out) a trainable magnitude initialised to the row
norms, and the norm treated as a constant (detached) as PEFT does. The norm is computed without materialising
BA: ‖W+sBA‖²_row = ‖W‖²_row + 2s·rowsum((W Aᵀ) ⊙ B) + s²·rowsum((B (A Aᵀ)) ⊙ B) — an
(out×r) product instead of an (out×in) one. ‖W‖²_row is recomputed each call (one reduction pass over W, no
W-sized temporary, far cheaper than the GEMM), which keeps it right if the base weight is loaded or trained.

With dropout active PEFT applies the magnitude to the dropped input's base term only:
y = W x + b + (g − 1) ⊙ W x̃ + g ⊙ s·B A x̃ (x̃ = dropout(x)); that is what runs when `dropout > 0`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...compat import is_functorch_wrapped
from ..base import Candidate, mark_owned, register
from .lora import Adapter, LoRAConfig, add_branch, autocast_on, branch_input, flat, lora_init, pissa_factors, unflat


def dora_row_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling) -> torch.Tensor:
    """‖W + s·BA‖ per output row, detached, without forming BA."""
    W, A, B = weight.detach(), lora_A.detach(), lora_B.detach()
    s = scaling.detach() if isinstance(scaling, torch.Tensor) else scaling
    sq = torch.linalg.vector_norm(W, dim=1).square()  # a reduction: no W-sized temporary (W.pow(2) makes one)
    sq = sq + (2 * s) * ((W @ A.t()) * B).sum(1) + (s * s) * ((B @ (A @ A.t())) * B).sum(1)
    return sq.clamp_min(0).sqrt()


def dora_formula(x2, weight, bias, lora_A, lora_B, magnitude, scaling) -> torch.Tensor:
    """g ⊙ (W x + s·B A x) + b on (N, in) rows, through autograd (no dropout)."""
    g = magnitude / dora_row_norm(weight, lora_A, lora_B, scaling)
    y = add_branch(F.linear(x2, weight), F.linear(x2, lora_A) * scaling, lora_B.t())
    g = g.to(y.dtype)  # under autocast y is in the autocast dtype: keep it there
    return y * g if bias is None else torch.addcmul(bias.to(y.dtype), y, g)


def branch_backward(dz, x, weight, lora_A, lora_B, scaling, su, need_x, need_A, need_B):
    """(dx, dA, dB) of z = W x + s·B A x for a frozen W, given dz and su = s·A x: the branch accumulates into
    dx in place (autograd would sum two (N, in) buffers) and dB is computed as (su^T dz)^T, the faster layout
    for a skinny result on CPU."""
    gB = torch.mm(dz, lora_B).mul_(scaling)  # s·dz B, (N, r)
    dx = torch.mm(dz, weight).addmm_(gB, lora_A) if need_x else None
    dA = torch.mm(gB.t(), x) if need_A else None
    dB = torch.mm(su.t(), dz).t() if need_B else None
    return dx, dA, dB


class FrozenBaseDoRA(torch.autograd.Function):
    """DoRA's step with the base weight frozen (the fine-tuning case), its backward written out.

    Autograd through the plain formula makes two (N, out) buffers more than needed and sums dx from two
    branches with an extra pass; on CPU each fresh (N, out) buffer costs page faults on top of its pass. Here
    z = W x + s·B(Ax) is built in place, y = g ⊙ z + b is the one other (N, out) buffer, and the backward
    reuses the dm product's buffer for dz and accumulates the branch into dx in place. The one (N, out)
    tensor saved, z, is kept only for a trainable magnitude. Gradients are those of the formula (tested
    against autograd). Not taken (`usable`): dropout, a trainable base or scaling, autocast or mixed dtypes (the
    formula's ops carry the casts), torch.func transforms, a Dynamo trace. A backward that builds a graph
    (create_graph=True) differentiates the formula instead, so higher orders are the formula's own.
    """

    @staticmethod
    def usable(x, weight, bias, lora_A, lora_B, magnitude, scaling) -> bool:
        if torch.compiler.is_compiling():
            return False  # traced: the formula's ops go to the compiler (the checks below would break the graph)
        if weight.requires_grad or getattr(scaling, "requires_grad", False) or autocast_on(x):
            return False
        ts = [t for t in (x, weight, bias, lora_A, lora_B, magnitude, scaling) if t is not None]
        if any(is_functorch_wrapped(t) for t in ts):
            return False  # inside torch.func transforms (vmap, jvp, grad): the formula composes with them
        return len({t.dtype for t in ts if t is not scaling}) == 1

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, magnitude, scaling):
        norm = dora_row_norm(weight, lora_A, lora_B, scaling)
        g = magnitude / norm  # (forward runs without grad: nothing to detach)
        su = torch.mm(x, lora_A.t()).mul_(scaling)  # s·A x, (N, r)
        z = add_branch(torch.mm(x, weight.t()), su, lora_B.t())
        y = torch.addcmul(bias, z, g) if bias is not None else z * g
        return y, su, z, g, norm  # the intermediates are outputs so that setup_context can save them

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, su, z, g, norm = output
        *_, need_B, need_m, _ = ctx.needs_input_grad
        ctx.mark_non_differentiable(su, z, g, norm)
        ctx.set_materialize_grads(False)  # no zero-filled (N, out) gradients for the intermediates
        ctx.save_for_backward(*inputs, su if need_B else None, z if need_m else None, g, norm)  # z: only for dm

    @staticmethod
    def backward(ctx, dy, *_):
        if dy is None:  # y unused (grads are not materialised)
            return (None,) * 7
        x, W, bias, A, B, m, s, su, z, g, norm = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: differentiate the formula itself
            return formula_vjp(dy, (x, W, bias, A, B, m, s), need)
        need_x, _, need_b, need_A, need_B, need_m, _ = need
        db = dy.sum(0) if need_b and bias is not None else None
        dm = None
        if need_m:
            buf = dy * z
            dm = buf.sum(0).div_(norm)
            dz = torch.mul(dy, g, out=buf)  # dm is reduced: its buffer holds dz now
        elif need_x or need_A or need_B:
            dz = dy * g
        else:
            return None, None, db, None, None, None, None
        dx, dA, dB = branch_backward(dz, x, W, A, B, s, su, need_x, need_A, need_B)
        return dx, None, db, dA, dB, dm, None


def formula_vjp(dy, inputs, need) -> tuple:
    """The gradients of dora_formula at `inputs`, with their own graph (for double backward)."""
    wanted = [t for t, n in zip(inputs, need) if n]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(dora_formula(*inputs), wanted, dy, create_graph=True))
    return tuple(next(grads) if n else None for n in need)


def dora_merged(x, weight, bias, lora_A, lora_B, magnitude, scaling):
    g = magnitude / dora_row_norm(weight, lora_A, lora_B, scaling)
    return F.linear(x, g[:, None] * torch.addmm(weight, lora_B * scaling, lora_A), bias)


@register
class DoRA(Adapter):
    name = "dora"
    Config = LoRAConfig
    tensor_names = ("lora_A", "lora_B", "magnitude", "scaling")
    adapter_names = ("lora_A", "lora_B", "magnitude", "scaling")
    kernel = "dora"
    candidates = (Candidate("merged", dora_merged, inference_only=True),)

    def __init__(self, in_features: int, out_features: int, cfg: LoRAConfig, dtype=None, device=None):
        super().__init__(in_features, out_features, cfg, dtype=dtype, device=device)
        r = cfg.rank
        self.lora_A = mark_owned(nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device)))
        self.lora_B = mark_owned(nn.Parameter(torch.empty(out_features, r, dtype=dtype, device=device)))
        self.magnitude = mark_owned(nn.Parameter(torch.ones(out_features, dtype=dtype, device=device)))
        self.register_buffer(
            "scaling", torch.tensor(cfg.scaling, dtype=dtype or torch.get_default_dtype(), device=device)
        )

    @classmethod
    def from_dense(cls, weight, bias, cfg: LoRAConfig, stats=None) -> "DoRA":
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, cfg, dtype=weight.dtype, device=weight.device)
        m.keep_base(weight)
        lora_init(m.lora_A, m.lora_B, cfg)
        with torch.no_grad():
            if cfg.init == "pissa":
                A, B, m._residual = pissa_factors(weight, cfg)
                m.lora_A.copy_(A)
                m.lora_B.copy_(B)
            if cfg.init == "random":  # B is not zero: the magnitudes are those of W + s·BA (as PEFT)
                m.magnitude.copy_(dora_row_norm(weight, m.lora_A, m.lora_B, m.scaling))
            else:  # B = 0, or PiSSA's residual + s·BA = W: W's row norms
                m.magnitude.copy_(torch.linalg.norm(weight.detach(), dim=1))
        return m

    @staticmethod
    def functional(x, weight, bias, lora_A, lora_B, magnitude, scaling, *drop):
        x2 = flat(x)
        if not drop:
            ts = (x2, weight, bias, lora_A, lora_B, magnitude, scaling)
            return unflat(FrozenBaseDoRA.apply(*ts)[0] if FrozenBaseDoRA.usable(*ts) else dora_formula(*ts), x)
        g = magnitude / dora_row_norm(weight, lora_A, lora_B, scaling)
        xd = branch_input(x2, drop)
        base = F.linear(x2, weight, bias)
        y = base + (g - 1) * F.linear(xd, weight) + g * F.linear(F.linear(xd, lora_A) * scaling, lora_B)
        return unflat(y, x)

    def merged_weight(self) -> torch.Tensor:
        W = self.dense_base().detach()
        full = W + self.scaling * (self.lora_B @ self.lora_A)
        return (self.magnitude / dora_row_norm(W, self.lora_A, self.lora_B, self.scaling))[:, None] * full

    def delta(self) -> torch.Tensor:
        return self.merged_weight() - self.dense_base().detach()

    @classmethod
    def param_count(cls, in_features, out_features, cfg) -> int:
        return cfg.rank * (in_features + out_features) + out_features

    @classmethod
    def flops_per_token(cls, in_features, out_features, cfg) -> int:
        return 2 * cfg.rank * (in_features + out_features) + cfg.rank + 2 * out_features
