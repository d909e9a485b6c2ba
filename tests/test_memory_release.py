"""Freed heap pages go back to the system between the large buffers of calibration and factorisation."""

import platform

import pytest
import torch
from torch import nn

import lrcompile
from lrcompile.runtime import memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_trims_the_glibc_heap():
    assert memory.release() in (True, False)  # callable, harmless
    junk = [bytearray(200_000) for _ in range(200)]  # below the mmap threshold: heap blocks
    del junk
    assert memory.release() is True  # there were free pages to return


def test_calibrate_fisher_and_rewrite_release_as_they_go(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "release", lambda: calls.append(1) or True)
    for mod in ("lrcompile.factorize.calibrate", "lrcompile.factorize.fisher", "lrcompile.plan.rewrite"):
        monkeypatch.setattr(f"{mod}.release", memory.release)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 6))
    policy = {
        "defaults": {"min_features": 0},
        "budget": {"params": 0.6},
        "rules": [{"match": "*", "method": "lowrank", "init": "whitened_svd"}],
    }
    xs = [torch.randn(3, 4, 8) for _ in range(2)]
    stats = lrcompile.calibrate(model, xs, policy, progress=False)
    after_calibrate = len(calls)
    assert after_calibrate >= 2 + 2 + 2  # per batch of statistics, per site decomposed, per batch of passes
    lrcompile.rewrite(model, policy, (xs[0],), calibration=stats, progress=False)
    done = [r for r in model.lrcompile_report.sites() if r.status == "rewritten"]
    assert done and len(calls) >= after_calibrate + len(done)  # per site rewritten
