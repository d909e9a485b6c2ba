"""Each site decomposed once: the bases the default allocation's curves computed wait on disk for `rewrite`."""

import copy
import gc
import os

import torch
from torch import nn

import lrcompile
from lrcompile.factorize import whiten

POLICY = {
    "defaults": {"min_features": 0},
    "budget": {"params": 0.6},
    "rules": [{"match": "*", "method": "lowrank", "init": "whitened_svd"}],
}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 20), nn.Linear(20, 8), nn.Linear(8, 6)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.relu(self.a(x)))))


def _count(monkeypatch):
    calls = []
    real = whiten.whitened_basis
    monkeypatch.setattr(whiten, "whitened_basis", lambda W, *a, **k: calls.append(tuple(W.shape)) or real(W, *a, **k))
    return calls


def test_rewrite_reads_the_calibration_bases_back(monkeypatch):
    torch.manual_seed(0)
    model = Net()
    xs = [torch.randn(4, 5, 12) for _ in range(3)]
    fresh = copy.deepcopy(model)
    calls = _count(monkeypatch)
    stats = lrcompile.calibrate(model, xs, POLICY, progress=False)
    assert len(calls) == 3 and stats.spill is not None and os.path.isdir(stats.spill.dir)
    assert all(stats.get(n).spilled is not None for n in "abc")
    calls.clear()
    lrcompile.rewrite(model, POLICY, (xs[0],), calibration=stats, progress=False)
    assert calls == []  # no site decomposed again
    done = [r.fqn for r in model.lrcompile_report.sites() if r.status == "rewritten"]
    assert {"a", "b"} <= set(done)
    # the same factors as a fresh decomposition
    for n in done:
        W = fresh.get_submodule(n).weight.detach()
        r = model.get_submodule(n).U.shape[1]
        U, V, _ = whiten.whitened_svd(W, stats.get(n).__class__(**{**vars(stats.get(n)), "spilled": None}), r)
        got = model.get_submodule(n)
        torch.testing.assert_close((got.U @ got.V).double(), U @ V, rtol=1e-5, atol=1e-6)
    d = stats.spill.dir
    del stats
    gc.collect()
    assert not os.path.exists(d)  # the directory goes with the statistics


def test_a_changed_weight_is_decomposed_anew(monkeypatch):
    torch.manual_seed(1)
    model = Net()
    xs = [torch.randn(4, 5, 12) for _ in range(2)]
    stats = lrcompile.calibrate(model, xs, POLICY, progress=False)
    with torch.no_grad():
        model.b.weight.mul_(1.5)  # edited after calibration: its spilled basis belongs to another weight
    calls = _count(monkeypatch)
    lrcompile.rewrite(model, POLICY, (xs[0],), calibration=stats, progress=False)
    assert calls == [(8, 20)]


def test_a_full_disk_keeps_the_bases_in_memory(monkeypatch):
    import safetensors.torch

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    torch.manual_seed(2)
    model = Net()
    xs = [torch.randn(4, 5, 12) for _ in range(2)]
    stats = lrcompile.calibrate(model, xs, POLICY, progress=False)
    assert set(stats.fisher) == set("abc") and all(stats.get(n).spilled is None for n in "abc")
    calls = _count(monkeypatch)
    lrcompile.rewrite(model, POLICY, (xs[0],), calibration=stats, progress=False)
    assert calls  # decomposed again, as without the directory


class Fan(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(12, 10), nn.Linear(12, 10)
        self.down = nn.Linear(20, 6)  # input twice its output: output-form statistics

    def forward(self, x):
        return self.down(torch.cat([torch.tanh(self.q(x)), self.k(x)], -1))


def test_moments_wait_on_disk_during_the_passes_and_come_back_shared(monkeypatch):
    from lrcompile.factorize import fisher

    torch.manual_seed(3)
    model = Fan()
    xs = [torch.randn(4, 5, 12) for _ in range(2)]
    no_curves = {**POLICY, "budget": {"params": 0.6, "allocate": "spectrum"}}  # the same statistics, no passes
    plain = lrcompile.calibrate(model, xs, no_curves, progress=False)
    seen = []
    real = fisher._pooled
    holder = {}

    def spy(out, batch):
        st = holder["stats"]
        seen.append(all(s.xtx is None and s.yty is None for s in st.sites.values()))
        return real(out, batch)

    monkeypatch.setattr(fisher, "_pooled", spy)
    real_measure = fisher.measure_fisher
    monkeypatch.setattr(
        fisher,
        "measure_fisher",
        lambda m, b, stats, *a, **k: holder.update(stats=stats) or real_measure(m, b, stats, *a, **k),
    )
    stats = lrcompile.calibrate(model, xs, POLICY, progress=False)
    assert seen and all(seen)  # parked while the passes ran
    assert stats.get("q").xtx is stats.get("k").xtx and stats.get("down").output_form  # back, shared again
    for n in ("q", "k"):
        assert torch.equal(stats.get(n).xtx, plain.get(n).xtx)
    assert torch.equal(stats.get("down").yty, plain.get("down").yty)
    assert not [f for f in os.listdir(stats.spill.dir) if f.startswith("parked")]  # files removed
