"""Structured families: Monarch, BTT, BLAST — math, projections, init, and the compile / rewrite paths."""

import copy
import dataclasses
import math

import pytest
import sympy
import torch
from conftest import compile_eager

import lrcompile
from lrcompile.errors import PolicyError
from lrcompile.families import FAMILIES
from lrcompile.families.blast import CHECK, EXACT, ITERS, fit_blast
from lrcompile.families.btt import even_split
from lrcompile.lifecycle.param_groups import param_groups
from lrcompile.policy.load import load_policy

D = torch.float64
CFGS = {"monarch": {"blocks": 3}, "btt": {"rank": 2}, "blast": {"blocks": [3, 2], "rank": 4}}
# non-power-of-two shapes; Monarch's include sizes that b does not divide (padding and slicing)
SHAPES = {
    "monarch": [(30, 45), (20, 17), (45, 30)],
    "btt": [(30, 42), (24, 36), (42, 30)],
    "blast": [(30, 42), (24, 36), (42, 30)],
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make(name, in_f, out_f, dtype=D, init="random", **over):
    cls = FAMILIES[name]
    cfg = cls.Config(**{**CFGS[name], "init": init, **over}).resolve(in_f, out_f)
    return cls, cfg, cls.init(in_f, out_f, cfg, dtype=dtype)


CASES = [(n, i, o) for n in CFGS for (i, o) in SHAPES[n]]


def blockwise_reference(name, m):
    """The dense matrix assembled block by block with Python loops, independent of the module."""
    if name == "blast":
        U, V, s = m.U, m.V, m.s
        rows = [
            torch.cat([U[i] @ torch.diag(s[i, j]) @ V[j].T for j in range(V.shape[0])], 1) for i in range(U.shape[0])
        ]
        return torch.cat(rows, 0)
    a1, a0, c0, t = m.W1.shape
    # sub-block (c₀, a₁) maps input block a₁ (a₀ features) to output block c₀ (c₁ features) through t channels
    rows = [torch.cat([m.W2[i, j].T @ m.W1[j, :, i, :].T for j in range(a1)], 1) for i in range(c0)]
    return torch.cat(rows, 0)[: m.out_features, : m.in_features]


@pytest.mark.parametrize("name,in_f,out_f", CASES)
def test_functional_equals_dense_matmul(name, in_f, out_f):
    """`functional` against `to_dense()`, which is built from the factors without `functional` (einsum)."""
    cls, cfg, m = make(name, in_f, out_f)
    x = torch.randn(2, 5, in_f, dtype=D)  # leading batch dims
    b = torch.randn(out_f, dtype=D)
    dense = m.to_dense()
    assert dense.shape == (out_f, in_f)
    torch.testing.assert_close(dense, blockwise_reference(name, m), atol=1e-13, rtol=1e-13)
    y = cls.functional(x, None, b, *m.tensors())
    assert y.shape == (2, 5, out_f) and y.is_contiguous()
    torch.testing.assert_close(y, x @ dense.T + b, atol=1e-12, rtol=1e-12)
    assert cls.param_count(in_f, out_f, cfg) == m.params()
    assert cls.flops_per_token(in_f, out_f, cfg) == 2 * m.params()
    tok = sympy.Symbol("tokens", positive=True, integer=True)
    assert sympy.simplify(cls.flops(in_f, out_f, cfg) - 2 * m.params() * tok) == 0


def test_monarch_pads_and_slices():
    """20 → 17 with 3 blocks: cores sized for 21 → 18; padded inputs contribute nothing, padded outputs are cut."""
    cls, cfg, m = make("monarch", 20, 17)
    assert cls.geometry(20, 17, cfg) == (3, 7, 3, 6, 2) and m.W1.shape == (3, 7, 3, 2)
    x = torch.randn(4, 20, dtype=D)
    full = torch.einsum("katc,azkt->kcaz", m.W2, m.W1).reshape(18, 21)  # the padded map
    torch.testing.assert_close(m(x), torch.nn.functional.pad(x, (0, 1)) @ full.T[:, :17], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name,in_f,out_f", [c for c in CASES if c[0] != "blast"])
def test_exact_recovery_and_optimality(name, in_f, out_f):
    """Per-sub-block SVD: exact on family members; on any W its error is the sum of the blocks' SVD tails."""
    cls, cfg, m = make(name, in_f, out_f)
    W = m.to_dense()
    rec = cls.from_dense(W, None, dataclasses.replace(cfg, init="svd"))
    torch.testing.assert_close(rec.to_dense(), W, atol=1e-10, rtol=1e-10)
    a1, a0, c0, c1, t = cls.geometry(in_f, out_f, cfg)
    R = torch.randn(out_f, in_f, dtype=D)
    proj = cls.from_dense(R, None, rec.cfg).to_dense()
    pad = torch.nn.functional.pad(R, (0, a1 * a0 - in_f, 0, c0 * c1 - out_f))
    S = torch.linalg.svdvals(pad.reshape(c0, c1, a1, a0).permute(0, 2, 1, 3))
    with torch.no_grad():
        assert math.isclose(float((R - proj).norm()), float(S[..., t:].norm()), rel_tol=1e-9)


@pytest.mark.parametrize("name", ["monarch", "btt"])
def test_beats_svd_on_block_low_rank(name):
    """A matrix whose sub-blocks are low rank (here: in the family) is exact for Monarch/BTT, and far from
    exact for plain SVD at the same parameter count."""
    in_f, out_f = 48, 60
    cls, cfg, m = make(name, in_f, out_f, blocks=4) if name == "monarch" else make(name, in_f, out_f)
    W = m.to_dense()
    err = (W - cls.from_dense(W, None, dataclasses.replace(cfg, init="svd")).to_dense()).norm() / W.norm()
    r = cls.param_count(in_f, out_f, cfg) // (in_f + out_f)
    S = torch.linalg.svdvals(W)
    svd_err = S[r:].norm() / S.norm()
    assert err < 1e-10 and svd_err > 0.1


def blast_member(out_f, in_f, b1, b2, r, seed):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(b1, out_f // b1, r, generator=g, dtype=D)
    V = torch.randn(b2, in_f // b2, r, generator=g, dtype=D)
    s = torch.randn(b1, b2, r, generator=g, dtype=D)
    return torch.einsum("ipr,ijr,jqr->ipjq", U, s, V).reshape(out_f, in_f)


def blast_dense(fit):
    b1, p, _ = fit.U.shape
    b2, q, _ = fit.V.shape
    return torch.einsum("ipr,ijr,jqr->ipjq", fit.U, fit.s, fit.V).reshape(b1 * p, b2 * q)


def svd_error(W, rank):
    S = torch.linalg.svdvals(W)
    return float(S[rank:].norm() / S.norm())


def equal_params_rank(in_f, out_f, b1, b2, r):
    """The low rank with BLAST's parameter count r(in + out + b₁b₂)."""
    return math.floor(r * (in_f + out_f + b1 * b2) / (in_f + out_f))


def test_blast_fit_recovers_members_and_never_loses_to_svd():
    """The fit is non-convex (no closed form): members are recovered closely though not always to round-off;
    the low-rank corner of the family (s = 1) exactly."""
    g = torch.Generator().manual_seed(2)
    L = torch.randn(40, 3, dtype=D, generator=g) @ torch.randn(3, 36, dtype=D, generator=g)
    assert (L - blast_dense(fit_blast(L, 4, 3, 3, progress=False))).norm() / L.norm() < 1e-8
    W = blast_member(36, 24, 3, 3, 4, seed=1)
    fit = fit_blast(W, 3, 3, 4, progress=False)
    assert (W - blast_dense(fit)).norm() / W.norm() < 1e-2
    assert fit.rel_error == pytest.approx(float((W - blast_dense(fit)).norm() / W.norm()), rel=1e-6)
    # deterministic: the same fit twice is bitwise the same
    fit2 = fit_blast(W, 3, 3, 4, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(fit[:3], fit2[:3]))
    # members: far below plain SVD with the same number of parameters (rank ⌊r(in+out+b₁b₂)/(in+out)⌋)
    for out_f, in_f, b1, b2, r in [(42, 30, 3, 2, 5), (48, 48, 8, 8, 3)]:
        W = blast_member(out_f, in_f, b1, b2, r, seed=1)
        err = float((W - blast_dense(fit_blast(W, b1, b2, r, progress=False))).norm() / W.norm())
        assert err < 0.25 * svd_error(W, equal_params_rank(in_f, out_f, b1, b2, r))
    # on an unstructured matrix theory gives no win at equal parameters; what holds is the fit's invariant:
    # it starts from the rank-r SVD (s = 1) and never returns worse than that — plain SVD at the same rank
    R = torch.randn(40, 36, dtype=D, generator=torch.Generator().manual_seed(3))
    err = (R - blast_dense(fit_blast(R, 4, 3, 6, progress=False))).norm() / R.norm()
    assert err <= svd_error(R, 6) + 1e-12


def test_blast_fit_stops_early():
    """The exactness stop on members, the tolerance stop on an unstructured matrix, the cap when neither fires."""
    W = blast_member(48, 48, 8, 8, 3, seed=1)
    fit = fit_blast(W, 8, 8, 3, progress=False)
    assert fit.rel_error < EXACT and fit.iterations < ITERS // 4  # 37 iterations measured
    R = torch.randn(40, 36, dtype=D, generator=torch.Generator().manual_seed(3))
    assert fit_blast(R, 4, 3, 6, progress=False, tol=1.0).iterations == CHECK  # first check point stops it
    default = fit_blast(R, 4, 3, 6, progress=False)
    assert CHECK < default.iterations < ITERS
    capped = fit_blast(R, 4, 3, 6, progress=False, tol=0.0, iters=30)
    assert capped.iterations == 30 and capped.rel_error > default.rel_error


# --- activation-aware projection (init: whitened_svd) ---------------------------------------------------------
WHITE = {
    "monarch": ((36, 45), {"blocks": 3}),
    "btt": ((36, 42), {"rank": 2}),
    "blast": ((36, 42), {"blocks": 3, "rank": 5}),
}


def correlated_inputs(in_f, block, n=4000, cross=0.3, seed=0):
    """Tokens whose channels have scales over two decades, mixed strongly inside each block of `block`
    channels and weakly (`cross`) across blocks."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, in_f, dtype=D)[torch.randperm(in_f, generator=g)]
    mix = torch.block_diag(
        *[torch.randn(k, k, dtype=D, generator=g) for k in [min(block, in_f - j) for j in range(0, in_f, block)]]
    )
    mix = mix + cross * torch.randn(in_f, in_f, dtype=D, generator=g) / math.sqrt(in_f)
    return (torch.randn(n, in_f, dtype=D, generator=g) * scales) @ mix


def stats_of(X):
    from lrcompile.factorize.calibrate import SiteStats

    return SiteStats(X.T @ X, X.abs().sum(0), X.shape[0])


def weighted(W, W_hat, X):
    W_hat = W_hat.detach()
    return float(((W - W_hat) @ X.T).norm() / (W @ X.T).norm())


def input_block(name, in_f, out_f, cfg):
    return (
        FAMILIES[name].geometry(in_f, out_f, cfg)[1] if name != "blast" else in_f // cfg.resolve(in_f, out_f).blocks[1]
    )


@pytest.mark.parametrize("name", list(WHITE))
def test_whitened_beats_plain_on_the_weighted_objective(name):
    (in_f, out_f), opts = WHITE[name]
    cls = FAMILIES[name]
    cfg = cls.Config(**opts, init="whitened_svd")
    X = correlated_inputs(in_f, input_block(name, in_f, out_f, cfg))
    W = torch.randn(out_f, in_f, dtype=D)
    white = cls.from_dense(W, None, cfg, stats_of(X))
    plain = cls.from_dense(W, None, dataclasses.replace(cfg, init="svd"))
    assert white.init_used == "whitened_svd"
    e_white, e_plain = weighted(W, white.to_dense(), X), weighted(W, plain.to_dense(), X)
    assert e_white < 0.8 * e_plain
    # ... and loses on the plain Frobenius objective, which plain svd minimises (BLAST: approximately)
    assert (W - white.to_dense()).norm() > (W - plain.to_dense()).norm()


@pytest.mark.parametrize("name", ["monarch", "btt"])
def test_whitened_is_the_block_optimum_for_block_diagonal_statistics(name):
    """With uncorrelated input blocks (C exactly block-diagonal) the block whitener is exact: the weighted
    error tr(Δ C Δᵀ) equals the closed form, the summed tails of the whitened sub-blocks' spectra."""
    from lrcompile.factorize.calibrate import SiteStats

    (in_f, out_f), opts = WHITE[name]
    cls = FAMILIES[name]
    cfg = cls.Config(**opts, init="whitened_svd", damping=0.0)
    a1, a0, c0, c1, t = cls.geometry(in_f, out_f, cfg)
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(a0, a0, dtype=D, generator=g) * torch.logspace(-1, 1, a0, dtype=D) for _ in range(a1)]
    C = torch.block_diag(*[p @ p.T for p in parts])[:in_f, :in_f]
    W = torch.randn(out_f, in_f, dtype=D)
    with torch.no_grad():
        W_hat = cls.from_dense(W, None, cfg, SiteStats(C, torch.ones(in_f, dtype=D), 1)).to_dense()
    Cp = torch.block_diag(*[p @ p.T for p in parts])  # padded coordinates: any positive block (W is 0 there)
    pad = torch.nn.functional.pad(W, (0, a1 * a0 - in_f, 0, c0 * c1 - out_f))
    blocks = pad.reshape(c0, c1, a1, a0).permute(0, 2, 1, 3)
    tails = sum(
        float(
            torch.linalg.svdvals(
                blocks[i, j] @ torch.linalg.cholesky(Cp[j * a0 : (j + 1) * a0, j * a0 : (j + 1) * a0])
            )[t:]
            .square()
            .sum()
        )
        for i in range(c0)
        for j in range(a1)
    )
    got = float((((W - W_hat) @ C) * (W - W_hat)).sum())
    assert got == pytest.approx(tails, rel=1e-9)


@pytest.mark.parametrize(
    "name,opts", [("monarch", {"blocks": 1}), ("btt", {"rank": 6}), ("blast", {"blocks": 3, "rank": 36})]
)
def test_whitened_full_rank_is_exact_and_no_stats_falls_back(name, opts):
    in_f, out_f = 36, 42
    cls = FAMILIES[name]
    cfg = cls.Config(**opts, init="whitened_svd")
    X = correlated_inputs(in_f, 12)
    W = torch.randn(out_f, in_f, dtype=D)
    torch.testing.assert_close(cls.from_dense(W, None, cfg, stats_of(X)).to_dense(), W, atol=1e-9, rtol=1e-9)
    with pytest.warns(UserWarning, match=f"{name} init 'whitened_svd' has no calibration statistics.*plain svd"):
        fallback = cls.from_dense(W, None, cfg, None)
    plain = cls.from_dense(W, None, dataclasses.replace(cfg, init="svd"))
    assert fallback.init_used == "svd"
    assert all(torch.equal(a, b) for a, b in zip(fallback.tensors(), plain.tensors()))


def test_whitened_through_rewrite_with_calibration():
    """The policy path: calibrate → rewrite with `init: whitened_svd`; the report notes the weighted error."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(36, 42))
    X = correlated_inputs(36, 12).float()
    stats = lrcompile.calibrate(model, [X[i : i + 500] for i in range(0, 2000, 500)], progress=False)
    pol = {
        "defaults": {"min_features": 0},
        "rules": [{"match": "*", "method": "btt", "rank": 2, "init": "whitened_svd"}],
    }
    W = model[0].weight.detach().double().clone()
    white = lrcompile.rewrite(copy.deepcopy(model), pol, (X[:4],), calibration=stats)
    with pytest.warns(UserWarning, match="btt init 'whitened_svd' has no calibration statistics"):
        plain = lrcompile.rewrite(copy.deepcopy(model), pol, (X[:4],))
    assert "without calibration statistics: used svd" in " ".join(plain.lrcompile_report.rows[("linear", "0")].notes)
    assert white[0].init_used == "whitened_svd" and plain[0].init_used == "svd"
    Xd = X.double()
    assert weighted(W, white[0].to_dense().double(), Xd) < 0.8 * weighted(W, plain[0].to_dense().double(), Xd)
    row = white.lrcompile_report.rows[("linear", "0")]
    assert row.weighted_error == pytest.approx(weighted(W, white[0].to_dense().double(), Xd[:2000]), rel=1e-3)


@pytest.mark.parametrize("name", list(CFGS))
def test_gradcheck(name):
    in_f, out_f = SHAPES[name][1]
    cls, cfg, m = make(name, in_f, out_f)
    x = torch.randn(3, in_f, dtype=D, requires_grad=True)
    b = torch.randn(out_f, dtype=D, requires_grad=True)
    ts = [t.detach().clone().requires_grad_(t.numel() > 0) for t in m.tensors()]
    assert torch.autograd.gradcheck(lambda x, b, *ts: cls.functional(x, None, b, *ts), (x, b, *ts))


@pytest.mark.parametrize("name", list(CFGS))
def test_bf16_forward_backward(name):
    in_f, out_f = SHAPES[name][0]
    cls, cfg, m = make(name, in_f, out_f, dtype=torch.float32)
    x = torch.randn(4, 7, in_f)
    ref = m(x)
    m16 = m.to(torch.bfloat16)
    x16 = x.bfloat16().requires_grad_()
    y = m16(x16)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()) < 3e-2
    y.float().pow(2).sum().backward()
    assert x16.grad is not None and all(p.grad is not None for p in m16.parameters())
    # from dense in bf16: factors come out in bf16
    W = torch.randn(out_f, in_f).bfloat16()
    assert all(t.dtype == torch.bfloat16 for t in cls.from_dense(W, None, cls.Config(**CFGS[name])).tensors())


# μP at 96 → 120, by hand: std = (1/√fan_in)·min(1, √(fan_out/fan_in)), Adam multiplier
# (in / fan_in) / number of cores for width-growing cores; BLAST's coupling s (fan-in b₂, fixed) trains at 1.0.
#   Monarch b=4: a₀ = 24, c₁ = 30, t = 6.  W1: 24 → c₀·t = 24; W2: a₁·t = 24 → 30.
#   BTT t=2: 96 = 8·12, 120 = 10·12.  W1: 12 → c₀·t = 20; W2: a₁·t = 16 → 12.
#   BLAST b=4, r=16: p = 30, q = 24.  V: 24 → 16; s: 4 → 4; U: 16 → 30.
MUP = {
    "monarch": ({"blocks": 4}, {"W1": ((24, 24), 0.2041241, 2.0), "W2": ((24, 30), 0.2041241, 2.0)}),
    "btt": ({"rank": 2}, {"W1": ((12, 20), 0.2886751, 4.0), "W2": ((16, 12), 0.2165064, 3.0)}),
    "blast": (
        {"blocks": 4, "rank": 16},
        {"V": ((24, 16), 0.1666667, 4 / 3), "s": ((4, 4), 0.5, 1.0), "U": ((16, 30), 0.25, 2.0)},
    ),
}


@pytest.mark.parametrize("name", list(MUP))
def test_random_init_scale_and_lr_multipliers(name):
    in_f, out_f = 96, 120
    opts, expected = MUP[name]
    cls, cfg, m = make(name, in_f, out_f, dtype=torch.float32, **opts)
    assert m._fans() == {n: fans for n, (fans, _, _) in expected.items()}
    assert m.lr_multipliers() == pytest.approx({n: mult for n, (_, _, mult) in expected.items()})
    for n, (_, std, _) in expected.items():
        p = getattr(m, n).detach()
        tol = 4 / math.sqrt(2 * p.numel())  # 4σ of a sample std
        assert float(p.std()) == pytest.approx(std, rel=tol), n
        assert abs(float(p.mean())) < 4 * std / math.sqrt(p.numel()), n
    x = torch.randn(512, in_f)
    with torch.no_grad():
        ratio = float(m(x).var() / x.var())
    assert 0.05 < ratio <= 1.2  # μP: never louder than the input, not vanishing
    svd = cls.from_dense(torch.randn(out_f, in_f), None, cls.Config(**opts))
    assert set(svd.lr_multipliers().values()) == {1.0}  # projected factors fine-tune at the dense rate


def test_param_groups_are_generic():
    cls, cfg, m = make("btt", 24, 36, dtype=torch.float32)
    model = torch.nn.Sequential(torch.nn.Linear(5, 24), m, torch.nn.Linear(36, 3))
    model[2].weight.requires_grad_(False)
    groups = param_groups(model, 1e-3)
    seen = [p for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(seen) == len(trainable) and {id(p) for p in seen} == {id(p) for p in trainable}
    assert groups[0]["lr_multiplier"] == 1.0 and groups[0]["lr"] == 1e-3
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for n, v in m.lr_multipliers().items():
        assert lr_of[id(getattr(m, n))] == pytest.approx(1e-3 * v)
    torch.optim.Adam(groups)  # valid optimizer groups


def test_config_validation_and_resolution():
    with pytest.raises(PolicyError, match=r"<policy>.*rule 1.*monarch blocks must be an int"):
        load_policy("rules:\n  - match: '*'\n    method: monarch\n    blocks: 2.5\n")
    with pytest.raises(PolicyError, match=r"rule 1.*unknown option 'rnak'"):
        load_policy({"rules": [{"match": "*", "method": "btt", "rnak": 4}]})
    with pytest.raises(PolicyError, match="tensor-train rank, an int"):
        load_policy({"rules": [{"match": "*", "method": "btt", "rank": 0.5}]})
    with pytest.raises(PolicyError, match=r"<policy>:4: rule 1.*btt cores must be 2 .*got 3$"):
        load_policy("rules:\n  - match: '*'\n    method: btt\n    cores: 3\n    rank: 2\n")
    assert load_policy({"rules": [{"match": "*", "method": "btt", "rank": 2, "cores": 2}]}).rules[0].config.cores == 2
    with pytest.raises(PolicyError, match="damping must be a non-negative number"):
        load_policy({"rules": [{"match": "*", "method": "monarch", "damping": -1}]})
    with pytest.raises(PolicyError, match="init must be one of svd, whitened_svd, random"):
        load_policy({"rules": [{"match": "*", "method": "blast", "rank": 4, "init": "asvd"}]})
    with pytest.raises(PolicyError, match="blocks must be an int b >= 1 or a pair"):
        load_policy({"rules": [{"match": "*", "method": "blast", "blocks": [2, 2, 2], "rank": 4}]})
    with pytest.raises(PolicyError, match="needs a 'rank'"):
        load_policy({"rules": [{"match": "*", "method": "blast"}]})
    B = FAMILIES["blast"].Config
    # float rank: ⌊f·in·out/(in+out+b₁b₂)⌋
    assert B(blocks=[2, 3], rank=0.5).resolve(30, 40).rank == math.floor(0.5 * 30 * 40 / (30 + 40 + 6))
    assert B(blocks=4, rank=10_000).resolve(32, 40).rank == 32
    with pytest.raises(ValueError, match=r"do not divide \(out, in\) = \(42, 30\)"):
        B(blocks=4, rank=3).resolve(30, 42)
    T = FAMILIES["btt"].Config
    assert even_split(768, "in_features") == (24, 32)
    c = T(rank=100).resolve(24, 36)
    assert (c.in_factors, c.out_factors, c.rank) == ([4, 6], [6, 6], 6)  # rank capped at min(a₀, c₁)
    with pytest.raises(ValueError, match="in_features 31 is prime"):
        T(rank=2).resolve(31, 36)
    with pytest.raises(ValueError, match="multiply to 20, not in_features 24"):
        T(rank=2, in_factors=[4, 5]).resolve(24, 36)
    with pytest.raises(ValueError, match="exceeds min"):
        FAMILIES["monarch"].Config(blocks=8).resolve(6, 40)
    # Monarch's published size: 2n²/b on a square map
    assert FAMILIES["monarch"].param_count(768, 768, FAMILIES["monarch"].Config(blocks=4)) == 2 * 768 * 768 // 4


def test_shape_the_family_cannot_take_stays_dense(tmp_path):
    """A prime in_features (BTT) and BLAST blocks that do not divide: per-site reason in the report, and those
    sites keep computing exactly the dense layer while the others are rewritten."""
    import json

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(31, 24), torch.nn.ReLU(), torch.nn.Linear(24, 36), torch.nn.ReLU(), torch.nn.Linear(36, 30)
    )
    x = torch.randn(3, 31)
    with torch.no_grad():
        ref = model(x)
        out = compile_eager(
            model,
            {
                "defaults": {"min_features": 0},
                "rules": [
                    {"match": "4", "method": "blast", "blocks": 4, "rank": 3},
                    {"match": "*", "method": "btt", "rank": 2},
                ],
            },
            report=str(tmp_path / "r.json"),
        )(x)
        rows = {r["fqn"]: r for r in json.loads((tmp_path / "r.json").read_text())["sites"]}
        assert rows["0"]["status"] == "failed" and "in_features 31 is prime" in rows["0"]["reason"]
        assert rows["4"]["status"] == "failed"
        assert "blast blocks [4, 4] do not divide (out, in) = (30, 36)" in rows["4"]["reason"]
        assert rows["2"]["status"] == "rewritten"
        # the failed sites are dense: the output equals the model with only site 2 replaced by its BTT
        btt = model[2].lrcompile
        h = torch.relu(btt(torch.relu(model[0](x))) + model[2].bias)
        torch.testing.assert_close(out, model[4](torch.relu(h)), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(out, ref, atol=1e-3)


# --- GPT-2 (HF Conv1D sites) through the backend and through rewrite ------------------------------------------
POLICIES = {
    "monarch": {"method": "monarch", "blocks": 4},
    "btt": {"method": "btt", "rank": 2},
    "blast": {"method": "blast", "blocks": 2, "rank": 0.3},
}


def gpt2(seed, n_layer=2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=101,
        n_embd=72,
        n_layer=n_layer,
        n_head=4,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def policy(name, **over):
    return {
        "defaults": {"min_features": 0},
        "rules": [{"match": "lm_head", "method": "dense"}, {"match": "transformer.h.*", **POLICIES[name], **over}],
    }


def n_factors(name):
    return len(FAMILIES[name].tensor_names if name != "monarch" else ("W1", "W2"))


def train(step, model, steps, lr=3e-3):
    """Adam through lrcompile.param_groups on one fixed batch; the losses."""
    opt = torch.optim.Adam(param_groups(model, lr))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = step()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def compile_trains_and_round_trips(name, n_layer, compile_fn, tmp_path, steps):
    """Every call is the same training-mode call with labels (dropout is 0): one graph per model, no recompiles."""
    model = gpt2(0, n_layer).train()
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(0))
    c = compile_fn(model, policy(name))

    def run(compiled):
        return compiled(input_ids=ids, labels=ids)

    run(c)  # the first call registers the factors on the model
    factors = {n for n, _ in model.named_parameters() if ".lrcompile." in n}
    assert len(factors) == 4 * n_layer * n_factors(name)
    losses = train(lambda: run(c).loss, model, steps)
    assert losses[-1] < losses[0]
    params = dict(model.named_parameters())
    assert all(params[n].grad is not None for n in factors)
    ref = run(c).logits.detach()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch._dynamo.reset()
    fresh = gpt2(1, n_layer).train()
    c2 = compile_fn(fresh, policy(name))
    before = run(c2).logits.detach()  # same compile/rewrite: the factor modules exist
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
    torch.testing.assert_close(run(c2).logits.detach(), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, ref, atol=1e-3)


@pytest.mark.parametrize("name", list(POLICIES))
def test_gpt2_compile_trains_and_state_dict_round_trips(name, tmp_path):
    """One block, the backend without Inductor: fast enough for the default suite."""
    compile_trains_and_round_trips(name, 1, compile_eager, tmp_path, steps=3)


@pytest.mark.slow  # Inductor compiles forward and backward twice: minutes on the shared 2-core machine
@pytest.mark.parametrize("name", list(POLICIES))
def test_gpt2_inductor_trains_and_state_dict_round_trips(name, tmp_path):
    def inductor(model, pol):
        return torch.compile(model, backend="lrcompile", options={"policy": pol, "tune": False})

    compile_trains_and_round_trips(name, 2, inductor, tmp_path, steps=5)


@pytest.mark.parametrize("name", list(POLICIES))
def test_gpt2_from_scratch_trains_with_mup_param_groups(name):
    """`init: random` (μP cores) through eager rewrite, trained with the families' lr multipliers."""
    model = gpt2(0, n_layer=1).train()
    ids = torch.randint(0, 101, (4, 13), generator=torch.Generator().manual_seed(0))
    lrcompile.rewrite(model, policy(name, init="random"), {"input_ids": ids})
    site = model.transformer.h[0].mlp.c_fc
    assert isinstance(site, FAMILIES[name]) and site.cfg.init == "random"
    groups = param_groups(model, 3e-3)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    mult = site.lr_multipliers()
    assert any(v != 1.0 for v in mult.values())
    for n, v in mult.items():
        assert lr_of[id(getattr(site, n))] == pytest.approx(3e-3 * v)
    losses = train(lambda: model(input_ids=ids, labels=ids).loss, model, steps=8)
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("name", list(POLICIES))
def test_gpt2_eager_rewrite(name, tmp_path):
    model = gpt2(0).eval()
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    lrcompile.rewrite(model, policy(name), {"input_ids": ids})
    cls = FAMILIES[name]
    mods = [m for m in model.modules() if isinstance(m, cls)]
    assert len(mods) == 8 and type(model.transformer.h[0].mlp.c_fc) is cls
    rows = [r for r in model.lrcompile_report.rows.values() if r.status == "rewritten"]
    assert len(rows) == 8 and all(0 <= r.rel_error < 1 and r.params_after < r.params_before for r in rows)
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        torch.testing.assert_close(compile_eager(model)(input_ids=ids).logits, eager, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(eager, dense)  # the lossy structure really runs
    torch._dynamo.reset()
    fresh = gpt2(1).eval()
    lrcompile.rewrite(fresh, policy(name), {"input_ids": ids})
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, eager, atol=1e-6, rtol=1e-6)


def test_whitened_fallback_warning_names_the_site():
    from lrcompile.families.base import site_scope

    cls = FAMILIES["monarch"]
    cfg = cls.Config(blocks=2, init="whitened_svd").resolve(8, 8)
    with site_scope("encoder.fc"), pytest.warns(UserWarning, match=r"no calibration statistics for site 'encoder\.fc'"):
        cls.from_dense(torch.randn(8, 8), None, cfg)


@pytest.mark.parametrize("in_f, out_f, t", [(45, 77, 3), (64, 24, 2)])
def test_btt_eager_row_tiles_match_one_pass(monkeypatch, in_f, out_f, t):
    """A z wider than the output runs in row tiles in eager inference (btt.TILE_BYTES): same numbers as the
    one-pass forward, on a row count that no tile divides, padded shapes included; with gradients, one pass."""
    from lrcompile.families import btt

    torch.manual_seed(0)
    a1, a0, c0, c1 = 5, 9 + (in_f > 45) * 4, 7, 11 + (out_f < 77) * -7
    w1, w2 = torch.randn(a1, a0, c0, t), torch.randn(c0, a1, t, c1)
    assert a1 * c0 * t > out_f and a1 * a0 >= in_f and c0 * c1 >= out_f
    x, bias = torch.randn(3, 67, in_f), torch.randn(out_f)
    with torch.no_grad():
        whole = btt.btt_matmul(x, w1, w2, bias, out_f)
    tiles = []
    real = btt._btt_rows
    monkeypatch.setattr(btt, "_btt_rows", lambda x2, *a: tiles.append(x2.shape[0]) or real(x2, *a))
    monkeypatch.setattr(btt, "TILE_BYTES", 16 * a1 * c0 * t * 4)  # 16-row tiles
    with torch.no_grad():
        tiled = btt.btt_matmul(x, w1, w2, bias, out_f)
    assert tiles == [16] * 12 + [9]
    assert tiled.shape == (3, 67, out_f) and torch.allclose(tiled, whole, atol=1e-5)
    want = (
        torch.einsum(
            "nai,aict,cats->ncs",
            torch.nn.functional.pad(x.reshape(-1, in_f).double(), (0, a1 * a0 - in_f)).view(-1, a1, a0),
            w1.double(),
            w2.double(),
        ).reshape(201, -1)[:, :out_f]
        + bias.double()
    )
    assert torch.allclose(tiled.reshape(201, -1).double(), want, atol=1e-4)
    tiles.clear()
    btt.btt_matmul(x.requires_grad_(), w1, w2, bias, out_f).sum().backward()
    assert tiles == [201] and x.grad is not None


def test_a_no_policy_compile_reports_every_installed_structure(tmp_path):
    """Monarch / BTT / BLAST compute with batched block products, not a linear call: after `rewrite`, a compile
    without a policy still lists them (installed, their own parameter counts) beside the low-rank site."""
    import json

    from conftest import structures

    torch.manual_seed(0)
    m = torch.nn.Sequential(*[torch.nn.Linear(24, 24) for _ in range(4)])
    rules = [{"match": str(i), "method": k, **CFGS[k]} for i, k in enumerate(("monarch", "btt", "blast"))]
    pol = {"defaults": {"min_features": 0}, "rules": [*rules, {"match": "3", "method": "lowrank", "rank": 4}]}
    x = torch.randn(5, 24)
    lrcompile.rewrite(m, pol, (x,), progress=False)
    assert structures(m) == {"0": "Monarch", "1": "BTT", "2": "Blast", "3": "LowRank"}
    rep = tmp_path / "r.json"
    out = compile_eager(m, report=str(rep))(x)
    torch.testing.assert_close(out, m(x))
    rows = {r["fqn"]: r for r in json.loads(rep.read_text())["sites"]}
    assert {f: (r["method"], r["status"]) for f, r in rows.items()} == {
        "0": ("monarch", "installed"),
        "1": ("btt", "installed"),
        "2": ("blast", "installed"),
        "3": ("lowrank", "installed"),
    }
    for f, r in rows.items():
        assert r["params_after"] == m.get_submodule(f).params() < r["params_before"] == 24 * 24 + 24, f
