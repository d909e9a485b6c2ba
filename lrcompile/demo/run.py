"""`lrcompile demo`: the bundled transformer, dense vs compiled with the demo policy, side by side."""

from __future__ import annotations

import copy
import os
import statistics
import time

import torch
from tabulate import tabulate

from .tiny import demo_model

POLICY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "policies", "demo.yaml")


def _median_ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def run_demo(d=512, layers=4, batch=8, seq=128, reps=10, report=None) -> dict:
    torch.manual_seed(0)
    dense, (ids,) = demo_model(d=d, layers=layers, batch=batch, seq=seq)
    model = copy.deepcopy(dense)
    print(f"bundled transformer: d={d}, {layers} layers, {batch}×{seq} tokens; policy {POLICY}\n")
    with open(POLICY) as f:
        print(f.read())
    options = {"policy": POLICY, "verbose": True}
    if report:
        options["report"] = report
    with torch.no_grad():
        ind = torch.compile(dense, backend="inductor")
        lrc = torch.compile(model, backend="lrcompile", options=options)
        ref = dense(ids)
        t0 = time.perf_counter()
        out = lrc(ids)
        compile_s = time.perf_counter() - t0
        ind(ids)
        times = {
            "eager dense": _median_ms(lambda: dense(ids), reps),
            "inductor dense": _median_ms(lambda: ind(ids), reps),
            "lrcompile": _median_ms(lambda: lrc(ids), reps),
        }
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).mean().item()
    rel = ((out - ref).norm() / ref.norm()).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    n_dense = sum(p.numel() for p in dense.parameters())
    n_run = sum(p.numel() for n, p in model.named_parameters() if not _shadowed(model, n))
    rows = [
        [
            "eager dense",
            f"{times['eager dense']:.1f}",
            f"{times['inductor dense'] / times['eager dense']:.2f}×",
            f"{n_dense:,}",
            "-",
            "-",
            "-",
        ],
        ["inductor dense", f"{times['inductor dense']:.1f}", "1.00×", f"{n_dense:,}", "-", "-", "-"],
        [
            "lrcompile",
            f"{times['lrcompile']:.1f}",
            f"{times['inductor dense'] / times['lrcompile']:.2f}×",
            f"{n_run:,}",
            f"{rel:.3f}",
            f"{cos:.4f}",
            f"{agree:.1%}",
        ],
    ]
    print()
    print(
        tabulate(
            rows,
            headers=["model", "ms/forward", "speed vs inductor", "params used", "rel. error", "cosine", "top-1 agree"],
        )
    )
    print(f"\nfirst lrcompile call (factorise + compile): {compile_s:.1f} s")
    return {"times_ms": times, "cosine": cos, "rel_error": rel, "top1": agree}


def _shadowed(model, name: str) -> bool:
    """Dense weights the rewritten graph no longer reads (the backend path keeps them on the module)."""
    owner, _, leaf = name.rpartition(".")
    if leaf != "weight":
        return False
    mod = model.get_submodule(owner) if owner else model
    return hasattr(mod, "lrcompile")
