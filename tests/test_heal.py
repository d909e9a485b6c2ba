"""lrcompile.heal: distillation of installed factors toward the dense teacher."""
import copy

import pytest
import torch
from torch import nn

import lrcompile
from lrcompile.heal import loss_of
from lrcompile.structures.base import is_owned


class Tiny(nn.Module):
    """Embedding + two residual MLP blocks; output (batch, seq, hidden) like an encoder's last hidden state."""

    def __init__(self, vocab=50, d=24):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), nn.Dropout(0.1))
                                    for _ in range(2))

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        for b in self.blocks:
            h = h + b(h)
        return h


def batches(n=4, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(3, seq, dtype=torch.long)
        mask[2, seq - 2:] = 0
        out.append({"input_ids": torch.randint(0, 50, (3, seq), generator=g), "attention_mask": mask})
    return out


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


@pytest.mark.parametrize("layers", [(), ("blocks.0",)])
def test_heal_lowers_the_loss_and_trains_only_the_factors(pair, layers):
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
    lrcompile.heal(student, teacher, bs, steps=60, lr=1e-2, layers=layers, progress=False)
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


def test_heal_errors_are_one_line(pair):
    student, teacher = pair
    with pytest.raises(ValueError, match="no batches"):
        lrcompile.heal(student, teacher, [], steps=1, progress=False)
    with pytest.raises(ValueError, match="no lrcompile factors"):
        lrcompile.heal(Tiny(), teacher, batches(1), steps=1, progress=False)
    with pytest.raises(ValueError, match="no submodule 'blocks.9'"):
        lrcompile.heal(student, teacher, batches(1), steps=1, layers=["blocks.9"], progress=False)
