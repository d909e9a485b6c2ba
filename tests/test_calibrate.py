"""lrcompile.calibrate: statistics per site FQN, padding ignored, save/load, and the paths that consume them."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import masked_id_batches, structures
from torch import nn

import lrcompile
from lrcompile.factorize.calibrate import CalibrationStats

transformers = pytest.importorskip("transformers")


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.inner = nn.ModuleDict({"b": nn.Linear(8, 5)})

    def forward(self, x, scale=1.0):
        return self.inner["b"](torch.relu(self.a(x))) * scale


def test_statistics_are_exact_and_keyed_by_module_path():
    m = Two()
    xs = [torch.randn(3, 4, 6, dtype=torch.float32) for _ in range(3)]
    batches = [xs[0], (xs[1],), {"x": xs[2], "scale": 2.0}]  # tensor, tuple of args, dict of kwargs
    st = lrcompile.calibrate(m, batches, progress=False)
    assert set(st.keys()) == {"a", "inner.b"}
    x = torch.cat([t.reshape(-1, 6) for t in xs]).double()
    s = st.get("a")
    assert s.tokens == 36
    torch.testing.assert_close(s.xtx, x.T @ x)
    torch.testing.assert_close(s.abs_mean, x.abs().mean(0))
    assert s.xtx.dtype == torch.float64 and st.get("nope") is None


def test_policy_limits_collection_to_compressing_sites():
    pol = {
        "defaults": {"min_features": 0},
        "rules": [{"match": "a", "method": "dense"}, {"match": "*", "method": "lowrank", "rank": 2}],
    }
    st = lrcompile.calibrate(Two(), [torch.randn(2, 6)], pol, progress=False)
    assert set(st.keys()) == {"inner.b"}


def test_save_load_round_trips_exactly(tmp_path):
    m = Two()
    st = lrcompile.calibrate(m, [torch.randn(5, 6)], progress=False)
    p = tmp_path / "stats.pt"
    st.save(p)
    back = CalibrationStats.load(p)
    assert set(back.keys()) == set(st.keys()) and back.digest() == st.digest()
    for k in st.keys():
        assert torch.equal(back.get(k).xtx, st.get(k).xtx) and torch.equal(back.get(k).abs_sum, st.get(k).abs_sum)
        assert back.get(k).tokens == st.get(k).tokens and back.get(k).cross is None
    other = Two()
    crossed = lrcompile.calibrate(other, [torch.randn(5, 6)], reference=m, progress=False)
    crossed.save(p)
    back = CalibrationStats.load(p)
    assert back.digest() == crossed.digest() != st.digest()
    for k in crossed.keys():
        assert torch.equal(back.get(k).cross, crossed.get(k).cross)
    with pytest.raises(FileNotFoundError, match="calibration file not found"):
        CalibrationStats.load(tmp_path / "missing.pt")


def bert():
    cfg = transformers.BertConfig(
        vocab_size=120,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
    )
    return transformers.BertModel(cfg).eval()


def test_padded_positions_are_ignored():
    torch.manual_seed(0)
    model = bert()
    ids = torch.randint(1, 120, (1, 6))
    short = {"input_ids": ids, "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    padded = {
        "input_ids": torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1),
        "attention_mask": torch.cat([torch.ones(1, 6), torch.zeros(1, 5)], 1).long(),
    }
    a = lrcompile.calibrate(model, [short], progress=False)
    b = lrcompile.calibrate(model, [padded], progress=False)
    for k in a.keys():
        assert b.get(k).tokens == a.get(k).tokens  # 6 per token-wise site; the pooler sees 1 row (CLS)
        torch.testing.assert_close(b.get(k).xtx, a.get(k).xtx, rtol=1e-5, atol=1e-6)
    assert b.get("encoder.layer.0.attention.self.query").tokens == 6


class Flat(nn.Module):
    """Flattens (batch, seq, d) to (batch·seq, d) before its linear, as some models do."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 6)
        self.lin = nn.Linear(6, 4)
        self.odd = nn.Linear(6, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        y = self.lin(h.reshape(-1, h.shape[-1]))
        z = self.odd(h[:, :-1])  # (batch, seq-1, d): no row of the mask lines up with it
        return y, z


def test_flattened_inputs_are_masked_and_unmaskable_sites_warn():
    m = Flat()
    ids = torch.randint(0, 30, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with pytest.warns(UserWarning, match="attention_mask could not be applied at 1 site.*odd"):
        st = lrcompile.calibrate(m, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    x = m.emb(ids).reshape(-1, 6)[mask.reshape(-1).bool()].double()
    assert st.get("lin").tokens == 8
    torch.testing.assert_close(st.get("lin").xtx, x.T @ x)
    assert st.get("odd").tokens == 8  # 2·4 rows, padded ones included (and warned)


def test_reference_gives_the_cross_moment_per_site():
    torch.manual_seed(0)
    ref, comp = Two(), Two()  # a different "compressed" model with the same site paths
    xs = [torch.randn(4, 6) for _ in range(2)]
    st = lrcompile.calibrate(comp, xs, reference=ref, progress=False)
    x = torch.cat(xs).double()
    with torch.no_grad():
        hr, hc = torch.relu(ref.a(torch.cat(xs))).double(), torch.relu(comp.a(torch.cat(xs))).double()
    torch.testing.assert_close(st.get("a").cross, x.T @ x)
    torch.testing.assert_close(st.get("inner.b").xtx, hc.T @ hc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.get("inner.b").cross, hr.T @ hc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.get("inner.b").cross_mean, hr.T @ hc / 8, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reference has no linear site"):
        lrcompile.calibrate(comp, xs, reference=nn.Sequential(nn.Linear(6, 8)), progress=False)


def _batches(n=3, seq=9):
    return masked_id_batches(n, rows=2, seq=seq, vocab=120, padded=3, seed=1, low=1)


def _hidden(model, inputs):
    return model(**inputs).last_hidden_state


BUDGET_POLICY = {
    "defaults": {"min_features": 0},
    "budget": {"params": 0.6},
    "rules": [
        {"match": "pooler.dense", "method": "dense"},
        {"match": "*", "method": "lowrank", "init": "whitened_svd"},
    ],
}


@pytest.mark.slow  # two Dynamo captures of a BERT: ~20 s on 2 shared cores
def test_end_to_end_backend_and_rewrite_with_budget(tmp_path):
    torch.manual_seed(0)
    model = bert()
    batches = _batches()
    stats = lrcompile.calibrate(model, batches, BUDGET_POLICY, progress=False)
    path = tmp_path / "stats.pt"
    stats.save(path)
    inputs = batches[0]
    with torch.no_grad():
        ref = _hidden(model, inputs)
        rep = tmp_path / "r.json"
        compiled = torch.compile(
            model,
            backend="lrcompile",
            options={"policy": BUDGET_POLICY, "calibration": str(path), "inductor": False, "report": str(rep)},
        )
        out = _hidden(compiled, inputs)
    rows = [r for r in json.loads(rep.read_text())["sites"] if r["kind"] == "linear" and r["fqn"] != "pooler.dense"]
    assert len(rows) == 12
    lowrank = [r for r in rows if r["status"] == "rewritten"]
    assert lowrank and all("allocated_rank" in r and "kept_energy" in r and "weighted_error" in r for r in lowrank)
    before = sum(r["params_before"] for r in rows)
    after = sum(r["params_after"] for r in rows)
    assert after <= 0.6 * before + 1e-9 and after >= 0.6 * before - sum(
        r["in_features"] + r["out_features"] for r in rows
    )
    assert len({r["rank"] for r in lowrank}) > 1  # non-uniform
    err = float((out - ref).norm() / ref.norm())
    uniform = {
        "defaults": {"min_features": 0},
        "rules": [{"match": "pooler.dense", "method": "dense"}, {"match": "*", "method": "lowrank", "rank": 0.6}],
    }
    torch._dynamo.reset()
    plain = bert()
    plain.load_state_dict(model.state_dict(), strict=False)
    lrcompile.rewrite(plain, uniform, inputs)  # plain SVD at the same fraction everywhere
    with torch.no_grad():
        assert err < float((_hidden(plain, inputs) - ref).norm() / ref.norm())  # random BERT: a small margin

    # The eager path plans the same ranks and gives the same output.
    torch._dynamo.reset()
    model2 = bert()
    model2.load_state_dict(model.state_dict(), strict=False)
    lrcompile.rewrite(model2, BUDGET_POLICY, inputs, calibration=stats)
    eager_rows = {r.fqn: r for r in model2.lrcompile_report.sites() if r.status == "rewritten"}
    assert {k: v.rank for k, v in eager_rows.items()} == {r["fqn"]: r["rank"] for r in lowrank}
    with torch.no_grad():
        torch.testing.assert_close(_hidden(model2, inputs), out, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # two Dynamo captures of a BERT: ~20 s on 2 shared cores
def test_whitened_beats_svd_end_to_end():
    torch.manual_seed(0)
    model = bert()
    batches = _batches(4)
    stats = lrcompile.calibrate(model, batches, progress=False)
    inputs = batches[0]
    errs = {}
    for init in ("svd", "whitened_svd"):
        torch._dynamo.reset()
        m = bert()
        m.load_state_dict(model.state_dict())
        pol = {
            "defaults": {"min_features": 0},
            "rules": [{"match": "encoder.*", "method": "lowrank", "rank": 0.5, "init": init}],
        }
        lrcompile.rewrite(m, pol, inputs, calibration=stats)
        with torch.no_grad():
            errs[init] = float((_hidden(m, inputs) - _hidden(model, inputs)).norm())
    assert errs["whitened_svd"] < errs["svd"]


SENS_POLICY = {
    "defaults": {"min_features": 0},
    "budget": {"params": 0.5, "allocate": "sensitivity"},
    "rules": [{"match": "*", "method": "lowrank", "init": "whitened_svd"}],
}


def test_sensitivity_curves_are_measured_round_trip_and_drive_the_budget(tmp_path):
    from lrcompile.capture.modules import site_weights
    from lrcompile.factorize.sensitivity import factorised
    from lrcompile.lifecycle.heal import loss_of
    from lrcompile.policy import budget as B

    torch.manual_seed(0)
    m = Two()
    xs = [torch.randn(2, 5, 6) for _ in range(3)]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    st = lrcompile.calibrate(m, xs, SENS_POLICY, sensitivity_batches=2, progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # weights restored
    assert set(st.sensitivity) == {"a", "inner.b"}
    # one point by hand: site a at rank 2 alone, loss vs the dense outputs on the first two batches
    Wr = factorised(m.a.weight, st.get("a"))(2)
    with torch.no_grad():
        ref = [m(x) for x in xs[:2]]
        saved = m.a.weight.clone()
        m.a.weight.copy_(Wr.float())
        want = sum(float(loss_of(m(x), t, x, 0.0)) for x, t in zip(xs[:2], ref)) / 2
        m.a.weight.copy_(saved)
    assert st.sensitivity["a"][2] == pytest.approx(want, rel=1e-5, abs=1e-9)
    p = tmp_path / "s.safetensors"
    st.save(p)
    back = CalibrationStats.load(p)
    assert back.sensitivity == st.sensitivity and back.digest() == st.digest()
    # the budget reads them: make "a" look catastrophic at every rank and it stays dense
    from lrcompile.policy.load import load_policy

    pol = load_policy({**SENS_POLICY, "budget": {"params": 0.9, "allocate": "sensitivity"}})
    back.sensitivity = {"a": {1: 9.0, 3: 9.0}, "inner.b": {1: 0.01, 2: 0.0}}
    # 0.9·(56 + 45) = 90.9: a dense (56) + b rank 2 (2·13 + 5), not the other way round
    assert B.plan_model(pol, m, back) == {"a": None, "inner.b": 2}
    back.sensitivity = {"a": {1: 0.01, 2: 0.0}, "inner.b": {1: 9.0, 3: 9.0}}
    assert B.plan_model(pol, m, back) == {"a": 2, "inner.b": None}
    from lrcompile.errors import PlanError

    with pytest.raises(PlanError, match="allocate: sensitivity needs calibration statistics"):
        B.plan_ranks(pol, site_weights(m), CalibrationStats())


def test_bench_calibration_and_held_out_text_are_disjoint(monkeypatch):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.data import generated
    from bench.data.text import CALIBRATION, HELD_OUT

    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    corpus = generated.calibration_corpus(3000)
    assert len(corpus) == len(CALIBRATION) + 3000 == len(set(corpus))
    assert not {norm(s) for s in corpus} & {norm(s) for s in HELD_OUT}
    assert len(HELD_OUT) >= 100
    # the filter, not luck: a generator that emits held-out sentences still yields a disjoint corpus
    monkeypatch.setattr(generated, "generate", lambda n, seed=0: HELD_OUT[:5] + [f"filler {i}." for i in range(n)])
    assert not set(generated.calibration_corpus(50)) & set(HELD_OUT)


class Sub(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6) / 3)

    def forward(self, x):
        return F.linear(x, self.w)  # a site named `sub` that no module hook sees


class Functional(nn.Module):
    """Sites only a trace sees: F.linear with a bare parameter inside a submodule (`sub`) and `x @ self.P` at the
    root (`P`, W = Pᵀ), around an nn.Linear (`lin`)."""

    def __init__(self):
        super().__init__()
        self.sub = Sub()
        self.lin = nn.Linear(8, 8)
        self.P = nn.Parameter(torch.randn(8, 5) / 3)

    def forward(self, x, attention_mask=None):
        return torch.tanh(self.lin(torch.relu(self.sub(x)))) @ self.P


def functional_batches():
    """Dict batches of two lengths (dynamic shapes), each with padded positions."""
    out = []
    for seq in (5, 7, 5):
        mask = torch.ones(2, seq, dtype=torch.long)
        mask[1, seq - 2 :] = 0
        out.append({"x": torch.randn(2, seq, 6), "attention_mask": mask})
    return out


def linear_report_names(model, inputs, tmp_path) -> set:
    """The linear sites the backend reports for one call of `model`."""
    rep = tmp_path / "names.json"
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="lrcompile", options={"inductor": False, "report": str(rep)})(**inputs)
    torch._dynamo.reset()
    return {r["fqn"] for r in json.loads(rep.read_text())["sites"] if r["kind"] == "linear"}


def test_functional_sites_get_statistics_under_the_backends_names(tmp_path):
    m = Functional()
    batches = functional_batches()
    st = lrcompile.calibrate(m, batches, progress=False)
    assert set(st.keys()) == {"sub", "lin", "P"} == linear_report_names(m, batches[0], tmp_path)
    assert st.index["P"] == {"weight": "P", "transposed": True, "bias": None}
    assert st.index["sub"] == {"weight": "sub.w", "transposed": False, "bias": None}
    want = {k: torch.zeros(n, n, dtype=torch.float64) for k, n in (("sub", 6), ("lin", 8), ("P", 8))}
    tokens = 0
    with torch.no_grad():
        for b in batches:
            keep = b["attention_mask"].bool()
            x = b["x"]
            h = torch.relu(F.linear(x, m.sub.w))
            ins = {"sub": x, "lin": h, "P": torch.tanh(m.lin(h))}
            for k, v in ins.items():
                rows = v[keep].double()  # padded positions left out
                want[k] += rows.T @ rows
            tokens += int(keep.sum())
    for k in want:
        assert st.get(k).tokens == tokens
        torch.testing.assert_close(st.get(k).xtx, want[k], rtol=1e-6, atol=1e-9)
        assert st.get(k).xtx.dtype == torch.float64


def test_functional_sites_get_sensitivity_curves_and_weights_are_restored():
    m = Functional()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    st = lrcompile.calibrate(m, functional_batches(), SENS_POLICY, sensitivity_batches=1, progress=False)
    assert set(st.sensitivity) == {"sub", "lin", "P"}
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_reference_cross_moments_at_functional_and_installed_sites():
    """A compressed copy (lowrank modules installed by rewrite, factors attached to the functional site) against
    its dense reference: every site's cross moment, sites matched by name."""
    import copy

    torch.manual_seed(0)
    ref = Functional()
    comp = copy.deepcopy(ref)
    xs = [torch.randn(4, 6) for _ in range(2)]
    pol = {"defaults": {"min_features": 0}, "rules": [{"match": "*", "method": "lowrank", "rank": 2}]}
    lrcompile.rewrite(comp, pol, (xs[0],), progress=False)
    assert structures(comp) == {"sub.lrcompile_w": "LowRank", "lin": "LowRank", "lrcompile_P": "LowRank"}  # compressed
    st = lrcompile.calibrate(comp, xs, reference=ref, progress=False)
    assert set(st.keys()) == {"sub", "lin", "P"} == set(st.index)  # the site list: the dense reference's
    x = torch.cat(xs)
    with torch.no_grad():
        ins = lambda net: (torch.relu(net.sub(x)), torch.tanh(net.lin(torch.relu(net.sub(x)))))  # noqa: E731
        (hr, yr), (hc, yc) = ins(ref), ins(comp)
    x = x.double()
    torch.testing.assert_close(st.get("sub").cross, x.T @ x)
    torch.testing.assert_close(st.get("lin").cross, hr.double().T @ hc.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.get("P").cross, yr.double().T @ yc.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.get("P").xtx, yc.double().T @ yc.double(), rtol=1e-5, atol=1e-6)


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        x = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(x)


class Loop(nn.Module):
    """A graph break inside a loop over blocks: Dynamo compiles Broken.forward as a frame of its own and runs its
    graphs for every block, with that block's weights."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Broken() for _ in range(3)])

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


def test_graphs_shared_by_instances_are_named_and_counted_per_instance():
    m = Loop()
    xs = [torch.randn(3, 6) for _ in range(2)]
    st = lrcompile.calibrate(m, xs, progress=False)
    assert set(st.keys()) == {f"blocks.{i}.{n}" for i in range(3) for n in "ab"}
    h = torch.cat(xs)
    with torch.no_grad():
        for i, blk in enumerate(m.blocks):
            for n in "ab":
                x = h.double()
                torch.testing.assert_close(st.get(f"blocks.{i}.{n}").xtx, x.T @ x, rtol=1e-5, atol=1e-6)
                h = getattr(blk, n)(h)
                h = torch.relu(h) if n == "a" else h


def test_recompiles_past_dynamos_limit_fail_loudly():
    class Repeat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, n):
            for _ in range(n):  # every n is another graph
                x = self.fc(x)
            return x

    batches = [(torch.randn(2, 4), n) for n in range(1, 12)]
    with pytest.raises(RuntimeError, match="recompile limit"):
        lrcompile.calibrate(Repeat(), batches, progress=False)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_site_names_equal_the_backends_on_hf_models(kind, tmp_path):
    from conftest import tiny_hf

    model, inputs = tiny_hf(kind, width=32, inter=48, layers=1, heads=2, kv_heads=2, vocab=60, tokens=5)
    st = lrcompile.calibrate(model, [inputs], progress=False)
    names = linear_report_names(model, inputs, tmp_path)
    assert set(st.keys()) == set(st.index) == names
    if kind == "gpt2":  # Conv1D (weight stored (in, out)) and the head tied to the embedding
        assert st.index["transformer.h.0.attn.c_attn"]["transposed"] and "lm_head" in names


class Fan(nn.Module):
    """q, k, v read one tensor; `solo` reads it in one call and another tensor in a later one."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 3)
        self.solo = nn.Linear(6, 2)

    def forward(self, x):
        y = self.q(x) + self.k(x)
        return torch.cat([y, self.v(x)], -1).sum(-1, keepdim=True) + self.solo(x * 2).sum(-1, keepdim=True)


def test_sites_fed_one_tensor_share_their_statistics_exactly(tmp_path):
    m = Fan()
    xs = [torch.randn(5, 6) for _ in range(3)]
    st = lrcompile.calibrate(m, xs, progress=False)
    x = torch.cat(xs).double()
    q, k, v = (st.get(n) for n in ("q", "k", "v"))
    assert q.xtx is k.xtx is v.xtx and q.abs_sum is v.abs_sum  # one tensor for the three sites, not three
    for s in (q, k, v):
        assert s.tokens == 15
        torch.testing.assert_close(s.xtx, x.T @ x)  # added once per batch, not once per site
    torch.testing.assert_close(st.get("solo").xtx, 4 * x.T @ x)
    assert st.get("solo").xtx is not q.xtx
    p = tmp_path / "s.safetensors"
    st.save(p)
    back = CalibrationStats.load(p)
    assert back.get("q").xtx is back.get("k").xtx  # stored once, shared again after loading
    assert back.digest() == st.digest()
    for n in st.keys():
        assert torch.equal(back.get(n).xtx, st.get(n).xtx) and back.get(n).tokens == st.get(n).tokens
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        assert sum(key.endswith(".xtx") for key in f.keys()) == 2  # q/k/v once, solo once


def test_a_site_met_in_two_groups_gets_its_own_statistics():
    from lrcompile.factorize.calibrate import _collect  # noqa: F401  (the accumulation under test)

    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x, both=True):
            return self.a(x) + self.b(x) if both else self.a(x) + self.b(2 * x)

    m = Split()
    xs = [torch.randn(3, 4), torch.randn(3, 4)]
    st = lrcompile.calibrate(m, [{"x": xs[0]}, {"x": xs[1], "both": False}], progress=False)
    x0, x1 = xs[0].double(), xs[1].double()
    torch.testing.assert_close(st.get("a").xtx, x0.T @ x0 + x1.T @ x1)
    torch.testing.assert_close(st.get("b").xtx, x0.T @ x0 + 4 * x1.T @ x1)
    assert st.get("a").xtx is not st.get("b").xtx


class Wide(nn.Module):
    """`down` reads 24 inputs and writes 8: its statistics fit in output form (8² instead of 24²)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 24), nn.Linear(24, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _wide_policy(**extra):
    return {
        "defaults": {"min_features": 0},
        "rules": [{"match": "*", "method": "lowrank", "init": "whitened_svd", "rank": 3, **extra}],
    }


def test_wide_input_sites_keep_output_statistics_and_factorise_the_same(tmp_path):
    from lrcompile.factorize import whiten

    torch.manual_seed(0)
    m = Wide()
    xs = [torch.randn(6, 8) for _ in range(3)]
    full = lrcompile.calibrate(m, xs, progress=False)  # no policy: input form everywhere
    small = lrcompile.calibrate(m, xs, _wide_policy(), progress=False)
    assert not full.get("down").output_form and small.get("down").output_form and not small.get("up").output_form
    s = small.get("down")
    assert s.xtx is None and s.yty.shape == (8, 8) and s.tokens == full.get("down").tokens
    W = m.down.weight.detach().double()
    torch.testing.assert_close(s.yty, W @ full.get("down").xtx @ W.T, rtol=1e-5, atol=1e-5)  # Σ yᵀy = W XᵀX Wᵀ
    for r in (1, 3, 6):  # whitened SVD, damping included, is the same factorisation from either form
        a = whiten.whitened_svd(W, full.get("down"), r)
        b = whiten.whitened_svd(W, s, r)
        torch.testing.assert_close(a[0] @ a[1], b[0] @ b[1], rtol=1e-6, atol=1e-6)
        assert a[2] == pytest.approx(b[2], rel=1e-6)
    torch.testing.assert_close(whiten.spectrum(W, s), whiten.spectrum(W, full.get("down"))[:8], rtol=1e-6, atol=1e-7)
    p = tmp_path / "s.safetensors"
    small.save(p)
    back = CalibrationStats.load(p)
    assert back.get("down").output_form and back.digest() == small.digest() != full.digest()
    assert torch.equal(back.get("down").yty, s.yty) and back.get("down").x_sq == s.x_sq
    # the report's weighted error from either form
    pol = _wide_policy()
    m1, m2 = copy_model(m), copy_model(m)
    lrcompile.rewrite(m1, pol, (xs[0],), calibration=full, progress=False)
    lrcompile.rewrite(m2, pol, (xs[0],), calibration=small, progress=False)
    e1 = {r.fqn: r.weighted_error for r in m1.lrcompile_report.sites()}
    e2 = {r.fqn: r.weighted_error for r in m2.lrcompile_report.sites()}
    assert e2["down"] == pytest.approx(e1["down"], rel=1e-4) and e1["down"] > 0
    torch.testing.assert_close(m1(xs[1]), m2(xs[1]), rtol=1e-4, atol=1e-5)


def test_rules_that_need_the_input_moment_keep_it():
    xs = [torch.randn(6, 8) for _ in range(2)]
    assert not lrcompile.calibrate(Wide(), xs, _wide_policy(compensate=True), progress=False).get("down").output_form
    plain = {"defaults": {"min_features": 0}, "rules": [{"match": "*", "method": "btt", "rank": 2}]}
    assert not lrcompile.calibrate(Wide(), xs, plain, progress=False).get("down").output_form
    from lrcompile.factorize import whiten

    st = lrcompile.calibrate(Wide(), xs, _wide_policy(), progress=False).get("down")
    U = torch.randn(8, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="compensate needs input statistics"):
        assert torch.equal(whiten.compensate(torch.randn(8, 24), U, torch.randn(2, 24), st), U)


def copy_model(m):
    import copy

    return copy.deepcopy(m)
