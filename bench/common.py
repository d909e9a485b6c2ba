"""Shared bench helpers: interleaved timing (ratios taken side by side) and result files with the machine."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time

import torch
from tabulate import tabulate

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> str:
    try:
        model = next(l.split(":", 1)[1].strip() for l in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if l.startswith("Model name"))
    except Exception:
        model = platform.processor() or "unknown CPU"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "n/a"
    return (f"{model}, {os.cpu_count()} cores, torch.get_num_threads()={torch.get_num_threads()}{gpu}; "
            f"torch {torch.__version__}, triton {tv}, Python {platform.python_version()}")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(fns: dict, reps: int = 20, warmup: int = 3) -> dict:
    """Median seconds per call for each fn, calling them round-robin so drift hits all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def write_result(name: str, title: str, rows: list, headers: list, notes: str = "") -> str:
    table = tabulate(rows, headers=headers, tablefmt="github")
    text = (f"# {title}\n\n{datetime.date.today().isoformat()} — {machine()}\n\n{table}\n"
            + (f"\n{notes}\n" if notes else ""))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(text)
    print(text)
    return text
