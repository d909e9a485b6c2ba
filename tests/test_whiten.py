"""Activation-aware factorisation (lrcompile.whiten and lowrank's whitened_svd / asvd / compensate)."""
import pytest
import torch

from lrcompile import whiten
from lrcompile.calibrate import SiteStats
from lrcompile.structures.lowrank import LowRank, LowRankConfig


def stats_of(x: torch.Tensor) -> SiteStats:
    s = SiteStats(torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64), torch.zeros(x.shape[1], dtype=torch.float64), 0)
    s.add(x)
    return s


def correlated(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix.T + 0.3


def objective(W, W_hat, x):
    return float(torch.linalg.norm((W - W_hat.detach()) @ x.T))


@pytest.mark.parametrize("init", ["whitened_svd", "asvd"])
def test_exact_at_full_rank(init):
    W = torch.randn(19, 13, dtype=torch.float64)
    st = stats_of(correlated(200, 13))
    m = LowRank.from_dense(W, None, LowRankConfig(rank=13, init=init), st)
    torch.testing.assert_close(m.to_dense(), W, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("init", ["whitened_svd", "asvd"])
@pytest.mark.parametrize("compensate", [False, True])
def test_rank_deficient_stats_stay_finite(init, compensate):
    W = torch.randn(24, 40, dtype=torch.float64)
    x = correlated(7, 40)  # 7 tokens for 40 channels: XᵀX has rank 7
    x[:, 5] = 0  # a dead channel
    st = stats_of(x)
    for damping in (0.0, 1e-2):
        cfg = LowRankConfig(rank=10, init=init, compensate=compensate, damping=damping)
        m = LowRank.from_dense(W, None, cfg, st)
        assert torch.isfinite(m.U).all() and torch.isfinite(m.V).all()
    zero = SiteStats(torch.zeros(40, 40, dtype=torch.float64), torch.zeros(40, dtype=torch.float64), 0)
    m = LowRank.from_dense(W, None, LowRankConfig(rank=10, init=init, compensate=compensate), zero)
    assert torch.isfinite(m.to_dense()).all()


def test_eigen_fallback_when_cholesky_fails():
    x = correlated(5, 16)
    wh = whiten.Whitener(x.T @ x, damping=0.0)  # singular, undamped: Cholesky fails
    assert wh.kind == "eigh"
    A = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(wh.unright(wh.right(A)), A, atol=1e-6, rtol=1e-6)


def test_whitened_beats_plain_svd_on_the_calibration_objective():
    W = torch.randn(32, 48, dtype=torch.float64)
    x = correlated(500, 48)
    st = stats_of(x)
    errs = {}
    for init, comp in [("svd", False), ("svd", True), ("asvd", False), ("whitened_svd", False)]:
        m = LowRank.from_dense(W, None, LowRankConfig(rank=8, init=init, compensate=comp, damping=0.0), st)
        errs[(init, comp)] = objective(W, m.to_dense(), x)
    assert errs[("whitened_svd", False)] <= errs[("svd", False)] * 0.9
    assert errs[("whitened_svd", False)] <= min(errs.values()) * (1 + 1e-6)  # SVD-LLM is the optimum
    assert errs[("svd", True)] < errs[("svd", False)]  # least-squares refit of U helps given V
    # the report's weighted error is the same objective, relative
    m = LowRank.from_dense(W, None, LowRankConfig(rank=8, init="whitened_svd", damping=0.0), st)
    rel = whiten.weighted_error(W, m.to_dense(), st.cov)
    assert rel == pytest.approx(errs[("whitened_svd", False)] / float(torch.linalg.norm(W @ x.T)), rel=1e-3)
    assert 0 < m.kept_energy < 1


def test_factors_are_balanced():
    W = torch.randn(30, 20, dtype=torch.float64)
    m = LowRank.from_dense(W, None, LowRankConfig(rank=6, init="whitened_svd", compensate=True), stats_of(correlated(300, 20)))
    torch.testing.assert_close(torch.linalg.vector_norm(m.U, dim=0), torch.linalg.vector_norm(m.V, dim=1))


def test_without_stats_falls_back_to_svd_with_a_warning():
    W = torch.randn(16, 12)
    with pytest.warns(UserWarning, match="no calibration statistics.*plain svd"):
        m = LowRank.from_dense(W, None, LowRankConfig(rank=4, init="whitened_svd"), None)
    ref = LowRank.from_dense(W, None, LowRankConfig(rank=4, init="svd"), None)
    torch.testing.assert_close(m.to_dense(), ref.to_dense())
    assert m.init_used == "svd"


def test_config_validation():
    with pytest.raises(ValueError, match="compensate"):
        LowRankConfig(rank=2, compensate="yes").validate()
    with pytest.raises(ValueError, match="damping"):
        LowRankConfig(rank=2, damping=-1).validate()
    LowRankConfig(rank=2, init="asvd").validate()
