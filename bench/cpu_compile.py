"""Cold compile time: GPT-2-small (12 layers) with the 50% low-rank policy vs Inductor on the dense model.

Each compile runs in a fresh process with empty caches (Inductor's and lrcompile's), timed from the first call
to its return. Then a second lrcompile compile in a fresh process with the caches it left: it must run no
factorisation and no tuning run. Each child counts both itself: every family's `from_dense` call (a
factorisation) and `lrcompile.tune.timing.RUNS` (every candidate execution made for tuning).
Target: cold lrcompile ≤ 2× Inductor's cold compile of the dense model.
    python bench/cpu_compile.py [--layers 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {bench!r})
from cpu_model import POLICY, build
model = build({layers})
ids = torch.randint(0, 50257, (8, 128))
backend = {backend!r}
opts = {{"policy": POLICY, "report": {report!r}}} if backend == "lrcompile" else None
made = [0]
if backend == "lrcompile":
    from lrcompile.families import FAMILIES
    from lrcompile.tune import timing

    def counted(fn):
        def wrapper(*a, **k):
            made[0] += 1
            return fn(*a, **k)
        return classmethod(wrapper)

    for cls in FAMILIES.values():
        if "from_dense" in vars(cls):  # an inherited one is counted where it is defined
            cls.from_dense = counted(vars(cls)["from_dense"].__func__)
with torch.no_grad():
    t0 = time.perf_counter()
    torch.compile(model, backend=backend, options=opts)(ids)
    dt = time.perf_counter() - t0
runs = timing.RUNS if backend == "lrcompile" else None
print(json.dumps({{"seconds": dt, "timing_runs": runs, "factorisations": made[0] if backend == "lrcompile" else None}}))
"""


def child(backend: str, layers: int, caches: str, report: str) -> dict:
    env = dict(
        os.environ,
        TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"),
        LRCOMPILE_CACHE_DIR=os.path.join(caches, "lrcompile"),
        TRITON_CACHE_DIR=os.path.join(caches, "triton"),
    )
    code = CHILD.format(bench=os.path.dirname(os.path.abspath(__file__)), layers=layers, backend=backend, report=report)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        report = os.path.join(d2, "report.json")
        ind = child("inductor", a.layers, d1, report)
        cold = child("lrcompile", a.layers, d2, report)
        rows = json.load(open(report))["sites"]
        svd_s = sum(r.get("seconds", 0) for r in rows)
        warm = child("lrcompile", a.layers, d2, report)
        rows = json.load(open(report))["sites"]
        hits = sum("factors from cache" in r.get("notes", []) for r in rows)
        rewritten = sum(r["status"] == "rewritten" for r in rows)
    t_ind = ind["seconds"]
    table = [
        ["inductor, dense (cold)", f"{t_ind:.1f}", "1.00×", "", "", ""],
        [
            "lrcompile 50% low-rank (cold)",
            f"{cold['seconds']:.1f}",
            f"{cold['seconds'] / t_ind:.2f}×",
            cold["timing_runs"],
            cold["factorisations"],
            f"factorisation {svd_s:.1f} s",
        ],
        [
            "lrcompile 50% low-rank (warm caches, new process)",
            f"{warm['seconds']:.1f}",
            f"{warm['seconds'] / t_ind:.2f}×",
            warm["timing_runs"],
            warm["factorisations"],
            f"{hits}/{rewritten} sites' factors from cache"
            + ("" if warm["timing_runs"] == 0 and warm["factorisations"] == 0 else "; WARM COMPILE DID WORK"),
        ],
    ]
    write_result(
        "cpu_compile",
        f"bench/cpu_compile.py — cold compile, GPT-2-small shape ({a.layers} layers), 8×128 tokens",
        table,
        ["compile", "seconds", "vs inductor cold", "timing runs", "factorisations", "note"],
        "Each row is a fresh process; cold = empty Inductor, Triton and lrcompile cache directories. "
        "Target: cold lrcompile ≤ 2.0× Inductor's cold compile; the warm row must take every site's factors "
        "from the cache and every tuning result from the autotune cache (0 factorisations, 0 timing runs).",
    )


if __name__ == "__main__":
    main()
