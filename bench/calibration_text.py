"""Does more calibration text make whitened SVD better, or only text like the evaluation text?

all-MiniLM-L6-v2, every encoder linear low rank at 0.75 / 0.5 of their parameters. The ranks are fixed once (the
default allocation from statistics of the first 95 hand-written calibration sentences); only the statistics the
factors are fitted to change: those 95 sentences, then the same plus N generated ones (bench/data/generated.py).
Scored on the selection split (never HELD_OUT), in its two parts: the other 32 hand-written sentences and 160
generated ones that no statistics saw. Mean cosine of mean-pooled embeddings to the original model.

    python bench/calibration_text.py [--generated 0,400,1840,3840] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

import lrcompile  # noqa: E402
from bench.common import write_result  # noqa: E402
from bench.data.generated import calibration_corpus  # noqa: E402
from bench.data.text import CALIBRATION  # noqa: E402
from bench.quality_minilm import batches_of, cosines, embed, load, policy  # noqa: E402
from lrcompile.factorize.fisher import measure_fisher  # noqa: E402
from lrcompile.factorize.sensitivity import factorised  # noqa: E402
from lrcompile.policy import budget as B  # noqa: E402

BUDGETS = (0.75, 0.5)
STATS_HAND = 95  # the selection split's statistics: the first 95 hand-written sentences
SCORED_GENERATED = 160  # the first generated sentences are scored, never calibrated on


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--generated", default="0,400,1840,3840", help="generated sentences added to the statistics")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(n) for n in args.generated.split(",")]
    tok, model = load()
    hand = list(CALIBRATION)
    gen = calibration_corpus(SCORED_GENERATED + max(counts))[len(hand) :]
    parts = {"hand-written": hand[STATS_HAND:], "generated": gen[:SCORED_GENERATED]}
    evs = {k: batches_of(tok, v, 64) for k, v in parts.items()}
    refs = {k: embed(model, v) for k, v in evs.items()}
    sites = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]
    small = batches_of(tok, hand[:STATS_HAND], 32)
    st = lrcompile.calibrate(model, small, policy(0.5, None), progress=False)
    curves = measure_fisher(model, small, st, policy(0.5, None), probes=16, progress=False)
    cands = [B.Candidate(n, model.get_submodule(n).weight.detach(), model.get_submodule(n).bias.numel()) for n in sites]
    ranks = {f: B.allocate(cands, {"params": f}, st, errors=curves) for f in BUDGETS}
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in sites}

    def score(weights) -> dict:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for n, w in weights.items():
                m.get_submodule(n).weight.copy_(w.float())
        return {k: round(cosines(embed(m, evs[k]), refs[k])[0], 4) for k in evs}

    rows = []
    for n in counts:
        t = time.time()
        stats = lrcompile.calibrate(model, batches_of(tok, hand[:STATS_HAND] + gen[SCORED_GENERATED:][:n], 32))
        took = time.time() - t
        for f in BUDGETS:
            got = score({s: factorised(dense[s], stats.get(s))(r) for s, r in ranks[f].items() if r is not None})
            rows.append([f, STATS_HAND + n, n, f"{took:.0f}", got["hand-written"], got["generated"]])
            print(rows[-1], flush=True)
    headers = ["budget", "sentences", "of them generated", "statistics s", "cos: hand-written", "cos: generated"]
    rows.sort(key=lambda r: (-r[0], r[1]))
    print(tabulate(rows, headers=headers, floatfmt=".4f"))
    write_result(
        "calibration_text",
        "Calibration text: more of it, or text like the evaluation's? (whitened SVD, all-MiniLM-L6-v2)",
        rows,
        headers,
        "Ranks fixed (default allocation from the 95 hand-written sentences); only the statistics change. Scored on "
        "the 32 other hand-written calibration sentences and 160 generated ones no statistics saw (the selection "
        "split; HELD_OUT is not used). Run as `python bench/calibration_text.py`.",
    )


if __name__ == "__main__":
    main()
