"""passes/rewrite.py on its own: the bias moved after the GEMMs for Inductor on CPU keeps the function."""

import pytest
import torch
from conftest import all_lowrank, rel_err
from torch import nn

import lrcompile.backend as backend
from lrcompile.passes.rewrite import add_bias_after_gemm


class Conv1DLike(nn.Module):
    """HF GPT-2's Conv1D: a 2-D addmm, where Inductor would fold mm + bias back into addmm."""

    def __init__(self, d=24, h=40):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, h) / d**0.5)
        self.b = nn.Parameter(torch.randn(h))
        self.fc = nn.Linear(h, d)

    def forward(self, x):
        h = torch.addmm(self.b, x.view(-1, x.shape[-1]), self.w).view(*x.shape[:-1], -1)
        return x + self.fc(torch.nn.functional.gelu(h))


def capture_compile_fx(monkeypatch):
    """The graphs handed to Inductor, run eagerly instead of compiled (fast, and the graph is what we check)."""
    graphs = []
    import torch._inductor.compile_fx as cfx

    def fake_compile_fx(gm, inputs, **kw):
        graphs.append(gm)
        return lambda *args: gm(*args)

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    return graphs


def bias_adds(gm):
    return sum(n.op == "call_function" and n.target is add_bias_after_gemm for n in gm.graph.nodes)


@pytest.mark.parametrize("inductor", [True, False])
def test_bias_is_added_after_the_gemms_only_for_inductor_on_cpu(monkeypatch, inductor):
    graphs = capture_compile_fx(monkeypatch)
    m = Conv1DLike()
    x = torch.randn(3, 5, 24)
    ref = m(x)
    runner = {}
    real_runner = backend.Runner

    def keep(fn, feeds, *rest):
        runner["r"] = real_runner(fn, feeds, *rest)
        return runner["r"]

    monkeypatch.setattr(backend, "Runner", keep)
    out = torch.compile(m, backend="lrcompile", options={"policy": all_lowrank(10_000), "inductor": inductor})(x)
    assert rel_err(out, ref) < 1e-5  # full rank: the same function either way
    gm = graphs[0] if inductor else runner["r"].fn
    assert bias_adds(gm) == (2 if inductor else 0)  # both sites (addmm and nn.Linear) when Inductor follows


def test_add_bias_after_gemm_is_a_plain_broadcast_add():
    y, b = torch.randn(7, 5), torch.randn(5)
    assert torch.equal(add_bias_after_gemm(y, b), y + b)
    y3 = torch.randn(2, 7, 5)
    assert torch.equal(add_bias_after_gemm(y3, b), y3 + b)
