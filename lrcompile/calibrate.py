"""Activation statistics per site, for activation-aware factorisation and rank allocation.

`calibrate(model, batches, policy)` runs the model eagerly with forward pre-hooks on its nn.Linear and HF Conv1D
modules and accumulates, per site FQN (the module's path, the name the backend and `rewrite` give the site):
  xtx       Σ xᵀx over tokens, float64 (in × in): the second moment the whitened objective ‖(W−Ŵ)Xᵀ‖ needs;
  abs_mean  mean |x| per input channel (ASVD's channel scale);
  tokens    how many token rows were seen;
  cross     with `reference=` (the dense original): Σ xᵀx̃ between the reference's input x and this model's
            input x̃ at the same site and token (in × in) — `model` is then usually an already compressed copy,
            and factorising against it reproduces the original outputs from the compressed upstream (whiten.py).
Padded positions (attention_mask == 0 in a batch dict) are left out: pad tokens are not the distribution the
model serves, and for right-padded batches they would dominate short sentences.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from .capture import call_model

FORMAT = "lrcompile-calibration-v1"


@dataclasses.dataclass
class SiteStats:
    xtx: torch.Tensor  # (in, in) float64, Σ over tokens of xᵀx
    abs_sum: torch.Tensor  # (in,) float64, Σ over tokens of |x|
    tokens: int
    cross: Optional[torch.Tensor] = None  # (in, in) float64, Σ xᵀ x̃ (reference input x, this model's x̃)
    fqn: Optional[str] = dataclasses.field(default=None, compare=False)  # set by CalibrationStats.get: warnings name it

    @property
    def in_features(self) -> int:
        return self.xtx.shape[0]

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    @property
    def cov(self) -> torch.Tensor:
        """Mean second moment E[xᵀx] (scale-free across token counts)."""
        return self.xtx / max(self.tokens, 1)

    @property
    def cross_mean(self) -> Optional[torch.Tensor]:
        return None if self.cross is None else self.cross / max(self.tokens, 1)

    @classmethod
    def empty(cls, in_features: int, device=None, cross: bool = False) -> "SiteStats":
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(in_features, in_features), z(in_features), 0, z(in_features, in_features) if cross else None)

    def add(self, x: torch.Tensor, ref: Optional[torch.Tensor] = None) -> None:
        """Accumulate rows x (…, in); `ref`: the reference model's rows at the same tokens (for `cross`)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.xtx.addmm_(x.T, x)
        self.abs_sum.add_(x.abs().sum(0))
        self.tokens += x.shape[0]
        if ref is not None:
            r = ref.detach().reshape(-1, ref.shape[-1]).to(torch.float64)
            if self.cross is None:
                self.cross = torch.zeros_like(self.xtx)
            self.cross.addmm_(r.T, x)


class CalibrationStats:
    """Statistics keyed by site FQN; `get(fqn)` gives a SiteStats or None."""

    def __init__(self, sites: Optional[dict] = None, sensitivity: Optional[dict] = None):
        self.sites: dict[str, SiteStats] = dict(sites or {})
        # measured end-to-end error curves {fqn: {rank: loss}} (`measure_sensitivity`); budgets can allocate by them
        self.sensitivity: dict[str, dict[int, float]] = dict(sensitivity or {})

    def get(self, fqn: str) -> Optional[SiteStats]:
        s = self.sites.get(fqn)
        if s is not None and s.fqn is None:
            s.fqn = fqn
        return s

    def __contains__(self, fqn) -> bool:
        return fqn in self.sites

    def __len__(self) -> int:
        return len(self.sites)

    def keys(self):
        return self.sites.keys()

    def digest(self) -> str:
        """Hash of every statistic (factor-cache keys include it)."""
        h = hashlib.sha256()
        for fqn in sorted(self.sites):
            s = self.sites[fqn]
            h.update(fqn.encode())
            h.update(s.xtx.contiguous().numpy().tobytes())
            h.update(s.abs_sum.contiguous().numpy().tobytes())
            h.update(str(s.tokens).encode())
            if s.cross is not None:
                h.update(s.cross.contiguous().numpy().tobytes())
        if self.sensitivity:
            h.update(json.dumps(self._curves(), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def _curves(self) -> dict:
        return {f: {str(r): float(e) for r, e in c.items()} for f, c in self.sensitivity.items()}

    def save(self, path) -> None:
        """safetensors: exact float64 tensors; the token counts travel in the metadata."""
        from safetensors.torch import save_file

        tensors, tokens = {}, {}
        for i, (fqn, s) in enumerate(self.sites.items()):
            tensors[f"{i}.xtx"] = s.xtx.detach().cpu().contiguous()
            tensors[f"{i}.abs_sum"] = s.abs_sum.detach().cpu().contiguous()
            if s.cross is not None:
                tensors[f"{i}.cross"] = s.cross.detach().cpu().contiguous()
            tokens[str(i)] = [fqn, s.tokens]
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        save_file(tensors, str(path), metadata={"format": FORMAT, "sites": json.dumps(tokens),
                                                "sensitivity": json.dumps(self._curves())})

    @classmethod
    def load(cls, path) -> "CalibrationStats":
        # safetensors, not torch.load: inside a Dynamo backend call torch.load materialises meta tensors
        from safetensors import safe_open

        if not os.path.exists(path):
            raise FileNotFoundError(f"lrcompile: calibration file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError
                sites, names = {}, set(f.keys())
                for i, (fqn, tokens) in json.loads(meta["sites"]).items():
                    cross = f.get_tensor(f"{i}.cross") if f"{i}.cross" in names else None
                    sites[fqn] = SiteStats(f.get_tensor(f"{i}.xtx"), f.get_tensor(f"{i}.abs_sum"), int(tokens), cross)
                curves = {fqn: {int(r): float(e) for r, e in c.items()}
                          for fqn, c in json.loads(meta.get("sensitivity", "{}")).items()}
        except Exception:
            raise ValueError(f"lrcompile: {path} is not an lrcompile calibration file (expected {FORMAT} safetensors)") from None
        return cls(sites, curves)


def _linear_modules(model: nn.Module, installed: bool = False) -> dict[str, nn.Module]:
    """nn.Linear and HF Conv1D modules by path (a module reachable twice is one site, under its first name).
    `installed`: also lrcompile's own structures (a compressed model calibrated against its reference)."""
    from .structures import Structure

    found = {}
    for name, m in model.named_modules():
        if isinstance(m, Structure):
            if installed:
                found[name] = m
            continue  # installed by lrcompile: never a site for another rewrite
        if isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None
                                         and m.weight.dim() == 2):
            found[name] = m
    return found


def module_sites(model: nn.Module) -> list[tuple[str, torch.Tensor, Optional[torch.Tensor]]]:
    """(fqn, dense weight (out, in), bias) of every nn.Linear / Conv1D module, as the backend names them."""
    out = []
    for name, m in _linear_modules(model).items():
        w = m.weight if isinstance(m, nn.Linear) else m.weight.T  # Conv1D stores (in, out)
        out.append((name, w, getattr(m, "bias", None)))
    return out


def _wanted(policy, fqn: str) -> bool:
    rule = policy.match(fqn, "linear")
    return rule is not None and rule.compressing


def _mask_of(batch) -> Optional[torch.Tensor]:
    if isinstance(batch, dict) and batch.get("attention_mask") is not None:
        return batch["attention_mask"]
    return None


def _in_features(m: nn.Module) -> int:
    if isinstance(m, nn.Linear) or hasattr(m, "in_features"):
        return m.in_features
    return m.weight.shape[0]  # HF Conv1D: weight (in, out)


def apply_mask(x: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(rows of x at unpadded positions, whether the mask could be applied). A (batch, seq) mask applies to
    inputs shaped (batch, seq, in) or flattened (batch·seq, in); inputs with one row per sequence (a pooler) have
    no padded rows to drop."""
    if mask is None:
        return x, True
    lead = tuple(x.shape[:-1])
    keep = mask.to(x.device) != 0
    if lead == tuple(mask.shape):
        return x[keep], True
    if x.dim() == 2 and x.shape[0] == mask.numel():
        return x[keep.reshape(-1)], True
    if mask.dim() == 2 and x.dim() == 2 and x.shape[0] == mask.shape[0]:
        return x, True
    return x, False


def calibrate(model: nn.Module, batches: Iterable, policy=None, *, reference: Optional[nn.Module] = None,
              sensitivity_batches: int = 2, progress: bool = True) -> CalibrationStats:
    """Run `batches` (tensors, tuples of args or dicts of kwargs) through `model` eagerly and collect statistics.

    `reference`: the dense original of `model` (e.g. `model` is a compressed copy): each batch also runs through
    it and every site records the cross moment between the reference's and `model`'s inputs (SiteStats.cross),
    sites being matched by module path. A policy whose budget says `allocate: sensitivity` also gets each site's
    measured error curve (`measure_sensitivity`, on the first `sensitivity_batches` batches)."""
    from .policy import load_policy

    pol = load_policy(policy)
    batches = batches if hasattr(batches, "__len__") else list(batches)
    stats = _collect(model, batches, pol, reference, progress)
    budget = pol.budget if pol is not None else None
    if budget and budget.get("allocate") == "sensitivity" and reference is None:
        stats.sensitivity = measure_sensitivity(model, list(batches)[:max(1, sensitivity_batches)], stats, pol,
                                                progress=progress)
    return stats


def _collect(model, batches, pol, reference, progress) -> CalibrationStats:
    from tqdm.auto import tqdm

    modules = {n: m for n, m in _linear_modules(model, installed=reference is not None).items()
               if pol is None or _wanted(pol, n)}
    ref_modules = {}
    if reference is not None:
        ref_modules = {n: m for n, m in _linear_modules(reference).items() if n in modules}
        missing = sorted(set(modules) - set(ref_modules))
        if missing:
            raise ValueError(f"lrcompile.calibrate: reference has no linear site {missing[0]!r} "
                             f"({len(missing)} of {len(modules)} sites unmatched)")
    stats = CalibrationStats()
    state = {"mask": None, "unmasked": {}}
    seen_ref: dict[str, list] = {}  # the reference's rows per site and call, consumed in call order

    def rows(name, x):
        x, ok = apply_mask(x.detach(), state["mask"])
        if not ok:
            state["unmasked"].setdefault(name, tuple(x.shape))
        return x

    def ref_hook_for(name, in_features):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if x.shape[-1] == in_features:
                seen_ref.setdefault(name, []).append(rows(name, x))
        return hook

    def hook_for(name, in_features):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if x.shape[-1] != in_features:
                return None
            x = rows(name, x)
            ref = None
            if reference is not None:
                queue = seen_ref.get(name)
                ref = queue.pop(0) if queue else None
                if ref is None or ref.shape != x.shape:
                    raise ValueError(f"lrcompile.calibrate: site {name!r} sees {tuple(x.shape)} in the model but "
                                     f"{None if ref is None else tuple(ref.shape)} in the reference")
            s = stats.sites.get(name)
            if s is None:
                s = stats.sites[name] = SiteStats.empty(in_features, x.device, cross=reference is not None)
            s.add(x, ref)
            return None

        return hook

    handles = []
    for name, m in modules.items():
        handles.append(m.register_forward_pre_hook(hook_for(name, _in_features(m)), with_kwargs=True))
    for name, m in ref_modules.items():
        handles.append(m.register_forward_pre_hook(ref_hook_for(name, _in_features(m)), with_kwargs=True))
    # eval mode: dropout would perturb the statistics; restore each module's own mode afterwards
    nets = [model] + ([reference] if reference is not None else [])
    modes = {m: m.training for net in nets for m in net.modules()}
    for net in nets:
        net.eval()
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        with torch.no_grad():
            for batch in tqdm(batches, total=total, desc="lrcompile calibrate", disable=not progress):
                state["mask"] = _mask_of(batch)
                seen_ref.clear()
                if reference is not None:
                    call_model(reference, batch)
                call_model(model, batch)
    finally:
        state["mask"] = None
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    if state["unmasked"]:
        names = sorted(state["unmasked"])
        warnings.warn(f"lrcompile.calibrate: attention_mask could not be applied at {len(names)} site(s) "
                      f"(e.g. {names[0]} with input rows {state['unmasked'][names[0]]}): their statistics include "
                      f"padded positions", stacklevel=2)
    for s in stats.sites.values():
        s.xtx, s.abs_sum = s.xtx.cpu(), s.abs_sum.cpu()
        if s.cross is not None:
            s.cross = s.cross.cpu()
    return stats


SENSITIVITY_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9)


def _site_init(pol, fqn: str):
    """(init, damping, alpha) the policy's low-rank rule will factorise this site with."""
    rule = pol.match(fqn, "linear") if pol is not None else None
    cfg = getattr(rule, "config", None)
    return (getattr(cfg, "init", "whitened_svd") or "whitened_svd", getattr(cfg, "damping", 0.01),
            getattr(cfg, "asvd_alpha", 0.5))


def factorised(W: torch.Tensor, s: Optional[SiteStats], init: str = "whitened_svd", damping: float = 0.01,
               alpha: float = 0.5):
    """rank -> Ŵ (float64) for one site: one SVD, sliced per rank (the same math as the low-rank inits)."""
    from . import whiten

    if init == "whitened_svd" and s is not None:
        T, wh = whiten.whitened_target(W, s, damping)
        post = wh.unright
    elif init == "asvd" and s is not None:
        sc = whiten.asvd_scale(s.abs_mean, alpha)
        T, post = W.detach().double() * sc, (lambda V: V / sc)
    else:
        T, post = W.detach().double(), (lambda V: V)
    P, S, Qh = torch.linalg.svd(T, full_matrices=False)
    return lambda r: (P[:, :r] * S[:r]) @ post(Qh[:r])


def measure_sensitivity(model: nn.Module, batches, stats: CalibrationStats, policy=None, *,
                        fractions=SENSITIVITY_FRACTIONS, progress: bool = True) -> dict[str, dict[int, float]]:
    """Each site compressed alone at ranks fractions × break-even, the rest dense: {fqn: {rank: loss}} with loss
    = 1 − cosine of the mask-weighted mean-pooled outputs against the dense model's (lrcompile.heal's loss, no
    token term), averaged over `batches`. The budget allocator reads these as measured error curves: unlike a
    site's spectrum they see how much its error matters at the model's output."""
    from tqdm.auto import tqdm

    from .heal import _hidden, loss_of
    from .policy import load_policy

    pol = load_policy(policy)
    batches = list(batches)
    mods = {n: m for n, m in _linear_modules(model).items() if n in stats.sites}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    curves = {}
    try:
        with torch.no_grad():
            refs = [_hidden(call_model(model, b)) for b in batches]
            for fqn, m in tqdm(mods.items(), desc="lrcompile sensitivity", disable=not progress):
                conv = not isinstance(m, nn.Linear)
                W = (m.weight.T if conv else m.weight).detach()
                out_f, in_f = W.shape
                approx = factorised(W, stats.get(fqn), *_site_init(pol, fqn))
                saved = m.weight.detach().clone()
                curve = {}
                try:
                    for f in fractions:
                        r = max(1, int(f * in_f * out_f / (in_f + out_f)))
                        Wr = approx(r).to(saved.dtype)
                        m.weight.copy_(Wr.T if conv else Wr)
                        curve[r] = sum(float(loss_of(_hidden(call_model(model, b)), t, b, 0.0))
                                       for b, t in zip(batches, refs)) / len(batches)
                finally:
                    m.weight.copy_(saved)
                curves[fqn] = curve
    finally:
        for mod, training in modes.items():
            mod.training = training
    return curves
