"""column_blocks: the block GEMMs written side by side, by every path (eager out=, autograd/tracing cat, bmm)."""

import pytest
import torch

from lrcompile.families import blockmm
from lrcompile.families.blockmm import column_blocks, swap_block_axes


def reference(a, b, bias):
    y = torch.einsum("knK,kKc->nkc", a.double(), b.double()).reshape(a.shape[1], -1)
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("k", [1, 3, blockmm.MAX_BLOCKS + 2])
@pytest.mark.parametrize("with_bias", [True, False])
def test_every_path_matches_float64(k, with_bias):
    a, b = torch.randn(k, 37, 11), torch.randn(k, 11, 5)
    bias = torch.randn(k * 5) if with_bias else None
    want = reference(a, b, bias)
    with torch.no_grad():
        got = column_blocks(a, b, bias)  # eager: out= views
    assert got.shape == (37, k * 5) and got.is_contiguous()
    assert torch.allclose(got.double(), want, atol=1e-5)
    a.requires_grad_(True)
    got = column_blocks(a, b, bias)  # autograd: cat
    assert torch.allclose(got.double(), want, atol=1e-5)
    g = torch.randn_like(got)
    (ga,) = torch.autograd.grad(got, a, g)
    want_ga = torch.einsum("nkc,kKc->knK", g.view(37, k, 5).double(), b.double())
    assert torch.allclose(ga.double(), want_ga, atol=1e-4)
    compiled = torch.compile(column_blocks, backend="aot_eager", fullgraph=True)  # traced: FunctionalTensors
    with torch.no_grad():
        assert torch.allclose(compiled(a.detach(), b, bias).double(), want, atol=1e-5)


def test_eager_path_writes_in_place_only_without_gradients(monkeypatch):
    calls = []
    real = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *xs, **kw: calls.append(1) or real(*xs, **kw))
    a, b = torch.randn(2, 4, 3), torch.randn(2, 3, 6)
    with torch.no_grad():
        column_blocks(a, b, None)
    assert calls == []
    column_blocks(a.requires_grad_(True), b, None)
    assert calls == [1]


@pytest.mark.parametrize(
    "dtype, t", [(torch.float32, 4), (torch.float32, 2), (torch.float32, 3), (torch.bfloat16, 4), (torch.float64, 2)]
)
def test_swap_block_axes_moves_whole_rank_rows(dtype, t):
    z = torch.randn(5, 7, 6, t).to(dtype)
    want = z.permute(2, 1, 0, 3).contiguous()
    with torch.no_grad():
        got = swap_block_axes(z)
    assert got.dtype == dtype and got.shape == want.shape and torch.equal(got, want)
    zg = z.clone().requires_grad_(True)  # autograd: the plain permute, gradients flow
    swap_block_axes(zg).sum().backward()
    assert torch.equal(zg.grad, torch.ones_like(z))
