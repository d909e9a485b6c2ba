"""plan.json entries of ExpertBanks, and the bank rebuilt from one on a freshly built model (lrcompile.load).

An entry: {"path", "placement": "module", "family": "experts", "dtype", "policy", "projections": {name:
{"family", "config", "experts", "in_features", "out_features"}}}. Everything in it is checked against the model
before anything is allocated: the module is a transformers 5 experts module, each projection one of its 3-D
weights of the saved shape, the experts distinct indices below its expert count.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from ..families import FAMILIES
from .bank import EXPERT_FAMILIES, ExpertBank, Projection, projections

FAMILY = "experts"


def experts_entry(path: str, bank: ExpertBank) -> dict:
    first = next(iter(bank.plans))
    return {
        "path": path,
        "placement": "module",
        "family": FAMILY,
        "dtype": str(bank.stacked(first)[0].dtype).replace("torch.", ""),
        "policy": getattr(bank, "policy_digest", None),
        "projections": {
            p: {
                "family": plan.family.name,
                "config": dataclasses.asdict(plan.cfg),
                "experts": list(plan.experts),
                "in_features": plan.in_features,
                "out_features": plan.out_features,
            }
            for p, plan in bank.plans.items()
        },
    }


def rebuild_experts(
    target: nn.Module, saved: dict, digest, fail: Callable, config: Callable, dtype, swap: Callable
) -> None:
    """The ExpertBank of a plan entry (`saved`: its projections) in place of `target`, with empty tensors.
    `fail(msg)` raises the one-line PlanError; `config(cls, sub_entry)` the validated family config; `swap(old,
    new, undo_extra)` replaces the module undoably (`undo_extra` puts released 3-D weights back)."""
    n_exp = int(target.num_experts)
    plans, stacked = {}, {}
    for p, sub in saved.items():
        if p not in projections(target) or not isinstance(sub, dict):
            fail(f"bad projection {p!r} (the module has {', '.join(projections(target))})")
        cls = FAMILIES.get(sub.get("family"))
        if cls is None or cls.name not in EXPERT_FAMILIES:
            fail(f"{p}: family {sub.get('family')!r} does not run on experts ({', '.join(EXPERT_FAMILIES)} do)")
        cfg = config(cls, sub)
        experts = sub.get("experts")
        if (
            not isinstance(experts, list)
            or not experts
            or not all(type(e) is int and 0 <= e < n_exp for e in experts)
            or len(set(experts)) != len(experts)
        ):
            fail(f"{p}: experts must be distinct indices below {n_exp}, got {str(experts)[:60]}")
        w = target._parameters[p]
        in_f, out_f = sub.get("in_features"), sub.get("out_features")
        shape = (in_f, out_f) if target.is_transposed else (out_f, in_f)
        if tuple(w.shape[1:]) != shape:
            fail(f"{p}: expected experts of {in_f}→{out_f}, found {tuple(w.shape)}")
        if cls.compressing and len(experts) != n_exp:
            fail(f"{p}: a compressed projection covers every expert")
        sized = cfg.resolve(in_f, out_f) if hasattr(cfg, "resolve") else cfg
        if cls.param_count(in_f, out_f, sized) > 4 * in_f * out_f:
            fail(f"{p}: {cls.name} {cfg} is larger than the dense expert: not a plan lrcompile writes")
        made = cls(in_f, out_f, cfg, dtype=dtype, device=w.device)  # empty tensors of one expert's shapes
        ts = []
        for name in cls.tensor_names:
            t = getattr(made, name)
            big = torch.empty((len(experts), *t.shape), dtype=t.dtype, device=t.device)
            ts.append(nn.Parameter(big, requires_grad=True) if isinstance(t, nn.Parameter) else big)
        plans[p], stacked[p] = Projection(cls.name, cfg, tuple(experts), in_f, out_f), ts
    bank = ExpertBank(target, plans, stacked)
    bank.policy_digest = digest
    released = {p: target._parameters.pop(p) for p, plan in plans.items() if plan.family.compressing}
    swap(target, bank, lambda: target._parameters.update(released))
