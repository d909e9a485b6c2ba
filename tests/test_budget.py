"""lrcompile.budget: non-uniform rank allocation under a global parameter / FLOP budget."""
import pytest
import torch

from lrcompile import budget as B
from lrcompile.calibrate import CalibrationStats, SiteStats
from lrcompile.policy import load_policy


def weight(out_f, in_f, decay, seed):
    g = torch.Generator().manual_seed(seed)
    P, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=torch.float64))
    k = min(in_f, out_f)
    s = torch.exp(-decay * torch.arange(k, dtype=torch.float64))
    return (P[:, :k] * s) @ Q[:, :k].T


def cands():
    return [B.Candidate("fast", weight(40, 30, 0.5, 0), 40), B.Candidate("slow", weight(40, 30, 0.02, 1), 40),
            B.Candidate("wide", weight(24, 64, 0.1, 2), 0)]


@pytest.mark.parametrize("kind", ["params", "flops"])
@pytest.mark.parametrize("frac", [0.3, 0.5, 0.8])
def test_meets_the_budget_within_one_rank_step_per_site(kind, frac):
    cs = cands()
    for step in (1, 4):
        ranks = B.allocate(cs, {kind: frac}, None, step=step)
        spent, dense = B.budget_cost(ranks, cs, kind)
        unit = max((c.shape[0] + c.shape[1]) * step * (2 if kind == "flops" else 1) for c in cs)
        assert spent <= frac * dense + 1e-6
        assert spent >= frac * dense - unit


def test_ranks_follow_the_spectra():
    cs = [B.Candidate("fast", weight(64, 64, 0.3, 0)), B.Candidate("slow", weight(64, 64, 0.03, 1))]
    ranks = B.allocate(cs, {"params": 0.3}, None)
    assert ranks["slow"] > 3 * ranks["fast"]  # a flat spectrum needs more rank than a fast-decaying one
    # a small site with a flat spectrum is cheaper to keep dense than to approximate near break-even
    assert B.allocate(cands(), {"params": 0.4}, None)["slow"] is None


def test_whitened_spectra_change_the_allocation():
    cs = [B.Candidate("a", weight(32, 32, 0.05, 0)), B.Candidate("b", weight(32, 32, 0.05, 1))]
    plain = B.allocate(cs, {"params": 0.4}, None)
    assert abs(plain["a"] - plain["b"]) <= 1
    x = torch.randn(400, 32, dtype=torch.float64)
    st = CalibrationStats()
    for name, scale in (("a", 10.0), ("b", 0.1)):  # site a sees inputs 100x larger: its errors weigh more
        s = SiteStats(torch.zeros(32, 32, dtype=torch.float64), torch.zeros(32, dtype=torch.float64), 0)
        s.add(x * scale)
        st.sites[name] = s
    ranks = B.allocate(cs, {"params": 0.4}, st)
    assert ranks["a"] > ranks["b"]


def test_dense_when_low_rank_saves_nothing_and_full_budget():
    cs = [B.Candidate("thin", weight(64, 2, 0.0, 0)), B.Candidate("sq", weight(16, 16, 0.3, 1))]
    ranks = B.allocate(cs, {"params": 1.0}, None)
    assert ranks == {"thin": None, "sq": None}  # everything fits dense: no error left to buy
    ranks = B.allocate(cs, {"params": 0.5}, None)
    assert ranks["thin"] is None or ranks["thin"] >= 1  # break-even of 64x2 is rank 1
    assert ranks["sq"] is not None and ranks["sq"] < 8


def test_measured_error_curves_override_spectra():
    cs = cands()
    errors = {"fast": {2: 5.0, 10: 4.0}, "slow": {2: 0.01, 10: 0.0}, "wide": {2: 0.01, 10: 0.0}}
    ranks = B.allocate(cs, {"params": 0.4}, None, errors=errors)
    assert ranks["fast"] is None or ranks["fast"] > ranks["slow"]


def test_plan_ranks_counts_only_compressing_sites_and_respects_caps():
    pol = load_policy({"defaults": {"min_features": 4}, "budget": {"params": 0.5},
                       "rules": [{"match": "head", "method": "dense"},
                                 {"match": "capped", "method": "lowrank", "rank": 3},
                                 {"match": "*", "method": "lowrank"}]})
    sites = [("head", torch.randn(50, 30), None), ("capped", weight(40, 30, 0.0, 0), torch.zeros(40)),
             ("free", weight(40, 30, 0.0, 1), None), ("tiny", torch.randn(3, 30), None)]
    ranks = B.plan_ranks(pol, sites)
    assert set(ranks) == {"capped", "free"}  # dense rule and below-min_features sites do not count
    assert ranks["capped"] == 3 and ranks["free"] > 3


def test_bad_budget_is_a_one_line_error():
    from lrcompile.errors import PlanError

    with pytest.raises(PlanError, match="budget must be"):
        B.allocate(cands(), {"bytes": 0.5}, None)
