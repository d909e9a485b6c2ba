"""The low-rank family: rank semantics, optimality of the truncated SVD, reference forward, gradients."""

import pytest
import torch

from lrcompile.families.lowrank import LowRank, LowRankConfig, resolve_rank


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


def test_rewrite_freezes_the_dense_weight_of_a_compressed_functional_site():
    """A swapped nn.Linear's dense weight leaves the model; a functional site's (F.linear with a bare parameter)
    stays on its module but is frozen, so it is out of `requires_grad` parameter lists and DDP's buckets. A
    weight the graph uses elsewhere too (here an embedding's, also applied as a head) keeps training."""
    import torch.nn.functional as F
    from torch import nn

    import lrcompile

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 16)
            self.fc = nn.Linear(16, 16)
            self.w = nn.Parameter(torch.randn(12, 16) / 4)

        def forward(self, ids):
            h = torch.tanh(self.fc(self.emb(ids)))
            return torch.cat([F.linear(h, self.w), F.linear(h, self.emb.weight)], -1)

    torch.manual_seed(0)
    m = M()
    ids = torch.randint(0, 10, (3, 5))
    pol = {"defaults": {"min_features": 0}, "rules": [{"match": "*", "method": "lowrank", "rank": 4}]}
    lrcompile.rewrite(m, pol, (ids,), progress=False)
    rows = {r.fqn: r for r in m.lrcompile_report.sites()}
    assert {f: rows[f].status for f in ("fc", "w", "emb")} == {"fc": "rewritten", "w": "rewritten", "emb": "rewritten"}
    assert not m.w.requires_grad and m.emb.weight.requires_grad
    assert isinstance(m.fc, LowRank) and m.lrcompile_w.U.requires_grad
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "w" not in trainable and {"lrcompile_w.U", "lrcompile_w.V", "emb.weight", "fc.U"} <= trainable
    c = torch.compile(m, backend="lrcompile", options={"inductor": False})
    with torch.no_grad():  # the compiled graph runs the factors, not the frozen dense weight
        h = torch.tanh(m.fc(m.emb(ids))).double()
        want = torch.cat(
            [
                h @ (m.lrcompile_w.U @ m.lrcompile_w.V).double().T,
                h @ (m.lrcompile_emb_weight.U @ m.lrcompile_emb_weight.V).double().T,
            ],
            -1,
        )
        torch.testing.assert_close(c(ids).double(), want, rtol=1e-5, atol=1e-6)
    w0, e0, u0 = m.w.detach().clone(), m.emb.weight.detach().clone(), m.lrcompile_w.U.detach().clone()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        c(ids).pow(2).mean().backward()
        opt.step()
    assert m.w.grad is None and torch.equal(m.w, w0)
    assert not torch.equal(m.emb.weight, e0) and not torch.equal(m.lrcompile_w.U, u0)
