"""The low-rank family: rank semantics, optimality of the truncated SVD, reference forward, gradients."""
import pytest
import torch

from lrcompile.structures.lowrank import LowRank, LowRankConfig, resolve_rank


def test_rank_semantics():
    assert resolve_rank(16, 100, 60) == 16
    assert resolve_rank(500, 100, 60) == 60  # an int at or above min(in, out) is full rank
    assert resolve_rank(1.0, 100, 60) == 37  # break-even: ⌊100·60/160⌋
    assert resolve_rank(0.5, 768, 768) == 192
    assert resolve_rank(0.001, 10, 10) == 1


@pytest.mark.parametrize("shape, rank", [((37, 23), 5), ((23, 37), 23), ((64, 50), 17)])
def test_truncated_svd_is_optimal_and_matches_reference(shape, rank):
    w = torch.randn(*shape, dtype=torch.float64)
    m = LowRank.from_dense(w, None, LowRankConfig(rank=rank).resolve(shape[1], shape[0]))
    s = torch.linalg.svdvals(w)
    # Eckart–Young: the error is exactly the discarded spectrum
    err = torch.linalg.norm(w - m.to_dense())
    assert torch.allclose(err, s[rank:].norm(), atol=1e-9)
    x = torch.randn(3, 4, shape[1], dtype=torch.float64)
    b = torch.randn(shape[0], dtype=torch.float64)
    m.bias = torch.nn.Parameter(b)
    torch.testing.assert_close(m(x), x @ m.to_dense().T + b)


def test_balanced_factors():
    w = torch.randn(40, 30, dtype=torch.float64)
    m = LowRank.from_dense(w, None, LowRankConfig(rank=8))
    torch.testing.assert_close(m.U.norm(dim=0), m.V.norm(dim=1))  # √S on both sides


def test_gradcheck():
    m = LowRank.from_dense(torch.randn(7, 5, dtype=torch.float64), None, LowRankConfig(rank=3))
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b, U, V: LowRank.functional(x, None, b, U, V), (x, b, m.U, m.V))


def test_random_init_scale():
    m = LowRank.init(512, 256, LowRankConfig(rank=64))
    x = torch.randn(2048, 512)
    ref = torch.nn.Linear(512, 256)
    # same output scale as a default nn.Linear (Kaiming-uniform: var = 1/(3·in))
    ratio = m(x).std() / (x @ ref.weight.T).std()
    assert 0.8 < ratio < 1.25
