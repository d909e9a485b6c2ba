"""First-order (Fisher) error curves: the default budget allocation's estimate of each site's end-to-end loss."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_hf
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


@pytest.mark.slow  # pretrained MiniLM: a calibration pass (Dynamo) and a few backward passes, ~1 min on 2 cores
def test_default_allocation_beats_uniform_ranks_on_pretrained_minilm():
    """`calibrate` + `budget: {params: F}` alone (whitened SVD init) on the real all-MiniLM-L6-v2: the default
    allocation's embeddings are closer to the dense model's than uniform ranks' at 75% and 50%, on sentences the
    statistics did not see (the spectrum allocation it replaced fell below uniform at 50%)."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from test_hf_models import embed, minilm

    import lrcompile
    from bench.data.text import CALIBRATION, HELD_OUT
    from lrcompile.policy import budget as B

    torch.manual_seed(0)
    tok, model = minilm()

    def batch(sentences):
        return dict(tok(sentences, padding=True, truncation=True, max_length=32, return_tensors="pt"))

    cal = [batch(CALIBRATION[i : i + 32]) for i in range(0, 96, 32)]
    ev = batch(HELD_OUT[:64])
    policy = {
        "defaults": {"min_features": 0},
        "budget": {"params": 0.75},
        "rules": [
            {"match": "encoder.*", "method": "lowrank", "init": "whitened_svd"},
            {"match": "*", "method": "dense"},
        ],
    }
    stats = lrcompile.calibrate(model, cal, policy, progress=False)
    assert len(stats.fisher) == 36 and not stats.sensitivity
    with torch.no_grad():
        ref = embed(model, ev)
    dense = {n: model.get_parameter(f"{n}.weight").detach().clone() for n in stats.fisher}

    def cosine(ranks):
        with torch.no_grad():
            for n, r in ranks.items():
                w = dense[n] if r is None else factorised(dense[n], stats.get(n))(r)
                model.get_parameter(f"{n}.weight").copy_(w)
            got = float(F.cosine_similarity(embed(model, ev), ref, dim=-1).mean())
            for n, w in dense.items():
                model.get_parameter(f"{n}.weight").copy_(w)
        return got

    for frac in (0.75, 0.5):
        pol = lrcompile.load_policy({**policy, "budget": {"params": frac}})
        ranks = B.plan_model(pol, model, stats)
        cands = [B.Candidate(n, w, b.numel()) for n, w, b in stats.site_list(model) if n in dense]
        uniform = B.uniform_ranks(cands, {"params": frac})
        spent, total = B.budget_cost(ranks, cands)
        assert spent <= frac * total and ranks != uniform
        assert cosine(ranks) > cosine(uniform), frac


def test_default_allocation_uses_the_curves_and_falls_back_to_uniform_ranks(tmp_path):
    """`budget: {params: F}` allocates by the statistics' Fisher curves (saved and loaded with them); without
    statistics it gives uniform ranks, and with statistics but no curves uniform ranks with a warning."""
    from lrcompile.policy import budget as B
    from lrcompile.policy.load import load_policy

    torch.manual_seed(0)
    sites = [("p", torch.randn(32, 32), None), ("q", torch.randn(32, 32), None)]
    pol = load_policy({**POLICY, "budget": {"params": 0.5}})
    uniform = B.uniform_ranks([B.Candidate(f, w) for f, w, _ in sites], {"params": 0.5})
    assert uniform == {"p": 8, "q": 8}
    # p's loss falls fast, q's slowly: the curves move rank from p to q
    st = CalibrationStats({f: SiteStats.empty(32) for f, _, _ in sites})
    st.fisher = {"p": {r: 0.5**r for r in range(1, 17)}, "q": {r: 1.0 - r / 16 for r in range(1, 17)}}
    st.save(tmp_path / "s.safetensors")
    st = CalibrationStats.load(tmp_path / "s.safetensors")
    assert st.fisher["p"][3] == 0.125 and not st.sensitivity
    got = B.plan_ranks(pol, sites, st)
    assert got["q"] > 8 > got["p"] and B.budget_cost(got, [B.Candidate(f, w) for f, w, _ in sites])[0] <= 1024
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert B.plan_ranks(pol, sites, None) == uniform
    st.fisher = {}
    with pytest.warns(UserWarning, match="allocate: fisher has no curves for 2 site"):
        assert B.plan_ranks(pol, sites, st) == uniform


def test_module_sites_by_their_rows_equal_the_weight_gradient_path(monkeypatch):
    """Module sites take their curves from the call's rows and output gradient; functional sites from the weight's
    gradient. Same probes, same numbers: the row path is only cheaper."""
    from lrcompile.factorize import fisher

    torch.manual_seed(2)
    model = Tiny().double()
    xs = [torch.randn(4, 5, 12, dtype=torch.float64) for _ in range(2)]
    stats = _stats(model, xs)
    called = []
    real = fisher._token_hook
    monkeypatch.setattr(fisher, "_token_hook", lambda *a: called.append(a[0]) or real(*a))
    rows = measure_fisher(model, xs, stats, POLICY, probes=3, progress=False)
    assert sorted(called) == ["a", "b"]  # both sites went the row path
    monkeypatch.setattr(fisher, "_module_of", lambda *a: None)  # as if both were functional sites
    grads = measure_fisher(model, xs, stats, POLICY, probes=3, progress=False)
    for fqn in "ab":
        assert rows[fqn].keys() == grads[fqn].keys()
        for r in rows[fqn]:
            assert rows[fqn][r] == pytest.approx(grads[fqn][r], rel=1e-7, abs=1e-14)


class Fn(nn.Module):
    """A functional site (`F.linear(x, self.w)`, no module of its own) before a module one."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(10, 12, dtype=torch.float64) / 3)
        self.b = nn.Linear(10, 6).double()

    def forward(self, x):
        return self.b(torch.tanh(F.linear(x, self.w)))


def test_spilled_bases_give_the_same_curves_in_one_set_of_passes(monkeypatch):
    """With the bases on disk every site shares one set of passes (each basis read back when the passes reach
    its site) and gets the curves that bases held in memory give; functional sites included."""
    from lrcompile.factorize import fisher

    torch.manual_seed(4)
    model = Fn()
    xs = [torch.randn(4, 5, 12, dtype=torch.float64) for _ in range(2)]
    st = CalibrationStats(
        index={
            "fn": {"weight": "w", "transposed": False, "bias": None},
            "b": {"weight": "b.weight", "transposed": False, "bias": "b.bias"},
        }
    )
    st.sites = {"fn": SiteStats.empty(12), "b": SiteStats.empty(10)}
    with torch.no_grad():
        for x in xs:
            st.sites["fn"].add(x)
            st.sites["b"].add(torch.tanh(F.linear(x, model.w)))
    held = measure_fisher(model, xs, st, POLICY, probes=3, progress=False)
    groups = []
    real = fisher._group
    monkeypatch.setattr(
        fisher, "_group", lambda m, b, s, p, params, *a: groups.append(list(params)) or real(m, b, s, p, params, *a)
    )
    spilled = measure_fisher(model, xs, st, POLICY, probes=3, spill=True, progress=False)
    assert groups == [["fn", "b"]] and st.spill is not None and st.get("fn").spilled is not None
    for fqn in ("fn", "b"):
        assert spilled[fqn].keys() == held[fqn].keys()
        for r in held[fqn]:
            assert spilled[fqn][r] == pytest.approx(held[fqn][r], rel=1e-7, abs=1e-14)
    groups.clear()
    measure_fisher(model, xs, st, POLICY, probes=3, max_bytes=1, progress=False)  # in memory, a site at a time
    assert groups == [["fn"], ["b"]]


def test_gradients_start_at_the_input_embeddings_with_the_same_curves(monkeypatch):
    """An HF model: the passes start gradients at the input embeddings' output, computing no weight gradient,
    and get the curves that gradients through every site weight give."""
    pytest.importorskip("transformers")
    import lrcompile
    from lrcompile.factorize import fisher

    torch.manual_seed(0)
    model, _ = tiny_hf("llama", width=32, inter=64, layers=1, heads=4, kv_heads=4, vocab=50, tokens=6, bare=True)
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 50, (2, 6), generator=gen)} for _ in range(2)]
    pol = {
        **POLICY,
        "rules": [
            {"match": "layers.*", "method": "lowrank", "init": "whitened_svd"},
            {"match": "*", "method": "dense"},
        ],
    }
    stats = lrcompile.calibrate(model, batches, progress=False)
    entry = fisher._grad_entry(model, batches[0])
    assert entry is model.get_input_embeddings()
    seen = []
    for p in model.parameters():
        p.register_hook(lambda g, seen=seen: seen.append(g.shape) or g)
    by_embeddings = measure_fisher(model, batches, stats, pol, probes=2, progress=False)
    assert seen == []  # no weight gradient computed
    monkeypatch.setattr(fisher, "_grad_entry", lambda *a: None)
    by_weights = measure_fisher(model, batches, stats, pol, probes=2, progress=False)
    assert seen and set(by_embeddings) == set(by_weights) == set(stats.keys()) and len(by_weights) == 7
    for fqn in by_weights:
        for r in by_weights[fqn]:
            assert by_embeddings[fqn][r] == pytest.approx(by_weights[fqn][r], rel=1e-6, abs=1e-15)
