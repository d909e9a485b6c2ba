"""Site discovery in Dynamo graphs: forms, names, nesting, tied weights, graph breaks, attention."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrcompile.capture.names import source_path, strip_root
from lrcompile.capture.sites import find_sites


def sites_of(model, *args):
    found = []

    def record(gm, inputs, **_):
        found.extend(find_sites(gm, inputs))
        return gm.forward

    torch.compile(model, backend=record)(*args)
    return found


def test_names_forms_and_nesting(toy):
    m, ids = toy
    sites = sites_of(m, ids)
    lin = [s for s in sites if s.kind == "linear"]
    names = [s.fqn for s in lin]
    assert names == [
        "blocks.0.fc",
        "blocks.0",
        "heads.shared",
        "blocks.1.fc",
        "blocks.1",
        "heads.shared",
        "v",
        "lm_head",
    ]
    by = {s.fqn: s for s in lin}
    assert by["blocks.0.fc"].weight is m.blocks[0].fc.weight and by["blocks.0.fc"].bias is m.blocks[0].fc.bias
    assert by["blocks.0"].weight is m.blocks[0].w and by["blocks.0"].bias is None  # functional, bare parameter
    assert by["v"].weight is m.v and by["v"].module_expr is None  # root call: named by its weight path
    # tied: the head applies the embedding's parameter; only the module stack tells the head apart
    assert by["lm_head"].weight is m.embed.weight and by["lm_head"].weight_path == "embed.weight"
    assert (by["lm_head"].in_features, by["lm_head"].out_features) == (24, 30)


def test_addmm_conv1d_and_matmul_forms():
    class Conv1D(nn.Module):  # HF GPT-2's layout: weight (in, out), y = addmm(b, x, W)
        def __init__(self, nx, nf):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.randn(nf))

        def forward(self, x):
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = Conv1D(6, 10)
            self.p = nn.Parameter(torch.randn(10, 5))  # used as x @ p: W = pᵀ
            self.q = nn.Parameter(torch.randn(4, 5))  # used as x @ q.t(): W = q

        def forward(self, x):
            return self.c(x) @ self.p @ self.q.t()

    m = M()
    sites = [s for s in sites_of(m, torch.randn(2, 3, 6)) if s.kind == "linear"]
    assert [(s.fqn, s.form, s.in_features, s.out_features, s.transposed) for s in sites] == [
        ("c", "addmm", 6, 10, True),
        ("p", "matmul", 10, 5, True),
        ("q", "matmul", 5, 4, False),
    ]
    assert torch.equal(sites[0].dense_weight, m.c.weight.T)


def test_graph_break_gives_sites_in_each_graph(toy):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    graphs = []

    def record(gm, inputs, **_):
        graphs.append([s.fqn for s in find_sites(gm, inputs)])
        return gm.forward

    torch.compile(Broken(), backend=record)(torch.randn(2, 8))
    assert graphs == [["a"], ["b"]]


def test_attention_sites_sdpa_and_manual():
    class Attn(nn.Module):
        def __init__(self, manual):
            super().__init__()
            self.manual = manual

        def forward(self, q, k, v, mask):
            if not self.manual:
                return F.scaled_dot_product_attention(q, k, v)
            s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            s = s.masked_fill(mask, float("-inf"))
            return torch.softmax(s, dim=-1) @ v

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.sdpa, self.manual = Attn(False), Attn(True)

        def forward(self, q, k, v, mask):
            return self.sdpa(q, k, v, mask) + self.manual(q, k, v, mask)

    q = k = v = torch.randn(2, 3, 5, 8)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    att = [(s.fqn, s.form) for s in sites_of(M(), q, k, v, mask) if s.kind == "attention"]
    assert att == [("sdpa", "sdpa"), ("manual", "softmax")]


def test_softmax_alone_is_not_attention():
    class M(nn.Module):
        def forward(self, x):
            return torch.softmax(x * 2, -1).sum()

    assert [s for s in sites_of(M(), torch.randn(3, 4)) if s.kind == "attention"] == []


def test_root_prefixes_are_stripped():
    assert strip_root("L['self'].encoder.layer.0") == "encoder.layer.0"
    assert strip_root("L['s'].fc") == "fc"
    assert strip_root("L['args'][0].model.layers.3.mlp") == "model.layers.3.mlp"
    assert strip_root("L['self']") == ""

    class Src:
        name = "L['s']._modules['blocks']._modules['0']._parameters['w']"

    assert source_path(Src()) == "blocks.0.w"


def test_fake_example_inputs_resolve_to_the_real_parameters(toy):
    """DDPOptimizer compiles its split subgraphs with FakeTensor example inputs: the sites must still carry the
    real parameters (their identity is how attached factors are found), taken from each placeholder's grapharg."""
    m, ids = toy
    found = []

    def record(gm, inputs, **_):
        mode = torch._guards.TracingContext.get().fake_mode
        fakes = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
        assert any(isinstance(f, torch._subclasses.FakeTensor) for f in fakes)
        found.extend(find_sites(gm, fakes))
        return gm.forward

    torch.compile(m, backend=record)(ids)
    by = {s.fqn: s for s in found if s.kind == "linear"}
    assert by["blocks.0.fc"].weight is m.blocks[0].fc.weight and by["blocks.0.fc"].bias is m.blocks[0].fc.bias
    assert by["blocks.1"].weight is m.blocks[1].w  # functional site: the bare parameter itself
    assert by["v"].weight is m.v and by["lm_head"].weight is m.embed.weight


def test_weight_shared_marks_weights_the_graph_also_uses_elsewhere(toy):
    m, ids = toy
    by = {}
    for s in sites_of(m, ids):
        if s.kind == "linear":
            by.setdefault(s.fqn, []).append(s.weight_shared)
    assert by["lm_head"] == [True]  # tied: the embedding lookup reads the same placeholder
    assert by["heads.shared"] == [False, False]  # one module called twice is one site, not a second use
    assert by["blocks.0"] == [False] and by["v"] == [False] and by["blocks.0.fc"] == [False]


@pytest.mark.parametrize(
    "expr, path",
    [
        ("L['s']._modules['blk']._parameters['w']", "blk.w"),
        (
            "L['self'].__dict__['_modules']['layers'][0]._modules['blocks']._parameters['weight']",
            "layers.0.blocks.weight",
        ),
        ("L['self'].encoder.layer[3].intermediate.dense.weight", "encoder.layer.3.intermediate.dense.weight"),
        ("L['args'][0]._modules['model']._parameters['w']", "model.w"),
        ("L['self']._parameters['v']", "v"),
    ],
)
def test_source_paths_of_every_form(expr, path):
    """Swin-style `__dict__['_modules']` hops are containers, not path parts (they made false tied-weight notes)."""

    class Src:
        name = expr

    assert source_path(Src()) == path


def test_every_spelling_of_a_transpose_is_seen():
    """`P.T` reaches the graph as getattr on 2.11-2.13 and as aten.numpy_T on 2.14: both mean W = P."""
    import torch.fx as fx

    from lrcompile.capture.sites import _unwrap_transpose

    g = fx.Graph()
    p = g.placeholder("p")
    spellings = [
        g.call_function(getattr, (p, "T")),
        g.call_method("t", (p,)),
        g.call_method("transpose", (p, 0, 1)),
        g.call_function(torch.ops.aten.numpy_T.default, (p,)),
        g.call_function(torch.ops.aten.numpy_T, (p,)),
        g.call_function(torch.t, (p,)),
    ]
    assert all(_unwrap_transpose(n) == (p, True) for n in spellings)
    assert _unwrap_transpose(p) == (p, False)
    assert _unwrap_transpose(g.call_function(torch.relu, (p,))) == (None, False)
