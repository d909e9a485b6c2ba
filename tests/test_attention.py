"""Attention rules: manual attention -> SDPA (pattern matcher), fused QKV, shared-basis K/V; dataflow association
of attention sites with their projections; HF BERT / GPT-2 / Llama from small configs; the eager rewrite path."""

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrcompile
from lrcompile.attention.factors import SharedBasis, StackedStructure
from lrcompile.backend import lrcompile_backend
from lrcompile.families import FAMILIES
from lrcompile.policy import examples
from lrcompile.policy.load import load_policy

transformers = pytest.importorskip("transformers")


class ManualAttn(nn.Module):
    """softmax(QKᵀ/√d + M)V written by hand, in the variants people write."""

    def __init__(self, d=32, heads=4, mask="none", scale="div", p=0.1, bias=True, softmax_dtype=None):
        super().__init__()
        self.h, self.dh, self.mask, self.scale, self.softmax_dtype = heads, d // heads, mask, scale, softmax_dtype
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
        elif self.mask == "add_first":  # the mask first: the scores are not the first operand
            s = m + s
        elif self.mask == "bool":
            s = s.masked_fill(m, float("-inf"))
        elif self.mask == "causal":
            s = s.masked_fill(~self.tril[:T, :T], float("-inf"))
        elif self.mask == "finfo":
            s = s.masked_fill(m, torch.finfo(s.dtype).min)
        elif self.mask == "where":  # m says where to attend
            s = torch.where(m, s, float("-inf"))
        elif self.mask == "where_fill":  # m says where not to
            s = torch.where(m, float("-inf"), s)
        elif self.mask == "where_tensor":  # the fill as a 0-dim tensor (older HF GPT-2)
            s = torch.where(m, s, torch.tensor(torch.finfo(s.dtype).min))
        if self.softmax_dtype is None:
            p = torch.softmax(s, dim=-1)
        else:  # Llama-style: softmax in a wider dtype, back to q's
            p = torch.softmax(s, dim=-1, dtype=self.softmax_dtype).to(q.dtype)
        return self.o((self.drop(p) @ v).transpose(1, 2).reshape(B, T, -1))


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


ATT = lambda method, **kw: {
    "defaults": {"min_features": 0},
    "rules": [  # noqa: E731
        {"match": "*", "kind": "attention", "method": method, **kw}
    ],
}


def mask_for(mask: str, B=2, T=9):
    """A random mask of the kind ManualAttn(mask=...) reads; no row fully masked (-inf and a finite fill differ
    there)."""
    if mask in ("add", "add_first"):
        return torch.randn(B, 1, T, T)
    if mask in ("bool", "finfo", "where_fill"):  # True: masked out
        m = torch.rand(B, 1, T, T) > 0.7
        m[..., 0] = False
        return m
    if mask in ("where", "where_tensor"):  # True: attend
        m = torch.rand(T, T) > 0.3
        m[..., 0] = True
        return m
    return None


@pytest.mark.parametrize(
    "mask,scale",
    [
        ("none", "div"),
        ("add", "mul"),
        ("add_first", "div"),
        ("bool", "div"),
        ("causal", "div"),
        ("finfo", "none"),
        ("where", "div"),
        ("where_fill", "mul"),
        ("where_tensor", "div"),
    ],
)
def test_manual_attention_becomes_sdpa(mask, scale, tmp_path):
    torch.manual_seed(0)
    m = ManualAttn(mask=mask, scale=scale).eval()  # dropout present, in eval mode
    x, mk = torch.randn(2, 9, 32), mask_for(mask)
    args = (x, mk) if mk is not None else (x,)
    ref = m(*args)
    out, graphs, rows = run(m, ATT("sdpa"), *args, report=tmp_path / "r.json")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    t = targets(graphs)
    assert F.scaled_dot_product_attention in t and torch.softmax not in t
    row = next(r for r in rows if r["kind"] == "attention")
    assert (row["fqn"], row["method"], row["status"]) == ("", "sdpa", "rewritten")


def sdpa_node(graphs):
    return next(n for g in graphs for n in g.graph.nodes if n.target is F.scaled_dot_product_attention)


def test_softmax_dtype_float32_is_kept_without_casts(tmp_path):
    m = ManualAttn(mask="add", softmax_dtype=torch.float32).eval()
    x, mk = torch.randn(2, 9, 32), mask_for("add")
    ref = m(x, mk)
    out, graphs, rows = run(m, ATT("sdpa"), x, mk, report=tmp_path / "r.json")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not any(a.target == "to" for a in sdpa_node(graphs).args[:3])  # q, k, v as they come: no cast
    row = next(r for r in rows if r["kind"] == "attention")
    assert row["status"] == "rewritten" and "upcast" not in row["reason"]


def test_softmax_in_float32_over_bfloat16_upcasts_q_k_v(tmp_path):
    """Llama's softmax(..., dtype=torch.float32) over bf16 scores: SDPA runs in float32 (the matcher alone would
    drop the dtype and run it in bf16), at least as close to the float64 truth as the hand-written chain."""
    torch.manual_seed(0)
    m = ManualAttn(mask="add", softmax_dtype=torch.float32, p=0.0).eval()
    exact = copy.deepcopy(m).double()
    exact.softmax_dtype = torch.float64
    m = m.to(torch.bfloat16)
    x, mk = torch.randn(2, 9, 32), mask_for("add")
    truth = exact(x.double(), mk.double())
    ref = m(x.bfloat16(), mk.bfloat16())
    out, graphs, rows = run(m, ATT("sdpa"), x.bfloat16(), mk.bfloat16(), report=tmp_path / "r.json")
    assert out.dtype == torch.bfloat16
    assert [(a.target, a.args[1]) for a in sdpa_node(graphs).args[:3]] == [("to", torch.float32)] * 3
    assert rel(out.double(), truth) <= 1.05 * rel(ref.double(), truth)
    assert rel(out.double(), ref.double()) < 1e-2
    row = next(r for r in rows if r["kind"] == "attention")
    assert row["status"] == "rewritten" and "upcast to torch.float32" in row["reason"]


def test_softmax_narrower_than_q_is_refused(tmp_path):
    m = ManualAttn(mask="causal", softmax_dtype=torch.bfloat16).eval()
    x = torch.randn(2, 9, 32)
    ref = m(x)
    out, graphs, rows = run(m, ATT("sdpa"), x, report=tmp_path / "r.json")
    torch.testing.assert_close(out, ref)
    assert torch.softmax in targets(graphs) and F.scaled_dot_product_attention not in targets(graphs)
    row = next(r for r in rows if r["kind"] == "attention")
    assert row["status"] == "failed" and row["reason"] == "softmax in torch.bfloat16 is narrower than q (torch.float32)"


def test_training_dropout_is_not_rewritten(tmp_path):
    m = ManualAttn(p=0.5).train()
    _, graphs, rows = run(m, ATT("sdpa"), torch.randn(2, 5, 32), report=tmp_path / "r.json")
    row = next(r for r in rows if r["kind"] == "attention")
    assert row["status"] == "failed" and "dropout in training" in row["reason"]
    assert torch.softmax in targets(graphs)


@pytest.mark.parametrize("variant", ["scale_first", "dropout_then_cast", "method_softmax"])
def test_chain_variants_the_walk_reads(variant, tmp_path):
    """c * scores, a dropout before the cast back, and Tensor.softmax(dim, dtype) are chains too."""

    class Variant(ManualAttn):
        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.split(self.q(x), B, T), self.split(self.k(x), B, T), self.split(self.v(x), B, T)
            s = q @ k.transpose(-2, -1)
            if variant == "scale_first":
                p = torch.softmax(0.25 * s, dim=-1)
            elif variant == "dropout_then_cast":
                p = F.dropout(torch.softmax(s / 2.0, dim=-1, dtype=torch.float64), p=0.1, training=False).to(q.dtype)
            else:
                p = (s / 2.0).softmax(-1, torch.float32)
            return self.o((p @ v).transpose(1, 2).reshape(B, T, -1))

    m = Variant().eval()
    x = torch.randn(2, 5, 32)
    ref = m(x)
    out, graphs, rows = run(m, ATT("sdpa"), x, report=tmp_path / "r.json")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    row = next(r for r in rows if r["kind"] == "attention")
    assert row["status"] == "rewritten", row["reason"]
    assert F.scaled_dot_product_attention in targets(graphs) and torch.softmax not in targets(graphs)


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
        "q": "fused_qkv",
        "k": "fused_qkv",
        "v": "fused_qkv",
        "o": "dense",
    }


def test_fused_qkv_low_rank_full_rank_reproduces_and_trains(tmp_path):
    m = ManualAttn().eval()
    x = torch.randn(3, 7, 32)
    ref = m(x)
    out, _, rows = run(m, ATT("fused_qkv", rank=32), x, report=tmp_path / "r.json")
    assert rel(out, ref) < 1e-5
    assert isinstance(m.lrcompile_qkv, SharedBasis) and m.lrcompile_qkv.U.shape == (96, 32)
    att = next(r for r in rows if r["kind"] == "attention")
    assert att["rank"] == 32 and att["rel_error"] < 1e-5
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


FULL_STRUCTURES = [
    {"method": "lowrank", "rank": 32},
    {"method": "monarch", "blocks": 1},
    {"method": "btt", "rank": 32},
    {"method": "blast", "blocks": 1, "rank": 32},
]


@pytest.mark.parametrize("structure", FULL_STRUCTURES, ids=[s["method"] for s in FULL_STRUCTURES])
def test_fused_qkv_structure_at_full_rank_reproduces_and_trains(structure, tmp_path):
    """Each compressing family over the stacked [W_q; W_k; W_v] (96 × 32) at a setting where it is exact; the
    compiled gradients equal the family's own: autograd through its to_dense into the dense layers."""
    m = ManualAttn().eval()
    x = torch.randn(3, 7, 32)
    ref = m(x)
    out, graphs, rows = run(m, ATT("fused_qkv", structure=structure), x, report=tmp_path / "r.json")
    assert rel(out, ref) < 1e-5
    st = m.lrcompile_qkv
    assert isinstance(st, StackedStructure) and st.family is FAMILIES[structure["method"]]
    assert st.family.functional in targets(graphs)
    assert len([t for t in targets(graphs) if t in (F.linear, torch._C._nn.linear)]) == 1  # only o stays linear
    att = next(r for r in rows if r["kind"] == "attention")
    assert att["status"] == "rewritten" and att["rel_error"] < 1e-5
    assert f"structure: {structure['method']}" in " ".join(att["notes"])
    loss = out.square().sum()
    tensors = [t for t in st.tensors() if t.requires_grad]
    got = torch.autograd.grad(loss, tensors)
    W = st.to_dense()
    dense = torch.func.functional_call(m, {"q.weight": W[:32], "k.weight": W[32:64], "v.weight": W[64:]}, (x,))
    want = torch.autograd.grad(dense.square().sum(), tensors)
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-4


def test_fused_qkv_monarch_is_the_familys_own_fit(tmp_path):
    from lrcompile.families.monarch import Monarch

    m = ManualAttn().eval()
    x = torch.randn(3, 7, 32)
    out, _, rows = run(m, ATT("fused_qkv", structure={"method": "monarch", "blocks": 4}), x, report=tmp_path / "r.json")
    W = torch.cat([m.q.weight, m.k.weight, m.v.weight]).detach()
    cfg = m.lrcompile_qkv.cfg
    own = Monarch.from_dense(W, None, cfg).to_dense()
    att = next(r for r in rows if r["kind"] == "attention")
    assert att["rel_error"] == pytest.approx(rel(own.double(), W.double()), rel=1e-6)
    assert att["params_after"] == Monarch.param_count(32, 96, cfg) + 96 < att["params_before"]
    lin = [r for r in rows if r["kind"] == "linear" and r["method"] == "fused_qkv"]
    assert sum(r["params_after"] for r in lin) == att["params_after"]  # the linear rows split it exactly
    with torch.no_grad():  # the graph computes q, k, v with the Monarch matrix
        m.q.weight.copy_(own[:32]), m.k.weight.copy_(own[32:64]), m.v.weight.copy_(own[64:])
    assert rel(out, m(x)) < 1e-5


@pytest.mark.parametrize("blocks", [1, 4])
def test_llama_structured_qkv_and_output_projection(blocks, tmp_path):
    """fused_qkv with a Monarch structure for Q/K/V; the output projection is a plain linear site, compressed by
    an ordinary linear rule."""
    model, inputs = llama("eager")
    pol = {
        "defaults": {"min_features": 0},
        "rules": [
            {
                "match": "*",
                "kind": "attention",
                "method": "fused_qkv",
                "structure": {"method": "monarch", "blocks": blocks},
            },
            {"match": "*.o_proj", "method": "monarch", "blocks": blocks},
        ],
    }
    with torch.no_grad():
        ref = first(model(**inputs))
        out, _, rows = run(model, pol, report=tmp_path / "r.json", **inputs)
    by = {(r["kind"], r["fqn"]): r for r in rows}
    a = "model.layers.0.self_attn"
    att, o = by[("attention", a)], by[("linear", a + ".o_proj")]
    assert att["status"] == o["status"] == "rewritten" and (att["method"], o["method"]) == ("fused_qkv", "monarch")
    assert by[("linear", a + ".k_proj")]["method"] == "fused_qkv"
    assert att["in_features"] == 48 and att["out_features"] == 48 + 2 * 24  # GQA: 2 KV heads of 12
    if blocks == 1:  # one block per factor: full rank
        assert rel(first(out), ref) < 1e-4 and att["rel_error"] < 1e-5 and o["rel_error"] < 1e-5
    else:
        assert att["params_after"] < att["params_before"] and o["params_after"] < o["params_before"]
        assert 0.1 < att["rel_error"] < 1 and rel(first(out), ref) > 1e-3


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
    with pytest.raises(lrcompile.PolicyError, match="either rank .* or structure, not both"):
        load_policy(ATT("fused_qkv", rank=4, structure="monarch"))
    with pytest.raises(
        lrcompile.PolicyError,
        match="structure must be a mapping with method: one of blast, btt, lowrank, monarch.*, got 'lora'",
    ):
        load_policy(ATT("fused_qkv", structure={"method": "lora"}))
    with pytest.raises(lrcompile.PolicyError, match="structure: method 'btt' needs a 'rank'"):
        load_policy(ATT("fused_qkv", structure={"method": "btt"}))
    assert load_policy(ATT("fused_qkv", structure="monarch")).rules[0].config.family()[1].blocks == 4


def test_structure_errors_name_the_file_and_line(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(
        "version: 1\nrules:\n  - match: '*'\n    kind: attention\n    method: fused_qkv\n"
        "    structure: {method: monarch, blcks: 2}\n"
    )
    with pytest.raises(lrcompile.PolicyError) as e:
        load_policy(str(f))
    msg = str(e.value)
    assert (
        "\n" not in msg and msg.startswith("p.yaml:6: rule 1") and "unknown option 'blcks'" in msg and "'blocks'" in msg
    )


# --- HF models ----------------------------------------------------------------------------------------------


def bert(impl):
    cfg = transformers.BertConfig(
        vocab_size=120,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        attn_implementation=impl,
    )
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0
    return transformers.BertModel(cfg).eval(), {"input_ids": torch.randint(0, 120, (2, 11)), "attention_mask": mask}


def gpt2(impl):
    cfg = transformers.GPT2Config(
        vocab_size=120, n_embd=48, n_layer=2, n_head=4, n_positions=64, attn_implementation=impl
    )
    return transformers.GPT2LMHeadModel(cfg).eval(), {"input_ids": torch.randint(0, 120, (2, 11))}


def llama(impl):
    cfg = transformers.LlamaConfig(
        vocab_size=120,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=impl,
    )
    return transformers.LlamaForCausalLM(cfg).eval(), {"input_ids": torch.randint(0, 120, (2, 11))}


def first(out):
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


ATTN_FQN = {
    "bert": "encoder.layer.{}.attention.self",
    "gpt2": "transformer.h.{}.attn",
    "llama": "model.layers.{}.self_attn",
}
FULL = {"fused_qkv": {}, "fused_qkv_rank": {"rank": 10_000}, "shared_kv": {"rank": 10_000}, "sdpa": {}}


@pytest.mark.parametrize("make", [bert, gpt2, llama], ids=["bert", "gpt2", "llama"])
@pytest.mark.parametrize("variant", ["sdpa", "fused_qkv", "fused_qkv_rank", "shared_kv"])
def test_hf_full_rank_reproduces(make, variant, tmp_path):
    method = variant.removesuffix("_rank")
    model, inputs = make("eager" if method == "sdpa" else "sdpa")
    with torch.no_grad():
        ref = first(model(**inputs))
        out, graphs, rows = run(model, ATT(method, **FULL[variant]), report=tmp_path / "r.json", **inputs)
    assert rel(first(out), ref) < 1e-4
    att = {r["fqn"]: r for r in rows if r["kind"] == "attention"}
    names = {ATTN_FQN[make.__name__].format(i) for i in range(2)}
    assert set(att) == names
    if variant == "fused_qkv" and make is gpt2:  # c_attn is already one projection
        assert {r["status"] for r in att.values()} == {"dense"}
        assert all("already come from one projection" in r["reason"] for r in att.values())
    else:
        assert {r["status"] for r in att.values()} == {"rewritten"}, att
    if method == "sdpa":
        assert torch.softmax not in targets(graphs) and F.softmax not in targets(graphs)
    if variant == "fused_qkv_rank":  # one shared basis for Q, K and V (GPT-2: a low-rank c_attn)
        basis = model.get_submodule(ATTN_FQN[make.__name__].format(0)).lrcompile_qkv
        assert basis.U.shape == ({"bert": 144, "gpt2": 144, "llama": 96}[make.__name__], 48)
        assert all(r["rel_error"] < 1e-5 for r in att.values())
    if method == "shared_kv":
        basis = model.get_submodule(ATTN_FQN[make.__name__].format(0)).lrcompile_kv
        kv = {"bert": 96, "gpt2": 96, "llama": 48}[make.__name__]  # Llama: 2 KV heads of 12
        assert basis.U.shape[0] == kv
        if make is gpt2:  # K and V are rows 48:144 of c_attn; Q rows stay dense
            assert (
                "k=transformer.h.0.attn.c_attn[48:96], v=transformer.h.0.attn.c_attn[96:144]"
                in att["transformer.h.0.attn"]["notes"][0]
            )


def test_llama_bf16_eager_attention_becomes_float32_sdpa(tmp_path):
    """HF Llama's eager attention takes softmax(..., dtype=torch.float32) of bf16 scores: the SDPA it becomes runs
    in float32 and lands at least as close to the float64 model as the bf16 eager model does."""
    model, inputs = llama("eager")
    model = model.to(torch.bfloat16)
    exact, _ = llama("eager")
    exact.load_state_dict(model.state_dict())
    exact = exact.double()
    with torch.no_grad():
        ref, truth = first(model(**inputs)).double(), first(exact(**inputs))
        out, graphs, rows = run(model, ATT("sdpa"), report=tmp_path / "r.json", **inputs)
    out = first(out).double()
    assert rel(out, truth) <= 1.05 * rel(ref, truth) and rel(out, ref) < 1e-2
    att = [r for r in rows if r["kind"] == "attention"]
    assert len(att) == 2 and all(r["status"] == "rewritten" and "upcast to torch.float32" in r["reason"] for r in att)
    assert torch.softmax not in targets(graphs) and F.softmax not in targets(graphs)


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_hf_shared_kv_low_rank_is_lossy_and_reported(make, tmp_path):
    model, inputs = make("sdpa")
    with torch.no_grad():
        ref = first(model(**inputs))
        out, _, rows = run(model, ATT("shared_kv", rank=0.5), report=tmp_path / "r.json", **inputs)
    att = [r for r in rows if r["kind"] == "attention"]
    assert all(
        r["status"] == "rewritten" and 0 < r["rel_error"] < 1 and r["params_after"] < r["params_before"] for r in att
    )
    assert rel(first(out), ref) > 1e-4
    lin = {r["fqn"]: r for r in rows if r["kind"] == "linear"}
    before = sum(r["params_before"] for r in lin.values())
    after = sum(r["params_after"] for r in lin.values())
    saved = sum(r["params_before"] - r["params_after"] for r in att)
    assert before - after == saved  # the linear rows carry the attention rewrite's savings exactly


def test_attention_rule_and_linear_rule_together_on_llama(tmp_path):
    model, inputs = llama("eager")
    pol = {
        "defaults": {"min_features": 0},
        "rules": [
            {"match": "*", "kind": "attention", "method": "shared_kv", "rank": 10_000},
            {"match": "lm_head", "method": "dense"},
            {"match": "*", "method": "lowrank", "rank": 10_000},
        ],
    }
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


def test_stale_shared_kv_factors_are_refit_after_assign():
    m = ManualAttn().eval()
    x = torch.randn(2, 5, 32)
    c = torch.compile(m, backend="lrcompile", options={"policy": ATT("shared_kv", rank=64), "inductor": False})
    c(x)
    assert any("lrcompile_kv" in n for n, _ in m.named_parameters())  # the K/V basis was made and is fed
    other = ManualAttn().eval()
    m.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, strict=False, assign=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same module with new weights: no "other instance" runs dense
        torch.testing.assert_close(c(x), other(x), atol=1e-5, rtol=1e-5)


def test_eager_rewrite_installs_attention_factors_and_freezes_replaced_weights(monkeypatch):
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
    basis, factors = attn.lrcompile_kv, attn.lrcompile_kv.U.detach().clone()
    made = []
    real = SharedBasis.from_stacked.__func__
    monkeypatch.setattr(
        SharedBasis, "from_stacked", classmethod(lambda cls, *a, **k: made.append(a) or real(cls, *a, **k))
    )
    with torch.no_grad():
        out = first(torch.compile(model, backend="lrcompile", options={"policy": pol, "inductor": False})(**inputs))
    assert rel(out, ref) < 1e-4
    assert made == [] and attn.lrcompile_kv is basis and torch.equal(basis.U, factors)  # found again, not remade


@pytest.mark.slow
def test_inductor_end_to_end_attention_rewrites():
    model, inputs = llama("eager")
    pol = {
        "defaults": {"min_features": 0},
        "rules": [
            {"match": "model.layers.0.self_attn", "kind": "attention", "method": "sdpa"},
            {"match": "*", "kind": "attention", "method": "shared_kv", "rank": 10_000},
        ],
    }
    with torch.no_grad():
        ref = first(model(**inputs))
        out = first(torch.compile(model, backend="lrcompile", options={"policy": pol})(**inputs))
    assert rel(out, ref) < 1e-4


@pytest.mark.parametrize("make", [llama, gpt2, bert], ids=["llama", "gpt2", "bert"])
def test_attn_shared_kv_example_matches_hf_models(make, tmp_path):
    """The shipped attn-shared-kv example on the HF models (its min_features lowered for their tiny width)."""
    pol = load_policy(examples.path("attn-shared-kv"))
    pol.defaults.min_features, pol.defaults.max_error = 0, None
    model, inputs = make("eager")
    with torch.no_grad():
        run(model, pol, report=tmp_path / "r.json", **inputs)
    rows = json.loads((tmp_path / "r.json").read_text())["sites"]
    att = [r for r in rows if r["kind"] == "attention"]
    assert len(att) == 2 and {(r["method"], r["status"]) for r in att} == {("shared_kv", "rewritten")}
    out_proj = {"llama": "self_attn.o_proj", "gpt2": "attn.c_proj", "bert": "attention.output.dense"}[make.__name__]
    methods = {r["fqn"]: r["method"] for r in rows if r["kind"] == "linear"}
    assert [m for f, m in methods.items() if f.endswith(out_proj)] == ["monarch", "monarch"]


def _unrecognised(kind):
    import transformers

    ids = {"input_ids": torch.randint(0, 100, (2, 8))}
    if kind == "bloom":
        return transformers.BloomModel(
            transformers.BloomConfig(vocab_size=100, hidden_size=64, n_layer=1, n_head=4)
        ).eval(), ids
    cfg = transformers.Gemma2Config(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        attn_implementation="eager",
    )
    return transformers.Gemma2Model(cfg).eval(), ids


@pytest.mark.parametrize("kind, path", [("bloom", "h.0.self_attention"), ("gemma2", "layers.0.self_attn")])
def test_an_attention_rule_on_an_unrecognised_attention_says_so(tmp_path, kind, path):
    """Fused baddbmm scores (BLOOM) and soft-capped scores (Gemma2) are no attention site: a failed row and one
    warning, not an output silently identical to dense."""
    m, inputs = _unrecognised(kind)
    rep = tmp_path / "r.json"
    with pytest.warns(UserWarning, match=f"{path}: a softmax here is no attention lrcompile recognises"):
        torch.compile(
            m, backend="lrcompile", options={"policy": ATT("shared_kv", rank=8), "inductor": False, "report": str(rep)}
        )(**inputs)
    rows = {r["fqn"]: r for r in json.loads(rep.read_text())["sites"] if r["kind"] == "attention"}
    assert rows[path]["status"] == "failed"


def test_a_router_softmax_is_not_reported_as_an_attention():
    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(16, 4)

        def forward(self, x):
            return torch.softmax(self.gate(x), -1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.compile(Router(), backend="lrcompile", options={"policy": ATT("shared_kv", rank=8), "inductor": False})(
            torch.randn(2, 16)
        )


def test_refresh_refits_attention_factors_after_a_write_through_data():
    m = ManualAttn().eval()
    x = torch.randn(2, 5, 32)
    c = torch.compile(m, backend="lrcompile", options={"policy": ATT("shared_kv", rank=64), "inductor": False})
    c(x)
    m.k.weight.data.mul_(3)
    assert (c(x) - m(x)).abs().max() > 1e-3  # no stamp sees a write through .data
    assert lrcompile.refresh(m) == 1
    torch.testing.assert_close(c(x), m(x), atol=1e-5, rtol=1e-5)
