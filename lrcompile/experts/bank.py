"""`ExpertBank`: a transformers 5 experts module whose 3-D expert weights run per expert through a family.

transformers 5 keeps a MoE layer's experts as 3-D parameters (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I];
[E, in, out] when the class says `is_transposed`) and dispatches the experts' forward by
`config._experts_implementation` (eager loop, batched_mm, grouped_mm). The bank replaces that module and computes
the same function as grouped_mm: the (token, expert) pairs sorted by expert, each expert's rows through its
projection, gating by the original module's own `_apply_gate` / `act_fn`, the routing weights, the sum over top-k.

A projection's selected experts (`slots`) run the family's `functional(x, W[e], b[e], *T[slot])` on their own
slices of the stacked factors T (lowrank: U [n, out, r], V [n, r, in]; LoRA: A [n, r, in], B [n, out, r],
scaling [n]): a real factored path, not a reconstructed weight. The other experts run W[e] as they did. State-dict
names keep the original module's (`experts.gate_up_proj` while some expert uses it) plus `experts.<proj>_<tensor>`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..families import FAMILIES
from ..families.base import Owner, mark_owned

# the families a projection's experts may run (their `functional` is a pure function of its tensors)
EXPERT_FAMILIES = ("lowrank", "lora")


def projections(module: nn.Module) -> list[str]:
    """The 3-D expert parameters of a transformers 5 experts module, in the order its forward applies them."""
    first = "gate_up_proj" if module.has_gate else "up_proj"
    return [first, "down_proj"]


def is_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module (`use_experts_implementation`): the flags its generic forwards read and
    3-D weights under the names they use."""
    flags = ("has_gate", "has_bias", "is_transposed", "num_experts", "_apply_gate", "act_fn")
    if not all(hasattr(module, f) for f in flags) or isinstance(module, ExpertBank):
        return False
    params = dict(module.named_parameters(recurse=False))
    return all(isinstance(params.get(p), nn.Parameter) and params[p].dim() == 3 for p in projections(module))


class Projection:
    """One 3-D parameter's family: which experts run it (`slots`: expert -> row of the stacked tensors)."""

    def __init__(self, family: str, cfg, experts: tuple[int, ...], in_features: int, out_features: int):
        self.family = FAMILIES[family]
        self.cfg = cfg
        self.experts = tuple(experts)
        self.slots = {e: i for i, e in enumerate(self.experts)}
        self.in_features = in_features
        self.out_features = out_features


class ExpertBank(Owner):
    """Replaces a transformers 5 experts module; see the module docstring."""

    def __init__(self, original: nn.Module, plans: dict[str, Projection], stacked: dict[str, list[torch.Tensor]]):
        super().__init__()
        # the original module computes the gate and the post-expert norm; held outside `_modules` (its
        # submodules are registered on the bank itself, under the same names, so state-dict keys stay)
        object.__setattr__(self, "original", original)
        self.num_experts = int(original.num_experts)
        self.has_gate, self.has_bias = bool(original.has_gate), bool(original.has_bias)
        self.is_transposed = bool(original.is_transposed)
        self.has_post_expert_norm = bool(getattr(original, "has_post_expert_norm", False))
        self.proj_names = tuple(projections(original))
        self.plans = plans
        names = []
        for p in self.proj_names:
            plan = plans.get(p)
            if plan is None or not plan.family.compressing:  # some expert still runs the dense weight
                self.register_parameter(p, original._parameters[p])
            if self.has_bias:
                self.register_parameter(f"{p}_bias", original._parameters[f"{p}_bias"])
            if plan is None:
                continue
            for tname, t in zip(plan.family.tensor_names, stacked[p]):
                name = f"{p}_{tname}"
                if isinstance(t, nn.Parameter):
                    self.register_parameter(name, mark_owned(t))
                else:
                    self.register_buffer(name, t)
                names.append(name)
        self.tensor_names = tuple(names)
        for name, child in original.named_children():
            self.add_module(name, child)

    def stacked(self, proj: str) -> list[torch.Tensor]:
        return [getattr(self, f"{proj}_{t}") for t in self.plans[proj].family.tensor_names]

    def dense_slice(self, proj: str, e: int) -> Optional[torch.Tensor]:
        """W[e] as (out, in), a view of the 3-D parameter; None where the bank no longer holds it."""
        w = self._parameters.get(proj)
        if w is None:
            return None
        return w[e].T if self.is_transposed else w[e]

    def project(self, proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
        b = getattr(self, f"{proj}_bias")[e] if self.has_bias else None
        plan = self.plans.get(proj)
        slot = plan.slots.get(e) if plan is not None else None
        w = self.dense_slice(proj, e)
        if slot is None:
            return F.linear(x, w, b)
        return plan.family.functional(x, w, b, *[t[slot] for t in self.stacked(proj)])

    def expert_weight(self, proj: str, e: int) -> torch.Tensor:
        """The (out, in) matrix expert `e` applies through `proj` now (factors folded in), for merge and tests."""
        with torch.no_grad():
            plan = self.plans.get(proj)
            slot = plan.slots.get(e) if plan is not None else None
            w = self.dense_slice(proj, e)
            if slot is None:
                return w.detach().clone()
            eye = torch.eye(plan.in_features, dtype=self.stacked(proj)[0].dtype, device=self.stacked(proj)[0].device)
            return plan.family.functional(eye, w, None, *[t[slot] for t in self.stacked(proj)]).T

    # Dynamo does not trace it (the rest of the model compiles around it): the per-expert row counts are data,
    # so a traced forward breaks the graph once per layer and unrolls every expert (3x the capture time of the
    # whole model on a tiny Mixtral), for matmuls whose shapes change with every batch anyway.
    @torch.compiler.disable
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        n_tok, top_k = top_k_index.shape
        ids = top_k_index.reshape(-1)
        order = torch.argsort(ids, stable=True)
        counts = torch.bincount(ids, minlength=self.num_experts).tolist()  # one host sync per layer
        rows = hidden_states[order // top_k].split(counts)
        first, down = self.proj_names
        outs = []
        for e, x in enumerate(rows):
            h = self.project(first, e, x)
            h = self.original._apply_gate(h) if self.has_gate else self.original.act_fn(h)
            outs.append(self.project(down, e, h))
        y = torch.cat(outs)
        if self.has_post_expert_norm:
            y = self.original.post_expert_norm(y)
        y = y * top_k_weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(y).index_copy(0, order, y)
        return out.view(n_tok, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def fold(self, proj: str) -> None:
        """Add an adapter projection's branches into its experts' weights and drop the branches (merge)."""
        plan = self.plans[proj]
        if plan.family.compressing:
            raise ValueError(f"{proj}: a compressed projection has no dense weight to fold into")
        with torch.no_grad():
            for e in plan.experts:
                w = self.dense_slice(proj, e)
                w.copy_(self.expert_weight(proj, e).to(w.dtype))
        for t in plan.family.tensor_names:
            delattr(self, f"{proj}_{t}")
        self.tensor_names = tuple(n for n in self.tensor_names if not n.startswith(f"{proj}_"))
        del self.plans[proj]

    def extra_repr(self) -> str:
        parts = [
            f"{p}: {plan.family.name} {plan.cfg} on experts {list(plan.experts)}" for p, plan in self.plans.items()
        ]
        return f"num_experts={self.num_experts}, " + "; ".join(parts)
