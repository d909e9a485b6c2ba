"""The fusion pass (passes/fuse.py) and its lowering (passes/lower.py): what a group absorbs and what it refuses, on
hand-built FX graphs; then tiny HF BERT, GPT-2 and Llama through the backend with fusion on, against fusion off,
with the kernels running under TRITON_INTERPRET=1 (conftest sets it before triton is imported)."""

import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import all_lowrank, compile_eager, hf_output, rel_err, spy_launches, tiny_hf

from lrcompile.families.adapters.lora import LoRA
from lrcompile.families.lowrank import LowRank
from lrcompile.kernels import OPS, runtime
from lrcompile.passes import fuse as fuse_mod
from lrcompile.passes import lower as lower_mod
from lrcompile.passes.fuse import contractible, find_groups
from lrcompile.tune.candidates import lora_merged

triton = pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

IN, OUT, R = 13, 11, 3


@pytest.fixture(autouse=True)
def launches(monkeypatch):
    """Every Triton launch, by kernel name (the kernels must really run, interpreted)."""
    assert runtime.interpreting() is True
    return spy_launches(monkeypatch)


def kernel_ops(gm: fx.GraphModule) -> list[fx.Node]:
    ops = {getattr(torch.ops.lrcompile, n).default for n in OPS}
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ops]


def build(body, inputs: dict):
    """A GraphModule from `body(graph, placeholders) -> output node`, and its real example inputs."""
    g = fx.Graph()
    phs = {k: g.placeholder(k) for k in inputs}
    g.output(body(g, phs))
    return fx.GraphModule(torch.nn.Module(), g), list(inputs.values())


def lowrank_inputs(dtype=torch.float32, lead=(2, 5), **extra):
    return {
        "x": torch.randn(*lead, IN, dtype=dtype),
        "b": torch.randn(OUT, dtype=dtype),
        "U": torch.randn(OUT, R, dtype=dtype) / 2,
        "V": torch.randn(R, IN, dtype=dtype) / IN**0.5,
        **extra,
    }


def site(g, p, x=None, bias=True):
    return g.call_function(
        LowRank.functional, (p["x"] if x is None else x, None, p["b"] if bias else None, p["U"], p["V"])
    )


def fused_vs_unfused(gm, inputs, tol=1e-5):
    """Lower a copy of `gm`; the lowered graph computes what the original does. Returns (groups, lowered)."""
    want = gm(*inputs)
    gm2 = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    lowered, groups = lower_mod.fuse(gm2, inputs)
    got = lowered(*inputs)
    assert rel_err(got, want) < tol, rel_err(got, want)
    assert len(kernel_ops(lowered)) == len(groups)
    return groups, lowered


ACTS = {
    "gelu": lambda g, y: g.call_function(F.gelu, (y,)),
    "gelu_tanh": lambda g, y: g.call_function(F.gelu, (y,), {"approximate": "tanh"}),
    "silu": lambda g, y: g.call_function(F.silu, (y,)),
    "relu": lambda g, y: g.call_method("relu", (y,)),
    "tanh": lambda g, y: g.call_function(torch.tanh, (y,)),
}


@pytest.mark.parametrize("act", list(ACTS))
def test_absorbs_bias_activation_and_residual(act, launches):
    def body(g, p):
        return g.call_function(operator.add, (ACTS[act](g, site(g, p)), p["res"]))

    gm, inputs = build(body, lowrank_inputs(res=torch.randn(2, 5, OUT)))
    groups, lowered = fused_vs_unfused(gm, inputs)
    (grp,) = groups
    assert grp.steps == ["add_row", act, "add"] and len(grp.epilogue) == 2
    assert [n.target for n in lowered.graph.nodes if n.op in ("call_function", "call_method")] == [
        kernel_ops(lowered)[0].target
    ]  # the activation and the add are gone: one kernel op
    assert launches == ["chain_kernel"]


def test_absorbs_prologue_cast_and_scale_and_the_output_cast():
    """x (fp32) → .to(bf16) → · 0.5 → site (bf16 factors) → .float(): one op reading fp32, writing fp32."""

    def body(g, p):
        xs = g.call_function(operator.mul, (g.call_method("to", (p["x"], torch.bfloat16)), 0.5))
        return g.call_method("float", (site(g, p, x=xs),))

    inputs = lowrank_inputs(torch.bfloat16)
    inputs["x"] = inputs["x"].float()
    gm, example = build(body, inputs)
    groups, lowered = fused_vs_unfused(gm, example, tol=2e-2)
    (grp,) = groups
    assert len(grp.prologue) == 2 and grp.alpha == 0.5 and grp.x.name == "x" and len(grp.epilogue) == 1
    (op,) = kernel_ops(lowered)
    assert op.args[0].name == "x" and op.args[-1] == torch.float32
    assert lowered(*example).dtype == torch.float32


def test_views_and_eval_dropout_ride_along():
    def body(g, p):
        y = g.call_method("view", (site(g, p), 10, OUT))
        y = g.call_function(F.dropout, (y,), {"p": 0.1, "training": False})
        return g.call_function(torch.relu, (y,))

    gm, inputs = build(body, lowrank_inputs())
    (grp,), lowered = fused_vs_unfused(gm, inputs)
    assert grp.steps == ["add_row", "relu"] and len(grp.epilogue) == 3 and len(grp.views) == 1
    assert lowered(*inputs).shape == (10, OUT)


def test_multi_user_nodes_are_not_absorbed():
    """No duplicated work: a node with a user outside the group ends it (the site's output read twice, an input
    cast read by two consumers, an activation read twice)."""

    def body(g, p):
        xc = g.call_method("to", (p["x"], torch.float32))
        y = site(g, p, x=xc)
        a = g.call_function(torch.relu, (y,))
        twice = g.call_function(operator.add, (a, y))  # y has two users
        z = site(g, p, x=xc)  # xc has two users
        t = g.call_function(torch.tanh, (z,))
        return g.call_function(operator.mul, (g.call_function(operator.add, (t, twice)), t))  # t has two users

    gm, inputs = build(body, lowrank_inputs())
    groups, _ = fused_vs_unfused(gm, inputs)
    assert [(grp.steps, len(grp.prologue), len(grp.epilogue)) for grp in groups] == [
        (["add_row"], 0, 0),
        (["add_row", "tanh"], 0, 1),
    ]


def test_a_grouping_that_would_create_a_cycle_is_refused(monkeypatch):
    """site → neg → add(site, neg): contracting {site, add} gives group → neg → group. networkx says so,
    the honest growth never proposes it (the site has two users), and a partition holding it is dropped."""

    def body(g, p):
        y = site(g, p)
        return g.call_function(operator.add, (y, g.call_function(torch.neg, (y,))))

    gm, inputs = build(body, lowrank_inputs())
    y, neg, add = [n for n in gm.graph.nodes if n.op == "call_function"]
    dag = fuse_mod._dag(gm.graph)
    assert not contractible(dag, [y, add])
    assert contractible(dag, [y, neg]) and contractible(dag, [y, neg, add])
    (grp,) = find_groups(gm, inputs)
    assert grp.epilogue == []

    real = fuse_mod._grow

    def greedy(s, family, dag, claimed):
        grp = real(s, family, dag, claimed)
        grp.epilogue.append(add)
        return grp

    monkeypatch.setattr(fuse_mod, "_grow", greedy)
    assert find_groups(gm, inputs) == []


def test_groups_are_disjoint_on_a_llama_mlp():
    """down(silu(gate(x)) · up(x)): the gate group takes silu and the product (the up site's output is its
    operand); the up group ends at its site; nothing is claimed twice, and lowering keeps every reference."""
    inputs = {"x": torch.randn(2, 5, IN)}
    for name, (i, o) in {"g": (IN, OUT), "u": (IN, OUT), "d": (OUT, IN)}.items():
        inputs[f"{name}U"], inputs[f"{name}V"] = torch.randn(o, R) / 2, torch.randn(R, i) / i**0.5

    def lin(g, p, name, x):
        return g.call_function(LowRank.functional, (x, None, None, p[f"{name}U"], p[f"{name}V"]))

    def body(g, p):
        gate = g.call_function(F.silu, (lin(g, p, "g", p["x"]),))
        up = lin(g, p, "u", p["x"])
        return g.call_function(operator.add, (lin(g, p, "d", g.call_function(operator.mul, (gate, up))), p["x"]))

    gm, example = build(body, inputs)
    groups, lowered = fused_vs_unfused(gm, example)
    assert [grp.steps for grp in groups] == [["silu", "mul"], [], ["add"]]
    members = [m for grp in groups for m in grp.members]
    assert len(members) == len(set(members))
    assert groups[0].operands[0][0] is groups[1].site
    assert len(kernel_ops(lowered)) == 3


def test_the_autotuners_lossless_choice_is_fused():
    """A site the tuner sent to merged LoRA (the same function) becomes the fused LoRA kernel."""
    inputs = {
        "x": torch.randn(3, IN),
        "W": torch.randn(OUT, IN),
        "b": torch.randn(OUT),
        "A": torch.randn(R, IN),
        "B": torch.randn(OUT, R),
        "s": torch.tensor(0.5),
    }

    def body(g, p):
        y = g.call_function(lora_merged, (p["x"], p["W"], p["b"], p["A"], p["B"], p["s"]))
        return g.call_function(F.gelu, (y,))

    gm, example = build(body, inputs)
    (grp,), lowered = fused_vs_unfused(gm, example)
    assert grp.family == "lora" and grp.steps == ["add_row", "gelu"]
    assert kernel_ops(lowered)[0].target is torch.ops.lrcompile.lora.default


def test_dropout_on_the_adapter_branch_is_left_unfused():
    inputs = {
        "x": torch.randn(3, IN),
        "W": torch.randn(OUT, IN),
        "A": torch.randn(R, IN),
        "B": torch.randn(OUT, R),
        "s": torch.tensor(0.5),
        "p": torch.tensor(0.2),
    }

    def body(g, p):
        return g.call_function(LoRA.functional, (p["x"], p["W"], None, p["A"], p["B"], p["s"], p["p"]))

    gm, example = build(body, inputs)
    assert find_groups(gm, example) == []


# --- end to end: tiny HF models through the backend -----------------------------------------------------------
def bert():
    return tiny_hf("bert", width=32, inter=48, layers=1, heads=2, kv_heads=2, vocab=60, tokens=5)


def gpt2():
    return tiny_hf("gpt2", width=32, inter=48, layers=1, heads=2, kv_heads=2, vocab=60, tokens=5)


def llama():
    return tiny_hf("llama", width=32, inter=48, layers=1, heads=2, kv_heads=1, vocab=60, tokens=5)


def rule(method, **cfg):
    return {"defaults": {"min_features": 0}, "rules": [{"match": "*", "method": method, **cfg}]}


POLICIES = {"lowrank": all_lowrank(4), "lora": rule("lora", rank=2), "monarch": rule("monarch", blocks=2)}


@pytest.fixture
def lowered_graphs(monkeypatch):
    """Every graph the backend's fusion step produced, with its groups."""
    out = []
    real = lower_mod.fuse

    def spy(gm, inputs):
        gm, groups = real(gm, inputs)
        out.append((gm, groups))
        return gm, groups

    monkeypatch.setattr(lower_mod, "fuse", spy)
    return out


def sites_in(gm):
    fams = fuse_mod.site_families()
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in fams]


def audible_adapters(model):
    """LoRA's B starts at zero: give it the same random values in both models, so the branch counts."""
    for n, p in model.named_parameters():
        if n.endswith("lora_B"):
            gen = torch.Generator().manual_seed(sum(map(ord, n)))
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def run_twice(model, inputs, policy, fuse):
    """First call compiles and registers the factors; the second runs with audible adapters (no recompile)."""
    c = compile_eager(model, POLICIES[policy], fuse=fuse, tune=False)
    c(**inputs)
    audible_adapters(model)
    return hf_output(c(**inputs))


SLOW = pytest.mark.slow
HF_CASES = [
    pytest.param(m, p, id=f"{m.__name__}-{p}", marks=() if fast else SLOW)
    for m, p, fast in [
        (bert, "lowrank", True),
        (gpt2, "lowrank", True),
        (llama, "lowrank", True),
        (llama, "lora", True),
        (gpt2, "monarch", True),
        (bert, "lora", False),
        (gpt2, "lora", False),
        (bert, "monarch", False),
        (llama, "monarch", False),
    ]
]


@pytest.mark.parametrize("make,policy", HF_CASES)
def test_fusion_keeps_hf_model_outputs(make, policy, lowered_graphs, launches):
    model, inputs = make()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        want = run_twice(model, inputs, policy, fuse=False)
        assert not lowered_graphs and not launches
        torch._dynamo.reset()
        got = run_twice(twin, inputs, policy, fuse=True)
    assert rel_err(got, want) < 1e-4
    assert lowered_graphs
    n_ops = sum(len(kernel_ops(gm)) for gm, _ in lowered_graphs)
    assert n_ops == sum(len(groups) for _, groups in lowered_graphs) >= 3  # q, k, v at least
    assert all(not sites_in(gm) for gm, _ in lowered_graphs)  # every site became a kernel op
    assert any(grp.epilogue for _, groups in lowered_graphs for grp in groups)  # and absorbed something
    assert len(launches) >= n_ops


def test_fusion_on_an_hf_llama_mlp(lowered_graphs, launches):
    """The gate/up/down sharing pattern in HF's own module (finding: overlapping groups)."""
    cfg = transformers.LlamaConfig(hidden_size=24, intermediate_size=40, num_attention_heads=2, num_key_value_heads=1)
    mlp = transformers.models.llama.modeling_llama.LlamaMLP(cfg)
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        want = compile_eager(mlp, all_lowrank(4), fuse=False, tune=False)(x)
        torch._dynamo.reset()
        got = compile_eager(copy.deepcopy(mlp), all_lowrank(4), fuse=True, tune=False)(x)
    assert rel_err(got, want) < 1e-4
    ((gm, groups),) = lowered_graphs
    assert sorted(grp.steps for grp in groups) == [[], [], ["silu", "mul"]]
    assert len(kernel_ops(gm)) == 3


@pytest.mark.parametrize("policy", ["lowrank", pytest.param("lora", marks=SLOW)])
def test_backward_through_the_fused_graph(policy, lowered_graphs, launches):
    """Llama (silu·mul epilogues, residual adds): the loss and every trainable gradient match the unfused graph;
    under LoRA with the model frozen first (as `rewrite` does), only the adapters get gradients."""
    model, inputs = llama()
    if policy == "lora":
        model.requires_grad_(False)
    twin = copy.deepcopy(model)
    results = []
    for m, fuse in ((model, False), (twin, True)):
        torch._dynamo.reset()
        c = compile_eager(m, POLICIES[policy], fuse=fuse, tune=False)
        c(**inputs)  # registers the factors on the model
        audible_adapters(m)
        loss = c(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        results.append((loss, grads, m))
    (l0, g0, m0), (l1, g1, m1) = results
    assert lowered_graphs and launches
    assert rel_err(l1, l0) < 1e-4
    assert g0.keys() == g1.keys() and any(".lrcompile." in n for n in g1)
    for n in g0:
        assert (g0[n] is None) == (g1[n] is None), n
        if g0[n] is not None and g0[n].norm() > 0:
            assert rel_err(g1[n], g0[n]) < 1e-4, n
    if policy == "lora":
        assert all(".lrcompile." in n for n in g1)
        frozen = [p for n, p in m1.named_parameters() if n.endswith("q_proj.weight")]
        assert frozen and all(p.grad is None for p in frozen)
