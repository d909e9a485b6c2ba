"""Healing: a short distillation of the installed factors against the dense model on calibration inputs.

By default only lrcompile's own parameters train (the factors); every other parameter is frozen for the duration
and then restored — `train_also` opts in the biases of the compressed sites and / or the normalisation layers.
Loss: 1 − cosine of the mask-weighted mean-pooled outputs plus a small per-token cosine term, model in eval
mode; optionally the outputs of chosen submodules (each transformer block) are matched too. Measured: this
works on balanced factors (U·√S, √S·V, equal norms) with a small Adam learning rate; an MSE loss on hidden
states with unbalanced factors wrecked the model.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..capture.trace import call_model
from ..families import Structure
from ..families.base import owned_parameters

LAYER_LOSSES = ("cos", "nmse")
SCHEDULES = ("linear", "cosine")
TRAIN_ALSO = ("biases", "norms")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


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


def _masked_mean(tok, m):
    m = m if tuple(m.shape) == tuple(tok.shape) else torch.ones_like(tok)
    return (tok * m).sum() / m.sum().clamp_min(1)


def _token_cos(h, t, m):
    """Mask-weighted mean of 1 − per-token cosine."""
    return _masked_mean(1 - F.cosine_similarity(h, t, dim=-1), m)


def _token_nmse(h, t, m):
    """Mask-weighted mean of ‖h − t‖² / ‖t‖² per token: also sees the norm, which a cosine ignores."""
    return _masked_mean((h - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12), m)


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


def _trainable(model: nn.Module, train_also) -> list[nn.Parameter]:
    """The structures' own tensors (factors), then whatever `train_also` opts in; each parameter once."""
    bad = [k for k in train_also if k not in TRAIN_ALSO]
    if bad:
        raise ValueError(f"lrcompile.heal: train_also {bad[0]!r} is not one of {', '.join(TRAIN_ALSO)}")
    out, seen = [], set()

    def add(p):
        if p is not None and p.dtype.is_floating_point and id(p) not in seen:
            seen.add(id(p))
            out.append(p)

    for _, p in owned_parameters(model):  # the families' factors and attention's stacked ones, also under FSDP2
        add(p)
    structs = [m for m in model.modules() if isinstance(m, Structure)]
    if not out:
        raise ValueError("lrcompile.heal: the model has no lrcompile factors (run lrcompile.rewrite first)")
    if "biases" in train_also:  # a compressed site's bias can absorb the mean of its output error
        for m in structs:
            if m.compressing and isinstance(m.bias, nn.Parameter):
                add(m.bias)
    if "norms" in train_also:
        for m in model.modules():
            if isinstance(m, _NORMS):
                for p in m.parameters(recurse=False):
                    add(p)
    return out


def _lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(steps - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1.0 - frac


def heal(
    model: nn.Module,
    teacher: nn.Module,
    batches: Iterable,
    *,
    steps: int = 200,
    lr: float = 2e-5,
    token_weight: float = 0.1,
    layers=(),
    layer_weight: float = 0.1,
    layer_loss: str = "cos",
    warmup: int = 0,
    schedule: str = "linear",
    train_also: Iterable[str] = (),
    progress: bool = True,
) -> nn.Module:
    """Distil `model`'s lrcompile factors toward `teacher` (the dense original) on `batches`; returns `model`.

    `layers`: submodule paths (the same in both models, e.g. each transformer block) whose outputs are matched
    too, each by `layer_loss` × `layer_weight` / len(layers): a gradient for every block, not only through the
    whole stack. `layer_loss`: "cos" (mean per-token 1 − cosine) or "nmse" (mean per-token ‖h − t‖² / ‖t‖²).
    Learning rate: linear warmup over the first `warmup` steps, then `schedule` "linear" (to 0) or "cosine"
    decay over the rest. `train_also`: "biases" (of the compressed sites) and / or "norms" (every normalisation
    layer's weight and bias) train with the factors; by default only lrcompile-owned parameters change."""
    from tqdm.auto import tqdm

    batches = list(batches)
    if not batches:
        raise ValueError("lrcompile.heal: no batches given")
    if layer_loss not in LAYER_LOSSES:
        raise ValueError(f"lrcompile.heal: layer_loss {layer_loss!r} is not one of {', '.join(LAYER_LOSSES)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"lrcompile.heal: schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if isinstance(train_also, str):
        train_also = (train_also,)
    params = _trainable(model, tuple(train_also))
    layers = list(layers)
    layer_term = _token_cos if layer_loss == "cos" else _token_nmse
    teacher_modes = {m: m.training for m in teacher.modules()}
    taps_t = _Taps(teacher, layers)
    try:  # both models' hooks before any state changes: a bad layer name leaves both as they were
        taps = _Taps(model, layers)
    except BaseException:
        taps_t.close()
        raise
    targets: dict[int, tuple] = {}  # teacher outputs, made when a batch is first used (a corpus may exceed steps)

    def target(i):
        if i not in targets:
            with torch.no_grad():
                out = _hidden(call_model(teacher, batches[i])).detach()
                targets[i] = (out, {n: v.detach() for n, v in taps_t.out.items()})
        return targets[i]

    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    model.eval()  # dropout off: the factors fit the function the model serves
    teacher.eval()
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr_factor(i, steps, warmup, schedule))
    try:
        for step in tqdm(range(steps), desc="lrcompile heal", disable=not progress):
            b, (t, t_layers) = batches[step % len(batches)], target(step % len(batches))
            h = _hidden(call_model(model, b))
            loss = loss_of(h, t, b, token_weight)
            if layers and layer_weight:
                m = _mask(b, h)
                loss = loss + layer_weight / len(layers) * sum(layer_term(taps.out[n], t_layers[n], m) for n in layers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        taps.close()
        taps_t.close()
        for mod, training in teacher_modes.items():
            mod.training = training
        for p, f in flags.items():
            p.requires_grad_(f)
        for mod, training in modes.items():
            mod.training = training
    return model
