"""Activation-aware low-rank factorisation: the math behind `init: whitened_svd | asvd` and `compensate: true`.

Objective (SVD-LLM): minimise ‖(W − Ŵ) Xᵀ‖_F over calibration inputs X, i.e. tr(Δ C Δᵀ) with C = XᵀX.
With C = L Lᵀ this is ‖Δ L‖_F, so Ŵ = trunc_r(W L) L⁻¹ is optimal (SVD-LLM). Any square root L works; Cholesky
is used when it succeeds, an eigen-decomposition with clamped eigenvalues when it does not, so rank-deficient
statistics (fewer tokens than channels, dead channels) never give NaN.
All math runs in float64 (C's eigenvalues span many decades); factors are returned in float64.

Sequential ("compressed-upstream", EoRA-style) compensation: when the statistics were collected on an already
compressed model against the dense reference (`calibrate(..., reference=dense)`), a site sees inputs x̃ while the
dense site saw x. Minimising ‖Ŵ X̃ᵀ − W Xᵀ‖ (reproduce the *original* output from the inputs the site really gets)
has the closed form Ŵ = trunc_r(W K L̃⁻ᵀ) L̃⁻¹ with C̃ = X̃ᵀX̃ = L̃ L̃ᵀ and K = XᵀX̃; with x̃ = x it is SVD-LLM.
The inits accept a SiteStats (for the cross moment) or a bare second-moment tensor.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import torch

from .stats import FLOAT32_ABOVE

Tensor = torch.Tensor


def _moments(stats) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(C, K) from a SiteStats or a bare C; (None, None) for missing or empty statistics (with a warning)."""
    if stats is None:
        return None, None
    if isinstance(stats, Tensor):
        return stats, None
    if stats.tokens <= 0:
        fqn = getattr(stats, "fqn", None)
        where = f"site {fqn!r}" if fqn else f"a {stats.in_features}-input site"
        warnings.warn(
            f"lrcompile: calibration statistics for {where} saw no tokens (every row masked?): treated as missing",
            stacklevel=3,
        )
        return None, None
    return stats.cov, getattr(stats, "cross_mean", None)


def damped(cov: Tensor, damping: float, like: Optional[Tensor] = None) -> Tensor:
    """C + λ·mean(diag C)·I: keeps C positive definite and pulls the objective slightly toward Frobenius.
    `like`: take the scale from this matrix (the cross moment is damped on C's scale)."""
    c = cov.to(torch.float64)
    ref = c if like is None else like.to(torch.float64)
    scale = float(torch.diagonal(ref).mean()) if ref.numel() else 0.0
    if damping > 0 and scale > 0:
        c = c + (damping * scale) * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return c


_TINY = torch.finfo(torch.float64).eps ** 0.5


def usable(cov: Optional[Tensor]) -> bool:
    """Statistics that carry information: finite and not all zero."""
    return (
        cov is not None and cov.numel() > 0 and bool(torch.isfinite(cov).all()) and float(torch.diagonal(cov).max()) > 0
    )


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
        d = torch.diagonal(L)
        # a tiny pivot means C is numerically singular: L⁻¹ would amplify rounding noise, so use the eigen path
        if int(info) == 0 and bool(torch.isfinite(L).all()) and float(d.min()) > _TINY * float(d.max()):
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

    def unright_t(self, A: Tensor) -> Tensor:
        """A L⁻ᵀ."""
        if self.L is None:
            return A
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.L.T, A, upper=True, left=False)  # X Lᵀ = A
        return A @ self.Linv_t


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


def whitened_target(W: Tensor, stats, damping: float = 1e-2) -> tuple[Tensor, "Whitener"]:
    """(T, wh) with the objective = ‖Ŵ L − T‖_F: T = W L (SVD-LLM) or W K L⁻ᵀ (cross moment present)."""
    cov, cross = _moments(stats)
    W = W.detach().to(torch.float64)
    if not usable(cov):
        if cov is not None:
            warnings.warn("lrcompile: calibration statistics are all zero or non-finite: plain SVD", stacklevel=3)
        return W, Whitener(torch.zeros(0, 0), 0.0)
    wh = Whitener(cov, damping)
    if cross is None:
        return wh.right(W), wh
    # the damping pulls toward ‖W − Ŵ‖_F: add it to K as to C̃, so that x̃ = x gives back W L
    return wh.unright_t(W @ damped(cross, damping, like=cov)), wh


class Basis(NamedTuple):
    """A site's whitened decomposition: W = Σᵢ A[:, i]·B[i] and the rank-r optimum is A[:, :r]·B[:r];
    `energy[i]` is component i's share of ‖W L‖² (descending), so Σ_{i≥r} energy is the rank-r objective."""

    A: Tensor  # (out, k)
    B: Optional[Tensor]  # (k, in); None for a projection basis (it is AᵀW: `rows` forms the rows needed)
    energy: Tensor  # (k,) float64
    projection: bool = False  # A has orthonormal columns and B = AᵀW: Ŵ_r = A_r A_rᵀ W

    def rows(self, W: Tensor, rank: int) -> Tensor:
        """B[:rank]."""
        if self.B is not None:
            return self.B[:rank]
        return self.A[:, :rank].T @ W.detach().to(self.A.dtype)


# Sites above FLOAT32_ABOVE weights are factorised in float32 (a 2048×5632 site: ~3.5 s instead of ~23 s on one
# core); only components far below the kept ones change.


def _work_dtype(W: Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 or W.numel() <= FLOAT32_ABOVE else torch.float32


def _descending_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (float64, descending, ≥ 0) and eigenvectors of a Gram matrix, in its own precision (float32
    for large sites: about twice as fast; its error is ~1e-7 of the largest eigenvalue, far below what a
    truncation drops)."""
    e, Q = torch.linalg.eigh((M + M.T) / 2)
    return e.flip(0).to(torch.float64).clamp_min(0), Q.flip(1)


def _projection(M: Tensor, dt: torch.dtype) -> Basis:
    """The out-space basis from M = W C_d Wᵀ: its eigenvectors P, Ŵ_r = P_r P_rᵀ W."""
    e, P = _descending_eigh(M)
    return Basis(P.to(dt), None, e, True)


def whitened_basis(W: Tensor, stats, damping: float = 1e-2) -> Basis:
    """The SVD-LLM solution at every rank from one eigendecomposition of the smaller Gram matrix of T = W L
    (C = L Lᵀ, damped). Since trunc_r(T) L⁻¹ = P_r P_rᵀ W (P: left singular vectors of T), a site with out ≤ in
    needs only the eigenvectors of T Tᵀ = W C Wᵀ — no square root or inverse of C, so a singular C is no special
    case; one with out > in takes T's right singular vectors Q from TᵀT and Ŵ_r = (T Q_r)(Q_rᵀ L⁻¹).
    With a cross moment (statistics against a reference) or without usable statistics it is T's SVD."""
    if getattr(stats, "output_form", False) and stats.tokens > 0:
        return _output_basis(W, stats, damping)
    cov, cross = _moments(stats)
    if cross is not None or not usable(cov):
        T, wh = whitened_target(W, stats, damping)
        P, S, Qh = torch.linalg.svd(T, full_matrices=False)
        return Basis(P * S, wh.unright(Qh), S.double() ** 2)
    dt = _work_dtype(W)
    Wd = W.detach().to(dt)
    out_f, in_f = Wd.shape
    if out_f <= in_f:
        c = damped(cov, damping).to(dt)
        return _projection(Wd @ c @ Wd.T, dt)
    wh = Whitener(cov, damping)
    if wh.L is not None:
        wh.L = wh.L.to(dt)
        wh.Linv_t = wh.Linv_t.to(dt) if wh.Linv_t is not None else None
    T = wh.right(Wd)
    e, Q = _descending_eigh(T.T @ T)
    Q = Q.to(dt)
    return Basis(T @ Q, wh.unright(Q.T), e)


def _output_basis(W: Tensor, stats, damping: float) -> Basis:
    """From output-form statistics: W C Wᵀ = E[yᵀy], and the damping λ·mean(diag C)·W Wᵀ with mean(diag C) =
    E[‖x‖²] / in — the same matrix the input form builds, without the in × in moment."""
    dt = _work_dtype(W)
    Wd = W.detach().to(dt)
    if tuple(stats.yty.shape) != (Wd.shape[0],) * 2 or stats.in_features != Wd.shape[1]:
        raise ValueError(
            f"lrcompile: output-form statistics of {stats.yty.shape[0]} outputs and {stats.in_features} inputs "
            f"for a {Wd.shape[0]}×{Wd.shape[1]} weight (statistics of another model?)"
        )
    n = max(stats.tokens, 1)
    M = stats.yty.to(dt) / n
    scale = stats.x_sq / n / max(Wd.shape[1], 1)
    if damping > 0 and scale > 0:
        M = M + (damping * scale) * (Wd @ Wd.T)
    if not bool(torch.isfinite(M).all()) or (float(torch.diagonal(M).max()) if M.numel() else 0.0) <= 0:
        warnings.warn("lrcompile: calibration statistics are all zero or non-finite: plain SVD", stacklevel=3)
        P, S, Qh = torch.linalg.svd(W.detach().to(torch.float64), full_matrices=False)
        return Basis(P * S, Qh, S**2)
    return _projection(M, dt)


def _kept(energy: Tensor, rank: int) -> float:
    tot = float(energy.sum())
    return float(energy[:rank].sum()) / tot if tot > 0 else 1.0


def whitened_factors(W: Tensor, cov, rank: int, damping: float = 1e-2) -> tuple[Tensor, Tensor, float, float]:
    """`whitened_svd` and the whitened energy in all (tr(W C Wᵀ) at this damping, or the target's ‖T‖² with a
    cross moment), from which the report's weighted error follows without another product."""
    from .spill import take

    got = take(getattr(cov, "spilled", None), W, damping, rank)  # the basis the allocation's curves used
    if got is not None:
        U, V, energy = got
        U, V = balance(U.to(torch.float64), V.to(torch.float64))
        return U, V, _kept(energy, rank), float(energy.sum())
    b = whitened_basis(W, cov, damping)
    U, V = balance(b.A[:, :rank].to(torch.float64), b.rows(W, rank).to(torch.float64))
    return U, V, _kept(b.energy, rank), float(b.energy.sum())


def whitened_svd(W: Tensor, cov, rank: int, damping: float = 1e-2) -> tuple[Tensor, Tensor, float]:
    """SVD-LLM: Ŵ = trunc_r(T) L⁻¹ (T = W L, or W K L⁻ᵀ with a cross moment), as U V balanced, float64
    (`whitened_basis`). `cov`: a SiteStats or the second moment C. kept energy is the fraction of ‖T‖² the rank
    keeps."""
    return whitened_factors(W, cov, rank, damping)[:3]


def asvd_scale(abs_mean: Tensor, alpha: float = 0.5) -> Tensor:
    """ASVD's input-channel scale mean|x|^α (float64); ones (plain SVD, warned) without usable statistics."""
    s = abs_mean.to(torch.float64).clamp_min(0) ** alpha
    top = float(s.max()) if s.numel() else 0.0
    if not top > 0 or not bool(torch.isfinite(s).all()):
        warnings.warn(
            "lrcompile: asvd channel scales are all zero or non-finite (no tokens seen?): plain SVD", stacklevel=3
        )
        return torch.ones_like(s)
    return s.clamp_min(top * 1e-6)  # dead channels: keep them invertible


def asvd(W: Tensor, abs_mean: Tensor, rank: int, alpha: float = 0.5) -> tuple[Tensor, Tensor, float]:
    """ASVD: scale input channels by mean|x|^α before the SVD, unscale V after."""
    s = asvd_scale(abs_mean, alpha)
    P, S, Qh = torch.linalg.svd(W.detach().to(torch.float64) * s, full_matrices=False)
    U, V = _split(P, S, Qh, rank)
    U, V = balance(U, V / s)
    return U, V, kept_energy(S, rank)


def compensate(W: Tensor, U: Tensor, V: Tensor, cov, damping: float = 1e-2) -> Tensor:
    """Refit U by least squares on the calibration activations for fixed V: U = W K Vᵀ (V C̃ Vᵀ)⁻¹ (K = C without
    a cross moment). `cov`: a SiteStats or C. Without usable statistics U is returned unchanged (warned); a refit
    that changes nothing (whitened_svd at the same damping is already this optimum) is warned as redundant."""
    if getattr(cov, "output_form", False):
        warnings.warn(
            "lrcompile: compensate needs input statistics (XᵀX); these were collected in output form for a policy "
            "without compensate: calibrate with this policy; factors unchanged",
            stacklevel=2,
        )
        return U.to(torch.float64)
    cov_, cross = _moments(cov)
    if not usable(cov_):
        warnings.warn(
            "lrcompile: compensate has no usable calibration statistics for this site; factors unchanged", stacklevel=2
        )
        return U.to(torch.float64)
    c = damped(cov_, damping)
    k = c if cross is None else damped(cross, damping, like=cov_)
    W = W.detach().to(torch.float64)
    V = V.to(torch.float64)
    G = V @ c @ V.T  # (r, r)
    G = (G + G.T) / 2
    jitter = 1e-12 * float(torch.diagonal(G).mean().clamp_min(1e-300))
    G = G + jitter * torch.eye(G.shape[0], dtype=G.dtype)
    Ut = torch.linalg.lstsq(G, (W @ k @ V.T).T).solution  # G symmetric: Uᵀ = G⁻¹ (W K Vᵀ)ᵀ
    U_new = Ut.T
    if not bool(torch.isfinite(U_new).all()):
        return U.to(torch.float64)
    U0 = U.to(torch.float64)
    if float(torch.linalg.norm(U_new - U0)) <= 1e-6 * float(torch.linalg.norm(U0)):
        warnings.warn(
            "lrcompile: compensate changed nothing: these factors are already the least-squares fit "
            "(whitened_svd at the same damping); it helps after svd/asvd, or with statistics from a "
            "compressed model (calibrate(..., reference=dense))",
            stacklevel=2,
        )
    return U_new


def weighted_error(W: Tensor, W_hat: Tensor, cov: Tensor) -> float:
    """Calibration-weighted relative error sqrt(tr(Δ C Δᵀ) / tr(W C Wᵀ)) = ‖(W−Ŵ)Xᵀ‖ / ‖W Xᵀ‖."""
    c = cov.to(torch.float32)
    W = W.detach().to(torch.float32)
    D = W - W_hat.detach().to(torch.float32)
    num = float(((D @ c) * D).sum())
    den = float(((W @ c) * W).sum())
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0


def spectrum(W: Tensor, cov=None, damping: float = 1e-2) -> Tensor:
    """Singular values of the whitened target (W L, or W K L⁻ᵀ) or of W (no statistics): the allocator's curves."""
    if getattr(cov, "output_form", False):
        return whitened_basis(W, cov, damping).energy.sqrt()
    cov_, cross = _moments(cov)
    if cross is None and usable(cov_):
        return whitened_basis(W, cov, damping).energy.sqrt()
    return torch.linalg.svdvals(whitened_target(W, cov, damping)[0])


def spectrum_curve(weight: Tensor, stats=None, damping: float = 1e-2):
    """error(r) = Σ_{i>r} σᵢ² of the whitened spectrum (plain spectrum without statistics)."""
    e = spectrum(weight, stats, damping).double() ** 2
    tail = torch.flip(torch.cumsum(torch.flip(e, [0]), 0), [0]).tolist() + [0.0]  # tail[r] = Σ_{i≥r}
    return lambda r: tail[min(max(r, 0), len(tail) - 1)]


def _from_energy(struct, weight: Tensor, stats, rel_err: Optional[float]) -> Optional[float]:
    """weighted_error of a whitened-SVD site without the out × in² product: the dropped energy is
    tr(Δ C_d Δᵀ) = (1 − kept)·tr(W C_d Wᵀ) with C_d = C + λ·s·I (s = mean diag C), so
    tr(Δ C Δᵀ) / tr(W C Wᵀ) = ((1 − kept)·total − λ s ‖Δ‖²) / (total − λ s ‖W‖²), ‖Δ‖ = rel_err·‖W‖. None when
    a term is missing (a cached entry from before, a cross moment, no statistics)."""
    total, kept = getattr(struct, "energy_total", None), getattr(struct, "kept_energy", None)
    if rel_err is None or stats is None or getattr(stats, "cross", None) is not None:
        return None
    # both may come from a factor-cache entry: numbers in range, or the slow way
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (total, kept)) or total <= 0:
        return None
    if not 0.0 <= kept <= 1.0 + 1e-9:
        return None
    n = max(stats.tokens, 1)
    if getattr(stats, "output_form", False):
        s = stats.x_sq / n / max(stats.in_features, 1)
    elif getattr(stats, "xtx", None) is not None:
        s = float(torch.diagonal(stats.xtx).sum()) / n / max(stats.in_features, 1)
    else:
        return None
    lam = getattr(getattr(struct, "cfg", None), "damping", 0.0) * s
    w2 = float(weight.detach().double().square().sum())
    den = total - lam * w2
    num = (1.0 - kept) * total - lam * (rel_err**2) * w2
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0


def site_quality(
    struct, weight: Tensor, stats=None, notes: Optional[list] = None, rel_err: Optional[float] = None
) -> dict:
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
    fast = _from_energy(struct, weight, stats, rel_err) if used == "whitened_svd" else None
    if fast is not None:
        out["weighted_error"] = fast
    elif stats is not None and getattr(stats, "xtx", None) is not None:
        with torch.no_grad():
            out["weighted_error"] = weighted_error(weight, struct.to_dense(), stats.cov)
    elif getattr(stats, "output_form", False) and used == "whitened_svd" and hasattr(struct, "U"):
        with torch.no_grad():
            out["weighted_error"] = projected_error(weight, struct.U, stats)
    return out


def projected_error(W: Tensor, U: Tensor, stats) -> float:
    """weighted_error for Ŵ = Π W (Π: the projection onto U's columns, as whitened SVD's factors are) from
    output-form statistics: tr(Δ C Δᵀ) = tr(E[yᵀy]) − tr(Π E[yᵀy])."""
    Y = stats.yty.to(torch.float64) / max(stats.tokens, 1)
    Q, _ = torch.linalg.qr(U.detach().to(torch.float64))
    den = float(torch.diagonal(Y).sum())
    num = den - float((Q * (Y @ Q)).sum())
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0
