"""Healing: a short distillation of the installed factors against the dense model on calibration inputs.

The defaults are the recipe measured on all-MiniLM-L6-v2 (README "Healing"): Adam at 3e-4 with 25 warmup steps
then cosine decay, the factors plus the compressed sites' biases and the normalisation layers trained, and each
repeated block's output matched by a normalised MSE besides the model's output. Model in eval mode; every other
parameter is frozen for the duration and then restored, as are modes and flags. Teacher outputs are computed per
step (never kept: a corpus may be large), a time budget bounds the call, and a held-out part of the batches is
scored before and after. Measured: balanced factors (U·√S, √S·V) are what make this stable; an MSE loss on hidden
states with unbalanced factors wrecked the model.
"""

from __future__ import annotations

import math
import time
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..capture.trace import call_model
from ..compat import compiled_original
from ..families import Structure
from ..families.base import is_owned, owned_parameters

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


def _unwrap(net: nn.Module) -> nn.Module:
    """The module a `torch.compile` wrapper runs (its hooks fire in the compiled graph too)."""
    return compiled_original(net) or net


def _submodule(net: nn.Module, name: str) -> Optional[nn.Module]:
    for root in (net, _unwrap(net)):
        try:
            return root.get_submodule(name)
        except AttributeError:
            continue
    return None


def repeated_blocks(model: nn.Module, holds=None) -> list[str]:
    """Paths of the model's repeated blocks: the elements of the longest `nn.ModuleList` whose elements (≥ 2)
    all have one class and of which at least one holds a module for which `holds(module)` is true (default: an
    lrcompile-owned parameter, i.e. a rewritten site). The first such list wins a tie; none found gives []."""
    if holds is None:
        holds = lambda m: any(is_owned(p) for p in m.parameters(recurse=False))  # noqa: E731
    root, best = _unwrap(model), []
    for name, mod in root.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2 or len(mod) <= len(best):
            continue
        if len({type(b) for b in mod}) != 1:
            continue
        if any(holds(m) for b in mod for m in b.modules()):
            best = [f"{name}.{i}" if name else str(i) for i in range(len(mod))]
    return best


class _Taps:
    """Forward hooks recording the outputs of the named submodules (layer-wise distillation targets)."""

    def __init__(self, net: nn.Module, names):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        for n in names:
            mod = _submodule(net, n)
            if mod is None:
                self.close()
                raise ValueError(f"lrcompile.heal: no submodule {n!r} to match layer outputs at")
            self.handles.append(mod.register_forward_hook(lambda _m, _a, o, n=n: self.out.__setitem__(n, _hidden(o))))

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []


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


def _lr_factor(step: int, steps: int, warmup: int, schedule: str, done: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup over `warmup` steps, then decay over whichever runs out first,
    the steps or the time (`done`: the fraction of the time budget spent), so a timed run still ends at 0."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, max((step - warmup) / max(steps - warmup, 1), done))
    return 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1.0 - frac


_clock = time.monotonic  # a module attribute so that tests can drive time


MAX_HOLDOUT = 16  # batches a fraction holds out at most: scoring them twice must not eat a large corpus's time


def split_holdout(n: int, holdout) -> list[int]:
    """Indices of the held-out batches among n: `holdout` a fraction in [0, 1) (at least one batch when n ≥ 2
    and the fraction is > 0, at most MAX_HOLDOUT) or an int count (< n); spread evenly over the batches, so an
    ordered corpus (sorted by length, by source) is sampled across its whole range."""
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)):
        raise ValueError(f"lrcompile.heal: holdout {holdout!r} is not a fraction or a batch count")
    if isinstance(holdout, float):
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"lrcompile.heal: holdout {holdout} is not a fraction in [0, 1)")
        k = 0 if holdout == 0 or n < 2 else max(1, min(n - 1, MAX_HOLDOUT, int(round(holdout * n))))
    else:
        if holdout < 0 or (holdout and holdout >= n):
            raise ValueError(f"lrcompile.heal: holdout {holdout} batches leaves none of the {n} to train on")
        k = holdout
    return sorted({min(n - 1, int((i + 0.5) * n / k)) for i in range(k)}) if k else []


def _teacher_out(teacher, taps_t, batch):
    with torch.no_grad():
        out = _hidden(call_model(teacher, batch)).detach()
    return out, dict(taps_t.out)


def _score(model, teacher, batches, taps_t, token_weight) -> dict:
    """Mean loss (output terms) and mean cosine of the pooled outputs over `batches`, teacher outputs streamed."""
    loss = cos = rows = 0.0
    with torch.no_grad():
        for b in batches:
            t, _ = _teacher_out(teacher, taps_t, b)
            h = _hidden(call_model(model, b))
            m = _mask(b, h)
            c = F.cosine_similarity(_pool(h, m), _pool(t, m), dim=-1).reshape(-1)
            loss += float(loss_of(h, t, b, token_weight)) * c.numel()
            cos += float(c.sum())
            rows += c.numel()
    return {"loss": loss / rows, "cosine": cos / rows}


def heal(
    model: nn.Module,
    teacher: nn.Module,
    batches: Iterable,
    *,
    steps: int = 3000,
    max_minutes: Optional[float] = 10.0,
    lr: float = 3e-4,
    token_weight: float = 0.1,
    layers="auto",
    layer_weight: float = 1.0,
    layer_loss: str = "nmse",
    warmup: int = 25,
    schedule: str = "cosine",
    train_also: Iterable[str] = ("biases", "norms"),
    holdout=0.1,
    report: Optional[dict] = None,
    progress: bool = True,
) -> nn.Module:
    """Distil `model`'s lrcompile factors toward `teacher` (the dense original) on `batches`; returns `model`.

    Runs `steps` Adam steps at `lr` (one batch each, cycling), or fewer when `max_minutes` (the whole call,
    held-out scoring included; None: no limit) runs out. Learning rate: linear warmup over `warmup` steps, then
    `schedule` "cosine" or "linear" decay to 0 at whichever limit comes first. Loss: 1 − cosine of the
    mask-weighted mean-pooled outputs + `token_weight` × the per-token cosine, plus each of `layers`' outputs
    matched by `layer_loss` ("nmse": ‖h − t‖² / ‖t‖² per token, or "cos") × `layer_weight` / len(layers).
    `layers`: "auto" = the model's repeated blocks (`repeated_blocks`), or submodule paths (the same in both
    models); () for none. `train_also`: "biases" (of the compressed sites) and / or "norms" (every normalisation
    layer) train with the factors; () for the factors only. `holdout`: the part of `batches` kept out of
    training and scored before and after (`split_holdout`). `report`: a dict filled with what happened (steps,
    seconds, why it stopped, layers, the held-out loss and pooled cosine before and after); with `progress` a
    bar shows the loss and the time left, and one line sums up the run."""
    from tqdm.auto import tqdm

    batches = list(batches)
    if not batches:
        raise ValueError("lrcompile.heal: no batches given")
    if layer_loss not in LAYER_LOSSES:
        raise ValueError(f"lrcompile.heal: layer_loss {layer_loss!r} is not one of {', '.join(LAYER_LOSSES)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"lrcompile.heal: schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if max_minutes is not None and not max_minutes >= 0:
        raise ValueError(f"lrcompile.heal: max_minutes {max_minutes!r} is not a number of minutes ≥ 0")
    if isinstance(train_also, str):
        train_also = (train_also,)
    t_start = _clock()
    budget_s = math.inf if max_minutes is None else 60.0 * max_minutes
    held = set(split_holdout(len(batches), holdout))
    train = [b for i, b in enumerate(batches) if i not in held]
    held_out = [batches[i] for i in sorted(held)]
    params = _trainable(model, tuple(train_also))
    layers = repeated_blocks(model) if isinstance(layers, str) and layers == "auto" else list(layers)
    layer_term = _token_cos if layer_loss == "cos" else _token_nmse
    teacher_modes = {m: m.training for m in teacher.modules()}
    taps_t = _Taps(teacher, layers)
    try:  # both models' hooks before any state changes: a bad layer name leaves both as they were
        taps = _Taps(model, layers)
    except BaseException:
        taps_t.close()
        raise
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    keep = {id(p) for p in params}
    info = report if report is not None else {}
    info.update(layers=list(layers), holdout_batches=len(held_out), train_batches=len(train), steps=0)
    loss_avg = None
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        model.eval()  # dropout off: the factors fit the function the model serves
        teacher.eval()
        if held_out:
            info["holdout_before"] = _score(model, teacher, held_out, taps_t, token_weight)
        # time left for training: the budget less the first scoring and as long again for the last one
        train_s = budget_s - 2 * (_clock() - t_start)
        opt = torch.optim.Adam(params, lr=lr)
        bar = tqdm(total=steps, desc="lrcompile heal", disable=not progress)
        t_train, stopped, step = _clock(), "steps", 0
        for step in range(steps):
            spent = _clock() - t_train
            if spent >= train_s:
                stopped = "time"
                break
            for g in opt.param_groups:
                g["lr"] = lr * _lr_factor(step, steps, warmup, schedule, spent / train_s)
            b = train[step % len(train)]
            t, t_layers = _teacher_out(teacher, taps_t, b)  # per step: teacher outputs are never kept
            h = _hidden(call_model(model, b))
            loss = loss_of(h, t, b, token_weight)
            if layers and layer_weight:
                m = _mask(b, h)
                loss = loss + layer_weight / len(layers) * sum(layer_term(taps.out[n], t_layers[n], m) for n in layers)
            del t, t_layers
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            v = float(loss.detach())
            loss_avg = v if loss_avg is None else 0.98 * loss_avg + 0.02 * v
            info["steps"] = step + 1
            if progress:
                if math.isfinite(train_s) and step >= 4:  # the bar's total (and ETA) follows the time budget
                    bar.total = min(steps, max(step + 1, int((step + 1) * train_s / (_clock() - t_train))))
                bar.set_postfix(loss=f"{loss_avg:.4g}", refresh=False)
                bar.update(1)
        bar.close()
        taps.close()  # the final scoring needs no layer outputs
        if held_out:
            info["holdout_after"] = _score(model, teacher, held_out, taps_t, token_weight)
    finally:
        taps.close()
        taps_t.close()
        for mod, training in teacher_modes.items():
            mod.training = training
        for p, f in flags.items():
            p.requires_grad_(f)
        for mod, training in modes.items():
            mod.training = training
    info.update(stopped=stopped, seconds=_clock() - t_start, train_loss=loss_avg)
    if progress:
        print(summary(info))
    return model


def summary(info: dict) -> str:
    """One line for a heal `report`."""
    line = f"lrcompile heal: {info['steps']} steps in {info['seconds']:.0f} s (stopped on {info['stopped']})"
    if info.get("train_loss") is not None:
        line += f", train loss {info['train_loss']:.4g}"
    a, b = info.get("holdout_before"), info.get("holdout_after")
    if a and b:
        line += (
            f"; held-out ({info['holdout_batches']} batches) pooled cosine {a['cosine']:.4f} → {b['cosine']:.4f},"
            f" loss {a['loss']:.4g} → {b['loss']:.4g}"
        )
    return line
