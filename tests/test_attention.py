"""Attention rules: manual attention -> SDPA (pattern matcher), fused QKV, shared-basis K/V; dataflow association
of attention sites with their projections; HF BERT / GPT-2 / Llama from small configs; the eager rewrite path."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrcompile
from lrcompile.attention import SharedBasis
from lrcompile.backend import lrcompile_backend
from lrcompile.policy import load_policy

transformers = pytest.importorskip("transformers")


class ManualAttn(nn.Module):
    """softmax(QKᵀ/√d + M)V written by hand, in the variants people write."""

    def __init__(self, d=32, heads=4, mask="none", scale="div", p=0.1, bias=True):
        super().__init__()
        self.h, self.dh, self.mask, self.scale = heads, d // heads, mask, scale
        self.q, self.k, self.v = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.o = nn.Linear(d, d)
        self.drop = nn.Dropout(p)
        self.register_buffer("tril", torch.tril(torch.ones(16, 16, dtype=torch.bool)))

    def split(self, t, B, T):
        return t.view(B, T, self.h, self.dh).transpose(1, 2)

    def forward(self, x, m=None):
        B, T, _ = x.shape
        q, k, v = self.split(self.q(x), B, T), self.split(self.k(x), B, T), self.split(self.v(x), B, T)
        s = q @ k.transpose(-2, -1)
        if self.scale == "div":
            s = s / math.sqrt(self.dh)
        elif self.scale == "mul":
            s = s * (1.0 / math.sqrt(self.dh))
        if self.mask == "add":
            s = s + m
        elif self.mask == "bool":
            s = s.masked_fill(m, float("-inf"))
        elif self.mask == "causal":
            s = s.masked_fill(~self.tril[:T, :T], float("-inf"))
        elif self.mask == "finfo":
            s = s.masked_fill(m, torch.finfo(s.dtype).min)
        p = self.drop(torch.softmax(s, dim=-1))
        return self.o((p @ v).transpose(1, 2).reshape(B, T, -1))


def run(model, policy, *args, report=None, **kw):
    """Compile with the backend (no Inductor); returns (output, the graphs that run, report rows)."""
    graphs = []
    opts = {"policy": policy, "inductor": False, **({"report": str(report)} if report else {})}

    def backend(gm, inputs):
        fn = lrcompile_backend(gm, inputs, options=opts)
        graphs.append(fn.fn)
        return fn

    out = torch.compile(model, backend=backend)(*args, **kw)
    rows = json.loads(report.read_text())["sites"] if report else None
    return out, graphs, rows


def targets(graphs):
    return [n.target for g in graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


ATT = lambda method, **kw: {"defaults": {"min_features": 0}, "rules": [  # noqa: E731
    {"match": "*", "kind": "attention", "method": method, **kw}]}


@pytest.mark.parametrize("mask,scale", [("none", "div"), ("add", "mul"), ("bool", "div"), ("causal", "div"),
                                        ("finfo", "none")])
def test_manual_attention_becomes_sdpa(mask, scale, tmp_path):
    torch.manual_seed(0)
    m = ManualAttn(mask=mask, scale=scale).eval()  # dropout present, in eval mode
    x = torch.randn(2, 9, 32)
    masks = {"add": torch.randn(2, 1, 9, 9), "bool": torch.rand(9, 9) > 0.7, "finfo": torch.rand(2, 1, 9, 9) > 0.7}
    if mask in ("bool", "finfo"):
        masks[mask][..., 0] = False  # no row fully masked (where -inf and a finite fill differ)
    args = (x, masks[mask]) if mask in masks else (x,)
    ref = m(*args)
    out, graphs, rows = run(m, ATT("sdpa"), *args, report=tmp_path / "r.json")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    t = targets(graphs)
    assert F.scaled_dot_product_attention in t and torch.softmax not in t
    row = next(r for r in rows if r["kind"] == "attention")
    assert (row["fqn"], row["method"], row["status"]) == ("", "sdpa", "rewritten")


def test_training_dropout_is_not_rewritten(tmp_path):
    m = ManualAttn(p=0.5).train()
    _, graphs, rows = run(m, ATT("sdpa"), torch.randn(2, 5, 32), report=tmp_path / "r.json")
    row = next(r for r in rows if r["kind"] == "attention")
    assert row["status"] == "failed" and "dropout in training" in row["reason"]
    assert torch.softmax in targets(graphs)


def test_probabilities_used_twice_are_left_alone(tmp_path):
    class Returns(ManualAttn):
        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.split(self.q(x), B, T), self.split(self.k(x), B, T), self.split(self.v(x), B, T)
            p = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)
            return p @ v, p  # the probabilities are an output too

    m = Returns().eval()
    x = torch.randn(2, 5, 32)
    ref = m(x)
    out, graphs, rows = run(m, ATT("sdpa"), x, report=tmp_path / "r.json")
    torch.testing.assert_close(out, ref)
    assert torch.softmax in targets(graphs)
    assert not any(r["kind"] == "attention" and r["status"] == "rewritten" for r in rows)


def test_fused_qkv_dense_is_exact_and_one_matmul(tmp_path):
    m = ManualAttn(mask="causal").eval()
    m.k.bias = None  # a projection without bias beside two with
    x = torch.randn(3, 7, 32)
    ref = m(x)
    out, graphs, rows = run(m, ATT("fused_qkv"), x, report=tmp_path / "r.json")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    lin = [n for g in graphs for n in g.graph.nodes if n.target in (F.linear, torch._C._nn.linear)]
    assert len(lin) == 2  # qkv + o
    att = next(r for r in rows if r["kind"] == "attention")
    assert att["status"] == "rewritten" and "q=q, k=k, v=v" in att["notes"][0]
    assert not any(n.startswith("lrcompile") for n, _ in m.named_children())  # no new parameters
    assert {r["fqn"]: r["method"] for r in rows if r["kind"] == "linear"} == {
        "q": "fused_qkv", "k": "fused_qkv", "v": "fused_qkv", "o": "dense"}


def test_fused_qkv_low_rank_full_rank_reproduces_and_trains(tmp_path):
    m = ManualAttn().eval()
    x = torch.randn(3, 7, 32)
    ref = m(x)
    out, _, rows = run(m, ATT("fused_qkv", rank=32), x, report=tmp_path / "r.json")
    assert rel(out, ref) < 1e-5
    assert isinstance(m.lrcompile_qkv, SharedBasis) and m.lrcompile_qkv.U.shape == (96, 32)
    att = next(r for r in rows if r["kind"] == "attention")
    assert att["rank"] == 32 and att["rel_error"] < 1e-5
    c = torch.compile(m, backend="lrcompile", options={"policy": ATT("fused_qkv", rank=8), "inductor": False})
    torch._dynamo.reset()
    m2 = ManualAttn().eval()
    c = torch.compile(m2, backend="lrcompile", options={"policy": ATT("fused_qkv", rank=8), "inductor": False})
    c(x).sum().backward()
    assert m2.lrcompile_qkv.U.grad is not None and m2.lrcompile_qkv.V.grad is not None
    assert m2.q.weight.grad is None and m2.q.bias.grad is not None  # biases still train


def test_shared_kv_is_the_stacked_svd(tmp_path):
    m = ManualAttn(mask="add").eval()
    x, mask = torch.randn(2, 6, 32), torch.randn(2, 1, 6, 6)
    ref = m(x, mask)
    out, graphs, rows = run(m, ATT("shared_kv", rank=64), x, mask, report=tmp_path / "r.json")
    assert rel(out, ref) < 1e-5  # rank ≥ min(in, 2·out): full rank
    torch._dynamo.reset()
    del m.lrcompile_kv
    out, graphs, rows = run(m, ATT("shared_kv", rank=6), x, mask, report=tmp_path / "r.json")
    basis = m.lrcompile_kv
    W = torch.cat([m.k.weight, m.v.weight]).detach().double()
    S = torch.linalg.svdvals(W)
    best = (S[6:].square().sum().sqrt() / S.square().sum().sqrt()).item()  # Eckart–Young optimum
    att = next(r for r in rows if r["kind"] == "attention")
    assert att["rel_error"] == pytest.approx(best, rel=1e-4)
    assert att["params_after"] == 6 * (32 + 64) + 64 and att["params_before"] == 2 * 32 * 32 + 64
    # x·Vᵀ once: one linear with V, one with the stacked U
    lin = [n for g in graphs for n in g.graph.nodes if n.target in (F.linear, torch._C._nn.linear)]
    assert sum(1 for n in lin if n.args[1].op == "placeholder" and n.args[1].target.endswith("shared_kv_V")) == 1
    # numbers: the graph computes K = x (U_k V)ᵀ and V = x (U_v V)ᵀ
    with torch.no_grad():
        m.k.weight.copy_(basis.U[:32] @ basis.V)
        m.v.weight.copy_(basis.U[32:] @ basis.V)
    torch.testing.assert_close(out, m(x, mask), atol=1e-5, rtol=1e-5)


def test_policy_validation_for_attention_rules():
    with pytest.raises(lrcompile.PolicyError, match="rank is required"):
        load_policy(ATT("shared_kv"))
    with pytest.raises(lrcompile.PolicyError, match="applies to attention sites only"):
        load_policy({"rules": [{"match": "*", "method": "shared_kv", "rank": 4}]})
    with pytest.raises(lrcompile.PolicyError, match="unknown option 'rnak'.*did you mean 'rank'"):
        load_policy(ATT("fused_qkv", rnak=4))
    with pytest.raises(lrcompile.PolicyError, match="kind: attention takes: dense, sdpa, fused_qkv, shared_kv"):
        load_policy(ATT("lowrank", rank=4))
    assert load_policy(ATT("fused_qkv")).rules[0].config.rank is None


# --- HF models ----------------------------------------------------------------------------------------------

def bert(impl):
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64, attn_implementation=impl)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0
    return transformers.BertModel(cfg).eval(), {"input_ids": torch.randint(0, 120, (2, 11)), "attention_mask": mask}


def gpt2(impl):
    cfg = transformers.GPT2Config(vocab_size=120, n_embd=48, n_layer=2, n_head=4, n_positions=64, attn_implementation=impl)
    return transformers.GPT2LMHeadModel(cfg).eval(), {"input_ids": torch.randint(0, 120, (2, 11))}


def llama(impl):
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation=impl)
    return transformers.LlamaForCausalLM(cfg).eval(), {"input_ids": torch.randint(0, 120, (2, 11))}


def first(out):
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


ATTN_FQN = {"bert": "encoder.layer.{}.attention.self", "gpt2": "transformer.h.{}.attn", "llama": "model.layers.{}.self_attn"}
FULL = {"fused_qkv": {}, "shared_kv": {"rank": 10_000}, "sdpa": {}}


@pytest.mark.parametrize("make", [bert, gpt2, llama], ids=["bert", "gpt2", "llama"])
@pytest.mark.parametrize("method", ["sdpa", "fused_qkv", "shared_kv"])
def test_hf_full_rank_reproduces(make, method, tmp_path):
    model, inputs = make("eager" if method == "sdpa" else "sdpa")
    with torch.no_grad():
        ref = first(model(**inputs))
        out, graphs, rows = run(model, ATT(method, **FULL[method]), report=tmp_path / "r.json", **inputs)
    assert rel(first(out), ref) < 1e-4
    att = {r["fqn"]: r for r in rows if r["kind"] == "attention"}
    names = {ATTN_FQN[make.__name__].format(i) for i in range(2)}
    assert set(att) == names
    if method == "fused_qkv" and make is gpt2:  # c_attn is already one projection
        assert {r["status"] for r in att.values()} == {"dense"}
        assert all("already come from one projection" in r["reason"] for r in att.values())
    else:
        assert {r["status"] for r in att.values()} == {"rewritten"}, att
    if method == "sdpa":
        assert torch.softmax not in targets(graphs) and F.softmax not in targets(graphs)
    if method == "shared_kv":
        basis = model.get_submodule(ATTN_FQN[make.__name__].format(0)).lrcompile_kv
        kv = {"bert": 96, "gpt2": 96, "llama": 48}[make.__name__]  # Llama: 2 KV heads of 12
        assert basis.U.shape[0] == kv
        if make is gpt2:  # K and V are rows 48:144 of c_attn; Q rows stay dense
            assert "k=transformer.h.0.attn.c_attn[48:96], v=transformer.h.0.attn.c_attn[96:144]" in att[
                "transformer.h.0.attn"]["notes"][0]


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_hf_shared_kv_low_rank_is_lossy_and_reported(make, tmp_path):
    model, inputs = make("sdpa")
    with torch.no_grad():
        ref = first(model(**inputs))
        out, _, rows = run(model, ATT("shared_kv", rank=0.5), report=tmp_path / "r.json", **inputs)
    att = [r for r in rows if r["kind"] == "attention"]
    assert all(r["status"] == "rewritten" and 0 < r["rel_error"] < 1 and r["params_after"] < r["params_before"]
               for r in att)
    assert rel(first(out), ref) > 1e-4
    lin = {r["fqn"]: r for r in rows if r["kind"] == "linear"}
    before = sum(r["params_before"] for r in lin.values())
    after = sum(r["params_after"] for r in lin.values())
    saved = sum(r["params_before"] - r["params_after"] for r in att)
    assert before - after == saved  # the linear rows carry the attention rewrite's savings exactly


def test_attention_rule_and_linear_rule_together_on_llama(tmp_path):
    model, inputs = llama("eager")
    pol = {"defaults": {"min_features": 0}, "rules": [
        {"match": "*", "kind": "attention", "method": "shared_kv", "rank": 10_000},
        {"match": "lm_head", "method": "dense"},
        {"match": "*", "method": "lowrank", "rank": 10_000}]}
    with torch.no_grad():
        ref = first(model(**inputs))
        out, _, rows = run(model, pol, report=tmp_path / "r.json", **inputs)
    assert rel(first(out), ref) < 1e-4
    lin = {r["fqn"]: r for r in rows if r["kind"] == "linear"}
    assert lin["model.layers.0.self_attn.k_proj"]["method"] == "shared_kv"
    assert lin["model.layers.0.self_attn.q_proj"]["method"] == "lowrank"
    assert lin["model.layers.0.mlp.up_proj"]["method"] == "lowrank"
    assert not hasattr(model.model.layers[0].self_attn.k_proj, "lrcompile")  # claimed: no linear factors


def test_stale_shared_kv_factors_are_refit():
    m = ManualAttn().eval()
    x = torch.randn(2, 5, 32)
    c = torch.compile(m, backend="lrcompile", options={"policy": ATT("shared_kv", rank=64), "inductor": False})
    c(x)
    other = ManualAttn().eval()
    m.load_state_dict({k: v for k, v in other.state_dict().items()}, strict=False)
    torch.testing.assert_close(c(x), other(x), atol=1e-5, rtol=1e-5)


def test_eager_rewrite_installs_attention_factors_and_freezes_replaced_weights():
    model, inputs = llama("eager")
    with torch.no_grad():
        ref = first(model(**inputs))
    pol = ATT("shared_kv", rank=10_000)
    lrcompile.rewrite(model, pol, inputs)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.lrcompile_kv, SharedBasis) and attn.lrcompile_kv.U.requires_grad
    assert not attn.k_proj.weight.requires_grad and attn.q_proj.weight.requires_grad  # K/V dense weights unused
    rows = {r.fqn: r for r in model.lrcompile_report.sites()}
    assert rows["model.layers.0.self_attn"].status == "rewritten"
    factors = attn.lrcompile_kv.U.detach().clone()
    with torch.no_grad():
        out = first(torch.compile(model, backend="lrcompile", options={"policy": pol, "inductor": False})(**inputs))
    assert rel(out, ref) < 1e-4
    assert attn.lrcompile_kv.U is not None and torch.equal(attn.lrcompile_kv.U, factors)  # found again, not remade


@pytest.mark.slow
def test_inductor_end_to_end_attention_rewrites():
    model, inputs = llama("eager")
    pol = {"defaults": {"min_features": 0}, "rules": [
        {"match": "model.layers.0.self_attn", "kind": "attention", "method": "sdpa"},
        {"match": "*", "kind": "attention", "method": "shared_kv", "rank": 10_000}]}
    with torch.no_grad():
        ref = first(model(**inputs))
        out = first(torch.compile(model, backend="lrcompile", options={"policy": pol})(**inputs))
    assert rel(out, ref) < 1e-4
