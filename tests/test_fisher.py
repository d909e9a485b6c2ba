"""First-order (Fisher) error curves: the default budget allocation's estimate of each site's end-to-end loss."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrcompile.factorize.fisher import measure_fisher
from lrcompile.factorize.sensitivity import factorised
from lrcompile.factorize.stats import CalibrationStats, SiteStats

POLICY = {
    "defaults": {"min_features": 0},
    "budget": {"params": 0.5},
    "rules": [{"match": "*", "method": "lowrank", "init": "whitened_svd"}],
}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 16)
        self.b = nn.Linear(16, 10)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _stats(model, xs) -> CalibrationStats:
    """What lrcompile.calibrate records for Tiny (without its Dynamo pass): each site's input moments, indexed."""
    st = CalibrationStats(index={n: {"weight": f"{n}.weight", "transposed": False, "bias": f"{n}.bias"} for n in "ab"})
    st.sites = {"a": SiteStats.empty(12), "b": SiteStats.empty(16)}
    with torch.no_grad():
        for x in xs:
            st.sites["a"].add(x)
            st.sites["b"].add(torch.tanh(model.a(x)))
    return st


def _loss(model, xs, refs):
    """The curves' loss: mean over sentences of 1 − cosine of the token-mean outputs."""
    return sum(float((1 - F.cosine_similarity(model(x).mean(1), r, dim=-1)).mean()) for x, r in zip(xs, refs)) / len(xs)


def test_fisher_curve_matches_the_measured_loss_of_a_small_truncation():
    """A site truncated by one rank alone: the probes' estimate agrees with the measured loss increase (the
    Gauss-Newton term is exact to second order), and the curve falls to ~0 toward full rank."""
    torch.manual_seed(0)
    model = Tiny().double()
    with torch.no_grad():  # fast-falling spectra: the tails past break-even are small perturbations
        for lin in (model.a, model.b):
            U, _, Vh = torch.linalg.svd(lin.weight, full_matrices=False)
            lin.weight.copy_((U * 0.4 ** torch.arange(Vh.shape[0])) @ Vh)
    xs = [torch.randn(8, 5, 12, dtype=torch.float64) for _ in range(2)]
    stats = _stats(model, xs)
    curves = measure_fisher(model, xs, stats, POLICY, probes=200, progress=False)
    assert set(curves) == {"a", "b"} and all(not p.requires_grad or p.grad is None for p in model.parameters())
    with torch.no_grad():
        refs = [model(x).mean(1) for x in xs]
        for fqn, r in (("a", 4), ("b", 4)):
            lin = model.get_submodule(fqn)
            saved = lin.weight.clone()
            lin.weight.copy_(factorised(saved, stats.get(fqn))(r))
            measured = _loss(model, xs, refs)
            lin.weight.copy_(saved)
            assert measured > 0
            assert curves[fqn][r] == pytest.approx(measured, rel=0.25), fqn
        assert max(curves["a"]) == 6 and curves["a"][1] > curves["a"][6]


def test_fisher_probes_average_to_the_exact_gauss_newton_term():
    """E over probes of the estimate = ½·mean_s δeᵀ H δe with δe = J Δ computed exactly (forward-mode)."""
    torch.manual_seed(1)
    model = Tiny().double()
    x = torch.randn(6, 4, 12, dtype=torch.float64)
    stats = _stats(model, [x])
    curves = measure_fisher(model, [x], stats, POLICY, probes=400, progress=False)
    W = model.a.weight.detach().clone()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def pooled(w):
        return torch.func.functional_call(model, {**params, "a.weight": w}, (x,)).mean(1)

    for r in (2, 4):
        delta = W - factorised(W, stats.get("a"))(r)
        e, de = torch.func.jvp(pooled, (W,), (delta,))
        u = e / e.norm(dim=-1, keepdim=True)
        quad = ((de.square().sum(-1) - (u * de).sum(-1) ** 2) / e.square().sum(-1)).mean() / 2
        assert curves["a"][r] == pytest.approx(float(quad), rel=0.2)
