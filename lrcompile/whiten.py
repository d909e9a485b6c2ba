"""Activation-aware low-rank factorisation: the math behind `init: whitened_svd | asvd` and `compensate: true`.

Objective (REFERENCE.md): minimise ‖(W − Ŵ) Xᵀ‖_F over calibration inputs X, i.e. tr(Δ C Δᵀ) with C = XᵀX.
With C = L Lᵀ this is ‖Δ L‖_F, so Ŵ = trunc_r(W L) L⁻¹ is optimal (SVD-LLM). Any square root L works; Cholesky
is used when it succeeds, an eigen-decomposition with clamped eigenvalues when it does not, so rank-deficient
statistics (fewer tokens than channels, dead channels) never give NaN.
All math runs in float64 (C's eigenvalues span many decades); factors are returned in float64.
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def damped(cov: Tensor, damping: float) -> Tensor:
    """C + λ·mean(diag C)·I: keeps C positive definite and pulls the objective slightly toward Frobenius."""
    c = cov.to(torch.float64)
    scale = float(torch.diagonal(c).mean()) if c.numel() else 0.0
    if damping > 0 and scale > 0:
        c = c + (damping * scale) * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return c


class Whitener:
    """A square root of C: `right(A)` = A L, `unright(A)` = A L⁻¹ (L Lᵀ = C)."""

    def __init__(self, cov: Tensor, damping: float = 1e-2):
        c = damped(cov, damping)
        n = c.shape[0]
        self.kind = "identity"
        self.L = self.Linv_t = None
        if not bool(torch.isfinite(c).all()) or (n == 0 or float(torch.diagonal(c).max()) <= 0):
            return  # no usable statistics: plain SVD (L = I)
        L, info = torch.linalg.cholesky_ex(c)
        if int(info) == 0 and bool(torch.isfinite(L).all()) and float(torch.diagonal(L).min()) > 0:
            self.kind, self.L = "cholesky", L
            return
        # Eigen fallback: C = Q diag(e) Qᵀ, L = Q diag(√e), eigenvalues clamped away from zero.
        e, Q = torch.linalg.eigh((c + c.T) / 2)
        e = e.clamp_min(max(float(e.max()), 1e-300) * 1e-10)
        self.kind = "eigh"
        self.L = Q * e.sqrt()
        self.Linv_t = Q / e.sqrt()  # (L⁻¹)ᵀ = Q diag(1/√e)

    def right(self, A: Tensor) -> Tensor:
        return A if self.L is None else A @ self.L

    def unright(self, A: Tensor) -> Tensor:
        if self.L is None:
            return A
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.L, A, upper=False, left=False)  # X L = A
        return A @ self.Linv_t.T


def balance(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale each rank component so ‖U[:, i]‖ = ‖V[i]‖ (same product): Adam treats both factors alike."""
    nu = torch.linalg.vector_norm(U, dim=0)
    nv = torch.linalg.vector_norm(V, dim=1)
    c = torch.where((nu > 0) & (nv > 0), (nv / nu.clamp_min(1e-300)).sqrt(), torch.ones_like(nu))
    return U * c, V / c[:, None]


def _split(P: Tensor, S: Tensor, Qh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    root = S[:rank].sqrt()
    return P[:, :rank] * root, root[:, None] * Qh[:rank]


def kept_energy(S: Tensor, rank: int) -> float:
    e = S.double() ** 2
    tot = float(e.sum())
    return float(e[:rank].sum()) / tot if tot > 0 else 1.0


def whitened_svd(W: Tensor, cov: Tensor, rank: int, damping: float = 1e-2) -> tuple[Tensor, Tensor, float]:
    """SVD-LLM: Ŵ = trunc_r(W L) L⁻¹, split as U = P√S, V = √S Qᵀ L⁻¹, then balanced."""
    wh = Whitener(cov, damping)
    P, S, Qh = torch.linalg.svd(wh.right(W.detach().to(torch.float64)), full_matrices=False)
    U, Vw = _split(P, S, Qh, rank)
    U, V = balance(U, wh.unright(Vw))
    return U, V, kept_energy(S, rank)


def asvd(W: Tensor, abs_mean: Tensor, rank: int, alpha: float = 0.5) -> tuple[Tensor, Tensor, float]:
    """ASVD: scale input channels by mean|x|^α before the SVD, unscale V after."""
    s = abs_mean.to(torch.float64).clamp_min(0) ** alpha
    top = float(s.max()) if s.numel() else 0.0
    s = s.clamp_min(top * 1e-6) if top > 0 else torch.ones_like(s)  # dead channels: keep them invertible
    P, S, Qh = torch.linalg.svd(W.detach().to(torch.float64) * s, full_matrices=False)
    U, V = _split(P, S, Qh, rank)
    U, V = balance(U, V / s)
    return U, V, kept_energy(S, rank)


def compensate(W: Tensor, U: Tensor, V: Tensor, cov: Tensor, damping: float = 1e-2) -> Tensor:
    """Refit U by least squares on the calibration activations for fixed V: U = W C Vᵀ (V C Vᵀ)⁻¹."""
    c = damped(cov, damping)
    W = W.detach().to(torch.float64)
    V = V.to(torch.float64)
    CV = c @ V.T  # (in, r)
    G = V @ CV  # (r, r)
    G = (G + G.T) / 2
    jitter = 1e-12 * float(torch.diagonal(G).mean().clamp_min(1e-300))
    G = G + jitter * torch.eye(G.shape[0], dtype=G.dtype)
    Ut = torch.linalg.lstsq(G, (W @ CV).T).solution  # G symmetric: Uᵀ = G⁻¹ (W C Vᵀ)ᵀ
    U_new = Ut.T
    return U_new if bool(torch.isfinite(U_new).all()) else U.to(torch.float64)


def weighted_error(W: Tensor, W_hat: Tensor, cov: Tensor) -> float:
    """Calibration-weighted relative error sqrt(tr(Δ C Δᵀ) / tr(W C Wᵀ)) = ‖(W−Ŵ)Xᵀ‖ / ‖W Xᵀ‖."""
    c = cov.to(torch.float32)
    W = W.detach().to(torch.float32)
    D = W - W_hat.detach().to(torch.float32)
    num = float(((D @ c) * D).sum())
    den = float(((W @ c) * W).sum())
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0


def spectrum(W: Tensor, cov: Optional[Tensor] = None, damping: float = 1e-2) -> Tensor:
    """Singular values of W L (whitened) or of W (no statistics): the allocator's error curves."""
    W = W.detach().to(torch.float64)
    if cov is not None:
        W = Whitener(cov, damping).right(W)
    return torch.linalg.svdvals(W)


def site_quality(struct, weight: Tensor, stats=None, notes: Optional[list] = None) -> dict:
    """Report fields for a compressed site: kept (whitened) spectral energy and calibration-weighted error."""
    out = {}
    if not getattr(struct, "compressing", False):
        return out
    kept = getattr(struct, "kept_energy", None)
    if kept is not None:
        out["kept_energy"] = kept
    cfg_init = getattr(getattr(struct, "cfg", None), "init", None)
    used = getattr(struct, "init_used", cfg_init)
    if notes is not None and used != cfg_init:
        notes.append(f"init {cfg_init} without calibration statistics: used {used}")
    if stats is not None and getattr(stats, "xtx", None) is not None:
        with torch.no_grad():
            out["weighted_error"] = weighted_error(weight, struct.to_dense(), stats.cov)
    return out
