"""BLAST (Lee et al.): W split into b₁×b₂ blocks of p×q, block A_ij = U_i · diag(s_ij) · V_jᵀ.

U (b₁, p, r) is shared along block rows, V (b₂, q, r) along block columns, s (b₁, b₂, r) couples them:
r(out + in + b₁b₂) parameters. It contains global low rank (s = 1) and block-diagonal low rank (s_ij = 0 off
the diagonal). Forward: z_j = x_j V_j, w_i = Σ_j s_ij ⊙ z_j, y_i = w_i U_iᵀ — three batched matmuls, the middle
one a tiny b₁×b₂ mixing per rank channel (never the (b₁, b₂, N, r) temporary).

From dense there is no closed form: preconditioned alternating descent on ‖W − Ŵ‖²_F, each of
U, V, s in turn with its gradient preconditioned by (Gram of the others + εI)⁻¹, ε = δ·√loss. With step 1 that
is a proximal least-squares step, so the loss never increases. It starts from the global truncated SVD (s = 1,
the best point of the family's low-rank corner), so the result is never worse than plain SVD at rank r. The
Grams make the loss and every gradient cheap: Ŵ is never rebuilt, an iteration costs two W-sized matmuls.
The fit stops after `ITERS` iterations, when it is exact (relative error < EXACT), or when the relative error
improved by less than TOL (relative) over the last CHECK iterations; a progress bar shows for slow fits.

`init: whitened_svd` fits W·blockdiag(L_j) instead of W, one L_j per column block (whitening_blocks.py), and
maps V_j back by L_j⁻ᵀ: right-multiplying column block j keeps the form U_i diag(s_ij) V_jᵀ, so the result is
the fit of the activation-weighted objective under the block-diagonal approximation of the statistics.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import NamedTuple, Optional, Union

import sympy
import torch
from torch import nn

from ..factorize import whiten
from .base import Structure, mark_owned, register
from .blockmm import column_blocks
from .btt import mup_std
from .lowrank import check_rank
from .whitening_blocks import StructuredConfig, block_whitener

ITERS = 300
TOL = 1e-4  # stop when the relative error improved by less than this fraction over CHECK iterations
CHECK = 10
EXACT = 1e-7  # or when it is this small (an in-family matrix)
DELTA = 0.1
SEED = 0
SLOW_S = 2.0  # show a progress bar when a fit is projected to take longer than this


def blast_matmul(
    x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, s: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """x (..., b₂·q), U (b₁, p, r), V (b₂, q, r), s (b₁, b₂, r) -> (..., b₁·p)."""
    lead, in_f = x.shape[:-1], x.shape[-1]
    b1, p, r = U.shape
    b2, q, _ = V.shape
    x2 = x.reshape(-1, in_f)
    n = x2.shape[0]
    # Every bmm operand is contiguous or a plain transpose: torch's CPU bmm falls back to a per-matrix loop
    # for other strides (100x slower at r≈300). The re-layouts between stages copy whole rows of n floats.
    zt = torch.bmm(V.transpose(1, 2), x2.view(n, b2, q).permute(1, 2, 0))  # zᵀ_j = V_jᵀ x_jᵀ: (b₂, r, n)
    zt = zt.transpose(0, 1).contiguous()  # (r, b₂, n)
    wt = torch.bmm(s.permute(2, 0, 1).contiguous(), zt)  # per channel (b₁ × b₂) @ (b₂ × n): (r, b₁, n)
    w = wt.transpose(0, 1).contiguous().transpose(1, 2)  # (b₁, n, r), a plain transpose of contiguous blocks
    y = column_blocks(w, U.transpose(1, 2), bias)  # (b₁, n, r) @ (b₁, r, p), each block into its columns
    return y.view(*lead, b1 * p)


def _blocks(value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value, value
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ValueError(f"blast blocks must be an int b >= 1 or a pair [b1, b2], got {value!r}")


def resolve_blast_rank(rank: Union[int, float], in_f: int, out_f: int, b1: int, b2: int) -> int:
    """int → exact; float f → ⌊f·in·out/(in+out+b₁b₂)⌋; capped at min(in, out), which already reproduces W."""
    r = math.floor(rank * in_f * out_f / (in_f + out_f + b1 * b2)) if isinstance(rank, float) else rank
    return max(1, min(int(r), min(in_f, out_f)))


@dataclasses.dataclass
class BlastConfig(StructuredConfig):
    blocks: Union[int, list] = 4  # b (a b×b grid) or [b₁, b₂] (block rows along out, block columns along in)
    rank: Optional[Union[int, float]] = None

    def validate(self) -> None:
        super().validate()
        _blocks(self.blocks)
        check_rank(self.rank, allow_none=True)  # a budget may allocate it

    def resolve(self, in_features: int, out_features: int) -> "BlastConfig":
        self.validate()
        if self.rank is None:
            raise ValueError("blast needs a 'rank' (an int, or a float fraction in (0, 1] of the dense parameters)")
        b1, b2 = _blocks(self.blocks)
        if out_features % b1 or in_features % b2:
            raise ValueError(f"blast blocks [{b1}, {b2}] do not divide (out, in) = ({out_features}, {in_features})")
        r = resolve_blast_rank(self.rank, in_features, out_features, b1, b2)
        return dataclasses.replace(self, blocks=[b1, b2], rank=r)


def _geometry(in_f: int, out_f: int, cfg: BlastConfig) -> tuple[int, int, int, int, int]:
    c = cfg.resolve(in_f, out_f)
    b1, b2 = c.blocks
    return b1, out_f // b1, b2, in_f // b2, c.rank


def _solve_right(G: torch.Tensor, P: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """G (P + εI)⁻¹ for symmetric P, batched."""
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    return torch.linalg.solve(P + eps * eye, G.transpose(-1, -2)).transpose(-1, -2)


class BlastFit(NamedTuple):
    U: torch.Tensor  # (b₁, p, r)
    V: torch.Tensor  # (b₂, q, r)
    s: torch.Tensor  # (b₁, b₂, r)
    iterations: int  # descent iterations run (≤ iters: the tolerance or exactness stop may end it early)
    rel_error: float  # ‖W − Ŵ‖_F / ‖W‖_F of the returned factors


def balance_channels(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale U against V per rank channel (the product is unchanged): factors of equal scale train well."""
    r = U.shape[-1]
    Ub, Vb = whiten.balance(U.reshape(-1, r), V.reshape(-1, r).T)
    return Ub.reshape(U.shape), Vb.T.reshape(V.shape)


def fit_blast(
    weight: torch.Tensor,
    b1: int,
    b2: int,
    r: int,
    iters: int = ITERS,
    tol: float = TOL,
    delta: float = DELTA,
    seed: int = SEED,
    progress: Optional[bool] = None,
) -> BlastFit:
    """U (b₁,p,r), V (b₂,q,r), s (b₁,b₂,r) approximating `weight` (out, in); see the module doc."""
    W = weight.detach()
    W = W.double() if W.dtype == torch.float64 else W.float()
    out_f, in_f = W.shape
    p, q = out_f // b1, in_f // b2
    Wb = W.reshape(b1, p, b2, q).permute(0, 2, 1, 3).contiguous()  # (b₁, b₂, p, q), reused every iteration
    norm2 = W.pow(2).sum()
    P_, S_, Qh = torch.linalg.svd(W, full_matrices=False)
    root = S_[:r].sqrt()
    U = (P_[:, :r] * root).reshape(b1, p, r).clone()
    V = (Qh[:r].T * root).reshape(b2, q, r).clone()
    s = torch.ones(b1, b2, r, dtype=W.dtype, device=W.device)
    del P_, Qh

    def loss_of(U, V, s):
        GU, GV = U.transpose(1, 2) @ U, V.transpose(1, 2) @ V
        Ps = GU[:, None] * GV[None]
        d = ((Wb.transpose(-1, -2) @ U[:, None]) * V[None]).sum(-2)
        quad = (s[..., None, :] @ Ps @ s[..., :, None]).sum()
        return (norm2 - 2 * (s * d).sum() + quad).clamp_min(0)

    best = (float(loss_of(U, V, s)), U.clone(), V.clone(), s.clone())  # plain SVD: the result is never worse
    # A tiny seeded nudge: at rank-deficient W the SVD leaves zero columns, from which no block can grow.
    g = torch.Generator(device="cpu").manual_seed(seed)
    scale = 1e-3 * float(S_[0].sqrt()) / math.sqrt(max(p, q))
    U += scale * torch.randn(U.shape, generator=g, dtype=W.dtype).to(W.device)
    V += scale * torch.randn(V.shape, generator=g, dtype=W.dtype).to(W.device)
    loss = loss_of(U, V, s)
    history = [float(loss)]
    bar, t0 = None, time.perf_counter()
    done = 0
    for it in range(iters):
        done = it + 1
        eps = delta * loss.sqrt()
        # U step: Gram P_Ui = Σ_j diag(s_ij) VjᵀVj diag(s_ij); gradient U_i P_Ui − Σ_j W_ij V_j diag(s_ij)
        GV = V.transpose(1, 2) @ V
        ss = s[..., :, None] * s[..., None, :]  # (b₁, b₂, r, r)
        PU = (GV[None] * ss).sum(1)
        RU = ((Wb @ V[None]) * s[:, :, None, :]).sum(1)
        U = U - _solve_right(U @ PU - RU, PU, eps)
        # V step, symmetric; WᵀU (with the new U) also feeds the s step
        GU = U.transpose(1, 2) @ U
        PV = (GU[:, None] * ss).sum(0)
        WtU = Wb.transpose(-1, -2) @ U[:, None]  # (b₁, b₂, q, r)
        RV = (WtU * s[:, :, None, :]).sum(0)
        V = V - _solve_right(V @ PV - RV, PV, eps)
        # s step: per block, Gram (UᵢᵀUᵢ) ⊙ (VⱼᵀVⱼ), linear term diag(Uᵢᵀ W_ij Vⱼ)
        GV = V.transpose(1, 2) @ V
        Ps = GU[:, None] * GV[None]
        d = (WtU * V[None]).sum(-2)
        gs = (Ps @ s[..., None]).squeeze(-1) - d
        eye = torch.eye(r, dtype=W.dtype, device=W.device)
        s = s - torch.linalg.solve(Ps + eps * eye, gs)
        loss = (norm2 - 2 * (s * d).sum() + (s[..., None, :] @ Ps @ s[..., :, None]).sum()).clamp_min(0)
        lf = float(loss)
        history.append(lf)
        if lf < best[0]:
            best = (lf, U.clone(), V.clone(), s.clone())
        if bar is None and it == 2 and progress is not False:
            projected = (time.perf_counter() - t0) / 3 * iters
            if progress or projected > SLOW_S:
                from tqdm.auto import tqdm

                bar = tqdm(total=iters, initial=3, desc=f"blast fit {out_f}x{in_f} r={r}", leave=False)
        elif bar is not None:
            bar.update(1)
            bar.set_postfix(rel_err=f"{math.sqrt(lf / float(norm2)):.3g}")
        rel = math.sqrt(lf / max(float(norm2), 1e-300))
        if rel < EXACT or (
            len(history) > CHECK and math.sqrt(history[-CHECK - 1] / max(float(norm2), 1e-300)) - rel < tol * rel
        ):
            break
    if bar is not None:
        bar.close()
    lf, U, V, s = best
    U, V = balance_channels(U, V)
    return BlastFit(U, V, s, done, math.sqrt(lf / max(float(norm2), 1e-300)))


@register
class Blast(Structure):
    name = "blast"
    Config = BlastConfig
    compressing = True
    tensor_names = ("U", "V", "s")
    kernel = "blast"
    # a budget sizes the rank; without a cheap error model (the fit is iterative) each site gets the budget's
    # fraction of its own dense cost
    budget_knob = "rank"

    def __init__(self, in_features: int, out_features: int, cfg: BlastConfig, dtype=None, device=None):
        super().__init__(in_features, out_features, cfg)
        b1, p, b2, q, r = _geometry(in_features, out_features, cfg)
        self.U = mark_owned(nn.Parameter(torch.empty(b1, p, r, dtype=dtype, device=device)))
        self.V = mark_owned(nn.Parameter(torch.empty(b2, q, r, dtype=dtype, device=device)))
        self.s = mark_owned(nn.Parameter(torch.empty(b1, b2, r, dtype=dtype, device=device)))

    def _fans(self) -> dict[str, tuple[int, int]]:
        """(fan_in, fan_out) of each factor as a linear map: V q → r, s b₂ → b₁ (per channel), U r → p."""
        b1, p, r = self.U.shape
        b2, q, _ = self.V.shape
        return {"V": (q, r), "s": (b2, b1), "U": (r, p)}

    @classmethod
    def init(cls, in_features, out_features, cfg, dtype=None, device=None) -> "Blast":
        """From scratch: μP-scaled Gaussian factors (s included: random couplings use every block)."""
        m = cls(in_features, out_features, cfg, dtype=dtype, device=device)
        with torch.no_grad():
            for name, (fi, fo) in m._fans().items():
                nn.init.normal_(getattr(m, name), std=mup_std(fi, fo))
        return m

    @classmethod
    def from_dense(cls, weight, bias, cfg: BlastConfig, stats=None) -> "Blast":
        out_f, in_f = weight.shape
        if cfg.init == "random":
            return cls.init(in_f, out_f, cfg, dtype=weight.dtype, device=weight.device)
        b1, p, b2, q, r = _geometry(in_f, out_f, cfg)
        wh, used = block_whitener(cls.name, cfg, stats, weight, b2, q)
        if wh is None:
            fit = fit_blast(weight, b1, b2, r)
            U, V = fit.U, fit.V
        else:  # fit W·blockdiag(L_j), then V_j ← L_j⁻ᵀ V_j (module doc)
            Wc = weight.detach().double().reshape(out_f, b2, q).transpose(0, 1)  # (b₂, out, q)
            fit = fit_blast(wh.right(Wc).transpose(0, 1).reshape(out_f, in_f), b1, b2, r)
            U, V = balance_channels(fit.U, wh.unright(fit.V.transpose(1, 2)).transpose(1, 2))
        m = cls(in_f, out_f, cfg, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            m.U.copy_(U)
            m.V.copy_(V)
            m.s.copy_(fit.s)
        m.init_used = used  # for the report (whiten.site_quality)
        return m

    def to_dense(self) -> torch.Tensor:
        """Assembled from the factors, independently of `functional`: block (i, j) is U_i diag(s_ij) V_jᵀ."""
        b1, p, _ = self.U.shape
        b2, q, _ = self.V.shape
        return torch.einsum("ipr,ijr,jqr->ipjq", self.U, self.s, self.V).reshape(b1 * p, b2 * q)

    def lr_multipliers(self) -> dict[str, float]:
        """Adam lr multipliers under `init: random` (1.0 for factors fitted to a trained dense weight).

        U and V are width-growing matrices (fan-in r and q): BTT's μP rule, (in / fan_in) / number of
        factors. s is not: it is a per-channel coupling whose fan-in b₂ is fixed while the layer widens, so
        μP counts it as vector-like (like a bias or a norm gain), whose Adam step must not shrink with width.
        The BTT rule applied to it would give in / b₂ / 3 — a factor growing with width (64× at in = 768,
        b = 4), far beyond what the rest of the model's vector-like parameters get from param_groups (the
        base rate). So s trains at the base rate like them: 1.0."""
        fans = self._fans()
        if self.cfg.init != "random":
            return {n: 1.0 for n in fans}
        mats = {n: f for n, f in fans.items() if n != "s"}
        return {"s": 1.0, **{n: (self.in_features / fi) / len(fans) for n, (fi, _) in mats.items()}}

    @staticmethod
    def functional(x, weight, bias, U, V, s):
        return blast_matmul(x, U, V, s, bias)

    @classmethod
    def param_count(cls, in_features, out_features, cfg) -> int:
        b1, p, b2, q, r = _geometry(in_features, out_features, cfg)
        return r * (in_features + out_features + b1 * b2)

    @classmethod
    def flops_per_token(cls, in_features, out_features, cfg) -> int:
        return 2 * cls.param_count(in_features, out_features, cfg)  # x V, the mixing, w Uᵀ: one MAC per entry

    @classmethod
    def flops(cls, in_features, out_features, cfg, tokens=None):
        """FLOPs of a call, symbolic in the token count unless `tokens` is given."""
        n = sympy.Symbol("tokens", positive=True, integer=True) if tokens is None else tokens
        return n * cls.flops_per_token(in_features, out_features, cfg)
