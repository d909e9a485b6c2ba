"""One structured layer vs dense F.linear, forward, 1024 tokens, fp32, CPU.

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

from lrcompile.families import FAMILIES  # noqa: E402

SHAPES = [(768, 3072), (3072, 768), (768, 768)]
CONFIGS = [
    ("monarch", "Monarch-4", {"blocks": 4}),
    ("btt", "BTT r=4", {"rank": 4}),
    ("blast", "BLAST b=4 r=50%", {"blocks": 4, "rank": 0.5}),
]
TOKENS = 1024


def gemms_alone(name: str, ts: list, n: int):
    """The family's block GEMMs and nothing else, as bmm on contiguous operands into preallocated outputs (no
    shuffle, bias, padding or allocation): the ceiling of any forward built on BLAS GEMMs, since the FLOP
    ratio assumes these run as efficiently as the dense GEMM."""
    if name == "blast":
        U, V, S = ts
        (b1, _, r), (b2, q, _) = U.shape, V.shape
        ops = [
            (V.transpose(1, 2).contiguous(), torch.randn(b2, q, n)),
            (S.permute(2, 0, 1).contiguous(), torch.randn(r, b2, n)),
            (torch.randn(b1, n, r), U.transpose(1, 2).contiguous()),
        ]
    else:
        W1, W2 = ts[:2]
        a1, a0, c0, t = W1.shape
        ops = [
            (torch.randn(a1, n, a0), W1.reshape(a1, a0, c0 * t)),
            (torch.randn(c0, n, a1 * t), W2.reshape(c0, a1 * t, -1)),
        ]
    outs = [torch.empty(a.shape[0], a.shape[1], b.shape[2]) for a, b in ops]

    def run():
        for (a, b), o in zip(ops, outs):
            torch.bmm(a, b, out=o)

    return run


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
                t = interleaved(
                    {
                        "dense": lambda x=x, W=W, b=b: F.linear(x, W, b),
                        "struct": lambda x=x, b=b, cls=cls, ts=ts: cls.functional(x, None, b, *ts),
                        "gemms": gemms_alone(name, ts, TOKENS),
                    },
                    reps=args.reps,
                )
            flop_ratio = (in_f * out_f) / cls.param_count(in_f, out_f, cfg)
            speedup = t["dense"] / t["struct"]
            pct = 100 * speedup / flop_ratio
            ok = "n/a (<2)" if flop_ratio < 2 else ("yes" if pct >= 90 else "no")
            ceiling = 100 * t["dense"] / t["gemms"] / flop_ratio
            rows.append(
                [
                    f"{in_f}→{out_f}",
                    label,
                    f"{t['dense'] * 1e3:.2f}",
                    f"{t['struct'] * 1e3:.2f}",
                    f"{flop_ratio:.2f}",
                    f"{speedup:.2f}",
                    f"{pct:.0f}%",
                    ok,
                    f"{ceiling:.0f}%",
                ]
            )
            print(rows[-1], flush=True)
    headers = [
        "shape",
        "family",
        "dense ms",
        "structured ms",
        "FLOP ratio",
        "speedup",
        "% of FLOP ratio",
        "≥ 90% (target)",
        "its GEMMs alone: % of FLOP ratio",
    ]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    load_end = os.getloadavg()[0]
    notes = (
        f"{TOKENS} tokens, fp32, forward only, bias on; median of {args.reps} interleaved reps; "
        "last column: the family's block GEMMs alone (bmm, contiguous operands, preallocated outputs), the "
        "ceiling of a forward built on BLAS GEMMs; "
        f"torch.set_num_threads({torch.get_num_threads()}). 1-minute load average {load:.2f} at start, "
        f"{load_end:.2f} at end"
        + (" — the machine was shared with other jobs: figures may be noisy." if max(load, load_end) > 0.5 else ".")
    )
    write_result("cpu_structured", "Structured layers vs dense F.linear (CPU)", rows, headers, notes)
    print("wrote bench/results/cpu_structured.md")


if __name__ == "__main__":
    main()
