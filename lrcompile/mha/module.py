"""nn.MultiheadAttention with factored `in_proj` / `out_proj`.

Its forward hands `in_proj_weight` and `out_proj.weight` to `F.multi_head_attention_forward` (one opaque call in
Dynamo's graph, so no linear site is visible inside it). `FactoredMHA` keeps that forward and makes those two
weights computed attributes: each projection's factors (`Factored`) rebuild the matrix the forward needs (lowrank
U V; LoRA W + s·B A, PEFT's merge formula), differentiably, so gradients reach the factors. This saves parameters,
not FLOPs: the attention runs dense matrices (the report says so).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..families import FAMILIES
from ..families.base import Owner, mark_owned

MHA_FAMILIES = ("lowrank", "lora")


class Factored(Owner):
    """One projection as a family's tensors (+ the frozen base weight for an adapter, + the bias); `weight` is the
    (out, in) matrix they make."""

    def __init__(self, family: str, cfg, in_features: int, out_features: int, tensors: dict, base, bias):
        super().__init__()
        self.family = FAMILIES[family]
        self.cfg, self.in_features, self.out_features = cfg, in_features, out_features
        for name, t in tensors.items():
            if isinstance(t, nn.Parameter):
                self.register_parameter(name, mark_owned(t))
            else:
                self.register_buffer(name, t)
        self.tensor_names = tuple(tensors)
        self.base: Optional[nn.Parameter] = base  # the dense weight an adapter adds to (None: compressed away)
        self.bias: Optional[nn.Parameter] = bias

    @property
    def weight(self) -> torch.Tensor:
        if self.family.name == "lora":
            return torch.addmm(self.base, self.lora_B * self.scaling, self.lora_A)
        return self.U @ self.V

    def extra_repr(self) -> str:
        return f"{self.family.name}, in_features={self.in_features}, out_features={self.out_features}, cfg={self.cfg}"


class FactoredMHA(nn.MultiheadAttention):
    """nn.MultiheadAttention whose `in_proj_weight` comes from a `Factored` child `in_proj` when it has one, and
    whose `out_proj` child may be a `Factored` (its `.weight` / `.bias` are what the forward reads)."""

    @property
    def in_proj_weight(self):
        f = self._modules.get("in_proj")
        return f.weight if f is not None else self._parameters["in_proj_weight"]

    def restore(self) -> nn.MultiheadAttention:
        """A plain nn.MultiheadAttention with the current matrices (merge)."""
        new = _clone_as(self, nn.MultiheadAttention)
        f = new._modules.pop("in_proj", None)
        if f is not None:
            new._parameters["in_proj_weight"] = _dense_param(f)
        out = new._modules["out_proj"]
        if isinstance(out, Factored):
            lin = nn.modules.linear.NonDynamicallyQuantizableLinear(
                out.in_features, out.out_features, bias=out.bias is not None, device="meta"
            )
            lin.weight, lin.bias = _dense_param(out), out.bias
            lin.train(out.training)
            new._modules["out_proj"] = lin
        return new


def _dense_param(f: Factored) -> nn.Parameter:
    with torch.no_grad():
        w = f.weight.detach()
        if f.base is not None:  # an adapter: the base Parameter takes the merged values (optimizers keep it)
            f.base.copy_(w)
            return f.base
        return nn.Parameter(w.clone(), requires_grad=True)


def _clone_as(old: nn.Module, cls: type) -> nn.Module:
    """`old`'s state in an instance of `cls` (its own parameter / module / buffer tables)."""
    new = cls.__new__(cls)
    new.__dict__.update(old.__dict__)
    for table in ("_parameters", "_buffers", "_modules"):
        new.__dict__[table] = dict(old.__dict__[table])
    return new


def factored_mha(old: nn.MultiheadAttention, in_proj: Optional[Factored], out_proj: Optional[Factored]) -> FactoredMHA:
    new = _clone_as(old, FactoredMHA)
    if in_proj is not None:
        del new._parameters["in_proj_weight"]
        new._modules["in_proj"] = in_proj
    if out_proj is not None:
        new._modules["out_proj"] = out_proj
    for m in (in_proj, out_proj):
        if m is not None:
            m.train(old.training)
    return new


def is_mha_site(module: nn.Module) -> bool:
    """A packed nn.MultiheadAttention (q, k, v share `in_proj_weight`) not yet factored."""
    return (
        isinstance(module, nn.MultiheadAttention)
        and not isinstance(module, FactoredMHA)
        and bool(getattr(module, "_qkv_same_embed_dim", False))
        and isinstance(module._parameters.get("in_proj_weight"), nn.Parameter)
    )
