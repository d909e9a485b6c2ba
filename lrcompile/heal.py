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
from .structures.base import is_owned


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


def _token_cos(h, t, m):
    """Mask-weighted mean of 1 − per-token cosine."""
    tok = 1 - F.cosine_similarity(h, t, dim=-1)
    m = m if tuple(m.shape) == tuple(tok.shape) else torch.ones_like(tok)
    return (tok * m).sum() / m.sum().clamp_min(1)


def loss_of(h, t, batch, token_weight: float = 0.1) -> torch.Tensor:
    """1 − cosine of the mask-weighted mean-pooled outputs, + token_weight × the per-token term."""
    m = _mask(batch, h)
    loss = (1 - F.cosine_similarity(_pool(h, m), _pool(t, m), dim=-1)).mean()
    if token_weight and h.dim() >= 3:
        loss = loss + token_weight * _token_cos(h, t, m)
    return loss


class _Taps:
    """Forward hooks recording the outputs of the named submodules (layer-wise distillation targets)."""

    def __init__(self, net: nn.Module, names):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        for n in names:
            try:
                mod = net.get_submodule(n)
            except AttributeError:
                raise ValueError(f"lrcompile.heal: no submodule {n!r} to match layer outputs at") from None
            self.handles.append(mod.register_forward_hook(lambda _m, _a, o, n=n: self.out.__setitem__(n, _hidden(o))))

    def close(self):
        for h in self.handles:
            h.remove()


def heal(model: nn.Module, teacher: nn.Module, batches: Iterable, *, steps: int = 200, lr: float = 2e-5,
         token_weight: float = 0.1, layers=(), layer_weight: float = 0.1, progress: bool = True) -> nn.Module:
    """Distil `model`'s lrcompile factors toward `teacher` (the dense original) on `batches`; returns `model`.

    `layers`: submodule paths (the same in both models, e.g. each transformer block) whose outputs are matched
    too, by their mean per-token cosine × `layer_weight` / len(layers): a gradient for every block, not only
    through the whole stack. The learning rate decays linearly to 0 over `steps`."""
    from tqdm.auto import tqdm

    batches = list(batches)
    if not batches:
        raise ValueError("lrcompile.heal: no batches given")
    # the structures' own tensors (factors), not the original biases or base weights they hold
    params = [p for m in model.modules() if isinstance(m, Structure) for p in m.parameters(recurse=False)
              if p.dtype.is_floating_point and is_owned(p)]
    if not params:
        raise ValueError("lrcompile.heal: the model has no lrcompile factors (run lrcompile.rewrite first)")
    layers = list(layers)
    teacher_modes = {m: m.training for m in teacher.modules()}
    taps_t = _Taps(teacher, layers)
    try:
        teacher.eval()
        with torch.no_grad():
            targets = []
            for b in batches:
                out = _hidden(call_model(teacher, b)).detach()
                targets.append((out, {n: v.detach() for n, v in taps_t.out.items()}))
    finally:
        taps_t.close()
        for mod, training in teacher_modes.items():
            mod.training = training
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    model.eval()  # dropout off: the factors fit the function the model serves
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / max(steps, 1))
    taps = _Taps(model, layers)
    try:
        for step in tqdm(range(steps), desc="lrcompile heal", disable=not progress):
            b, (t, t_layers) = batches[step % len(batches)], targets[step % len(batches)]
            h = _hidden(call_model(model, b))
            loss = loss_of(h, t, b, token_weight)
            if layers and layer_weight:
                m = _mask(b, h)
                loss = loss + layer_weight / len(layers) * sum(_token_cos(taps.out[n], t_layers[n], m) for n in layers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        taps.close()
        for p, f in flags.items():
            p.requires_grad_(f)
        for mod, training in modes.items():
            mod.training = training
    return model
