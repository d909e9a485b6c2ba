"""Compress a ~1B-parameter Llama-shaped model on this machine: memory and time per site.

Llama shape (hidden 2048, 16 layers, intermediate 5632, 32 heads, vocab 32000; ≈ 0.95 B parameters, fp32,
random weights from the config), every block linear low-rank at 50% params through `lrcompile.rewrite` (dense
weights released site by site). Records peak RSS against the dense model's size, total and per-site seconds,
and checks that time grows linearly in the number of sites (per-site time of the first vs the second half of
the layers, which have the same shapes). Then save / load into a fresh model and compare the load time.
Targets: completes with a progress bar; peak RSS ≤ 1.6× the dense model's size.
`--whitened`: `init: whitened_svd` and `budget: {params: 0.5}` (the default allocation) instead of a fixed rank,
on statistics from `--cal-batches` batches of synthetic tokens; the statistics + allocation + factorisation
seconds per site are reported (target ≤ 3 s) and the result goes to scale_llama-whitened.md.
    python bench/scale_llama.py [--layers 16] [--whitened [--cal-batches 4 --cal-len 128]]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

POLICY = {
    "rules": [
        {"match": "lm_head", "method": "dense"},
        {"match": "re:model\\.layers\\.\\d+\\.(self_attn|mlp)\\..*", "method": "lowrank", "rank": 0.5},
    ]
}


WHITENED = {
    "budget": {"params": 0.5},
    "rules": [
        {"match": "lm_head", "method": "dense"},
        {"match": "re:model\\.layers\\.\\d+\\.(self_attn|mlp)\\..*", "method": "lowrank", "init": "whitened_svd"},
    ],
}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def build(layers: int):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def main():
    import lrcompile

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--whitened", action="store_true", help="whitened SVD + a 50%% params budget, calibrated")
    ap.add_argument("--cal-batches", type=int, default=4)
    ap.add_argument("--cal-len", type=int, default=128)
    a = ap.parse_args()
    import transformers  # noqa: F401 - imported before the baseline: its memory is no part of the model's

    rss_base = peak_rss_gib()
    t0 = time.perf_counter()
    model = build(a.layers)
    n_params = sum(p.numel() for p in model.parameters())
    dense_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    build_s = time.perf_counter() - t0
    rss_before = peak_rss_gib()
    ids = torch.randint(0, 32000, (1, 16))
    with tempfile.TemporaryDirectory() as d:
        rep = os.path.join(d, "report.json")
        policy, stats, calib_s = POLICY, None, 0.0
        if a.whitened:  # synthetic tokens: the cost, not the quality, is measured here
            policy = WHITENED
            gen = torch.Generator().manual_seed(1)
            cal = [(torch.randint(0, 32000, (1, a.cal_len), generator=gen),) for _ in range(a.cal_batches)]
            t0 = time.perf_counter()
            stats = lrcompile.calibrate(model, cal, policy, progress=True)
            calib_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        lrcompile.rewrite(model, policy, (ids,), report=rep, progress=True, calibration=stats)
        rewrite_s = time.perf_counter() - t0
        del stats
        sites = json.load(open(rep))["sites"]
        rows = [r for r in sites if r["status"] == "rewritten"]
        sized = [r for r in sites if r.get("method") == "lowrank"]  # what the budget sized (some stay dense)
        rss_peak = peak_rss_gib()
        after = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            ref = model(ids).logits
        t0 = time.perf_counter()
        lrcompile.save(model, os.path.join(d, "ck"))
        save_s = time.perf_counter() - t0
        del model
        fresh = build(a.layers)
        t0 = time.perf_counter()
        lrcompile.load(fresh, os.path.join(d, "ck"))
        load_s = time.perf_counter() - t0
        with torch.no_grad():
            same = torch.equal(fresh(ids).logits, ref)
    per_site = [r["seconds"] for r in rows]
    half = len(per_site) // 2
    first, second = statistics.mean(per_site[:half]), statistics.mean(per_site[half:])
    table = [
        ["parameters", f"{n_params / 1e9:.3f} B → {after / 1e9:.3f} B"],
        ["dense model size (fp32)", f"{dense_gib:.2f} GiB"],
        ["peak RSS after building the model", f"{rss_before:.2f} GiB"],
        [
            "peak RSS over the whole rewrite",
            f"{rss_peak:.2f} GiB ({rss_peak / dense_gib:.2f}× the dense model; target ≤ 1.6×)",
        ],
        [
            "peak RSS above the bare process (torch imported)",
            f"{rss_peak - rss_base:.2f} GiB ({(rss_peak - rss_base) / dense_gib:.2f}× the dense model)",
        ],
        ["sites rewritten", f"{len(rows)}"],
        ["rewrite time", f"{rewrite_s:.1f} s ({rewrite_s / max(len(rows), 1):.2f} s per site)"],
        *(
            [
                [
                    "statistics + allocation curves (calibrate)",
                    f"{calib_s:.1f} s on {a.cal_batches}×{a.cal_len} synthetic tokens",
                ],
                [
                    "statistics + allocation + factorisation",
                    f"{calib_s + rewrite_s:.1f} s ({(calib_s + rewrite_s) / max(len(rows), 1):.2f} s per rewritten "
                    f"site, {(calib_s + rewrite_s) / max(len(sized), 1):.2f} s per site the budget sized "
                    f"({len(sized)}); target ≤ 3 s)",
                ],
            ]
            if a.whitened
            else []
        ),
        ["per-site seconds: first half / second half of the sites", f"{first:.2f} / {second:.2f} (linear if ≈ equal)"],
        ["per-site seconds by shape", ", ".join(f"{k}: {statistics.mean(v):.2f}" for k, v in _by_shape(rows).items())],
        ["save / load (no factorisation)", f"{save_s:.1f} s / {load_s:.1f} s; loaded outputs identical: {same}"],
        ["building the model from its config (for scale)", f"{build_s:.1f} s"],
    ]
    write_result(
        "scale_llama-whitened" if a.whitened else "scale_llama",
        f"bench/scale_llama.py — Llama shape, hidden 2048, {a.layers} layers, 50% low-rank"
        + (" (whitened SVD, budget, default allocation)" if a.whitened else ""),
        table,
        ["what", "measured"],
        "Peak RSS is the process maximum (resource.getrusage), so it includes building the dense model.",
    )


def _by_shape(rows):
    out = {}
    for r in rows:
        out.setdefault(f"{r['in_features']}→{r['out_features']}", []).append(r["seconds"])
    return out


if __name__ == "__main__":
    main()
