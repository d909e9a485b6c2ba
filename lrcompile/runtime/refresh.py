"""`lrcompile.refresh(model)`: refit, on demand, every set of factors that still has the dense weights it came from.

For the update paths no stamp can see cheaply (in-place writes through `.data`, which bypass the version counter
and keep the storage; see the README's table of update paths). Trained factors are refit too: the caller says the
dense weights are the truth now.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention.factors import AttnFactors
from . import attach as store
from . import fresh


def _attention_sources(model: nn.Module, owner_path: str, struct: AttnFactors):
    """(weights, their rows) of the projections the factors were made from, as recorded when they were made."""
    rows, weights = [], []
    for path, (a, b), relative in struct.sources:
        full = ".".join(p for p in (owner_path, path) if p) if relative else path
        try:
            mod = model.get_submodule(full)
        except AttributeError:
            return None
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            return None
        dense = w.T if type(mod).__name__ == "Conv1D" else w
        rows.append(dense[a:b])
        weights.append(w)
    return weights, rows


def refresh(model: nn.Module, calibration=None) -> int:
    """Refit the factors of every site whose dense weight is still on the model (backend-attached factors,
    attention factors); returns how many were refit. `calibration`: statistics for activation-aware inits."""
    n = 0
    for path, struct, weight in store.installed(model):
        if not struct.compressing or weight is None:
            continue
        transposed = getattr(struct, "base_transposed", None)
        if transposed is None:
            transposed = tuple(weight.shape) != (struct.out_features, struct.in_features)
        dense = (weight.T if transposed else weight).detach()
        stats = calibration.get(path.rpartition(".")[0]) if calibration is not None else None
        struct.refit(dense, stats)
        fresh.record(struct, [weight])
        n += 1
    for path, mod in model.named_modules():
        if isinstance(mod, AttnFactors):
            owner = path.rpartition(".")[0]
            found = _attention_sources(model, owner, mod)
            if found is None:
                continue
            weights, rows = found
            mod.refit(torch.cat(rows).detach())
            fresh.record(mod, weights)
            n += 1
    return n
