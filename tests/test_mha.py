"""nn.MultiheadAttention's packed in_proj and out_proj as linear sites (compression and LoRA)."""

import copy

import pytest
import torch
from torch import nn

import lrcompile
from lrcompile.mha import Factored, FactoredMHA

D, HEADS = 32, 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.head = nn.Linear(D, 8)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


pytestmark = pytest.mark.usefixtures("one_thread")


def policy(method, **opts):
    match = ["attn.in_proj", "attn.out_proj"]
    return {"version": 1, "defaults": {"min_features": 1}, "rules": [{"match": match, "method": method, **opts}]}


def x_in():
    return torch.randn(2, 7, D, generator=torch.Generator().manual_seed(3))


def rewritten(model):
    return {r.fqn for r in model.lrcompile_report.sites() if r.status == "rewritten"}


def dense_reference(model, w_in, w_out):
    """A plain copy of `model` whose MHA holds the given matrices."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.attn.in_proj_weight.copy_(w_in)
        ref.attn.out_proj.weight.copy_(w_out)
    return ref


def truncated(w, r):
    P, S, Qh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    return (P[:, :r] * S[:r]) @ Qh[:r]


def test_full_rank_reproduces_dense():
    model, x = Net().eval(), x_in()
    want = model(x)
    lrcompile.rewrite(model, policy("lowrank", rank=D), (x,))
    assert isinstance(model.attn, FactoredMHA) and isinstance(model.attn.out_proj, Factored)
    assert rewritten(model) == {"attn.in_proj", "attn.out_proj"}
    keys = model.state_dict().keys()
    assert "attn.in_proj_weight" not in keys and "attn.out_proj.weight" not in keys and "attn.in_proj.U" in keys
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_rank_r_matches_float64_svd_reference():
    model, x = Net().eval(), x_in()
    r = 5
    ref = dense_reference(model, truncated(model.attn.in_proj_weight, r), truncated(model.attn.out_proj.weight, r))
    lrcompile.rewrite(model, policy("lowrank", rank=r), (x,))
    assert model.attn.in_proj.U.shape == (3 * D, r) and model.attn.out_proj.V.shape == (r, D)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    model.train()
    model(x).sum().backward()
    assert model.attn.in_proj.U.grad is not None and model.attn.out_proj.V.grad is not None


def test_lora_trains_only_the_branches_and_matches_a_dense_reference():
    model, x = Net().eval(), x_in()
    base = copy.deepcopy(model)
    want = model(x)
    lrcompile.rewrite(model, policy("lora", rank=4, alpha=8), (x,))
    torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)  # B = 0 at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"attn.{p}.lora_{ab}" for p in ("in_proj", "out_proj") for ab in "AB"}
    model.train()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).zero_grad()
    model(x).sum().backward()
    assert all(model.get_parameter(n).grad is not None for n in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.eval()
    with torch.no_grad():
        for f in (model.attn.in_proj, model.attn.out_proj):
            f.lora_B.normal_()
    a = model.attn
    w_in = a.in_proj.base + 2.0 * a.in_proj.lora_B @ a.in_proj.lora_A  # s = alpha / r = 2
    w_out = a.out_proj.base + 2.0 * a.out_proj.lora_B @ a.out_proj.lora_A
    ref = dense_reference(base, w_in, w_out)
    assert (ref(x) - want).abs().max() > 1e-3
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_save_load_and_merge(tmp_path):
    model, x = Net().eval(), x_in()
    lrcompile.rewrite(model, policy("lora", rank=3), (x,))
    with torch.no_grad():
        model.attn.in_proj.lora_B.normal_()
        model.attn.out_proj.lora_B.normal_()
    want = model(x)
    lrcompile.save(model, str(tmp_path))
    fresh = Net().eval()
    lrcompile.load(fresh, str(tmp_path))
    assert isinstance(fresh.attn, FactoredMHA)
    torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)
    lrcompile.merge(fresh)
    assert type(fresh.attn) is nn.MultiheadAttention
    assert type(fresh.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)


def test_compiled_matches_eager():
    model, x = Net().eval(), x_in()
    lrcompile.rewrite(model, policy("lowrank", rank=6), (x,))
    assert isinstance(model.attn, FactoredMHA)
    want = model(x)
    compiled = torch.compile(model, backend="lrcompile", options={"inductor": False})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)


def test_backend_policy_says_mha_needs_rewrite():
    model = Net().eval()
    opts = {"policy": policy("lowrank", rank=4), "inductor": False}
    compiled = torch.compile(model, backend="lrcompile", options=opts)
    with pytest.warns(UserWarning, match="attn: MoE experts and nn.MultiheadAttention are sites of lrcompile.rewrite"):
        compiled(x_in())


def test_adapter_state_dict_carries_mha_lora():
    x = x_in()
    a = Net().eval()
    b = copy.deepcopy(a)
    lrcompile.rewrite(a, policy("lora", rank=4), (x,))
    lrcompile.rewrite(b, policy("lora", rank=4), (x,))
    with torch.no_grad():
        a.attn.in_proj.lora_B.normal_()
        a.attn.out_proj.lora_B.normal_()
    sd = lrcompile.adapter_state_dict(a)
    assert set(sd) == {f"attn.{p}.{t}" for p in ("in_proj", "out_proj") for t in ("lora_A", "lora_B", "scaling")}
    lrcompile.load_adapter_state_dict(b, sd)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
