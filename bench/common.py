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
        model = next(
            l.split(":", 1)[1].strip()
            for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if l.startswith("Model name")
        )
    except Exception:
        model = platform.processor() or "unknown CPU"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "n/a"
    return (
        f"{model}, {os.cpu_count()} cores, torch.get_num_threads()={torch.get_num_threads()}{gpu}; "
        f"torch {torch.__version__}, triton {tv}, Python {platform.python_version()}; {ALLOCATOR['state']}"
    )


# glibc hands freed blocks above a (dynamic) size back to the OS, so a training step that frees and re-makes
# (N, d) buffers page-faults them in again on every step — measured at 3-6x the cost of the op itself for
# elementwise passes on a 2-core VM. jemalloc/tcmalloc (PyTorch's CPU launcher preloads one) or these two
# mallopt settings keep the pages. The benches run glibc's defaults unless asked (`--malloc keep`), and say so.
# state: named in result headers; suffix: a keep run's result file, so both settings can be on record
ALLOCATOR = {
    "state": "glibc malloc, default thresholds" if platform.libc_ver()[0] == "glibc" else "system malloc",
    "suffix": "",
}
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, (1 << 31) - 1  # glibc's largest dynamic mmap threshold; int max


def add_malloc_flag(ap) -> None:
    ap.add_argument(
        "--malloc",
        choices=("default", "keep"),
        default="default",
        help="keep: make glibc keep freed memory (no page faults per step); default: glibc's own",
    )


def apply_malloc(choice: str) -> None:
    """`keep`: glibc keeps freed memory in the process. Both thresholds must be set (either alone turns off
    glibc's dynamic threshold and faults more than the default), and mallopt takes a C int."""
    preload = os.environ.get("LD_PRELOAD", "")
    if any(a in preload for a in ("jemalloc", "tcmalloc")):
        ALLOCATOR["state"] = f"LD_PRELOAD={preload}"
        return
    if choice != "keep":
        return
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        raise SystemExit("--malloc keep: mallopt refused (not glibc?)")
    ALLOCATOR.update(
        state="glibc malloc keeping freed memory (mallopt: mmap threshold 32 MiB, trim threshold 2 GiB)",
        suffix="-malloc-keep",
    )


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
    text = f"# {title}\n\n{datetime.date.today().isoformat()} — {machine()}\n\n{table}\n" + (
        f"\n{notes}\n" if notes else ""
    )
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}{ALLOCATOR['suffix']}.md"), "w") as f:
        f.write(text)
    print(text)
    return text
