"""save / load round trips without factorising; mismatched plans fail clearly; the factor cache hits and misses."""

import json
import warnings

import pytest
import torch
from conftest import Toy, all_lowrank, compile_eager, lowered, rel_err, structures
from torch import nn

import lrcompile
from lrcompile import PlanError
from lrcompile.factorize import svd
from lrcompile.families import lowrank
from lrcompile.policy.load import load_policy


def no_svd(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("an SVD ran")

    monkeypatch.setattr(lowrank, "truncated_svd", boom)
    monkeypatch.setattr(svd, "truncated_svd", boom)
    monkeypatch.setattr(torch.linalg, "svd", boom)


class Attn(nn.Module):
    """softmax(QKᵀ/√d)V by hand, then an MLP: attention rules and linear rules on one model."""

    def __init__(self, d=32):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc = nn.Linear(d, 2 * d)

    def forward(self, x):
        s = self.q(x) @ self.k(x).transpose(-2, -1) / 32**0.5
        h = self.o(torch.softmax(s, -1) @ self.v(x))
        return self.fc(h)


def attention_policy(**attn):
    return {
        "defaults": {"min_features": 0},
        "rules": [{"match": "*", "kind": "attention", **attn}, {"match": "fc", "method": "lowrank", "rank": 5}],
    }


def test_save_load_eager_rewrite_reproduces_exactly(toy, tmp_path, monkeypatch):
    m, ids = toy
    lrcompile.rewrite(m, all_lowrank(5), (ids,))
    with torch.no_grad():
        m.blocks[0].fc.U.add_(0.1)  # trained factors are what gets saved
    ref = compile_eager(m)(ids)
    assert lrcompile.save(m, str(tmp_path / "ck")) is None
    plan = json.loads((tmp_path / "ck" / "plan.json").read_text())
    assert {e["path"] for e in plan["sites"]} >= {
        "blocks.0.fc",
        "heads.shared",
        "lm_head",
        "lrcompile_v",
        "blocks.0.lrcompile_w",
    }
    torch._dynamo.reset()
    no_svd(monkeypatch)
    fresh = Toy()
    assert lrcompile.load(fresh, str(tmp_path / "ck")) is fresh
    assert set(fresh.state_dict()) == set(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert torch.equal(compile_eager(fresh)(ids), ref)
    assert len(lowered(fresh)) == 7 and set(lowered(fresh).values()) == {"installed"}  # the loaded factors ran


def test_save_load_backend_path(tmp_path, monkeypatch):
    m = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    x = torch.randn(4, 32)
    ref = compile_eager(m, all_lowrank(6), tune=False)(x)  # one implementation: bit-equal runs
    assert structures(m) == {"0.lrcompile": "LowRank", "2.lrcompile": "LowRank"}  # attached: what save writes
    lrcompile.save(m, str(tmp_path / "ck"))
    torch._dynamo.reset()
    no_svd(monkeypatch)
    fresh = lrcompile.load(nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32)), str(tmp_path / "ck"))
    assert torch.equal(compile_eager(fresh, tune=False)(x), ref)  # attached factors found and reused, none recomputed
    assert lowered(fresh) == {"0": "installed", "2": "installed"}


def test_tied_weights_are_stored_once(toy, tmp_path):
    from safetensors import safe_open

    m, ids = toy
    lrcompile.rewrite(
        m,
        {
            "defaults": {"min_features": 0},
            "rules": [
                {"match": "lm_head", "method": "lora", "rank": 4},
                {"match": "blocks.*", "method": "lowrank", "rank": 5},
            ],
        },
        (ids,),
    )
    assert m.lm_head.weight is m.embed.weight  # an adapter keeps the tie: its base is the embedding
    lrcompile.save(m, str(tmp_path / "ck"))
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        stored = [k for k in keys if f.get_slice(k).get_shape() == list(m.embed.weight.shape)]
    assert stored == ["embed.weight"] and "lm_head.weight" not in keys  # one copy of the tied tensor
    unique = {id(t) for t in m.state_dict(keep_vars=True).values()}
    assert len(keys) == len(unique) == len(m.state_dict()) - 1  # every tensor once; only the tie is dropped
    assert {"lm_head.lora_A", "lm_head.lora_B", "blocks.0.fc.U"} <= keys
    fresh = lrcompile.load(Toy(), str(tmp_path / "ck"))
    assert fresh.lm_head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, m.embed.weight)
    with torch.no_grad():
        assert torch.equal(fresh(ids), m(ids))


@pytest.mark.parametrize(
    "attn",
    [
        {"method": "shared_kv", "rank": 6},
        {"method": "fused_qkv", "rank": 7},
        {"method": "fused_qkv", "structure": {"method": "lowrank", "rank": 9}},
    ],
    ids=["shared_kv", "fused_qkv", "fused_qkv_structure"],
)
def test_attention_factors_round_trip(attn, tmp_path, monkeypatch):
    m = Attn()
    x = torch.randn(2, 6, 32)
    pol = attention_policy(**attn)
    lrcompile.rewrite(m, pol, (x,))
    child = "lrcompile_kv" if attn["method"] == "shared_kv" else "lrcompile_qkv"
    assert hasattr(m, child)
    with torch.no_grad():
        getattr(m, child).tensors()[0].mul_(1.5)  # trained factors are what gets saved
    ref = compile_eager(m)(x)
    lrcompile.save(m, str(tmp_path / "ck"))
    plan = json.loads((tmp_path / "ck" / "plan.json").read_text())
    entry = next(e for e in plan["sites"] if e["path"] == child)
    assert entry["placement"] == "attached" and entry["policy"] == load_policy(pol).digest
    torch._dynamo.reset()
    no_svd(monkeypatch)
    fresh = Attn()
    lrcompile.load(fresh, str(tmp_path / "ck"))
    assert type(getattr(fresh, child)) is type(getattr(m, child))
    assert getattr(fresh, child).sources == getattr(m, child).sources
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert {n for n, p in fresh.named_parameters() if not p.requires_grad} == {
        n for n, p in m.named_parameters() if not p.requires_grad
    }
    assert torch.equal(compile_eager(fresh)(x), ref)
    assert set(lowered(fresh, "attention").values()) == {"installed"}  # the loaded attention factors ran


def test_plan_records_the_policy_digest(tmp_path):
    m = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    pol_a, pol_b = (
        {"rules": [{"match": "0", "method": "lowrank", "rank": 4}], "defaults": {"min_features": 0}},
        {"rules": [{"match": "2", "method": "lora", "rank": 2}]},
    )
    lrcompile.rewrite(m, pol_a, (torch.randn(2, 32),))
    lrcompile.rewrite(m, pol_b, (torch.randn(2, 32),))
    da, db = load_policy(pol_a).digest, load_policy(pol_b).digest
    assert da != db and m.lrcompile_policy_digest == db
    lrcompile.save(m, str(tmp_path / "ck"))
    plan = json.loads((tmp_path / "ck" / "plan.json").read_text())
    assert {e["path"]: e["policy"] for e in plan["sites"]} == {"0": da, "2": db}
    assert plan["policies"] == sorted([da, db])
    fresh = lrcompile.load(nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32)), str(tmp_path / "ck"))
    lrcompile.save(fresh, str(tmp_path / "again"))  # a loaded model keeps its provenance
    assert json.loads((tmp_path / "again" / "plan.json").read_text())["sites"] == plan["sites"]
    # the backend path records it too
    b = nn.Linear(32, 32)
    compile_eager(b, all_lowrank(4))(torch.randn(2, 32))
    assert b.lrcompile.policy_digest == load_policy(all_lowrank(4)).digest


def test_load_restores_requires_grad(tmp_path):
    m = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    lrcompile.rewrite(m, {"rules": [{"match": "*", "method": "lora", "rank": 2}]}, (torch.randn(2, 32),))
    m[0].lora_B.requires_grad_(False)  # the user's own choice is kept too
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert {"0.weight", "0.bias", "2.weight", "0.lora_B"} <= frozen and "2.lora_A" not in frozen
    lrcompile.save(m, str(tmp_path / "ck"))
    fresh = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    lrcompile.load(fresh, str(tmp_path / "ck"))
    assert {n for n, p in fresh.named_parameters() if not p.requires_grad} == frozen


def test_mismatched_plan_names_the_site(tmp_path):
    m = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    lrcompile.rewrite(m, all_lowrank(6), (torch.randn(2, 32),))
    lrcompile.save(m, str(tmp_path / "ck"))
    with pytest.raises(PlanError, match=r"plan\.json: site '0': expected a Linear 32→48, found 32→64"):
        lrcompile.load(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)), str(tmp_path / "ck"))
    with pytest.raises(PlanError, match=r"site '2': expected a Linear, found GELU"):
        lrcompile.load(nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 32), nn.GELU()), str(tmp_path / "ck"))
    with pytest.raises(PlanError, match="cannot read plan.json"):
        lrcompile.load(m, str(tmp_path / "nowhere"))


def test_factor_cache_hits_on_same_weights_and_misses_on_change(tmp_path, monkeypatch):
    m = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 32)
    rep = tmp_path / "r.json"
    ref = compile_eager(m, all_lowrank(6), report=str(rep))(x)
    assert not any("factors from cache" in s.get("notes", []) for s in json.loads(rep.read_text())["sites"])
    calls = []
    real = lowrank.truncated_svd
    monkeypatch.setattr(lowrank, "truncated_svd", lambda *a: calls.append(1) or real(*a))
    torch._dynamo.reset()
    again = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    again.load_state_dict(state)  # a new process would rebuild the model like this
    out = compile_eager(again, all_lowrank(6), report=str(rep))(x)
    assert calls == [] and torch.equal(out, ref)
    assert all("factors from cache" in s["notes"] for s in json.loads(rep.read_text())["sites"])
    torch._dynamo.reset()
    changed = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    state["0.weight"][0, 0] += 1.0
    changed.load_state_dict(state)
    compile_eager(changed, all_lowrank(6))(x)
    assert calls == [1]  # only the changed weight was factorised again


def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    import os

    m = nn.Linear(32, 32)
    x = torch.randn(2, 32)
    ref = compile_eager(m, all_lowrank(4))(x)
    root = os.environ["LRCOMPILE_CACHE_DIR"]
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".safetensors")]
    assert len(files) == 1
    with open(files[0], "wb") as f:
        f.write(b"\x00garbage")
    torch._dynamo.reset()
    fresh = nn.Linear(32, 32)
    fresh.load_state_dict({k: v for k, v in m.state_dict().items() if "lrcompile" not in k})
    with pytest.warns(UserWarning, match="unreadable"):
        out = compile_eager(fresh, all_lowrank(4))(x)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda e: e["config"].update(rank=5),
            r"model\.safetensors: '0\.U' has shape \(48, 6\), the rebuilt model expects \(48, 5\)",
        ),
        (lambda e: e["config"].update(rnak=5), r"plan\.json: site '0': unknown lowrank config field 'rnak'"),
        (lambda e: e.update(dtype="float42"), r"plan\.json: site '0': unknown dtype 'float42'"),
        (lambda e: e["config"].update(rank=0), r"plan\.json: site '0': bad lowrank config \(rank must be >= 1"),
        (lambda e: e.update(family="lowrnk"), r"plan\.json: site '0': unknown family 'lowrnk'"),
    ],
)
def test_corrupt_plan_is_a_one_line_plan_error(tmp_path, edit, expected):
    m = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    lrcompile.rewrite(m, all_lowrank(6), (torch.randn(2, 32),))
    lrcompile.save(m, str(tmp_path / "ck"))
    path = tmp_path / "ck" / "plan.json"
    plan = json.loads(path.read_text())
    edit(plan["sites"][0])
    path.write_text(json.dumps(plan))
    with pytest.raises(PlanError, match=expected) as e:
        lrcompile.load(nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32)), str(tmp_path / "ck"))
    assert "\n" not in str(e.value)


def test_factor_cache_hit_reports_like_the_miss(tmp_path):
    import os

    from safetensors.torch import load_file, save_file

    pol = all_lowrank(6)
    pol["rules"][0]["init"] = "whitened_svd"  # no calibration given: falls back to svd, with a warning
    x = torch.randn(4, 32)
    rep = tmp_path / "r.json"
    m = nn.Linear(32, 32)
    state = {k: v.clone() for k, v in m.state_dict().items()}

    def compile_fresh():
        torch._dynamo.reset()
        again = nn.Linear(32, 32)
        again.load_state_dict(state)
        with pytest.warns(UserWarning, match="no calibration statistics"):
            compile_eager(again, pol, report=str(rep))(x)
        return json.loads(rep.read_text())["sites"][0]

    with pytest.warns(UserWarning, match="no calibration statistics"):
        compile_eager(m, pol, report=str(rep))(x)
    miss = json.loads(rep.read_text())["sites"][0]
    assert miss["svd"] == "exact" and 0 < miss["kept_energy"] < 1
    assert any("used svd" in n for n in miss["notes"]) and "factors from cache" not in miss["notes"]
    hit = compile_fresh()
    assert "factors from cache" in hit["notes"]
    for key in ("kept_energy", "svd", "rel_error"):
        assert hit[key] == miss[key], key
    assert any("used svd" in n for n in hit["notes"])
    # an entry written without its warnings (an older cache, checksum intact): the fallback is still said
    from safetensors import safe_open

    root = os.environ["LRCOMPILE_CACHE_DIR"]
    [entry] = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".safetensors")]
    with safe_open(entry, framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in ("warnings", "init_used")}
    save_file(load_file(entry), entry, metadata=meta)
    bare = compile_fresh()
    assert "factors from cache" in bare["notes"] and any("used svd" in n for n in bare["notes"])


class TwoWidths(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(24, 48), nn.Linear(48, 48), nn.Linear(48, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def vera_rules(*groups):
    return {"rules": [{"match": list(g), "method": "vera", "rank": 8} for g in groups]}


def train_adapters(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)


def test_vera_pairs_are_shared_on_load_as_at_rewrite(tmp_path):
    """Two VeRA rules are two adapters: two pairs of different sizes. load gives back exactly that sharing, with
    pairs of the loaded model's own (never those of another model in the process)."""
    from lrcompile.families.adapters.vera import VeRA, VeRAConfig

    x = torch.randn(4, 24)
    m = TwoWidths()
    lrcompile.rewrite(m, vera_rules(["fc1", "fc2"], ["head"]), (x,))
    assert m.fc1.vera_A is m.fc2.vera_A and m.head.vera_A is not m.fc1.vera_A
    assert m.fc1.vera_B.shape == (48, 8) and m.head.vera_B.shape == (10, 8)  # each pair sized to its own sites
    train_adapters(m)
    with torch.no_grad():
        ref = m(x)
    lrcompile.save(m, str(tmp_path / "ck"))
    plan = json.loads((tmp_path / "ck" / "plan.json").read_text())
    assert {e["path"]: e["projections"] for e in plan["sites"]} == {"fc1": 0, "fc2": 0, "head": 1}
    stray = VeRA(48, 48, VeRAConfig(rank=8))  # untouched, in the process-wide scope: must not be joined
    stray_A = stray.vera_A.clone()
    fresh = lrcompile.load(TwoWidths(), str(tmp_path / "ck"))
    assert fresh.fc1.vera_A is fresh.fc2.vera_A and fresh.head.vera_A is not fresh.fc1.vera_A
    assert fresh.fc1.vera_A is not stray.vera_A and fresh.head.vera_A is not stray.vera_A
    assert set(fresh.fc1._pair.users) == {fresh.fc1, fresh.fc2}
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)
    other = lrcompile.load(TwoWidths(), str(tmp_path / "ck"))
    assert other.fc1.vera_A is not fresh.fc1.vera_A
    assert torch.equal(stray.vera_A, stray_A)
    for k, v in m.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def test_load_with_another_policy_warns(tmp_path):
    m = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    pol = all_lowrank(6)
    lrcompile.rewrite(m, pol, (torch.randn(2, 32),))
    lrcompile.save(m, str(tmp_path / "ck"))
    fresh = lambda: nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))  # noqa: E731
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lrcompile.load(fresh(), str(tmp_path / "ck"), policy=pol)  # the policy that made it: silent
    other = all_lowrank(4)
    with pytest.warns(
        UserWarning,
        match=rf"saved from policy {load_policy(pol).digest}, not from <policy> "
        rf"\({load_policy(other).digest}\)",
    ) as got:
        loaded = lrcompile.load(fresh(), str(tmp_path / "ck"), policy=other)
    assert "\n" not in str(got[0].message)
    assert loaded[0].cfg.rank == 6  # loaded as saved
    with pytest.raises(lrcompile.PolicyError):  # a broken policy is its own one-line error
        lrcompile.load(fresh(), str(tmp_path / "ck"), policy="rules: [")


def test_noble_bases_stay_trainable_through_save_and_load(toy, tmp_path):
    """NOBLE trains its base weights even under a later adapter rule (which freezes the rest); load restores
    exactly the saved requires_grad flags."""
    m, ids = toy
    lrcompile.rewrite(
        m,
        {
            "defaults": {"min_features": 0},
            "rules": [{"match": ["blocks.0.fc", "blocks.0"], "method": "noble", "rank": 4}],
        },
        (ids,),
    )
    lrcompile.rewrite(m, {"rules": [{"match": "heads.shared", "method": "lora", "rank": 2}]}, (ids,))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {"blocks.0.fc.weight", "blocks.0.w"} <= trainable and "blocks.1.fc.weight" not in trainable
    with torch.no_grad():
        ref = m(ids)
    lrcompile.save(m, str(tmp_path / "ck"))
    fresh = lrcompile.load(Toy(), str(tmp_path / "ck"))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad():
        assert torch.equal(fresh(ids), ref)


def test_weight_digest_streams_without_a_full_copy(monkeypatch):
    from lrcompile.factorize import cache as fc

    w = torch.randn(96, 40)
    whole = fc.weight_digest(w.T.contiguous())
    monkeypatch.setattr(fc, "CHUNK_BYTES", 4 * 96 * 5)  # five rows of the (40, 96) transposed view per slice
    pieces = list(fc._pieces(w.T))
    assert len(pieces) == 8 and max(p.nbytes for p in pieces) == 4 * 96 * 5  # never the whole weight at once
    assert fc.weight_digest(w.T) == whole  # the same byte stream: strided and contiguous keys agree
    [one] = list(fc._pieces(w))  # a contiguous CPU tensor is read in place
    assert one.nbytes == w.numel() * 4 and one.ctypes.data == w.data_ptr()
    assert fc.weight_digest(w.to(torch.bfloat16)) != fc.weight_digest(w) != fc.weight_digest(w + 1e-3)


def test_warm_compile_reports_the_same_fields_as_the_cold_one(tmp_path):
    """Everything the report says about a site is the same when its factors come from the cache (but the time
    taken and the cache note), including the activation-aware fallback on a site without statistics."""
    pol = {
        "defaults": {"min_features": 0},
        "rules": [
            {"match": "0", "method": "lowrank", "rank": 6, "init": "whitened_svd"},
            {"match": "2", "method": "lowrank", "rank": 0.5},
        ],
    }
    m = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 32)
    rep = tmp_path / "r.json"

    def run():
        torch._dynamo.reset()
        fresh = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
        fresh.load_state_dict(state)
        with pytest.warns(UserWarning, match="no calibration statistics") as got:
            out = compile_eager(fresh, pol, report=str(rep))(x)
        said = sorted(
            {str(w.message).split(" (factors from cache)")[0] for w in got if "calibration" in str(w.message)}
        )
        return out, {r["fqn"]: r for r in json.loads(rep.read_text())["sites"]}, said

    cold_out, cold, cold_warn = run()
    warm_out, warm, warm_warn = run()
    assert torch.equal(cold_out, warm_out) and warm_warn == cold_warn
    timing = {"seconds", "tuned_ms", "dense_ms", "notes"}
    for fqn in ("0", "2"):
        assert "factors from cache" in warm[fqn]["notes"] and "factors from cache" not in cold[fqn]["notes"]
        assert {k: v for k, v in warm[fqn].items() if k not in timing} == {
            k: v for k, v in cold[fqn].items() if k not in timing
        }, fqn
        strip = lambda notes: [n for n in notes if n != "factors from cache" and "ms" not in n]  # noqa: E731
        assert strip(warm[fqn]["notes"]) == strip(cold[fqn]["notes"]), fqn


def test_stats_digest_is_the_statistics_value_not_the_site_name():
    """CalibrationStats.get names a site's statistics (for warnings); the factor-cache key must not change with
    it — only with the statistics themselves."""
    from lrcompile.factorize import cache as fc
    from lrcompile.factorize.calibrate import CalibrationStats, SiteStats

    x = torch.randn(20, 6, dtype=torch.float64)
    s = SiteStats(torch.zeros(6, 6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64), 0)
    s.add(x)
    before = fc.stats_digest(s)
    named = CalibrationStats({"enc.fc": s}).get("enc.fc")
    assert named.fqn == "enc.fc" and fc.stats_digest(named) == before
    s.add(x[:3])
    assert fc.stats_digest(s) != before


def _entries(root):
    import os

    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".safetensors")]


def _recompile_fresh(m, policy, x, **kw):
    torch._dynamo.reset()
    fresh = nn.Linear(m.in_features, m.out_features)
    fresh.load_state_dict({k: v for k, v in m.state_dict().items() if "lrcompile" not in k})
    return fresh, compile_eager(fresh, policy, **kw)(x)


def test_garbled_factor_bytes_with_an_intact_header_are_a_miss(tmp_path):
    import os

    m = nn.Linear(32, 32)
    x = torch.randn(2, 32)
    ref = compile_eager(m, all_lowrank(4))(x)
    (path,) = _entries(os.environ["LRCOMPILE_CACHE_DIR"])
    data = bytearray(open(path, "rb").read())
    data[-64:] = b"\x7f" * 64  # the last tensor's bytes: the header still parses
    open(path, "wb").write(bytes(data))
    rep = tmp_path / "r.json"
    with pytest.warns(UserWarning, match="unreadable or garbled.*checksum"):
        fresh, out = _recompile_fresh(m, all_lowrank(4), x, report=str(rep))
    torch.testing.assert_close(out, ref)
    row = json.loads(rep.read_text())["sites"][0]
    assert row["status"] == "rewritten" and "factors from cache" not in row["notes"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt: the next compile hits a good entry
        _, again = _recompile_fresh(m, all_lowrank(4), x)
    torch.testing.assert_close(again, ref)


def test_entry_with_wrong_shapes_is_evicted_and_rebuilt(monkeypatch):
    import os

    from lrcompile.factorize import cache as factor_cache

    m = nn.Linear(32, 32)
    x = torch.randn(2, 32)
    ref = compile_eager(m, all_lowrank(4))(x)
    (path,) = _entries(os.environ["LRCOMPILE_CACHE_DIR"])
    k = os.path.basename(path)[: -len(".safetensors")]
    factor_cache.store(k, {"U": torch.zeros(32, 3), "V": torch.zeros(3, 32)}, {})  # a consistent, wrong entry
    with pytest.warns(UserWarning, match="does not fit lowrank"):
        _, out = _recompile_fresh(m, all_lowrank(4), x)
    torch.testing.assert_close(out, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, out = _recompile_fresh(m, all_lowrank(4), x)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("broken", ["file_at_root", "read_only", "fifo"])
def test_unusable_cache_is_a_miss_not_a_failed_site(tmp_path, monkeypatch, broken):
    import os

    root = tmp_path / "cache"
    m = nn.Linear(32, 32)
    x = torch.randn(2, 32)
    if broken == "file_at_root":
        root.write_text("not a directory")
    elif broken == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes through directory permissions")
        root.mkdir()
        root.chmod(0o500)
    monkeypatch.setenv("LRCOMPILE_CACHE_DIR", str(root))
    if broken == "fifo":
        compile_eager(m, all_lowrank(4))(x)
        (path,) = _entries(str(root))
        os.remove(path)
        os.mkfifo(path)  # opening it would block forever
    rep = tmp_path / "r.json"
    with pytest.warns(UserWarning, match="factor cache"):
        _, out = _recompile_fresh(m, all_lowrank(4), x, report=str(rep))
    assert json.loads(rep.read_text())["sites"][0]["status"] == "rewritten"
    assert rel_err(out, m(x)) < 1.0


def test_stale_temp_files_of_killed_writers_are_swept(tmp_path):
    import os
    import time

    from lrcompile.factorize import cache as factor_cache

    k = "ab" + "0" * 30
    factor_cache.store(k, {"U": torch.ones(2, 2)}, {})
    d = os.path.dirname(factor_cache._file(k))
    old = os.path.join(d, "dead.tmp")
    open(old, "w").close()
    os.utime(old, (time.time() - 2 * factor_cache.STALE_TMP_S,) * 2)
    factor_cache.store("ab" + "1" * 30, {"U": torch.ones(2, 2)}, {})
    assert not os.path.exists(old)


def test_factor_cache_key_covers_the_versions(monkeypatch):
    import lrcompile as lc
    from lrcompile.factorize import cache as factor_cache
    from lrcompile.families.lowrank import LowRankConfig

    w = torch.randn(8, 8)
    cfg = LowRankConfig(rank=2)
    k = factor_cache.key(w, "lowrank", cfg, None)
    monkeypatch.setattr(factor_cache, "_code_versions", {})
    monkeypatch.setattr(lc, "__version__", "9.9.9")
    assert factor_cache.key(w, "lowrank", cfg, None) != k


def _saved(tmp_path):
    m = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    lrcompile.rewrite(m, all_lowrank(6), (torch.randn(2, 32),))
    lrcompile.save(m, str(tmp_path / "ck"))
    return tmp_path / "ck"


def _fresh():
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda p: p["sites"][1]["config"].update(rank=10**9), r"site '2': .* parameters for a 48→32 layer"),
        (lambda p: p["sites"][1].update(in_features="many"), r"site '2': bad entry"),
        (lambda p: p["sites"][1].update(config=None), r"site '2': no config"),
        (lambda p: p.update(sites={"a": 1}), r"'sites' must be a list"),
        (
            lambda p: p["sites"][1].update(placement="attached", owner="", weight=None, child="x"),
            r"site '2': bad entry",
        ),
        (lambda p: p["sites"][1].update(placement="attached", owner="", weight="nope", child="x"), r"no parameter"),
    ],
)
def test_a_refused_load_leaves_the_model_as_it_was(tmp_path, edit, expected):
    ck = _saved(tmp_path)
    plan = json.loads((ck / "plan.json").read_text())
    edit(plan)
    (ck / "plan.json").write_text(json.dumps(plan))
    m = _fresh()
    before = {n: (type(mod), id(mod)) for n, mod in m.named_modules()}
    params = {n: p for n, p in m.named_parameters()}
    with pytest.raises(PlanError, match=expected) as e:
        lrcompile.load(m, str(ck))
    assert "\n" not in str(e.value)
    assert {n: (type(mod), id(mod)) for n, mod in m.named_modules()} == before  # site 1 was rebuilt, then undone
    assert {n: p for n, p in m.named_parameters()}.keys() == params.keys()
    x = torch.randn(3, 32)
    torch.testing.assert_close(compile_eager(m)(x), m(x))  # no empty factors left to compute NaN


@pytest.mark.parametrize("cut", ["header", "data"])
def test_a_truncated_weights_file_is_a_one_line_plan_error(tmp_path, cut):
    ck = _saved(tmp_path)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[:20] if cut == "header" else data[:-100])
    m = _fresh()
    before = {n: type(mod) for n, mod in m.named_modules()}
    with pytest.raises(PlanError, match=r"model\.safetensors: cannot read the weights") as e:
        lrcompile.load(m, str(ck))
    assert "\n" not in str(e.value) and {n: type(mod) for n, mod in m.named_modules()} == before
