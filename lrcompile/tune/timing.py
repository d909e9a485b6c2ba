"""Median run times of a site's candidates: wall clock on CPU, CUDA events on a GPU, within a time budget.

`RUNS` counts every candidate execution made for tuning (correctness checks included): a compile served from a
warm cache leaves it unchanged, which is what the tests read.
"""

from __future__ import annotations

import statistics
import time

import torch

RUNS = 0

MAX_REPS = 25  # tiny shapes stop here long before the budget


def run(fn, args):
    """One counted execution (the correctness check's run doubles as the warm-up)."""
    global RUNS
    RUNS += 1
    with torch.no_grad():
        return fn(*args)


def medians_ms(fns: dict, args, device: torch.device, budget_s: float) -> dict:
    return {k: statistics.median(v) for k, v in samples_ms(fns, args, device, budget_s).items()}


# A measurement whose median is this many times its fastest run was taken under a burst of load: it is used for
# this compile but not cached, so that one noisy run cannot fix a choice for every later compile.
UNSTABLE = 3.0
MIN_ROUNDS_TO_JUDGE = 5


def unstable(samples: dict) -> list:
    """Candidates whose times spread grossly (median > UNSTABLE × fastest over enough rounds)."""
    return [
        k
        for k, v in samples.items()
        if len(v) >= MIN_ROUNDS_TO_JUDGE and statistics.median(v) > UNSTABLE * max(min(v), 1e-9)
    ]


def samples_ms(fns: dict, args, device: torch.device, budget_s: float) -> dict:
    """Median milliseconds per call of each fn, called round-robin (load drift on a shared machine hits all alike)
    for 1..MAX_REPS rounds, stopping once `budget_s` is spent: the bound holds to within one round, which is what
    keeps a cold compile within its target on large shapes."""
    global RUNS
    samples: dict = {k: [] for k in fns}
    spent, rounds = 0.0, 0
    cuda = device.type == "cuda"
    with torch.no_grad():
        while rounds < MAX_REPS and (rounds == 0 or spent < budget_s):
            for k, fn in fns.items():
                RUNS += 1
                t0 = time.perf_counter()
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn(*args)
                    end.record()
                    end.synchronize()
                    samples[k].append(start.elapsed_time(end))
                else:
                    fn(*args)
                    samples[k].append((time.perf_counter() - t0) * 1e3)
                spent += time.perf_counter() - t0
            rounds += 1
    return samples
