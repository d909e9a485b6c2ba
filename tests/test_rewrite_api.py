"""Eager `lrcompile.rewrite`: module swap, released dense weights, ties, then the no-policy backend."""

import gc
import json
import weakref

import pytest
import torch
from conftest import all_lowrank, compile_eager, lowered, rel_err
from torch import nn

import lrcompile
from lrcompile.families.adapters.lora import LoRA
from lrcompile.families.lowrank import LowRank


def test_rewrite_returns_model_and_swaps_modules(toy):
    m, ids = toy
    ref = m(ids)
    out_model = lrcompile.rewrite(m, all_lowrank(10_000), (ids,))
    assert out_model is m
    assert isinstance(m.blocks[0].fc, LowRank) and isinstance(m.heads["shared"], LowRank)
    assert isinstance(m.lm_head, LowRank)
    assert rel_err(m(ids), ref) < 1e-5  # eager, swapped modules (full rank: fp32 precision)
    # the functional sites run factored under the backend with no policy
    assert rel_err(compile_eager(m)(ids), ref) < 1e-5
    assert len(lowered(m)) == 7 and set(lowered(m).values()) == {"installed"}  # every site, factored


def test_rewrite_accepts_kwargs_inputs():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x=None, scale=1.0):
            return self.fc(x) * scale

    m = KW()
    lrcompile.rewrite(m, all_lowrank(4), {"x": torch.randn(2, 16), "scale": 2.0})
    assert isinstance(m.fc, LowRank) and m.fc.U.shape == (16, 4)


def test_dense_weights_are_released(monkeypatch):
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    refs = [weakref.ref(m[i].weight) for i in (0, 2, 4)]
    bias = m[0].bias
    alive_at = []
    real = LowRank.from_dense.__func__

    def spy(cls, weight, *a, **k):  # one site at a time: the previous sites' dense weights are gone already
        gc.collect()
        alive_at.append([r() is not None for r in refs])
        return real(cls, weight, *a, **k)

    monkeypatch.setattr(LowRank, "from_dense", classmethod(spy))
    lrcompile.rewrite(m, all_lowrank(8), (torch.randn(2, 64),))
    assert alive_at == [[True, True, True], [False, True, True], [False, False, True]]
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    assert m[0].bias is bias  # the bias parameter is kept, same object (optimizer state, state_dict key)
    assert set(m.state_dict()) == {f"{i}.{n}" for i in (0, 2, 4) for n in ("U", "V", "bias")}


def test_tied_head_gets_its_own_factors(toy, tmp_path):
    m, ids = toy
    emb = m.embed.weight.detach().clone()
    lrcompile.rewrite(
        m,
        {"defaults": {"min_features": 0}, "rules": [{"match": "lm_head", "method": "lowrank", "rank": 8}]},
        (ids,),
        report=str(tmp_path / "r.json"),
    )
    assert torch.equal(m.embed.weight, emb)
    row = {s["fqn"]: s for s in json.loads((tmp_path / "r.json").read_text())["sites"]}["lm_head"]
    assert row["status"] == "rewritten" and any("tie broken" in n for n in row["notes"])


def test_no_policy_compile_reports_installed_modules(toy, tmp_path):
    m, ids = toy
    lrcompile.rewrite(m, all_lowrank(5), (ids,))
    rep = tmp_path / "r.json"
    compile_eager(m, report=str(rep))(ids)
    rows = {s["fqn"]: s for s in json.loads(rep.read_text())["sites"]}
    assert rows["blocks.0.fc"]["status"] == "installed" and rows["blocks.0.fc"]["rank"] == 5
    # installed modules and parameters are never sites for another rewrite
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    compile_eager(m, all_lowrank(2), report=str(rep))(ids)
    rows = {s["fqn"]: s for s in json.loads(rep.read_text())["sites"]}
    assert rows["blocks.0.fc"]["status"] == "installed"
    assert set(dict(m.named_parameters())) == set(before)


def test_rewrite_then_train_with_optimizer(toy):
    m, ids = toy
    lrcompile.rewrite(m, all_lowrank(6), (ids,))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)  # built after rewrite: sees the factors
    c = compile_eager(m)
    target = torch.randn(3, 7, 30)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = (c(ids) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert len(lowered(m)) == 7 and set(lowered(m).values()) == {"installed"}  # the graph trained the factors


def test_rule_matching_no_site_warns(toy):
    m, ids = toy
    with pytest.warns(UserWarning, match=r"rule 1 \(match 'nothing\.here'\) matches no site"):
        lrcompile.rewrite(m, {"rules": [{"match": "nothing.here", "method": "lowrank", "rank": 2}]}, (ids,))


def test_adapter_rewrite_keeps_earlier_noble_bases_trainable(toy):
    m, ids = toy
    lrcompile.rewrite(
        m,
        {
            "defaults": {"min_features": 0},
            "rules": [{"match": ["blocks.0.fc", "blocks.0"], "method": "noble", "rank": 4}],
        },
        (ids,),
    )
    noble_fc, noble_w = m.blocks[0].fc, m.blocks[0].lrcompile_w  # swapped in, attached beside F.linear
    assert noble_fc.name == noble_w.name == "noble"
    assert all(p.requires_grad for p in m.parameters())  # NOBLE alone freezes nothing
    lrcompile.rewrite(m, {"rules": [{"match": "heads.shared", "method": "lora", "rank": 2}]}, (ids,))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if n.startswith("heads.shared.lora_")}
    assert lora and trainable - lora == {"blocks.0.fc.weight", "blocks.0.w"}  # the NOBLE bases, nothing else
    assert not noble_fc.tensors()[0].requires_grad  # the earlier NOBLE branch is pre-existing: frozen
    assert not m.blocks[1].fc.weight.requires_grad and not m.heads["shared"].weight.requires_grad


class FalconStyleLinear(nn.Linear):
    """Falcon's FalconLinear: `input @ self.weight.T`, the bias added after."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)  # another function: must not be swapped


def test_a_linear_subclass_that_computes_a_linear_is_swapped_so_eager_calls_see_the_adapter():
    m = nn.Sequential(FalconStyleLinear(16, 16), nn.ReLU(), ScaledLinear(16, 16))
    x = torch.randn(4, 16)
    pol = {"defaults": {"min_features": 0}, "rules": [{"match": "*", "method": "lora", "rank": 4}]}
    lrcompile.rewrite(m, pol, (x,))
    assert isinstance(m[0], LoRA)  # swapped: the eager forward runs the adapter
    assert type(m[2]) is ScaledLinear and isinstance(m[2].lrcompile, LoRA)  # attached, runs when compiled
    with torch.no_grad():
        m[0].lora_B.normal_()
    compiled = torch.compile(m, backend="lrcompile", options={"inductor": False})
    h = torch.relu(m[0](x))
    torch.testing.assert_close(m[0](x), x @ (m[0].weight + m[0].delta()).T + m[0].bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled(x), 2 * (h @ m[2].weight.T + m[2].bias), atol=1e-5, rtol=1e-5)
    assert lowered(m) == {"0": "installed", "2": "installed"}  # both adapters ran in the graph


def test_graphs_shared_by_instances_are_rewritten_for_each_instance():
    """A graph break inside a loop over blocks: Dynamo compiles the block's forward once and runs that graph for
    every block. The capture names each run for its block, as the backend does, so every block is rewritten."""
    from test_calibrate import Loop

    m = Loop()
    x = torch.randn(3, 6)
    ref = m(x)
    lrcompile.rewrite(
        m,
        {
            "defaults": {"min_features": 0, "guard": "off"},
            "rules": [{"match": "blocks.*", "method": "lowrank", "rank": 6}],
        },
        (x,),
        progress=False,
    )
    rows = {r.fqn: r.status for r in m.lrcompile_report.sites()}
    assert rows == {f"blocks.{i}.{n}": "rewritten" for i in range(3) for n in "ab"}
    assert all(type(getattr(blk, n)).__name__ == "LowRank" for blk in m.blocks for n in "ab")
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)  # full rank: the same function
