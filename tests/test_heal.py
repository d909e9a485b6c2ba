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
    lrcompile.heal(student, teacher, bs, steps=60, lr=1e-2, layers=layers, train_also=(), progress=False, **extra)
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
    # a time budget decays the rate by whichever runs out first: half the time spent = half way down
    assert _lr_factor(20, 3000, 10, "cosine", done=0.5) == pytest.approx(0.5)
    assert _lr_factor(20, 3000, 10, "linear", done=1.0) == pytest.approx(0.0, abs=1e-12)
    assert _lr_factor(60, steps, warm, "cosine", done=0.1) == pytest.approx(0.5)  # the steps run out first here


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


class Listed(nn.Module):
    """Two ModuleLists of one block class (lengths 3 and 2), a mixed list and a nested list."""

    def __init__(self, d=8):
        super().__init__()
        self.mixed = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)])
        self.short = nn.ModuleList(nn.Sequential(nn.Linear(d, d)) for _ in range(2))
        self.long = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.ModuleList([nn.Linear(d, d)])) for _ in range(3))


def test_repeated_blocks_are_the_longest_uniform_list_holding_a_site(pair):
    from lrcompile.lifecycle.heal import repeated_blocks

    student, teacher = pair
    assert repeated_blocks(student) == ["blocks.0", "blocks.1"]  # they hold the rewritten sites
    assert repeated_blocks(teacher) == []  # nothing rewritten in the dense model
    is_linear = lambda m: isinstance(m, nn.Linear)  # noqa: E731
    assert repeated_blocks(teacher, holds=is_linear) == ["blocks.0", "blocks.1"]
    m = Listed()
    assert repeated_blocks(m, holds=is_linear) == ["long.0", "long.1", "long.2"]  # the mixed list is not blocks
    del m.long
    assert repeated_blocks(m, holds=is_linear) == ["short.0", "short.1"]
    assert repeated_blocks(m, holds=lambda _m: False) == []


def test_defaults_are_the_measured_recipe_with_blocks_found(pair):
    import inspect

    d = {k: v.default for k, v in inspect.signature(lrcompile.heal).parameters.items()}
    assert (d["lr"], d["steps"], d["max_minutes"], d["warmup"], d["schedule"]) == (3e-4, 3000, 10.0, 25, "cosine")
    assert (d["layers"], d["layer_loss"], d["layer_weight"]) == ("auto", "nmse", 1.0)
    assert d["train_also"] == ("biases", "norms") and d["holdout"] == 0.1
    student, teacher = pair
    bs = batches(5)
    state = {n: p.detach().clone() for n, p in student.named_parameters()}
    report = {}
    lrcompile.heal(student, teacher, bs, steps=20, progress=False, report=report)
    assert report["layers"] == ["blocks.0", "blocks.1"] and report["steps"] == 20
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, state[n])}
    assert {"norm.weight", "norm.bias", "blocks.0.0.bias"} <= changed  # biases and norms train by default
    assert report["holdout_after"]["cosine"] > report["holdout_before"]["cosine"]


class Tracked(torch.Tensor):
    """Marks the teacher's outputs (a subclass survives detach) so that the test can count those still alive."""


def test_teacher_outputs_are_streamed_not_kept(pair):
    import gc

    student, teacher = pair
    teacher.register_forward_hook(lambda _m, _a, out: out.as_subclass(Tracked))
    alive = []
    student.register_forward_pre_hook(lambda *_a: alive.append(sum(type(o) is Tracked for o in gc.get_objects())))
    calls = []
    teacher.register_forward_pre_hook(lambda *_a: calls.append(1))
    lrcompile.heal(student, teacher, batches(10), steps=24, holdout=0, progress=False)
    assert len(calls) == 24  # one teacher forward per step, whatever the corpus
    assert max(alive) <= 3, alive  # the current step's output and what the last step left: not one per batch


def test_max_minutes_stops_on_time_and_leaves_room_for_the_last_scoring(pair, monkeypatch):
    from lrcompile.lifecycle import heal as H

    student, teacher = pair
    now = [0.0]
    monkeypatch.setattr(H, "_clock", lambda: now[0])
    teacher.register_forward_pre_hook(lambda *_a: now.__setitem__(0, now[0] + 1.0))  # each teacher call: 1 s
    done = []  # the learning rate follows the time spent: the schedule ends as the budget does
    real = H._lr_factor
    monkeypatch.setattr(H, "_lr_factor", lambda *a: done.append(a[4]) or real(*a))
    report = {}
    lrcompile.heal(student, teacher, batches(4), steps=1000, max_minutes=0.5, holdout=0, progress=False, report=report)
    assert (report["steps"], report["stopped"]) == (30, "time")
    assert done[0] == 0.0 and done[-1] == pytest.approx(29 / 30)
    report = {}  # scoring one held-out batch takes 1 s before and 1 s after: 28 s are left to train
    lrcompile.heal(student, teacher, batches(4), steps=1000, max_minutes=0.5, holdout=1, progress=False, report=report)
    assert (report["steps"], report["stopped"], report["seconds"]) == (28, "time", 30.0)
    report = {}
    lrcompile.heal(student, teacher, batches(4), steps=5, max_minutes=0.5, holdout=0, progress=False, report=report)
    assert (report["steps"], report["stopped"]) == (5, "steps")
    state = {n: p.detach().clone() for n, p in student.named_parameters()}
    lrcompile.heal(student, teacher, batches(4), max_minutes=0, holdout=0, progress=False, report=report)
    assert report["steps"] == 0 and all(torch.equal(p, state[n]) for n, p in student.named_parameters())


def test_progress_shows_loss_time_left_and_a_summary(pair, monkeypatch, capsys):
    from lrcompile.lifecycle import heal as H

    student, teacher = pair
    now = [0.0]
    monkeypatch.setattr(H, "_clock", lambda: now[0])
    teacher.register_forward_pre_hook(lambda *_a: now.__setitem__(0, now[0] + 1.0))
    lrcompile.heal(student, teacher, batches(4), steps=1000, max_minutes=0.5, progress=True)
    out, err = capsys.readouterr()
    assert "loss=" in err and "28/28" in err  # the bar's total follows the time budget, so its ETA does
    assert out.startswith("lrcompile heal: 28 steps in 30 s (stopped on time)") and "held-out (1 batches)" in out


def test_holdout_batches_are_scored_not_trained_on(pair):
    from lrcompile.lifecycle.heal import split_holdout

    assert split_holdout(10, 0.1) == [5] and split_holdout(2, 0.1) == [1] and split_holdout(1, 0.5) == []
    assert split_holdout(10, 0.0) == [] and split_holdout(10, 3) == [1, 5, 8]
    assert split_holdout(20, 0.2) == [2, 7, 12, 17]
    assert len(split_holdout(10_000, 0.1)) == 16 and len(split_holdout(10_000, 100)) == 100  # fractions are capped
    for bad in (1.0, -0.1, 10, -1, "a", True):
        with pytest.raises(ValueError, match="holdout"):
            split_holdout(10, bad)
    student, teacher = pair
    bs = batches(4)
    grad_seen = []
    student.register_forward_pre_hook(
        lambda _m, _a, kw: grad_seen.append((id(kw["input_ids"]), torch.is_grad_enabled())), with_kwargs=True
    )
    report = {}
    lrcompile.heal(student, teacher, bs, steps=9, lr=1e-2, holdout=0.25, progress=False, report=report)
    held = id(bs[2]["input_ids"])
    assert [g for i, g in grad_seen if i == held] == [False, False]  # scored before and after, never trained on
    assert sum(g for _i, g in grad_seen) == 9 and report["holdout_batches"] == 1 and report["train_batches"] == 3
    assert report["holdout_after"]["loss"] < report["holdout_before"]["loss"]
