"""lrcompile.heal: distillation of installed factors toward the dense teacher."""

import copy
import math

import pytest
import torch
from conftest import masked_id_batches
from torch import nn

import lrcompile
from lrcompile.families.base import is_owned
from lrcompile.lifecycle.heal import _lr_factor, loss_of


class Tiny(nn.Module):
    """Embedding + two residual MLP blocks; output (batch, seq, hidden) like an encoder's last hidden state."""

    def __init__(self, vocab=50, d=24):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), nn.Dropout(0.1)) for _ in range(2)
        )
        self.norm = nn.LayerNorm(d)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        for b in self.blocks:
            h = h + b(h)
        return self.norm(h)


def batches(n=4, seq=7, seed=0):
    return masked_id_batches(n, rows=3, seq=seq, vocab=50, padded=2, seed=seed)


POLICY = {"defaults": {"min_features": 0}, "rules": [{"match": "blocks.*", "method": "lowrank", "rank": 3}]}


def total_loss(student, teacher, bs):
    with torch.no_grad():
        return sum(float(loss_of(student(**b), teacher(**b), b)) for b in bs) / len(bs)


@pytest.fixture
def pair():
    torch.manual_seed(0)
    teacher = Tiny().eval()
    student = copy.deepcopy(teacher)
    lrcompile.rewrite(student, POLICY, batches(1)[0], progress=False)
    return student, teacher


@pytest.mark.parametrize(
    "layers,extra",
    [
        ((), {}),
        (("blocks.0",), {}),
        (("blocks.0", "blocks.1"), {"layer_loss": "nmse", "layer_weight": 1.0}),
        ((), {"warmup": 10, "schedule": "cosine"}),
    ],
)
def test_heal_lowers_the_loss_and_trains_only_the_factors(pair, layers, extra):
    student, teacher = pair
    bs = batches()
    before = total_loss(student, teacher, bs)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not is_owned(p)}
    factors = {n: p.detach().clone() for n, p in student.named_parameters() if is_owned(p)}
    assert len(factors) == 8 and any(n.endswith(".bias") for n in frozen)  # U, V of 4 sites; biases stay
    teacher_state = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    student.train()
    teacher.train()
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    lrcompile.heal(student, teacher, bs, steps=60, lr=1e-2, layers=layers, progress=False, **extra)
    assert student.training and all(m.training for m in student.modules())  # modes restored
    assert teacher.training and all(m.training for m in teacher.modules())
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags
    for n, p in student.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, factors[n]), n
    for n, p in teacher.named_parameters():
        assert torch.equal(p, teacher_state[n]), n
    student.eval()
    teacher.eval()
    after = total_loss(student, teacher, bs)
    assert after < 0.5 * before, (before, after)


def test_lr_schedule_warms_up_then_decays():
    steps, warm = 110, 10
    assert [_lr_factor(i, steps, warm, "linear") for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert _lr_factor(10, steps, warm, "cosine") == pytest.approx(1.0)
    assert _lr_factor(60, steps, warm, "cosine") == pytest.approx(0.5)  # half way through the decay
    assert _lr_factor(35, steps, warm, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert _lr_factor(60, steps, warm, "linear") == pytest.approx(0.5)
    assert _lr_factor(steps, steps, warm, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert _lr_factor(5, 20, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_layer_nmse_sees_the_norm():
    """A scaled copy has zero per-token cosine loss but a normalised MSE of (s − 1)²."""
    from lrcompile.lifecycle.heal import _token_cos, _token_nmse

    t = torch.randn(2, 5, 8, dtype=torch.float64)
    m = torch.ones(2, 5, dtype=torch.float64)
    m[1, 3:] = 0
    assert float(_token_cos(1.5 * t, t, m)) == pytest.approx(0.0, abs=1e-12)
    assert float(_token_nmse(1.5 * t, t, m)) == pytest.approx(0.25)
    h = torch.randn_like(t)
    want = ((h - t).square().sum(-1) / t.square().sum(-1))[m.bool()].mean()
    assert float(_token_nmse(h, t, m)) == pytest.approx(float(want))


@pytest.mark.parametrize("also", [("biases",), ("norms",), ("biases", "norms")])
def test_train_also_opts_in_biases_and_norms(pair, also):
    student, teacher = pair
    bs = batches()
    before = total_loss(student, teacher, bs)
    state = {n: p.detach().clone() for n, p in student.named_parameters()}
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    lrcompile.heal(student, teacher, bs, steps=40, lr=1e-2, train_also=also, progress=False)
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, state[n])}
    owned = {n for n, p in student.named_parameters() if is_owned(p)}
    site_biases = {n for n in state if n.startswith("blocks.") and n.endswith(".bias") and n not in owned}
    norms = {"norm.weight", "norm.bias"}
    assert len(site_biases) == 4
    want = owned | (site_biases if "biases" in also else set()) | (norms if "norms" in also else set())
    assert changed == want
    assert total_loss(student, teacher, bs) < 0.5 * before


def test_heal_errors_are_one_line(pair):
    student, teacher = pair
    with pytest.raises(ValueError, match="no batches"):
        lrcompile.heal(student, teacher, [], steps=1, progress=False)
    with pytest.raises(ValueError, match="no lrcompile factors"):
        lrcompile.heal(Tiny(), teacher, batches(1), steps=1, progress=False)
    with pytest.raises(ValueError, match="no submodule 'blocks.9'"):
        lrcompile.heal(student, teacher, batches(1), steps=1, layers=["blocks.9"], progress=False)
    for kw, msg in [
        ({"layer_loss": "mse"}, "layer_loss 'mse' is not one of cos, nmse"),
        ({"schedule": "step"}, "schedule 'step' is not one of linear, cosine"),
        ({"train_also": ["emb"]}, "train_also 'emb' is not one of biases, norms"),
    ]:
        with pytest.raises(ValueError, match=msg):
            lrcompile.heal(student, teacher, batches(1), steps=1, progress=False, **kw)


def test_a_layer_only_the_teacher_has_leaves_both_models_as_they_were(pair):
    student, teacher = pair
    teacher.extra = nn.Linear(24, 24)  # a path the student lacks
    student.train()
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    with pytest.raises(ValueError, match="no submodule 'extra'"):
        lrcompile.heal(student, teacher, batches(1), steps=1, layers=["extra"], progress=False)
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags
    assert all(m.training for m in student.modules())
    assert not teacher.extra._forward_hooks  # the teacher's tap was removed


def test_heal_trains_attention_factors_through_the_compiled_model():
    """Attention's stacked factors (fused_qkv) are lrcompile's too: healing the compiled model — the graph that
    uses them — trains them with the linear sites' factors and lowers the loss."""
    from conftest import tiny_hf

    from lrcompile.attention.factors import AttnFactors

    torch.manual_seed(0)
    teacher, _ = tiny_hf("bert", width=32, inter=64, layers=1, heads=4, kv_heads=4, vocab=60, tokens=8)
    student = copy.deepcopy(teacher)
    bs = masked_id_batches(4, rows=2, seq=8, vocab=60, padded=2, seed=0)
    pol = {
        "defaults": {"min_features": 0},
        "rules": [
            {"match": "*", "kind": "attention", "method": "fused_qkv", "rank": 6},
            {"match": "encoder.*", "method": "lowrank", "rank": 6},
            {"match": "*", "method": "dense"},
        ],
    }
    lrcompile.rewrite(student, pol, bs[0], progress=False)
    attn = {
        n: p.detach().clone() for m in student.modules() if isinstance(m, AttnFactors) for n, p in m.named_parameters()
    }
    assert attn
    compiled = torch.compile(student, backend="lrcompile", options={"inductor": False})
    hidden = lambda m: lambda **b: m(**b).last_hidden_state  # noqa: E731
    before = total_loss(hidden(compiled), hidden(teacher), bs)
    lrcompile.heal(compiled, teacher, bs, steps=40, lr=1e-2, progress=False)
    after = total_loss(hidden(compiled), hidden(teacher), bs)
    moved = [
        n
        for m in student.modules()
        if isinstance(m, AttnFactors)
        for n, p in m.named_parameters()
        if not torch.equal(p, attn[n])
    ]
    assert sorted(moved) == sorted(attn) and after < 0.7 * before, (moved, before, after)
