"""Activation statistics per site, for activation-aware factorisation and rank allocation.

`calibrate(model, batches, policy)` runs the model eagerly with forward pre-hooks on its nn.Linear and HF Conv1D
modules and accumulates, per site FQN (the module's path, the name the backend and `rewrite` give the site):
  xtx       Σ xᵀx over tokens, float64 (in × in): the second moment the whitened objective ‖(W−Ŵ)Xᵀ‖ needs;
  abs_mean  mean |x| per input channel (ASVD's channel scale);
  tokens    how many token rows were seen.
Padded positions (attention_mask == 0 in a batch dict) are left out: pad tokens are not the distribution the
model serves, and for right-padded batches they would dominate short sentences.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
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

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.xtx.addmm_(x.T, x)
        self.abs_sum.add_(x.abs().sum(0))
        self.tokens += x.shape[0]


class CalibrationStats:
    """Statistics keyed by site FQN; `get(fqn)` gives a SiteStats or None."""

    def __init__(self, sites: Optional[dict] = None):
        self.sites: dict[str, SiteStats] = dict(sites or {})

    def get(self, fqn: str) -> Optional[SiteStats]:
        return self.sites.get(fqn)

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
        return h.hexdigest()[:16]

    def save(self, path) -> None:
        """safetensors: exact float64 tensors; the token counts travel in the metadata."""
        from safetensors.torch import save_file

        tensors, tokens = {}, {}
        for i, (fqn, s) in enumerate(self.sites.items()):
            tensors[f"{i}.xtx"] = s.xtx.detach().cpu().contiguous()
            tensors[f"{i}.abs_sum"] = s.abs_sum.detach().cpu().contiguous()
            tokens[str(i)] = [fqn, s.tokens]
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        save_file(tensors, str(path), metadata={"format": FORMAT, "sites": json.dumps(tokens)})

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
                sites = {}
                for i, (fqn, tokens) in json.loads(meta["sites"]).items():
                    sites[fqn] = SiteStats(f.get_tensor(f"{i}.xtx"), f.get_tensor(f"{i}.abs_sum"), int(tokens))
        except Exception:
            raise ValueError(f"lrcompile: {path} is not an lrcompile calibration file (expected {FORMAT} safetensors)") from None
        return cls(sites)


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """nn.Linear and HF Conv1D modules by path (a module reachable twice is one site, under its first name)."""
    from .structures import Structure

    found = {}
    for name, m in model.named_modules():
        if isinstance(m, Structure):
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
        m = batch["attention_mask"]
        return m.bool() if m.dim() == 2 else None
    return None


def calibrate(model: nn.Module, batches: Iterable, policy=None, *, progress: bool = True) -> CalibrationStats:
    """Run `batches` (tensors, tuples of args or dicts of kwargs) through `model` eagerly and collect statistics."""
    from tqdm.auto import tqdm

    from .policy import load_policy

    pol = load_policy(policy)
    modules = {n: m for n, m in _linear_modules(model).items() if pol is None or _wanted(pol, n)}
    stats = CalibrationStats()
    state = {"mask": None}

    def hook_for(name, in_features):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if x.shape[-1] != in_features:
                return None
            mask = state["mask"]
            if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                x = x[mask.to(x.device)]  # drop padded positions
            s = stats.sites.get(name)
            if s is None:
                s = stats.sites[name] = SiteStats(torch.zeros(in_features, in_features, dtype=torch.float64, device=x.device),
                                                  torch.zeros(in_features, dtype=torch.float64, device=x.device), 0)
            s.add(x)
            return None

        return hook

    handles = []
    for name, m in modules.items():
        in_f = m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0]
        handles.append(m.register_forward_pre_hook(hook_for(name, in_f), with_kwargs=True))
    # eval mode: dropout would perturb the statistics; restore each module's own mode afterwards
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        with torch.no_grad():
            for batch in tqdm(batches, total=total, desc="lrcompile calibrate", disable=not progress):
                state["mask"] = _mask_of(batch)
                call_model(model, batch)
    finally:
        state["mask"] = None
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    for s in stats.sites.values():
        s.xtx, s.abs_sum = s.xtx.cpu(), s.abs_sum.cpu()
    return stats
