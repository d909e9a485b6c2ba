"""End-to-end sensitivity curves: each site compressed alone at a few ranks, the model's output drop measured on
calibration batches. `budget: {allocate: sensitivity}` allocates ranks by them."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..capture.trace import call_model, model_sites
from .stats import CalibrationStats, SiteStats

SENSITIVITY_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9)


def _site_init(pol, fqn: str):
    """(init, damping, alpha) the policy's low-rank rule will factorise this site with."""
    rule = pol.match(fqn, "linear") if pol is not None else None
    cfg = getattr(rule, "config", None)
    return (
        getattr(cfg, "init", "whitened_svd") or "whitened_svd",
        getattr(cfg, "damping", 0.01),
        getattr(cfg, "asvd_alpha", 0.5),
    )


def site_svd(
    W: torch.Tensor, s: Optional[SiteStats], init: str = "whitened_svd", damping: float = 0.01, alpha: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, S, R) with W = P·diag(S)·R and Ŵ_r = P[:, :r]·diag(S[:r])·R[:r] the site's rank-r init (the same math
    as the low-rank inits): whitened — `whiten.whitened_basis` (S = 1; float32 for large sites); ASVD — T's SVD
    with R = Qᴴ / scale; plain SVD — R = Qᴴ (float64)."""
    from . import whiten

    if init == "whitened_svd" and s is not None:
        b = whiten.whitened_basis(W, s, damping)
        return b.A, torch.ones(b.A.shape[1], dtype=b.A.dtype), b.rows(W, b.A.shape[1])
    elif init == "asvd" and s is not None:
        sc = whiten.asvd_scale(s.abs_mean, alpha)
        T, post = W.detach().double() * sc, (lambda V: V / sc)
    else:
        T, post = W.detach().double(), (lambda V: V)
    P, S, Qh = torch.linalg.svd(T, full_matrices=False)
    return P, S, post(Qh)


def factorised(
    W: torch.Tensor, s: Optional[SiteStats], init: str = "whitened_svd", damping: float = 0.01, alpha: float = 0.5
):
    """rank -> Ŵ (float64) for one site: one SVD, sliced per rank."""
    P, S, R = site_svd(W, s, init, damping, alpha)
    return lambda r: (P[:, :r] * S[:r]) @ R[:r]


def measure_sensitivity(
    model: nn.Module,
    batches,
    stats: CalibrationStats,
    policy=None,
    *,
    fractions=SENSITIVITY_FRACTIONS,
    progress: bool = True,
) -> dict[str, dict[int, float]]:
    """Each site compressed alone at ranks fractions × break-even, the rest dense: {fqn: {rank: loss}} with loss
    = 1 − cosine of the mask-weighted mean-pooled outputs against the dense model's (lrcompile.heal's loss, no
    token term), averaged over `batches`. The budget allocator reads these as measured error curves: unlike a
    site's spectrum they see how much its error matters at the model's output."""
    from tqdm.auto import tqdm

    from ..lifecycle.heal import _hidden, loss_of
    from ..policy.load import load_policy

    pol = load_policy(policy)
    batches = list(batches)
    params = _site_weights(model, stats, batches[0])
    modes = {m: m.training for m in model.modules()}
    model.eval()
    curves = {}
    try:
        with torch.no_grad():
            refs = [_hidden(call_model(model, b)) for b in batches]
            for fqn, (weight, conv) in tqdm(params.items(), desc="lrcompile sensitivity", disable=not progress):
                W = (weight.T if conv else weight).detach()
                out_f, in_f = W.shape
                approx = factorised(W, stats.get(fqn), *_site_init(pol, fqn))
                saved = weight.detach().clone()
                curve = {}
                try:
                    for f in fractions:
                        r = max(1, int(f * in_f * out_f / (in_f + out_f)))
                        Wr = approx(r).to(saved.dtype)
                        weight.copy_(Wr.T if conv else Wr)
                        curve[r] = sum(
                            float(loss_of(_hidden(call_model(model, b)), t, b, 0.0)) for b, t in zip(batches, refs)
                        ) / len(batches)
                finally:
                    weight.copy_(saved)
                curves[fqn] = curve
    finally:
        for mod, training in modes.items():
            mod.training = training
    return curves


def _site_weights(model: nn.Module, stats: CalibrationStats, example) -> dict:
    """{fqn: (stored parameter, stored (in, out))} of the sites with statistics, from the statistics' site list,
    else from a trace of `model(example)` (statistics saved before they kept one)."""
    if all(f in stats.index for f in stats.sites):
        try:
            return {
                f: (model.get_parameter(stats.index[f]["weight"]), bool(stats.index[f]["transposed"]))
                for f in stats.sites
            }
        except AttributeError:
            pass
    return {s.fqn: (s.weight, s.transposed) for s in model_sites(model, example) if s.fqn in stats.sites}
