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


# Matrices above this many entries are worked in float32: moments are accumulated and kept so (float64 would double
# the largest thing calibration holds), and sites with more weights are factorised so (whiten.py).
FLOAT32_ABOVE = 1 << 21


def moment_dtype(n: int) -> torch.dtype:
    return torch.float64 if n * n <= FLOAT32_ABOVE else torch.float32


@dataclasses.dataclass
class SiteStats:
    """Input moments of one site. Input form: `xtx` (in × in). Output form, for a site whose input is wider than
    its output and whose rule needs nothing else (low rank, no compensation): `yty` = Σ yᵀy of the dense
    outputs y = x Wᵀ (out × out) and `x_sq` = Σ ‖x‖², from which whitened SVD follows exactly (W C Wᵀ =
    E[yᵀy]); `xtx` is then None. Both keep `abs_sum` (ASVD) and `tokens`."""

    xtx: Optional[torch.Tensor]  # (in, in), Σ over tokens of xᵀx (float64; float32 when large)
    abs_sum: torch.Tensor  # (in,) float64, Σ over tokens of |x|
    tokens: int
    cross: Optional[torch.Tensor] = None  # (in, in) float64, Σ xᵀ x̃ (reference input x, this model's x̃)
    fqn: Optional[str] = dataclasses.field(default=None, compare=False)  # set by CalibrationStats.get: warnings name it
    yty: Optional[torch.Tensor] = None  # (out, out), Σ yᵀy (output form)
    x_sq: float = 0.0  # Σ ‖x‖² (output form: the scale of the whitening's damping)
    # the whitened basis the allocation's curves computed, on disk (spill.py; in memory only, never saved)
    spilled: Optional[object] = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def in_features(self) -> int:
        return self.abs_sum.shape[0]

    @property
    def output_form(self) -> bool:
        return self.xtx is None and self.yty is not None

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    @property
    def cov(self) -> Optional[torch.Tensor]:
        """Mean second moment E[xᵀx] (scale-free across token counts); None in output form."""
        return None if self.xtx is None else self.xtx / max(self.tokens, 1)

    @property
    def cross_mean(self) -> Optional[torch.Tensor]:
        return None if self.cross is None else self.cross / max(self.tokens, 1)

    @classmethod
    def empty(cls, in_features: int, device=None, cross: bool = False) -> "SiteStats":
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        xtx = torch.zeros(in_features, in_features, dtype=moment_dtype(in_features), device=device)
        return cls(xtx, z(in_features), 0, z(in_features, in_features) if cross else None)

    @classmethod
    def empty_output(cls, in_features: int, out_features: int, device=None) -> "SiteStats":
        yty = torch.zeros(out_features, out_features, dtype=moment_dtype(out_features), device=device)
        return cls(None, torch.zeros(in_features, dtype=torch.float64, device=device), 0, yty=yty)

    def add(self, x: torch.Tensor, ref: Optional[torch.Tensor] = None, moments: Optional[tuple] = None) -> None:
        """Accumulate rows x (…, in); `ref`: the reference model's rows at the same tokens (for `cross`);
        `moments`: (xᵀx, Σ|x|) of these rows already computed (sites that share an input)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if moments is None:
            xd = x.to(self.xtx.dtype)
            self.xtx.addmm_(xd.T, xd)
            self.abs_sum.add_(x.abs().sum(0))
        else:
            self.xtx.add_(moments[0].to(self.xtx.dtype))
            self.abs_sum.add_(moments[1])
        self.tokens += x.shape[0]
        if ref is not None:
            r = ref.detach().reshape(-1, ref.shape[-1]).to(torch.float64)
            if self.cross is None:
                self.cross = torch.zeros_like(self.xtx, dtype=torch.float64)
            self.cross.addmm_(r.T, x)

    def add_output(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        """Output form: accumulate y = x Wᵀ's moment for rows x (…, in), W the site's dense (out, in) weight."""
        x = x.detach().reshape(-1, x.shape[-1])
        y = x.to(self.yty.dtype) @ weight.detach().to(self.yty.dtype).T
        self.yty.addmm_(y.T, y)
        x64 = x.to(torch.float64)
        self.abs_sum.add_(x64.abs().sum(0))
        self.x_sq += float(x64.square().sum())
        self.tokens += x.shape[0]


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
        self.spill = None  # the whitened bases the default allocation computed, on disk (spill.py; not saved)

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
        hashed: dict[int, str] = {}  # statistics shared by sites fed one input: hashed once, then named
        for fqn in sorted(self.sites):
            s = self.sites[fqn]
            h.update(fqn.encode())
            for t in (s.xtx, s.abs_sum, s.yty):
                if t is None:
                    continue
                first = hashed.setdefault(id(t), fqn)
                h.update(t.contiguous().numpy().tobytes() if first == fqn else f"as {first}".encode())
            if s.yty is not None:
                h.update(f"x_sq {s.x_sq!r}".encode())
            h.update(str(s.tokens).encode())
            if s.cross is not None:
                h.update(s.cross.contiguous().numpy().tobytes())
        if self.sensitivity:
            h.update(json.dumps(_curves(self.sensitivity), sort_keys=True).encode())
        if self.fisher:
            h.update(b"fisher" + json.dumps(_curves(self.fisher), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def save(self, path) -> None:
        """safetensors: the tensors exactly as held (sites sharing statistics: stored once); the token counts
        travel in the metadata."""
        from safetensors.torch import save_file

        tensors, tokens, alias, first = {}, {}, {}, {}
        for i, (fqn, s) in enumerate(self.sites.items()):
            if s.xtx is None:  # output form
                tensors[f"{i}.yty"] = s.yty.detach().cpu().contiguous()
                tensors[f"{i}.abs_sum"] = s.abs_sum.detach().cpu().contiguous()
                tokens[str(i)] = [fqn, s.tokens, s.x_sq]
                continue
            j = first.setdefault(id(s.xtx), i)
            if j != i and first.get(id(s.abs_sum)) == j:  # shared with site j: stored once
                alias[str(i)] = j
            else:
                own = (lambda t: t.clone()) if j != i else (lambda t: t)  # safetensors stores no shared memory
                tensors[f"{i}.xtx"] = own(s.xtx.detach().cpu().contiguous())
                tensors[f"{i}.abs_sum"] = own(s.abs_sum.detach().cpu().contiguous())
                first.setdefault(id(s.abs_sum), i)
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
                "shared": json.dumps(alias),
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
                sites, names, by_index = {}, set(f.keys()), {}
                alias = {str(i): int(j) for i, j in json.loads(meta.get("shared", "{}")).items()}
                for i, (fqn, tokens, *x_sq) in json.loads(meta["sites"]).items():
                    cross = f.get_tensor(f"{i}.cross") if f"{i}.cross" in names else None
                    if f"{i}.yty" in names:  # output form
                        if len(x_sq) != 1 or not math.isfinite(float(x_sq[0])) or float(x_sq[0]) < 0:
                            raise ValueError
                        yty, abs_sum = f.get_tensor(f"{i}.yty"), f.get_tensor(f"{i}.abs_sum")
                        got = SiteStats(None, abs_sum, int(tokens), yty=yty, x_sq=float(x_sq[0]))
                        sites[fqn] = by_index[int(i)] = got
                        continue
                    if i in alias:  # the statistics of an earlier site fed the same input
                        src = by_index[alias[i]]
                        xtx, abs_sum = src.xtx, src.abs_sum
                    else:
                        xtx, abs_sum = f.get_tensor(f"{i}.xtx"), f.get_tensor(f"{i}.abs_sum")
                    sites[fqn] = by_index[int(i)] = SiteStats(xtx, abs_sum, int(tokens), cross)
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
