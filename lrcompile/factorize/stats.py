"""Calibration statistics: per-site activation moments (SiteStats), keyed by site FQN (CalibrationStats), and
their file format. `lrcompile.calibrate` collects them; factorisation, budgets and the factor cache read them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Optional

import torch
from torch import nn

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

    def add(self, x: torch.Tensor, ref: Optional[torch.Tensor] = None, moments: Optional[tuple] = None) -> None:
        """Accumulate rows x (…, in); `ref`: the reference model's rows at the same tokens (for `cross`);
        `moments`: (xᵀx, Σ|x|) of these rows already computed (sites that share an input)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if moments is None:
            self.xtx.addmm_(x.T, x)
            self.abs_sum.add_(x.abs().sum(0))
        else:
            self.xtx.add_(moments[0])
            self.abs_sum.add_(moments[1])
        self.tokens += x.shape[0]
        if ref is not None:
            r = ref.detach().reshape(-1, ref.shape[-1]).to(torch.float64)
            if self.cross is None:
                self.cross = torch.zeros_like(self.xtx)
            self.cross.addmm_(r.T, x)


class CalibrationStats:
    """Statistics keyed by site FQN; `get(fqn)` gives a SiteStats or None."""

    def __init__(
        self,
        sites: Optional[dict] = None,
        sensitivity: Optional[dict] = None,
        index: Optional[dict] = None,
        fisher: Optional[dict] = None,
    ):
        self.sites: dict[str, SiteStats] = dict(sites or {})
        # measured end-to-end error curves {fqn: {rank: loss}} (`measure_sensitivity`); budgets can allocate by them
        self.sensitivity: dict[str, dict[int, float]] = dict(sensitivity or {})
        # first-order estimates of the same loss at every rank (`fisher.measure_fisher`): the default allocation's
        self.fisher: dict[str, dict[int, float]] = dict(fisher or {})
        # every linear site of the calibrated model, as the backend enumerates it (not only those with statistics):
        # {fqn: {"weight": path, "transposed": bool, "bias": path or None}}
        self.index: dict[str, dict] = dict(index or {})

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
            h.update(json.dumps(_curves(self.sensitivity), sort_keys=True).encode())
        if self.fisher:
            h.update(b"fisher" + json.dumps(_curves(self.fisher), sort_keys=True).encode())
        return h.hexdigest()[:16]

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
        save_file(
            tensors,
            str(path),
            metadata={
                "format": FORMAT,
                "sites": json.dumps(tokens),
                "sensitivity": json.dumps(_curves(self.sensitivity)),
                "fisher": json.dumps(_curves(self.fisher)),
                "index": json.dumps(self.index),
            },
        )

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
                curves = _parse_curves(meta.get("sensitivity", "{}"))
                fisher = _parse_curves(meta.get("fisher", "{}"))  # absent in files written before it existed
                index = json.loads(meta.get("index", "{}"))  # absent in files written before it existed
        except Exception:
            raise ValueError(
                f"lrcompile: {path} is not an lrcompile calibration file (expected {FORMAT} safetensors)"
            ) from None
        return cls(sites, curves, index, fisher)

    def site_list(self, model: nn.Module) -> Optional[list]:
        """(fqn, dense weight (out, in), bias) of every indexed site, resolved on `model`; None without an index
        or where `model` lacks one of its parameters (statistics of another model)."""
        if not self.index:
            return None
        out = []
        try:
            for fqn, e in self.index.items():
                w = model.get_parameter(e["weight"])
                b = model.get_parameter(e["bias"]) if e.get("bias") else None
                out.append((fqn, w.T if e.get("transposed") else w, b))
        except (AttributeError, KeyError, TypeError):
            return None
        return out


def _curves(curves: dict) -> dict:
    return {f: {str(r): float(e) for r, e in c.items()} for f, c in curves.items()}


def _parse_curves(text: str) -> dict[str, dict[int, float]]:
    """{fqn: {rank: error}} from a file's metadata: finite errors, ranks ≥ 1 (anything else: not our file)."""
    out = {}
    for fqn, c in json.loads(text).items():
        curve = {int(r): float(e) for r, e in c.items()}
        if any(r < 1 or not math.isfinite(e) for r, e in curve.items()):
            raise ValueError
        out[fqn] = curve
    return out


def as_stats(calibration) -> Optional["CalibrationStats"]:
    """What a `calibration` argument or option names: statistics as given, or loaded from a path; None stays None."""
    if calibration is None or isinstance(calibration, CalibrationStats):
        return calibration
    return CalibrationStats.load(calibration)
