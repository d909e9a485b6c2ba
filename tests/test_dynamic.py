"""Dynamic shapes: batch and sequence changes compile each graph at most twice (Dynamo marks the sizes dynamic
on the first recompile), and the factors are made once and found again by every recompile and graph."""

import collections
import copy

import pytest
import torch
from test_attention import ManualAttn
from torch import nn
from torch._guards import CompileContext

import lrcompile
from lrcompile.attention.factors import SharedBasis
from lrcompile.backend import lrcompile_backend

# Batch and sequence change together at the first change (Dynamo makes dynamic only the dims that changed,
# one recompile per newly varying dim) and stay >= 2 (Dynamo specialises sizes 0 and 1: a batch of 1 is one
# more compile, whatever the backend).
SHAPES = [(2, 5), (3, 7), (4, 9), (5, 6), (2, 11), (6, 3)]
POLICY = {
    "defaults": {"min_features": 0},
    "rules": [
        {"match": "attn", "kind": "attention", "method": "shared_kv", "rank": 6},
        {"match": "*", "method": "lowrank", "rank": 8},
    ],
}


class BreakAttn(ManualAttn):
    """ManualAttn with an optional graph break between the Q/K/V projections and the attention."""

    breaks = False

    def forward(self, x, m=None):
        B, T, _ = x.shape
        q, k, v = self.split(self.q(x), B, T), self.split(self.k(x), B, T), self.split(self.v(x), B, T)
        if self.breaks:
            torch._dynamo.graph_break()
        s = (q @ k.transpose(-2, -1) / self.dh**0.5).masked_fill(~self.tril[:T, :T], float("-inf"))
        return self.o((torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(B, T, -1))


class Net(nn.Module):
    def __init__(self, graph_break=False):
        super().__init__()
        self.attn = BreakAttn(mask="causal")
        self.mlp = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
        self.graph_break = graph_break

    def forward(self, x):
        x = x + self.attn(x)
        if self.graph_break:
            torch._dynamo.graph_break()
        return x + self.mlp(x)


class Calls(list):
    """Backend calls: (frame id, symbolic sizes among the inputs). A frame is one graph; each call compiles it."""

    def per_graph(self) -> dict:
        return collections.Counter(frame for frame, _ in self)

    def dynamic(self) -> bool:
        return any(n > 0 for _, n in self)


def counting(options, graphs=None):
    calls = Calls()

    def backend(gm, inputs):
        calls.append((CompileContext.current_compile_id().frame_id, sum(isinstance(i, torch.SymInt) for i in inputs)))
        fn = lrcompile_backend(gm, inputs, options=options)
        if graphs is not None:
            graphs.append(fn.fn)
        return fn

    return backend, calls


def count_factorisations(monkeypatch):
    import lrcompile.plan.build as plan

    made = []
    real_linear, real_attn = plan.from_dense_cached, SharedBasis.from_stacked.__func__
    monkeypatch.setattr(plan, "from_dense_cached", lambda *a, **k: made.append("linear") or real_linear(*a, **k))
    monkeypatch.setattr(
        SharedBasis, "from_stacked", classmethod(lambda cls, *a, **k: made.append("attn") or real_attn(cls, *a, **k))
    )
    return made


@pytest.mark.parametrize("graph_break", [False, True], ids=["one-graph", "graph-break"])
def test_batch_and_sequence_changes_compile_at_most_twice_per_graph(graph_break, monkeypatch):
    made = count_factorisations(monkeypatch)
    m = Net(graph_break).eval()
    backend, calls = counting({"policy": POLICY, "inductor": False})
    c = torch.compile(m, backend=backend)
    ref = None
    for B, T in SHAPES:
        x = torch.randn(B, T, 32)
        with torch.no_grad():
            out = c(x)
            ref = ref or factored_copy(m)
            torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)
    per_graph = calls.per_graph()
    assert len(per_graph) == (2 if graph_break else 1) and max(per_graph.values()) == 2, per_graph
    assert calls.dynamic()  # the recompile was dynamic
    # one factorisation per site, never repeated: 4 low-rank linears (attn.q, attn.o, mlp.0, mlp.2) + 1 K/V basis
    assert sorted(made) == ["attn"] + ["linear"] * 4


def factored_copy(m: Net) -> Net:
    """An eager copy of `m` whose rewritten weights are their factors' products (what the compiled graph runs)."""
    ref = copy.deepcopy(m)
    ref.graph_break = False
    a, basis = ref.attn, ref.attn.lrcompile_kv
    with torch.no_grad():
        for lin in (a.q, a.o, ref.mlp[0], ref.mlp[2]):
            lin.weight.copy_(lin.lrcompile.U @ lin.lrcompile.V)
        a.k.weight.copy_(basis.U[:32] @ basis.V)
        a.v.weight.copy_(basis.U[32:] @ basis.V)
    return ref


def test_training_under_varying_shapes_keeps_one_set_of_factors(monkeypatch):
    made = count_factorisations(monkeypatch)
    m = Net()
    backend, calls = counting({"policy": POLICY, "inductor": False})
    c = torch.compile(m, backend=backend)
    c(torch.randn(2, 5, 32))  # first call registers the factors; the optimizer sees them
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    for B, T in SHAPES:
        opt.zero_grad()
        c(torch.randn(B, T, 32)).pow(2).mean().backward()
        opt.step()
    assert list(calls.per_graph().values()) == [2]
    assert len(made) == 5
    assert m.attn.lrcompile_kv.U.grad is not None


def test_dims_marked_dynamic_compile_once(monkeypatch):
    made = count_factorisations(monkeypatch)
    m = Net().eval()
    backend, calls = counting({"policy": POLICY, "inductor": False})
    c = torch.compile(m, backend=backend, dynamic=True)
    with torch.no_grad():
        for B, T in SHAPES:
            c(torch.randn(B, T, 32))
    assert len(calls) == 1 and calls[0][1] >= 2 and len(made) == 5


def basis_copy(m: Net) -> Net:
    """An eager copy of a rewritten `m` with K and V computed from the shared basis (what the graph runs)."""
    ref = copy.deepcopy(m)
    ref.attn.breaks = False
    basis = ref.attn.lrcompile_kv
    with torch.no_grad():
        ref.attn.k.weight.copy_(basis.U[:32] @ basis.V)
        ref.attn.v.weight.copy_(basis.U[32:] @ basis.V)
    return ref


def test_graph_break_between_projections_and_attention_finds_factors_across_graphs(monkeypatch):
    """rewrite() makes the factors in one graph; training then breaks the module between its projections and
    its attention (Dynamo compiles the attention module's frames on their own: names relative to it). The K/V
    basis is found by the graph holding the projections, without the attention; the attention's graph is left
    alone; nothing is factorised again while shapes vary."""
    m = Net()
    lrcompile.rewrite(m, POLICY, (torch.randn(2, 5, 32),), progress=False)
    made = count_factorisations(monkeypatch)
    m.attn.breaks = True
    graphs = []
    backend, calls = counting({"policy": POLICY, "inductor": False}, graphs)
    c = torch.compile(m, backend=backend)
    ref = basis_copy(m)
    for B, T in SHAPES:
        x = torch.randn(B, T, 32)
        out = c(x)
        torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert m.attn.lrcompile_kv.U.grad is not None and m.attn.k.weight.grad is None  # K/V train through it
    per_graph = calls.per_graph()
    assert len(per_graph) >= 3 and max(per_graph.values()) <= 2, per_graph
    assert made == []  # found across graphs and recompiles, never made again

    def has(g, pred):
        return any(pred(n) for n in g.graph.nodes)

    basis = [g for g in graphs if has(g, lambda n: n.op == "placeholder" and n.target.endswith("shared_kv_V"))]
    attn = [g for g in graphs if has(g, lambda n: n.target in (torch.softmax, "softmax"))]
    assert len(basis) == len(attn) == 2  # first compile and the dynamic recompile
    assert not set(basis) & set(attn)  # in different graphs


@pytest.mark.slow
def test_inductor_dynamic_recompile_with_factor_inputs():
    m = Net().eval()
    backend, calls = counting({"policy": POLICY})
    c = torch.compile(m, backend=backend)
    ref = None
    with torch.no_grad():
        for B, T in SHAPES[:4]:
            x = torch.randn(B, T, 32)
            out = c(x)
            ref = ref or factored_copy(m)
            torch.testing.assert_close(out, ref(x), atol=1e-4, rtol=1e-4)
    assert list(calls.per_graph().values()) == [2] and calls[1][1] > 0  # the recompile is the dynamic one
