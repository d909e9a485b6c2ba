"""Healing: a short distillation of the installed factors against the dense model on calibration inputs.

Only lrcompile's own parameters train (the factors; every other parameter is frozen for the duration and then
restored). Loss: 1 − cosine of the mask-weighted mean-pooled outputs plus a small per-token cosine term, model
in eval mode. REFERENCE.md: this works on balanced factors (U·√S, √S·V, equal norms) with a small Adam learning
rate; an MSE loss on hidden states with unbalanced factors wrecked the model.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .capture import call_model
from .structures import Structure


def _hidden(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    return out[0]


def _mask(batch, h):
    m = batch.get("attention_mask") if isinstance(batch, dict) else None
    if m is None or tuple(m.shape) != tuple(h.shape[:2]):
        return torch.ones(h.shape[:-1], dtype=h.dtype, device=h.device)
    return m.to(h.dtype)


def _pool(h, m):
    if h.dim() < 3:
        return h
    return (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1)


def heal(model: nn.Module, teacher: nn.Module, batches: Iterable, *, steps: int = 200, lr: float = 2e-5,
         token_weight: float = 0.1, progress: bool = True) -> nn.Module:
    """Distil `model`'s lrcompile factors toward `teacher` (the dense original) on `batches`; returns `model`."""
    from tqdm.auto import tqdm

    batches = list(batches)
    if not batches:
        raise ValueError("lrcompile.heal: no batches given")
    params = [p for m in model.modules() if isinstance(m, Structure) for p in m.parameters(recurse=False)
              if p.dtype.is_floating_point]
    if not params:
        raise ValueError("lrcompile.heal: the model has no lrcompile factors (run lrcompile.rewrite first)")
    with torch.no_grad():
        targets = [_hidden(call_model(teacher.eval(), b)).detach() for b in batches]
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    model.eval()  # dropout off: the factors fit the function the model serves
    opt = torch.optim.Adam(params, lr=lr)
    try:
        for step in tqdm(range(steps), desc="lrcompile heal", disable=not progress):
            b, t = batches[step % len(batches)], targets[step % len(batches)]
            h = _hidden(call_model(model, b))
            m = _mask(b, h)
            loss = (1 - F.cosine_similarity(_pool(h, m), _pool(t, m), dim=-1)).mean()
            if token_weight and h.dim() >= 3:
                tok = 1 - F.cosine_similarity(h, t, dim=-1)
                loss = loss + token_weight * (tok * m).sum() / m.sum().clamp_min(1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        for mod, training in modes.items():
            mod.training = training
    return model
