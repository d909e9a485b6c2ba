"""Low-rank factorisation W ≈ U V: U (out×r), V (r×in); y = (x Vᵀ) Uᵀ + b.

From dense by truncated SVD with the singular values split evenly (U = P√S, V = √S Qᵀ): balanced factors
train well under Adam (unbalanced whitened factors wrecked a healing run). Activation-aware inits
(`whitened_svd`, `asvd`) and the least-squares `compensate` step live in lrcompile/whiten.py.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..factorize import svd, whiten
from .base import Candidate, MethodConfig, Structure, mark_owned, register, site_label

RANK_MULTIPLE = 8


def resolve_rank(rank: Union[int, float], in_features: int, out_features: int) -> int:
    """int → exact rank (capped at full rank); float f in (0,1] → ⌊f·in·out/(in+out)⌋ (f=1 is break-even),
    rounded down to a multiple of RANK_MULTIPLE once it is that large: a rank of 304 instead of 307 runs its two
    GEMMs ~5% faster on CPU (vector widths, tensor-core tiles on GPU) and keeps the count within the fraction."""
    full = min(in_features, out_features)
    if isinstance(rank, float):
        r = math.floor(rank * in_features * out_features / (in_features + out_features))
        if r >= 8 * RANK_MULTIPLE:
            r -= r % RANK_MULTIPLE
    else:
        r = rank
    return max(1, min(int(r), full))


def check_rank(rank, *, allow_none: bool) -> None:
    if rank is None:
        if not allow_none:
            raise ValueError("rank is required (an int, or a float fraction in (0, 1] of the dense parameters)")
        return
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ValueError(f"rank must be an int or a float in (0, 1], got {rank!r}")
    if isinstance(rank, int) and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if isinstance(rank, float) and not (0.0 < rank <= 1.0):
        raise ValueError(f"a float rank is a fraction of the dense parameter count and must be in (0, 1], got {rank}")


@dataclasses.dataclass
class LowRankConfig(MethodConfig):
    rank: Optional[Union[int, float]] = None
    compensate: bool = False  # refit U by least squares on the calibration activations (needs statistics)
    damping: float = 0.01  # λ in C + λ·mean(diag C)·I for whitening / compensation
    asvd_alpha: float = 0.5  # ASVD channel-scale exponent: mean|x|^α

    INITS: ClassVar[tuple[str, ...]] = ("svd", "whitened_svd", "asvd", "random")
    ACTIVATION_AWARE: ClassVar[tuple[str, ...]] = ("whitened_svd", "asvd")

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.compensate, bool):
            raise ValueError(f"compensate must be true or false, got {self.compensate!r}")
        for key in ("damping", "asvd_alpha"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{key} must be a non-negative number, got {v!r}")
        check_rank(self.rank, allow_none=True)  # a budget may allocate it; the planner insists otherwise

    def resolve(self, in_features: int, out_features: int) -> "LowRankConfig":
        return dataclasses.replace(self, rank=resolve_rank(self.rank, in_features, out_features))


def truncated_svd(weight: torch.Tensor, rank: int) -> svd.Truncated:
    """Top-`rank` singular triplets of a 2-D weight, in float32 at least: exact, or randomized where that is
    faster and within 1% of the exact error (lrcompile.svd). `.algorithm` says which ran."""
    return svd.truncated_svd(weight, rank)


def _rows(x):
    return x.reshape(-1, x.shape[-1])


def lowrank_addmm(x, weight, bias, U, V):
    """(x Vᵀ) Uᵀ as mm + addmm on 2-D rows: the bias rides in the second GEMM's epilogue."""
    h = torch.mm(_rows(x), V.t())
    y = torch.mm(h, U.t()) if bias is None else torch.addmm(bias, h, U.t())
    return y.reshape(*x.shape[:-1], U.shape[0])


def lowrank_pretransposed(x, weight, bias, U, V):
    """Both factors copied to contiguous (in, r) / (r, out) first: row-major B operands for the GEMMs."""
    Vt, Ut = V.t().contiguous(), U.t().contiguous()
    h = torch.mm(_rows(x), Vt)
    y = torch.mm(h, Ut) if bias is None else torch.addmm(bias, h, Ut)
    return y.reshape(*x.shape[:-1], U.shape[0])


@register
class LowRank(Structure):
    name = "lowrank"
    Config = LowRankConfig
    compressing = True
    tensor_names = ("U", "V")
    kernel = "lowrank"
    # (U V) formed per call is the same function too, but it rebuilds the dense matrix the rewrite was asked to
    # drop (peak memory): not a candidate
    candidates = (Candidate("addmm", lowrank_addmm), Candidate("pretransposed", lowrank_pretransposed))
    budget_knob = "rank"

    @classmethod
    def budget_error(cls, weight, stats, cfg: LowRankConfig):
        """Σ_{i>r} σᵢ² of the whitened spectrum (W·L, C = L Lᵀ; plain W without statistics): the mean squared
        output error per token of the truncation, the error the factorisation minimises."""
        from ..factorize.whiten import spectrum_curve

        return spectrum_curve(weight, stats, cfg.damping)

    @classmethod
    def budget_cost(cls, in_features, out_features, cfg, kind):
        unit = (in_features + out_features) * (1 if kind == "params" else 2)  # param_count / flops_per_token, closed
        return lambda r: r * unit  # form: the allocator prices every rank of every site

    def __init__(self, in_features: int, out_features: int, cfg: LowRankConfig, dtype=None, device=None):
        super().__init__(in_features, out_features, cfg)
        r = cfg.rank
        self.U = mark_owned(nn.Parameter(torch.empty(out_features, r, dtype=dtype, device=device)))
        self.V = mark_owned(nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device)))

    @classmethod
    def init(cls, in_features, out_features, cfg, dtype=None, device=None) -> "LowRank":
        """Fresh factors for training from scratch: x Vᵀ Uᵀ has the variance of a Kaiming-uniform Linear."""
        m = cls(in_features, out_features, cfg, dtype=dtype, device=device)
        with torch.no_grad():
            nn.init.normal_(m.V, std=1.0 / math.sqrt(in_features))
            nn.init.normal_(m.U, std=1.0 / math.sqrt(3.0 * cfg.rank))
        return m

    @classmethod
    def from_dense(cls, weight, bias, cfg: LowRankConfig, stats=None) -> "LowRank":
        """`stats`: the site's SiteStats (lrcompile.calibrate), passed whole to lrcompile.whiten so that a cross
        moment (statistics from a compressed model) is used; statistics that saw no tokens count as missing."""
        out_f, in_f = weight.shape
        if cfg.init == "random":
            return cls.init(in_f, out_f, cfg, dtype=weight.dtype, device=weight.device)
        init, algorithm = cfg.init, None
        where = site_label(stats, f"this {out_f}x{in_f} weight")
        if stats is not None and getattr(stats, "tokens", 1) <= 0:
            why = "calibration statistics that saw no tokens (every row masked?)"
            stats = None
        else:
            why = "no calibration statistics"
        if init in cfg.ACTIVATION_AWARE and stats is None:
            warnings.warn(f"lrcompile: {where}: lowrank init {init!r} has {why}; using plain svd", stacklevel=3)
            init = "svd"
        total = None
        if init == "whitened_svd":
            U, V, kept, total = whiten.whitened_factors(weight, stats, cfg.rank, cfg.damping)
        elif init == "asvd":
            U, V, kept = whiten.asvd(weight, stats.abs_mean, cfg.rank, cfg.asvd_alpha)
        else:
            got = truncated_svd(weight, cfg.rank)
            P, S, Qh = got
            algorithm = getattr(got, "algorithm", None)
            U, V = P * S.sqrt(), S.sqrt()[:, None] * Qh
            total = float(weight.detach().double().square().sum())
            kept = float(S.double().square().sum()) / total if total > 0 else 1.0  # ‖W‖_F² = Σ σ²
        if cfg.compensate:
            if stats is None:  # asked for and impossible: say so rather than return unrefitted factors quietly
                warnings.warn(
                    f"lrcompile: {where}: lowrank compensate: true has {why}; factors not refitted", stacklevel=3
                )
            else:
                U, V = whiten.balance(whiten.compensate(weight, U, V, stats, cfg.damping), V)
        m = cls(in_f, out_f, cfg, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            m.U.copy_(U)
            m.V.copy_(V)
        m.kept_energy = kept  # fraction of the (whitened) spectrum's energy the rank keeps: for the report
        if total is not None and not cfg.compensate:
            m.energy_total = total  # tr(W C Wᵀ) at the factorisation's damping: the report's weighted error from it
        m.init_used = init
        m.svd_algorithm = algorithm  # 'exact' / 'randomized' for plain svd (lrcompile.svd); None otherwise
        return m

    @staticmethod
    def functional(x, weight, bias, U, V):
        return F.linear(F.linear(x, V), U, bias)

    def to_dense(self) -> torch.Tensor:
        """U V, built independently of `functional` (and without its in × in identity)."""
        return self.U @ self.V

    @classmethod
    def param_count(cls, in_features, out_features, cfg) -> int:
        return cfg.rank * (in_features + out_features)

    @classmethod
    def exact(cls, in_features, out_features, cfg) -> bool:
        return cfg.rank >= min(in_features, out_features)

    @classmethod
    def flops_per_token(cls, in_features, out_features, cfg) -> int:
        return 2 * cfg.rank * (in_features + out_features)
