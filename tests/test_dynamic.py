"""Dynamic shapes: batch and sequence changes compile each graph at most twice (Dynamo marks the sizes dynamic
on the first recompile), and the factors are made once and found again by every recompile and graph."""
import copy

import pytest
import torch
from torch import nn

from lrcompile.attention import SharedBasis
from lrcompile.backend import lrcompile_backend
from test_attention import ManualAttn

# Batch and sequence change together at the first change (Dynamo makes dynamic only the dims that changed,
# one recompile per newly varying dim) and stay >= 2 (Dynamo specialises sizes 0 and 1: a batch of 1 is one
# more compile, whatever the backend).
SHAPES = [(2, 5), (3, 7), (4, 9), (5, 6), (2, 11), (6, 3)]
POLICY = {"defaults": {"min_features": 0}, "rules": [
    {"match": "attn", "kind": "attention", "method": "shared_kv", "rank": 6},
    {"match": "*", "method": "lowrank", "rank": 8}]}


class Net(nn.Module):
    def __init__(self, graph_break=False):
        super().__init__()
        self.attn = ManualAttn(mask="causal")
        self.mlp = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
        self.graph_break = graph_break

    def forward(self, x):
        x = x + self.attn(x)
        if self.graph_break:
            torch._dynamo.graph_break()
        return x + self.mlp(x)


def counting(options):
    calls = []

    def backend(gm, inputs):
        calls.append(sum(isinstance(i, torch.SymInt) for i in inputs))  # symbolic sizes among the inputs
        return lrcompile_backend(gm, inputs, options=options)

    return backend, calls


def count_factorisations(monkeypatch):
    import lrcompile.plan as plan

    made = []
    real_linear, real_attn = plan.from_dense_cached, SharedBasis.from_stacked.__func__
    monkeypatch.setattr(plan, "from_dense_cached", lambda *a, **k: made.append("linear") or real_linear(*a, **k))
    monkeypatch.setattr(SharedBasis, "from_stacked", classmethod(lambda cls, *a, **k: made.append("attn") or real_attn(cls, *a, **k)))
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
    graphs = 2 if graph_break else 1
    assert len(calls) <= 2 * graphs
    assert any(n > 0 for n in calls)  # the recompile was dynamic
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
    assert len(calls) <= 2
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
    assert len(calls) == 1 and calls[0] >= 2 and len(made) == 5


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
    assert len(calls) == 2 and calls[1] > 0
