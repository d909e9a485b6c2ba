"""`rewrite`, `calibrate` and warmup compile the model they are given with throwaway backends: afterwards those
frames are gone (nothing of them keeps the model alive), and every other compiled model keeps its own."""

import gc
import math
import weakref

import pytest
import torch
from conftest import all_lowrank
from torch import nn

import lrcompile
from lrcompile.families.lowrank import LowRank
from lrcompile.tune import warmup

ATTENTION = {
    "defaults": {"min_features": 0},
    "rules": [{"match": "*", "kind": "attention", "method": "shared_kv", "rank": 4}],
}


class Other(nn.Module):
    """Model A: compiled by the user before lrcompile works on model B."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x).relu()


class Attn(nn.Module):
    """Model B: softmax(QKᵀ/√d)V by hand, then an output projection."""

    def __init__(self, d=8):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return self.o(p @ v)


def rewrite_linear(m, x):
    lrcompile.rewrite(m, all_lowrank(2), (x,))
    assert isinstance(m.o, LowRank)


def rewrite_attention(m, x):
    lrcompile.rewrite(m, ATTENTION, (x,))
    assert hasattr(m, "lrcompile_kv")  # install_attention ran


def calibrate(m, x):
    stats = lrcompile.calibrate(m, [x, x + 1], progress=False)
    assert "o" in stats.sites


def warmup_specs(m, x):
    assert warmup.model_specs(m, (x,), all_lowrank(2))


ACTIONS = [rewrite_linear, rewrite_attention, calibrate, warmup_specs]


@pytest.mark.parametrize("other", [Other, Attn], ids=["other_class", "same_class"])
@pytest.mark.parametrize("action", ACTIONS, ids=lambda f: f.__name__)
def test_other_compiled_models_are_not_recompiled(action, other):
    calls = []

    def count(gm, inputs):
        calls.append(1)
        return gm.forward

    x = torch.randn(2, 3, 8)
    a = torch.compile(other(), backend=count)
    a(x)
    assert calls == [1]
    action(Attn(), x)
    a(x)
    assert calls == [1], f"{action.__name__} made another compiled model recompile"


@pytest.mark.parametrize("action", ACTIONS, ids=lambda f: f.__name__)
def test_throwaway_frames_do_not_keep_the_model_alive(action):
    m = Attn()
    ref = weakref.ref(m)
    action(m, torch.randn(2, 3, 8))
    del m
    gc.collect()
    assert ref() is None, f"something {action.__name__} compiled still holds the model"
