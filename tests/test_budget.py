"""lrcompile.budget: non-uniform rank allocation under a global parameter / FLOP budget."""

import json

import pytest
import torch
from conftest import compile_eager
from torch import nn

from lrcompile.factorize.calibrate import CalibrationStats, SiteStats
from lrcompile.policy import budget as B
from lrcompile.policy.load import load_policy


def weight(out_f, in_f, decay, seed):
    g = torch.Generator().manual_seed(seed)
    P, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=torch.float64))
    k = min(in_f, out_f)
    s = torch.exp(-decay * torch.arange(k, dtype=torch.float64))
    return (P[:, :k] * s) @ Q[:, :k].T


def cands():
    return [
        B.Candidate("fast", weight(40, 30, 0.5, 0), 40),
        B.Candidate("slow", weight(40, 30, 0.02, 1), 40),
        B.Candidate("wide", weight(24, 64, 0.1, 2), 0),
    ]


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
    # target 0.5·(128 + 256) = 192: thin dense (128) + sq rank 2 leaves error Σ_{i≥2} e^{-0.6i} = 0.67, less than
    # thin rank 1 (66, error 1) + sq rank 3 (1 + 0.37)
    assert ranks == {"thin": None, "sq": 2}
    assert B.allocate([B.Candidate("col", weight(64, 1, 0.0, 0))], {"params": 0.5}, None) == {"col": None}  # 65 ≥ 64


def sq(fqn, n=10):
    return B.Candidate(fqn, torch.zeros(n, n, dtype=torch.float64))  # cost 2n·r, dense n², ranks 1..n/2-1


def test_exact_allocation_on_a_hand_computed_case():
    # 10x10, no bias: rank r costs 20r, dense 100, ranks 1..4. Lower hulls: a = (1, 2, dense), b = (1, dense).
    errors = {"a": {1: 10.0, 2: 4.0, 3: 3.0, 4: 2.5}, "b": {1: 6.0, 2: 4.8, 3: 4.0, 4: 3.0}}
    cs = [sq("a"), sq("b")]
    # 80 to spend: a 1→2 (0.3 per param), then b's hull step to dense (80) and a's (60) do not fit; the fill buys
    # b 1→2 (0.06) over a 2→3 (0.05). Total error 8.8, the optimum of every pair with cost ≤ 80.
    assert B.allocate(cs, {"params": 0.4}, None, errors=errors) == {"a": 2, "b": 2}
    # 160: a 1→2, b dense (0.075 > a's 0.067), then a 2→3 fills the last 20: error 3, the optimum.
    assert B.allocate(cs, {"params": 0.8}, None, errors=errors) == {"a": 3, "b": None}
    for frac in (0.4, 0.6, 0.8):  # brute force over every choice: the allocation is optimal on this case
        got = B.allocate(cs, {"params": frac}, None, errors=errors)
        err = lambda r, e: 0.0 if r is None else e[r]  # noqa: E731
        best = min(
            err(ra, errors["a"]) + err(rb, errors["b"])
            for ra in (1, 2, 3, 4, None)
            for rb in (1, 2, 3, 4, None)
            if B.budget_cost({"a": ra, "b": rb}, cs)[0] <= frac * 200
        )
        assert err(got["a"], errors["a"]) + err(got["b"], errors["b"]) == pytest.approx(best)


def test_curves_measured_above_rank_one_grade_ranks_instead_of_going_dense():
    # sensitivity measured at ≥ 15% of break-even (rank 3 of a 40x40 site, break-even 20): ranks below are unknown,
    # not free; with diminishing returns the budget is spread evenly, no site goes dense.
    curve = {3: 1.0, 6: 0.45, 9: 0.25, 12: 0.12, 15: 0.05, 18: 0.02}
    cs = [sq(f"s{i}", 40) for i in range(4)]
    ranks = B.allocate(cs, {"params": 0.5}, None, errors={c.fqn: curve for c in cs})
    assert all(r is not None and 9 <= r <= 12 for r in ranks.values())  # all on the hull's 9→12 segment
    assert sum(ranks.values()) == 4 * 10  # 0.5·1600/80 each: the whole budget
    # a budget below the first measured rank: the minimum ranks, with a warning
    with pytest.warns(UserWarning, match="below the minimum rank"):
        assert B.allocate(cs, {"params": 0.1}, None, errors={c.fqn: curve for c in cs}) == {c.fqn: 3 for c in cs}


def test_plateau_is_skipped_for_the_drop_behind_it():
    # "p" gains nothing from 1 to 3, then drops; "q" improves steadily. A ratio greedy would never start p's climb.
    errors = {"p": {1: 5.0, 3: 5.0, 4: 0.5}, "q": {1: 2.0, 2: 1.6, 3: 1.3, 4: 1.1}}
    cs = [sq("p"), sq("q")]
    # 100 to spend from (1, 1) = 40: p 1→4 (60, 4.5 → 0.075/param) beats q's steps (0.02, 0.015, 0.01)
    assert B.allocate(cs, {"params": 0.5}, None, errors=errors) == {"p": 4, "q": 1}


def test_steps_that_remove_nothing_do_not_take_the_budget_of_others():
    # "e" is exact at rank 2 (what is left is rounding); "f"'s hull jumps from 1 to dense, which does not fit.
    # 120 to spend from (1, 1) = 40: e 1→2, then f's single steps — not e's worthless steps toward dense.
    errors = {"e": {1: 10.0, 2: 1e-13, 3: 1e-14, 4: 0.0}, "f": {1: 3.0, 2: 2.5, 3: 2.1, 4: 1.8}}
    assert B.allocate([sq("e"), sq("f")], {"params": 0.6}, None, errors=errors) == {"e": 2, "f": 4}


def test_rank_caps_forbid_dense_and_min_ranks_hold():
    errors = {"a": {1: 10.0, 2: 9.0, 3: 8.0, 4: 7.0}}
    c = B.Candidate("a", torch.zeros(10, 10, dtype=torch.float64), max_rank=2)
    assert B.allocate([c], {"params": 1.0}, None, errors=errors) == {"a": 2}  # cap, though dense would fit
    c = B.Candidate("a", torch.zeros(10, 10, dtype=torch.float64), min_rank=3)
    with pytest.warns(UserWarning, match="below the minimum rank"):
        assert B.allocate([c], {"params": 0.2}, None, errors=errors) == {"a": 3}


def test_uniform_ranks_count_bias_and_respect_caps():
    cs = [
        B.Candidate("a", torch.zeros(30, 40), bias=30),
        B.Candidate("b", torch.zeros(30, 40), bias=0, max_rank=5),
        B.Candidate("c", torch.zeros(64, 1)),
    ]
    ranks = B.uniform_ranks(cs, {"params": 0.5})
    # a: r·70 + 30 ≤ 0.5·(1200 + 30) = 615 → r = 8 (⌊0.5·1200/70⌋ = 8 too, but 9·70+30 = 660 > 615 shows the bias)
    assert ranks["a"] == 8 and B.budget_cost({"a": 8}, cs[:1])[0] <= 0.5 * 1230
    assert ranks["b"] == 5 and ranks["c"] is None  # capped; 64x1 saves nothing at rank 1
    ranks = B.uniform_ranks(cs[:1], {"params": 0.8})
    assert ranks["a"] == 13  # (0.8·1230 − 30)/70 = 13.6; without the bias ⌊0.8·1200/70⌋ = 13 — same; check cost
    assert 13 * 70 + 30 <= 0.8 * 1230 < 14 * 70 + 30
    assert B.uniform_ranks([B.Candidate("d", torch.zeros(100, 100), bias=100)], {"params": 0.5}) == {"d": 24}  # not 25


def test_measured_error_curves_override_spectra():
    cs = cands()
    errors = {"fast": {2: 5.0, 10: 4.0}, "slow": {2: 0.01, 10: 0.0}, "wide": {2: 0.01, 10: 0.0}}
    # fast's measured error dwarfs the others: it stays dense; the others sit at their first measured rank
    assert B.allocate(cs, {"params": 0.4}, None, errors=errors) == {"fast": None, "slow": 2, "wide": 2}
    assert B.allocate(cs, {"params": 0.4}, None) != {"fast": None, "slow": 2, "wide": 2}  # the spectra differ


def test_plan_ranks_counts_only_compressing_sites_and_respects_caps():
    pol = load_policy(
        {
            "defaults": {"min_features": 4},
            "budget": {"params": 0.5},
            "rules": [
                {"match": "head", "method": "dense"},
                {"match": "capped", "method": "lowrank", "rank": 3},
                {"match": "*", "method": "lowrank"},
            ],
        }
    )
    sites = [
        ("head", torch.randn(50, 30), None),
        ("capped", weight(40, 30, 0.0, 0), torch.zeros(40)),
        ("free", weight(40, 30, 0.0, 1), None),
        ("tiny", torch.randn(3, 30), None),
    ]
    ranks = B.plan_ranks(pol, sites)
    assert set(ranks) == {"capped", "free"}  # dense rule and below-min_features sites do not count
    assert ranks["capped"] == 3 and ranks["free"] > 3


def test_btt_is_allocated_by_its_blockwise_spectra_and_blast_gets_the_fraction():
    """BTT declares a knob (its rank t) and an error model (the sub-blocks' spectral tails, the exact error of its
    blockwise SVD): it joins the allocation. BLAST declares a knob without an error model: F of each site's own
    cost. A rule's rank caps either."""
    from lrcompile.families import FAMILIES

    BTT = FAMILIES["btt"]
    # 36 -> 36 with a₁ = a₀ = c₀ = c₁ = 6: every (6 x 6) sub-block of "exact" has rank 2
    g = torch.Generator().manual_seed(0)
    exact = (
        torch.einsum(
            "cair,cajr->ciaj",
            torch.randn(6, 6, 6, 2, generator=g, dtype=torch.float64),
            torch.randn(6, 6, 6, 2, generator=g, dtype=torch.float64),
        ).reshape(36, 36)
        * 3
    )
    cfg = BTT.Config()
    err = BTT.budget_error(exact, None, cfg)
    assert err(1) > 1 and err(2) < 1e-20 and BTT.budget_max(36, 36, cfg) == 6
    btt_cost = BTT.param_count(36, 36, BTT.Config(rank=1))  # 432 per unit of t, dense 1296
    pol = load_policy(
        {
            "defaults": {"min_features": 4},
            "budget": {"params": 0.5, "allocate": "spectrum"},
            "rules": [
                {"match": "t*", "method": "btt"},
                {"match": "l*", "method": "lowrank"},
                {"match": "bl", "method": "blast", "blocks": 2},
                {"match": "capped", "method": "blast", "blocks": 2, "rank": 3},
            ],
        }
    )
    sites = [
        ("texact", exact, None),
        ("lflat", weight(36, 36, 0.0, 1), None),
        ("bl", torch.randn(40, 32), torch.zeros(40)),
        ("capped", torch.randn(40, 32), None),
    ]
    ranks = B.plan_ranks(pol, sites)
    assert ranks["texact"] == 2  # exact at 2: more buys nothing, the flat low-rank site gets the rest
    # blast: r(32 + 40 + 4) + 40 ≤ 0.5·(1280 + 40) -> r = 8; capped at its rule's 3
    assert ranks["bl"] == 8 and ranks["capped"] == 3
    spent = 2 * btt_cost + ranks["lflat"] * 72 + (8 * 76 + 40) + 3 * 76
    assert spent <= 0.5 * (2 * 1296 + 1320 + 1280) < spent + 72


def test_bad_budget_is_a_one_line_error():
    from lrcompile.errors import PlanError

    with pytest.raises(PlanError, match="budget must be"):
        B.allocate(cands(), {"bytes": 0.5}, None)


class Mixed(torch.nn.Module):
    """nn.Linear sites with different spectra and a root functional site (F.linear with a bare parameter)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(48, 64)
        self.b = torch.nn.Linear(64, 40)
        self.w = torch.nn.Parameter(weight(40, 40, 0.01, 5).float())
        with torch.no_grad():
            self.a.weight.copy_(weight(64, 48, 0.3, 3))
            self.b.weight.copy_(weight(40, 64, 0.05, 4))

    def forward(self, x):
        return torch.nn.functional.linear(torch.relu(self.b(torch.relu(self.a(x)))), self.w)


def test_eager_rewrite_and_backend_plan_the_same_ranks(tmp_path):
    """The budget is planned once over the whole model by `plan_model` in both paths: same rank per site, and
    the same function; the functional site `w` is one of the budget's sites in both."""
    import json

    import lrcompile

    pol = {
        "defaults": {"min_features": 0},
        "budget": {"params": 0.4},
        "rules": [{"match": "*", "method": "lowrank", "init": "whitened_svd"}],
    }
    torch.manual_seed(0)
    ref = Mixed()
    xs = [torch.randn(16, 48) for _ in range(3)]
    stats = lrcompile.calibrate(ref, xs, pol, progress=False)
    eager, lazy = Mixed(), Mixed()
    eager.load_state_dict(ref.state_dict())
    lazy.load_state_dict(ref.state_dict())
    lrcompile.rewrite(eager, pol, (xs[0],), calibration=stats, progress=False)
    eager_rows = {r.fqn: (r.status, r.rank) for r in eager.lrcompile_report.sites() if r.kind == "linear"}
    path = tmp_path / "report.json"
    x = torch.randn(5, 48)
    with torch.no_grad():
        out = torch.compile(
            lazy,
            backend="lrcompile",
            options={"policy": pol, "calibration": stats, "inductor": False, "report": str(path)},
        )(x)
    rows = {
        r["fqn"]: (r["status"], r.get("rank")) for r in json.loads(path.read_text())["sites"] if r["kind"] == "linear"
    }
    assert set(rows) == {"a", "b", "w"}
    assert eager_rows == rows
    expected = B.plan_model(load_policy(pol), ref, stats)
    assert {f: rows[f][1] for f in ("a", "b", "w")} == expected and expected["a"] != expected["b"]  # non-uniform
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(eager, backend="lrcompile", options={"inductor": False})(x)
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-6)


class Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(weight(64, 48, 0.3, 6).float())

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w)  # site `inner`: no module hook sees it


class Funcs(torch.nn.Module):
    """Functional sites only: F.linear with a bare parameter inside a submodule, `x @ self.P` at the root."""

    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.P = torch.nn.Parameter(weight(40, 64, 0.02, 7).T.float().contiguous())  # W = Pᵀ (40, 64)

    def forward(self, x):
        return torch.relu(self.inner(x)) @ self.P


def test_functional_sites_are_budgeted_by_the_backend(tmp_path):
    """Both functional sites get statistics, a planned rank, and the backend rewrites them at that rank — with
    the calibration's site list, and without statistics (the backend traces the call for its site list)."""
    import json

    import lrcompile

    pol = {"defaults": {"min_features": 0}, "budget": {"params": 0.4}, "rules": [{"match": "*", "method": "lowrank"}]}
    torch.manual_seed(0)
    m = Funcs()
    xs = [torch.randn(16, 48) for _ in range(2)]
    stats = lrcompile.calibrate(m, xs, pol, progress=False)
    assert set(stats.keys()) == {"inner", "P"}
    planned = {
        True: B.plan_model(load_policy(pol), m, stats),
        False: B.plan_model(load_policy(pol), m, example_inputs=(xs[0],)),
    }
    assert all(set(p) == {"inner", "P"} and None not in p.values() for p in planned.values())
    for calibrated in (True, False):
        torch._dynamo.reset()
        rep = tmp_path / f"r{calibrated}.json"
        opts = {"policy": pol, "inductor": False, "report": str(rep), **({"calibration": stats} if calibrated else {})}
        with torch.no_grad():
            out = torch.compile(m, backend="lrcompile", options=opts)(xs[0])
        rows = {r["fqn"]: r for r in json.loads(rep.read_text())["sites"] if r["kind"] == "linear"}
        assert set(rows) == {"inner", "P"}
        for f, r in rows.items():
            assert r["status"] == "rewritten" and r["allocated_rank"] == r["rank"] == planned[calibrated][f]
        with torch.no_grad():  # and the factors are the ones applied
            h = torch.relu(xs[0] @ m.inner.lrcompile_w.to_dense().T)
            torch.testing.assert_close(out, h @ m.lrcompile_P.to_dense().T, rtol=1e-4, atol=1e-5)
        for mod, name in ((m.inner, "lrcompile_w"), (m, "lrcompile_P")):
            delattr(mod, name)


@pytest.mark.parametrize("rule", [{"method": "blast", "blocks": 2}, {"method": "btt", "rank": 2}, {"method": "btt"}])
def test_a_budget_site_the_family_cannot_take_stays_dense_with_a_warning(rule, tmp_path):
    """97 is prime (BTT needs a factorisation) and BLAST's 2x2 blocks do not divide it: no bare ValueError."""
    m = nn.Sequential(nn.Linear(97, 96), nn.ReLU(), nn.Linear(96, 97))
    x = torch.randn(2, 97)
    pol = {"defaults": {"min_features": 0}, "budget": {"params": 0.5}, "rules": [{"match": "*", **rule}]}
    rep = tmp_path / "r.json"
    with pytest.warns(UserWarning, match=f"{rule['method']} cannot take"):
        out = compile_eager(m, pol, report=str(rep))(x)
    torch.testing.assert_close(out, m(x))
    assert {r["status"] for r in json.loads(rep.read_text())["sites"]} <= {"skipped", "failed"}
    pol["defaults"]["strict"] = True
    torch._dynamo.reset()
    with pytest.raises(Exception, match="cannot take"):
        compile_eager(m, pol)(x)
