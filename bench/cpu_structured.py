"""One structured layer vs dense F.linear, forward, 1024 tokens, fp32, CPU (TARGETS.md `cpu_structured`).

For each family and layer shape: the family's `functional` (what the rewritten graph calls) and F.linear are
timed side by side (interleaved, median of many reps); the speedup is compared with the FLOP ratio
(dense FLOPs / structured FLOPs). Target: ≥ 90% of the FLOP ratio wherever the FLOP ratio is ≥ 2.

    python bench/cpu_structured.py [--reps 40] [--malloc keep]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_malloc_flag, apply_malloc, interleaved, write_result  # noqa: E402

from lrcompile.structures import FAMILIES  # noqa: E402

SHAPES = [(768, 3072), (3072, 768), (768, 768)]
CONFIGS = [("monarch", "Monarch-4", {"blocks": 4}), ("btt", "BTT r=4", {"rank": 4}),
           ("blast", "BLAST b=4 r=50%", {"blocks": 4, "rank": 0.5})]
TOKENS = 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=40)
    add_malloc_flag(ap)
    args = ap.parse_args()
    apply_malloc(args.malloc)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    rows = []
    for in_f, out_f in SHAPES:
        x = torch.randn(TOKENS, in_f)
        W = torch.randn(out_f, in_f) / in_f**0.5
        b = torch.randn(out_f)
        for name, label, opts in CONFIGS:
            cls = FAMILIES[name]
            cfg = cls.Config(init="random", **opts).resolve(in_f, out_f)
            m = cls.init(in_f, out_f, cfg)
            ts = [t.detach() for t in m.tensors()]
            with torch.no_grad():
                t = interleaved({"dense": lambda: F.linear(x, W, b),
                                 "struct": lambda: cls.functional(x, None, b, *ts)}, reps=args.reps)
            flop_ratio = (in_f * out_f) / cls.param_count(in_f, out_f, cfg)
            speedup = t["dense"] / t["struct"]
            pct = 100 * speedup / flop_ratio
            ok = "n/a (<2)" if flop_ratio < 2 else ("yes" if pct >= 90 else "no")
            rows.append([f"{in_f}→{out_f}", label, f"{t['dense'] * 1e3:.2f}", f"{t['struct'] * 1e3:.2f}",
                         f"{flop_ratio:.2f}", f"{speedup:.2f}", f"{pct:.0f}%", ok])
            print(rows[-1], flush=True)
    headers = ["shape", "family", "dense ms", "structured ms", "FLOP ratio", "speedup", "% of FLOP ratio",
               "≥ 90% (target)"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    load_end = os.getloadavg()[0]
    notes = (f"{TOKENS} tokens, fp32, forward only, bias on; median of {args.reps} interleaved reps; "
             f"torch.set_num_threads({torch.get_num_threads()}). 1-minute load average {load:.2f} at start, "
             f"{load_end:.2f} at end" + (" — the machine was shared with other jobs: figures may be noisy."
                                        if max(load, load_end) > 0.5 else "."))
    write_result("cpu_structured", "Structured layers vs dense F.linear (CPU)", rows, headers, notes)
    print("wrote bench/results/cpu_structured.md")


if __name__ == "__main__":
    main()
