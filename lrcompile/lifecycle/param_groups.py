"""Optimizer parameter groups that apply each lrcompile module's per-parameter learning-rate multipliers.

Any module may expose `lr_multipliers() -> {parameter name (relative to the module): multiplier}` — the
structured families (μP multipliers under `init: random`) and adapter families alike; this file knows none of
them. Every other trainable parameter gets `base_lr`.

    opt = torch.optim.AdamW(lrcompile.param_groups(model, 3e-4), weight_decay=0.1)
"""

from __future__ import annotations

from torch import nn


def param_groups(model: nn.Module, base_lr: float) -> list[dict]:
    """One group per distinct multiplier, base group first: {"params", "lr", "lr_multiplier"}.

    Frozen parameters are left out (an optimizer has nothing to do with them); a parameter reachable twice
    (tied, or shared by several modules) is placed once, with the first multiplier found for it.
    """
    mult: dict[int, float] = {}
    for module in model.modules():
        fn = getattr(module, "lr_multipliers", None)
        if not callable(fn):
            continue
        for name, m in fn().items():
            p = module.get_parameter(name)
            mult.setdefault(id(p), float(m))
    groups: dict[float, list] = {}
    for p in model.parameters():  # deduplicated by identity, in registration order
        if p.requires_grad:
            groups.setdefault(mult.get(id(p), 1.0), []).append(p)
    order = sorted(groups, key=lambda m: (m != 1.0, m))
    return [{"params": groups[m], "lr": base_lr * m, "lr_multiplier": m} for m in order]
