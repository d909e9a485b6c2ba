"""Block Tensor-Train (BTT): y[c₀,c₁] = Σ_{a₁,a₀,t} x[a₁,a₀] · W1[a₁,a₀,c₀,t] · W2[c₀,a₁,t,c₁].

in = a₁·a₀ (a₁ input blocks of a₀ features), out = c₀·c₁ (c₀ output blocks of c₁ features), rank t: every
(c₀, a₁) sub-block of the dense matrix has rank ≤ t. Two batched matmuls with one shuffle between them.
Monarch (monarch.py) is the same map with a₁ = c₀ = b and t = block size / b, so both share `TwoCore`.

From dense: each (c₀, a₁) sub-block's own truncated SVD — the factors of different sub-blocks are disjoint
entries of W1/W2, so this is the Frobenius-optimal projection, exact on matrices already in the family.
`init: whitened_svd` whitens each input block with its own square root of the calibration second moment
(whitening_blocks.py: block-diagonal, so the result stays in the family).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import sympy
import torch
import torch.nn.functional as F
from torch import nn

from ..factorize import whiten
from .base import Structure, mark_owned, register
from .blockmm import column_blocks, eager_inference, swap_block_axes
from .whitening_blocks import BlockWhitener, StructuredConfig, block_whitener

# --- the shared forward ---------------------------------------------------------------------------------------
# Row tiles of the eager forward: BTT's intermediate z has a₁·c₀·t values per row — more than its output row at a
# small rank (768→3072, t = 4: 4608 vs 3072) — so a full-height z (19 MB at 1024 rows) goes through memory three
# times (bmm write, shuffle, bmm read). In tiles of ~2 MiB it stays in L2: measured on 2 CPU cores, 1024 rows,
# 768→3072 24 → 15 ms, 3072→768 13 → 10 ms, 768→768 5.6 → 4.4 ms. Monarch's z is no wider than its output and
# tiling only adds calls (slower at every tile height tried), hence the width test.
TILE_BYTES = 2 << 20


def btt_matmul(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: Optional[torch.Tensor], out_features: int
) -> torch.Tensor:
    """x (..., in) with in ≤ a₁·a₀ (zero-padded up), W1 (a₁, a₀, c₀, t), W2 (c₀, a₁, t, c₁) -> (..., out_features).

    Layout: the first bmm reads x's blocks through a strided view (BLAS takes the row stride, no copy) and
    writes (a₁, N, c₀·t); the only shuffle copies that small intermediate to (c₀, N, a₁·t) so that the second
    bmm reads contiguous blocks; the second stage's GEMMs write their column blocks of the output in place, bias
    in their accumulators (blockmm.py). In eager inference a z wider than the output runs in row tiles.
    """
    lead, in_f = x.shape[:-1], x.shape[-1]
    a1, a0, c0, t = w1.shape
    x2 = x.reshape(-1, in_f)
    z_row = a1 * c0 * t
    tile = max(16, TILE_BYTES // (z_row * w1.element_size()))
    if (
        z_row > out_features
        and isinstance(x2.shape[0], int)
        and x2.shape[0] >= 2 * tile
        and eager_inference(x2, w1, w2, bias)
    ):
        y = torch.cat([_btt_rows(x2[i : i + tile], w1, w2, bias, out_features) for i in range(0, x2.shape[0], tile)])
    else:
        y = _btt_rows(x2, w1, w2, bias, out_features)
    return y.view(*lead, out_features)


def _btt_rows(x2, w1, w2, bias, out_features):
    in_f = x2.shape[-1]
    a1, a0, c0, t = w1.shape
    c1 = w2.shape[-1]
    if in_f != a1 * a0:
        x2 = F.pad(x2, (0, a1 * a0 - in_f))
    n = x2.shape[0]
    z = torch.bmm(x2.view(n, a1, a0).transpose(0, 1), w1.reshape(a1, a0, c0 * t))
    z = swap_block_axes(z.view(a1, n, c0, t)).view(c0, n, a1 * t)
    if bias is not None and out_features != c0 * c1:
        bias = F.pad(bias, (0, c0 * c1 - out_features))
    y = column_blocks(z, w2.reshape(c0, a1 * t, c1), bias)  # each block GEMM writes its output columns
    if out_features != c0 * c1:
        y = y[:, :out_features].contiguous()  # callers .view() linear outputs freely
    return y


def blockwise_svd(
    weight: torch.Tensor, a1: int, a0: int, c0: int, c1: int, t: int, whitener: Optional[BlockWhitener] = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(W1, W2, kept energy) for an (out, in) weight, zero-padded up to (c₀·c₁, a₁·a₀): see the module doc.

    With a whitener (one L_j per input block, whitening_blocks.py) each sub-block W_blk is replaced by
    trunc_t(W_blk L_j) L_j⁻¹, optimal for the block-diagonal activation-weighted objective; `kept` is the
    fraction of the (whitened) spectral energy the rank keeps.
    """
    w = weight.detach()
    w = w.double() if w.dtype == torch.float64 or whitener is not None else w.float()
    out_f, in_f = w.shape
    if (out_f, in_f) != (c0 * c1, a1 * a0):
        w = F.pad(w, (0, a1 * a0 - in_f, 0, c0 * c1 - out_f))
    blocks = w.reshape(c0, c1, a1, a0).permute(0, 2, 1, 3)  # (c₀, a₁, c₁, a₀)
    if whitener is not None:
        blocks = whitener.right(blocks)  # L_j runs along the a₁ axis
    P, S, Qh = torch.linalg.svd(blocks, full_matrices=False)
    root = S[..., :t].sqrt()
    U = P[..., :t] * root[..., None, :]  # (c₀, a₁, c₁, t)
    V = Qh[..., :t, :] * root[..., None]  # (c₀, a₁, t, a₀)
    if whitener is not None:
        V = whitener.unright(V)
        # √S split evenly is balanced only before ·L⁻¹: rebalance each rank component (same product)
        U, V = (f.reshape(c0, a1, *f.shape[-2:]) for f in torch.vmap(whiten.balance)(U.flatten(0, 1), V.flatten(0, 1)))
    total = float(S.double().square().sum())
    kept = float(S[..., :t].double().square().sum()) / total if total > 0 else 1.0
    w2 = U.transpose(-1, -2)  # (c₀, a₁, t, c₁)
    w1 = V.permute(1, 3, 0, 2)  # (c₀, a₁, t, a₀) -> (a₁, a₀, c₀, t)
    return w1.contiguous(), w2.contiguous(), kept


def mup_std(fan_in: int, fan_out: int) -> float:
    """μP spectral init of one core: (1/√fan_in)·min(1, √(fan_out/fan_in)) (BTT paper)."""
    return (1.0 / math.sqrt(fan_in)) * min(1.0, math.sqrt(fan_out / fan_in))


class TwoCore(Structure):
    """Shared body of BTT and Monarch: parameters W1 (a₁, a₀, c₀, t) and W2 (c₀, a₁, t, c₁)."""

    compressing = True
    kernel = "twocore"

    @classmethod
    def geometry(cls, in_features: int, out_features: int, cfg) -> tuple[int, int, int, int, int]:
        """(a₁, a₀, c₀, c₁, t) for this layer; raises ValueError when the family cannot take the shape."""
        raise NotImplementedError

    def __init__(self, in_features: int, out_features: int, cfg, dtype=None, device=None):
        super().__init__(in_features, out_features, cfg)
        a1, a0, c0, c1, t = self.geometry(in_features, out_features, cfg)
        self.W1 = mark_owned(nn.Parameter(torch.empty(a1, a0, c0, t, dtype=dtype, device=device)))
        self.W2 = mark_owned(nn.Parameter(torch.empty(c0, a1, t, c1, dtype=dtype, device=device)))

    def _fans(self) -> dict[str, tuple[int, int]]:
        """(fan_in, fan_out) of each core seen as a batched linear map: W1 a₀ → c₀·t, W2 a₁·t → c₁."""
        a1, a0, c0, t = self.W1.shape
        return {"W1": (a0, c0 * t), "W2": (a1 * t, self.W2.shape[-1])}

    @classmethod
    def init(cls, in_features, out_features, cfg, dtype=None, device=None):
        """From scratch: μP-scaled Gaussian cores."""
        m = cls(in_features, out_features, cfg, dtype=dtype, device=device)
        with torch.no_grad():
            for name, (fi, fo) in m._fans().items():
                nn.init.normal_(getattr(m, name), std=mup_std(fi, fo))
        return m

    @classmethod
    def from_dense(cls, weight, bias, cfg, stats=None):
        out_f, in_f = weight.shape
        if cfg.init == "random":
            return cls.init(in_f, out_f, cfg, dtype=weight.dtype, device=weight.device)
        a1, a0, c0, c1, t = cls.geometry(in_f, out_f, cfg)
        wh, used = block_whitener(cls.name, cfg, stats, weight, a1, a0)
        w1, w2, kept = blockwise_svd(weight, a1, a0, c0, c1, t, wh)
        m = cls(in_f, out_f, cfg, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            m.W1.copy_(w1)
            m.W2.copy_(w2)
        m.kept_energy, m.init_used = kept, used  # for the report (whiten.site_quality)
        return m

    def to_dense(self) -> torch.Tensor:
        """Assembled from the cores, independently of `functional`: sub-block (c₀, a₁), of shape c₁ × a₀, is
        W2[c₀, a₁]ᵀ · W1[a₁, :, c₀, :]ᵀ; the grid is output blocks × input blocks, sliced to (out, in)."""
        a1, a0, c0, _ = self.W1.shape
        c1 = self.W2.shape[-1]
        grid = torch.einsum("katc,azkt->kcaz", self.W2, self.W1)  # (c₀, c₁, a₁, a₀)
        return grid.reshape(c0 * c1, a1 * a0)[: self.out_features, : self.in_features]

    def lr_multipliers(self) -> dict[str, float]:
        """Adam lr multiplier per core (BTT paper): (in / fan_in_core) / number of cores under `init: random`
        (μP); 1.0 for factors projected from a trained dense weight (they fine-tune at the dense rate)."""
        if self.cfg.init != "random":
            return {n: 1.0 for n in ("W1", "W2")}
        fans = self._fans()
        return {n: (self.in_features / fi) / len(fans) for n, (fi, _) in fans.items()}

    @classmethod
    def param_count(cls, in_features, out_features, cfg) -> int:
        a1, a0, c0, c1, t = cls.geometry(in_features, out_features, cfg)
        return a1 * a0 * c0 * t + c0 * a1 * t * c1

    @classmethod
    def flops_per_token(cls, in_features, out_features, cfg) -> int:
        return 2 * cls.param_count(in_features, out_features, cfg)  # one MAC per core entry per token

    @classmethod
    def flops(cls, in_features, out_features, cfg, tokens=None):
        """FLOPs of a call, symbolic in the token count unless `tokens` is given."""
        n = sympy.Symbol("tokens", positive=True, integer=True) if tokens is None else tokens
        return n * cls.flops_per_token(in_features, out_features, cfg)


# --- BTT ------------------------------------------------------------------------------------------------------
def _pair(value, what: str) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise ValueError(f"{what} must be a pair of positive ints [outer, inner], got {value!r}")
    return int(value[0]), int(value[1])


def even_split(n: int, what: str) -> tuple[int, int]:
    """n = small·large with the factors as close to √n as possible (small first)."""
    small = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    if small == 1 and n > 1:
        raise ValueError(
            f"{what} {n} is prime: BTT needs a factorization (give {what.split('_')[0]}_factors, "
            "or use monarch, which pads)"
        )
    return small, n // small


@dataclasses.dataclass
class BTTConfig(StructuredConfig):
    rank: Optional[int] = None  # tensor-train rank t: each (c₀, a₁) sub-block has rank ≤ t
    in_factors: Optional[list] = None  # [a₁, a₀] with a₁·a₀ = in (default: the most even split)
    out_factors: Optional[list] = None  # [c₀, c₁] with c₀·c₁ = out
    cores: int = 2  # tensor-train length; only the two-core BTT of the paper's experiments is implemented

    def validate(self) -> None:
        super().validate()
        if isinstance(self.cores, bool) or self.cores != 2 or not isinstance(self.cores, int):
            raise ValueError(
                f"btt cores must be 2 (only the two-core block tensor-train is implemented), got {self.cores!r}"
            )
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"btt rank is the tensor-train rank, an int >= 1, got {self.rank!r}")
        _pair(self.in_factors, "in_factors")
        _pair(self.out_factors, "out_factors")

    def resolve(self, in_features: int, out_features: int) -> "BTTConfig":
        self.validate()
        if self.rank is None:
            raise ValueError("btt needs a 'rank' (the tensor-train rank, an int)")
        a1, a0 = _pair(self.in_factors, "in_factors") or even_split(in_features, "in_features")
        c0, c1 = _pair(self.out_factors, "out_factors") or even_split(out_features, "out_features")
        if a1 * a0 != in_features:
            raise ValueError(f"in_factors {[a1, a0]} multiply to {a1 * a0}, not in_features {in_features}")
        if c0 * c1 != out_features:
            raise ValueError(f"out_factors {[c0, c1]} multiply to {c0 * c1}, not out_features {out_features}")
        t = min(self.rank, a0, c1)  # a (c₁ × a₀) sub-block has rank ≤ min(c₁, a₀): more is full rank
        return dataclasses.replace(self, rank=t, in_factors=[a1, a0], out_factors=[c0, c1])


@register
class BTT(TwoCore):
    name = "btt"
    Config = BTTConfig
    tensor_names = ("W1", "W2")
    budget_knob = "rank"

    @classmethod
    def budget_max(cls, in_features, out_features, cfg):
        return cls.geometry(in_features, out_features, cls.with_size(cfg, in_features + out_features))[4]

    @classmethod
    def budget_error(cls, weight, stats, cfg: BTTConfig):
        """Σ over the (c₀, a₁) sub-blocks of their spectral tails beyond t: `from_dense`'s blockwise SVD is the
        optimal projection, so this is its exact error — of W without statistics, of the output under the
        block-diagonal whitening (whitening_blocks.py) with them, as lowrank's whitened spectrum."""
        out_f, in_f = weight.shape
        a1, a0, c0, c1, _ = cls.geometry(in_f, out_f, cls.with_size(cfg, 1))
        w = weight.detach().double()
        blocks = w.reshape(c0, c1, a1, a0).permute(0, 2, 1, 3)  # (c₀, a₁, c₁, a₀)
        cov = getattr(stats, "cov", None) if stats is not None and getattr(stats, "tokens", 1) > 0 else None
        if whiten.usable(cov):
            blocks = BlockWhitener(cov, a1, a0, cfg.damping).right(blocks)
        s2 = torch.linalg.svdvals(blocks).square().sum((0, 1))  # σ² summed over sub-blocks, per index
        tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]).tolist() + [0.0]  # tail[t] = Σ_{i≥t}
        return lambda t: tail[min(max(int(t), 0), len(tail) - 1)]

    @classmethod
    def geometry(cls, in_features, out_features, cfg):
        r = cfg.resolve(in_features, out_features)
        (a1, a0), (c0, c1) = r.in_factors, r.out_factors
        return a1, a0, c0, c1, r.rank

    @staticmethod
    def functional(x, weight, bias, W1, W2):
        return btt_matmul(x, W1, W2, bias, W2.shape[0] * W2.shape[-1])
