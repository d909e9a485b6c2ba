"""`init: whitened_svd` for the structured families (Monarch, BTT, BLAST): block-diagonal whitening.

The activation-aware objective (SVD-LLM) is tr(Δ C Δᵀ) = ‖(W − Ŵ) Xᵀ‖², C = E[xᵀx]. For low rank
its optimum is trunc(W L) L⁻¹ with C = L Lᵀ. For a structured family that recipe does not stay in the family:
the structure lives on blocks of W's input columns, and a full L mixes columns across blocks, so the family's
projection of W·L multiplied back by L⁻¹ is no longer block structured.

What is done instead: keep only C's diagonal blocks, one per input block of the family (Monarch/BTT: a₁ blocks
of a₀ columns; BLAST: b₂ blocks of q columns), and take one square root L_j per block. Under that block-diagonal
approximation the objective splits over blocks, tr(Δ C Δᵀ) ≈ Σ_j ‖Δ_{:,j} L_j‖², and right-multiplying a
column block by L_j (or by L_j⁻¹) keeps every family's block structure (each sub-block's rank for Monarch/BTT;
the shared U_i, s_ij with V_j → L_jᵀ V_j for BLAST). So the family's own projection of W·blockdiag(L_j),
multiplied back by blockdiag(L_j⁻¹), is optimal for the approximated objective — exactly optimal when the input
blocks are uncorrelated — and costs one small Cholesky per block. Cross-block correlations are ignored.
Damping is the whole-matrix one of lrcompile.whiten (λ·mean(diag C), applied before the blocks are cut).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar, Optional

import torch

from ..factorize import whiten
from .base import MethodConfig, site_label


@dataclasses.dataclass
class StructuredConfig(MethodConfig):
    """Options shared by Monarch, BTT and BLAST: the inits, and the whitening damping."""

    damping: float = 0.01  # λ in C + λ·mean(diag C)·I for `init: whitened_svd`

    INITS: ClassVar[tuple[str, ...]] = ("svd", "whitened_svd", "random")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or self.damping < 0:
            raise ValueError(f"damping must be a non-negative number, got {self.damping!r}")


class BlockWhitener:
    """blockdiag(L_j) with L_j L_jᵀ = the j-th diagonal block (size k) of the damped C, and its inverse.

    `cov` is (in, in) with in ≤ n·k; the padded coordinates (always-zero inputs of a padded family) get the
    mean damped diagonal, which keeps every block invertible and does not touch the real ones.
    """

    def __init__(self, cov: torch.Tensor, n: int, k: int, damping: float):
        c = whiten.damped(cov, damping)
        in_f = c.shape[0]
        if in_f < n * k:
            fill = float(torch.diagonal(c).mean()) if in_f else 1.0
            c = torch.block_diag(c, torch.eye(n * k - in_f, dtype=c.dtype, device=c.device) * (fill or 1.0))
        eye = torch.eye(k, dtype=torch.float64, device=c.device)
        Ls, Linvs = [], []
        for j in range(n):
            wh = whiten.Whitener(c[j * k : (j + 1) * k, j * k : (j + 1) * k], damping=0.0)  # already damped
            Ls.append(wh.right(eye))
            Linvs.append(wh.unright(eye))
        self.L = torch.stack(Ls)  # (n, k, k)
        self.Linv = torch.stack(Linvs)

    def right(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks (..., n, rows, k) -> each column block times its L_j."""
        return blocks @ self.L.to(blocks.dtype)

    def unright(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks (..., n, rows, k) -> each column block times its L_j⁻¹."""
        return blocks @ self.Linv.to(blocks.dtype)


def block_whitener(
    family: str, cfg: StructuredConfig, stats, weight: torch.Tensor, n: int, k: int
) -> tuple[Optional[BlockWhitener], str]:
    """(whitener or None, the init actually used). Without usable statistics `whitened_svd` falls back to plain
    `svd`, with a warning (as for lowrank). Only the second moment C is used: a cross
    moment (statistics taken on a compressed model) is not, so the target is W's own activation-weighted fit."""
    if cfg.init != "whitened_svd":
        return None, cfg.init
    cov = getattr(stats, "cov", None) if stats is not None and getattr(stats, "tokens", 1) > 0 else None
    if not whiten.usable(cov):
        out_f, in_f = weight.shape
        why = "no calibration statistics" if stats is None else "calibration statistics that carry nothing"
        warnings.warn(
            f"lrcompile: {family} init 'whitened_svd' has {why} for "
            f"{site_label(stats, 'this site')} ({out_f}x{in_f} weight); "
            "using plain svd",
            stacklevel=4,
        )
        return None, "svd"
    return BlockWhitener(cov, n, k, cfg.damping), "whitened_svd"
