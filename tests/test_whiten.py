"""Activation-aware factorisation (lrcompile.whiten and lowrank's whitened_svd / asvd / compensate)."""

import pytest
import torch

from lrcompile.factorize import whiten
from lrcompile.factorize.calibrate import SiteStats
from lrcompile.families.lowrank import LowRank, LowRankConfig


def stats_of(x: torch.Tensor) -> SiteStats:
    s = SiteStats(
        torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64), torch.zeros(x.shape[1], dtype=torch.float64), 0
    )
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
    plain = objective(W, LowRank.from_dense(W, None, LowRankConfig(rank=5, init="svd"), st).to_dense(), x)
    for damping in (0.0, 1e-2):
        cfg = LowRankConfig(rank=5, init=init, compensate=compensate, damping=damping)
        m = LowRank.from_dense(W, None, cfg, st)
        assert torch.isfinite(m.U).all() and torch.isfinite(m.V).all()
        if init == "whitened_svd" or compensate:  # the calibration objective never loses to plain SVD's
            assert objective(W, m.to_dense(), x) <= plain * (1 + 1e-6)
    zero = SiteStats(torch.zeros(40, 40, dtype=torch.float64), torch.zeros(40, dtype=torch.float64), 0)
    ref = LowRank.from_dense(W, None, LowRankConfig(rank=10, init="svd"), None).to_dense()
    with pytest.warns(UserWarning, match="saw no tokens"):  # zero tokens: missing statistics, said so
        m = LowRank.from_dense(W, None, LowRankConfig(rank=10, init=init, compensate=compensate), zero)
    torch.testing.assert_close(m.to_dense(), ref)  # exactly plain SVD (compensate leaves it alone)


def test_zero_token_stats_are_missing_stats():
    W = torch.randn(12, 10, dtype=torch.float64)
    st = stats_of(torch.zeros(0, 10, dtype=torch.float64))  # every row masked
    assert st.tokens == 0
    with pytest.warns(UserWarning, match="saw no tokens"):
        U, V, _ = whiten.whitened_svd(W, st, 3)
    P, S, Qh = torch.linalg.svd(W)
    torch.testing.assert_close(U @ V, (P[:, :3] * S[:3]) @ Qh[:3])


def test_eigen_fallback_when_cholesky_fails():
    x = correlated(5, 16)
    C = x.T @ x
    wh = whiten.Whitener(C, damping=0.0)  # singular, undamped
    assert wh.kind == "eigh"
    torch.testing.assert_close(wh.L @ wh.L.T, C, atol=1e-9 * float(C.diagonal().max()), rtol=0)
    A = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(wh.unright(wh.right(A)), A, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(wh.unright_t(A @ wh.L.T), A, atol=1e-6, rtol=1e-6)


def test_tiny_cholesky_pivots_take_the_eigen_path():
    # Cholesky succeeds, but with a pivot 1e-10 of the largest: numerically singular (L⁻¹ amplifies noise 1e10×)
    e = torch.ones(20, dtype=torch.float64)
    e[7] = 1e-20
    C = torch.diag(e)
    L, info = torch.linalg.cholesky_ex(C)
    assert int(info) == 0 and float(L.diagonal().min()) > 0
    wh = whiten.Whitener(C, damping=0.0)
    assert wh.kind == "eigh"
    torch.testing.assert_close(wh.L @ wh.L.T, C, atol=1e-9 * float(C.diagonal().max()), rtol=0)
    good = whiten.Whitener(C + torch.eye(20, dtype=torch.float64), damping=0.0)
    assert good.kind == "cholesky"
    torch.testing.assert_close(good.L @ good.L.T, C + torch.eye(20, dtype=torch.float64))


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
    # at damping 0 the objective is exactly the dropped tail of the whitened spectrum: ‖(W−Ŵ)Xᵀ‖ = √Σ_{i>r} σᵢ²(W L)
    s = torch.linalg.svdvals(W @ torch.linalg.cholesky(x.T @ x))
    assert errs[("whitened_svd", False)] == pytest.approx(float(s[8:].square().sum().sqrt()), rel=1e-8)
    # the report's weighted error is the same objective, relative
    m = LowRank.from_dense(W, None, LowRankConfig(rank=8, init="whitened_svd", damping=0.0), st)
    rel = whiten.weighted_error(W, m.to_dense(), st.cov)
    assert rel == pytest.approx(errs[("whitened_svd", False)] / float(torch.linalg.norm(W @ x.T)), rel=1e-3)
    assert 0 < m.kept_energy < 1


def test_exact_on_the_calibration_data_at_rank_of_the_statistics():
    W = torch.randn(30, 40, dtype=torch.float64)
    x = correlated(9, 40)  # XᵀX has rank 9: rank 9 reproduces W on every calibration row, though Ŵ ≠ W
    m = LowRank.from_dense(W, None, LowRankConfig(rank=9, init="whitened_svd", damping=0.0), stats_of(x))
    assert objective(W, m.to_dense(), x) <= 1e-6 * float(torch.linalg.norm(W @ x.T))
    assert float(torch.linalg.norm(W - m.to_dense())) > 0.1 * float(torch.linalg.norm(W))


def test_cross_moment_fits_original_outputs_from_compressed_inputs():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(20, 16, generator=g, dtype=torch.float64)
    x = correlated(400, 16, seed=1)  # the dense model's inputs at this site
    xt = x + 0.3 * torch.randn(400, 16, generator=g, dtype=torch.float64) @ torch.randn(
        16, 16, generator=g, dtype=torch.float64
    )
    st = stats_of(xt)  # inputs the compressed model feeds it, with the cross moment Σ xᵀ x̃
    st.cross = x.T @ xt

    def target_err(What):
        return float(torch.linalg.norm(xt @ What.T - x @ W.T))

    U, V, _ = whiten.whitened_svd(W, st, 16, damping=0.0)  # full rank: the least-squares map W K C̃⁻¹
    ls = torch.linalg.lstsq(xt, x @ W.T).solution.T
    torch.testing.assert_close(U @ V, ls, atol=1e-8, rtol=1e-8)
    for r in (4, 8):
        U, V, _ = whiten.whitened_svd(W, st, r, damping=0.0)
        ours = target_err(U @ V)
        plain = whiten.whitened_svd(W, stats_of(xt), r, damping=0.0)  # SVD-LLM on x̃, blind to x
        assert ours < 0.95 * target_err(plain[0] @ plain[1])
        Ur = torch.randn(20, r, generator=g, dtype=torch.float64)  # no rank-r map does better (random probes)
        for _ in range(3):
            What = (U + 0.01 * Ur) @ V
            assert ours <= target_err(What)
        # compensation (fixed V) with the cross moment reaches at least as far as from plain SVD's U
        P, S, Qh = torch.linalg.svd(W, full_matrices=False)
        Uc = whiten.compensate(W, P[:, :r] * S[:r], Qh[:r], st, damping=0.0)
        assert target_err(Uc @ Qh[:r]) < target_err((P[:, :r] * S[:r]) @ Qh[:r])
    x_same = stats_of(x)
    x_same.cross = x.T @ x  # x̃ = x: exactly SVD-LLM
    a, b = whiten.whitened_svd(W, x_same, 5), whiten.whitened_svd(W, stats_of(x), 5)
    torch.testing.assert_close(a[0] @ a[1], b[0] @ b[1], atol=1e-9, rtol=1e-9)


def test_compensate_warns_when_redundant_or_without_statistics():
    W = torch.randn(18, 14, dtype=torch.float64)
    st = stats_of(correlated(300, 14))
    U, V, _ = whiten.whitened_svd(W, st.cov, 4)
    with pytest.warns(UserWarning, match="changed nothing"):
        Uc = whiten.compensate(W, U, V, st.cov)
    torch.testing.assert_close(Uc, U)
    with pytest.warns(UserWarning, match="no usable calibration statistics"):
        assert torch.equal(whiten.compensate(W, U, V, torch.zeros(14, 14, dtype=torch.float64)), U)


def test_factors_are_balanced():
    W = torch.randn(30, 20, dtype=torch.float64)
    m = LowRank.from_dense(
        W, None, LowRankConfig(rank=6, init="whitened_svd", compensate=True), stats_of(correlated(300, 20))
    )
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


def test_lowrank_passes_the_site_statistics_whole():
    """from_dense hands whiten the SiteStats, not only its C: a cross moment (statistics from a compressed
    model) changes the target, and compensate refits with it too."""
    g = torch.Generator().manual_seed(7)
    W = torch.randn(20, 16, generator=g, dtype=torch.float64)
    x = correlated(300, 16, seed=2)
    xt = x + 0.3 * torch.randn(300, 16, generator=g, dtype=torch.float64) @ torch.randn(
        16, 16, generator=g, dtype=torch.float64
    )
    st = stats_of(xt)
    st.cross = x.T @ xt
    target = lambda What: float(torch.linalg.norm(xt @ What.detach().T - x @ W.T))  # noqa: E731
    m = LowRank.from_dense(W, None, LowRankConfig(rank=6, init="whitened_svd"), st)
    U, V, _ = whiten.whitened_svd(W, st, 6)
    torch.testing.assert_close(m.to_dense(), U @ V, atol=1e-10, rtol=1e-10)
    blind = whiten.whitened_svd(W, st.cov, 6)  # C only: SVD-LLM on x̃, blind to x
    assert target(m.to_dense()) < 0.95 * target(blind[0] @ blind[1])
    c = LowRank.from_dense(W, None, LowRankConfig(rank=6, init="svd", compensate=True), st)
    P, S, Qh = torch.linalg.svd(W, full_matrices=False)
    V0 = S[:6].sqrt()[:, None] * Qh[:6]
    Uc = whiten.compensate(W, P[:, :6] * S[:6].sqrt(), V0, st)
    torch.testing.assert_close(c.to_dense(), Uc @ V0, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("init", ["whitened_svd", "asvd"])
def test_zero_token_site_is_missing_and_named(init):
    from lrcompile.factorize.calibrate import CalibrationStats

    W = torch.randn(14, 11, dtype=torch.float64)
    cal = CalibrationStats({"enc.fc": stats_of(torch.zeros(0, 11, dtype=torch.float64))})
    with pytest.warns(UserWarning, match=r"site 'enc\.fc'.*saw no tokens.*plain svd") as rec:
        m = LowRank.from_dense(W, None, LowRankConfig(rank=4, init=init, compensate=True), cal.get("enc.fc"))
    assert m.init_used == "svd"
    assert any("compensate" in str(w.message) and "'enc.fc'" in str(w.message) for w in rec)
    ref = LowRank.from_dense(W, None, LowRankConfig(rank=4, init="svd"), None)
    torch.testing.assert_close(m.to_dense(), ref.to_dense(), atol=1e-12, rtol=1e-12)


def test_compensate_without_statistics_warns_naming_the_site():
    import torch.nn.functional as F
    from torch import nn

    import lrcompile
    from lrcompile.families.base import site_scope

    W = torch.randn(12, 9, dtype=torch.float64)
    with site_scope("blk.proj"), pytest.warns(UserWarning, match=r"site 'blk\.proj'.*compensate.*no calibration"):
        m = LowRank.from_dense(W, None, LowRankConfig(rank=3, compensate=True), None)
    ref = LowRank.from_dense(W, None, LowRankConfig(rank=3), None)
    torch.testing.assert_close(m.to_dense(), ref.to_dense())

    class M(nn.Module):  # the eager rewrite names its sites for the families
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(10, 10)

        def forward(self, x):
            return F.relu(self.fc(x))

    pol = {
        "defaults": {"min_features": 0},
        "rules": [{"match": "*", "method": "lowrank", "rank": 3, "compensate": True}],
    }
    with pytest.warns(UserWarning, match=r"site 'fc'.*compensate: true has no calibration statistics"):
        lrcompile.rewrite(M(), pol, (torch.randn(2, 10),), progress=False)


def _svd_llm(W, C, rank, damping):
    """The textbook SVD-LLM solution, float64: trunc_r(W L) L⁻¹ with L = chol(C + damping)."""
    L = torch.linalg.cholesky(whiten.damped(C, damping))
    P, S, Qh = torch.linalg.svd(W @ L, full_matrices=False)
    return (P[:, :rank] * S[:rank]) @ torch.linalg.solve_triangular(L, Qh[:rank], upper=False, left=False), S


@pytest.mark.parametrize("shape", [(12, 30), (30, 12), (16, 16)])
def test_basis_is_the_svd_llm_solution_at_every_rank(shape):
    W = torch.randn(*shape, dtype=torch.float64)
    C = (lambda x: x.T @ x / 300)(correlated(300, shape[1]))
    b = whiten.whitened_basis(W, C, 1e-2)
    for r in (1, 3, min(shape) - 1, min(shape)):
        want, S = _svd_llm(W, C, r, 1e-2)
        torch.testing.assert_close(b.A[:, :r] @ b.rows(W, r), want, atol=1e-8, rtol=1e-8)
        U, V, kept = whiten.whitened_svd(W, C, r, 1e-2)
        torch.testing.assert_close(U @ V, want, atol=1e-8, rtol=1e-8)
        assert kept == pytest.approx(float(S[:r].square().sum() / S.square().sum()), rel=1e-9)
    torch.testing.assert_close(b.energy[: min(shape)], S.square(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shape", [(40, 90), (90, 40)])
def test_large_sites_factorise_in_float32_to_the_same_answer(shape, monkeypatch):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(*shape, generator=g)
    C = (lambda x: x.T @ x / 500)(correlated(500, shape[1]))
    exact = {r: _svd_llm(W.double(), C, r, 1e-2)[0] for r in (5, 20)}
    monkeypatch.setattr(whiten, "FLOAT32_ABOVE", 100)  # this site counts as large
    b = whiten.whitened_basis(W, C, 1e-2)
    assert b.A.dtype == torch.float32 and b.energy.dtype == torch.float64
    x = correlated(500, shape[1])
    for r, want in exact.items():
        got = (b.A[:, :r] @ b.rows(W, r)).double()
        # the same calibration objective to float32 precision
        e_got, e_want = objective(W.double(), got, x), objective(W.double(), want, x)
        assert e_got == pytest.approx(e_want, rel=1e-4)


@pytest.mark.parametrize("shape", [(20, 32), (32, 20)])
def test_report_weighted_error_from_the_energies_equals_the_product(shape):
    """The report's weighted error of a whitened-SVD site comes from the factorisation's energies and the Frobenius
    error (no out × in² product), and equals the direct tr(Δ C Δᵀ) / tr(W C Wᵀ) at any damping."""
    W = torch.randn(*shape, dtype=torch.float64)
    x = correlated(300, shape[1])
    st = stats_of(x)
    for damping in (0.0, 1e-2, 0.3):
        m = LowRank.from_dense(W, None, LowRankConfig(rank=6, init="whitened_svd", damping=damping), st)
        rel = float(torch.linalg.norm(W - m.to_dense()) / torch.linalg.norm(W))
        fast = whiten._from_energy(m, W, st, rel)
        assert fast is not None
        assert fast == pytest.approx(whiten.weighted_error(W, m.to_dense(), st.cov), rel=1e-4)
        assert whiten.site_quality(m, W, st, rel_err=rel)["weighted_error"] == fast
    m.energy_total = "planted"  # a factor-cache entry is untrusted: the slow way then
    assert whiten._from_energy(m, W, st, rel) is None
    assert whiten.site_quality(m, W, st, rel_err=rel)["weighted_error"] > 0
