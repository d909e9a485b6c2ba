"""save / load round trips without factorising; mismatched plans fail clearly; the factor cache hits and misses."""
import json

import pytest
import torch
from torch import nn

import lrcompile
from conftest import Toy, all_lowrank, compile_eager
from lrcompile import PlanError
from lrcompile.structures import lowrank


def no_svd(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("an SVD ran")

    monkeypatch.setattr(lowrank, "truncated_svd", boom)
    monkeypatch.setattr(torch.linalg, "svd", boom)


def test_save_load_eager_rewrite_reproduces_exactly(toy, tmp_path, monkeypatch):
    m, ids = toy
    lrcompile.rewrite(m, all_lowrank(5), (ids,))
    with torch.no_grad():
        m.blocks[0].fc.U.add_(0.1)  # trained factors are what gets saved
    ref = compile_eager(m)(ids)
    assert lrcompile.save(m, str(tmp_path / "ck")) is None
    plan = json.loads((tmp_path / "ck" / "plan.json").read_text())
    assert {e["path"] for e in plan["sites"]} >= {"blocks.0.fc", "heads.shared", "lm_head", "lrcompile_v", "blocks.0.lrcompile_w"}
    torch._dynamo.reset()
    no_svd(monkeypatch)
    fresh = Toy()
    assert lrcompile.load(fresh, str(tmp_path / "ck")) is fresh
    assert set(fresh.state_dict()) == set(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert torch.equal(compile_eager(fresh)(ids), ref)


def test_save_load_backend_path(tmp_path, monkeypatch):
    m = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    x = torch.randn(4, 32)
    ref = compile_eager(m, all_lowrank(6))(x)
    lrcompile.save(m, str(tmp_path / "ck"))
    torch._dynamo.reset()
    no_svd(monkeypatch)
    fresh = lrcompile.load(nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32)), str(tmp_path / "ck"))
    assert torch.equal(compile_eager(fresh)(x), ref)  # attached factors found and reused, none recomputed


def test_tied_weights_are_stored_once(tmp_path):
    m = Toy()
    lrcompile.save(m, str(tmp_path / "ck"))
    fresh = lrcompile.load(Toy(), str(tmp_path / "ck"))
    assert fresh.lm_head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, m.embed.weight)


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
