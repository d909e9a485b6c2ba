"""One layer, 1024 tokens, forward+backward of a fine-tuning step, side by side.

LoRA r=16, DoRA r=16 and HF PEFT LoRA r=16 run with the base weight frozen (only dx flows through it) and are
compared with the frozen dense layer's step; NOBLE r=32 trains its base weight and is compared with the dense
layer's full step (dx, dW, db). Medians of interleaved runs; gradients are cleared inside every step.

Two tables: eager (the installed structure's `functional`, as `options={"inductor": False}` runs it) and
compiled (`torch.compile(backend="lrcompile")` with the adapter policy, default options, against the dense layer
under `backend="inductor"`) — the compiled path is what users run, and Inductor fuses the adapter's elementwise
steps (scaling, DoRA's column scale and its reduction) into neighbouring kernels.

    python bench/cpu_adapters.py [--reps 20] [--threads N] [--no-compiled] [--malloc keep]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_malloc_flag, apply_malloc, interleaved, write_result  # noqa: E402

from lrcompile.families.adapters.dora import DoRA  # noqa: E402
from lrcompile.families.adapters.lora import LoRA, LoRAConfig  # noqa: E402
from lrcompile.families.adapters.noble import NOBLE, NOBLEConfig  # noqa: E402

TOKENS = 1024
SHAPES = [(768, 768), (1024, 1024), (768, 3072)]
TARGETS = {"lora": 1.10, "dora": 1.25, "noble": 1.15}
COLUMNS = {
    "lora": "LoRA r=16 (vs frozen)",
    "lora_floor": "LoRA floor: its GEMMs alone (vs frozen)",
    "dora": "DoRA r=16 (vs frozen)",
    "noble": "NOBLE r=32 (vs full)",
    "peft_lora": "PEFT LoRA r=16 eager (vs frozen)",
}


class One(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.fc = lin

    def forward(self, x):
        return self.fc(x)


def install(cls, lin: nn.Linear, cfg, train_base: bool):
    m = cls.from_dense(lin.weight, None, cfg)
    m.weight, m.bias = lin.weight, lin.bias
    for p in (lin.weight, lin.bias):
        p.requires_grad_(train_base)
    with torch.no_grad():  # a trained-looking branch (B = 0 would make nothing cheaper, but be honest)
        for n in ("lora_B",):
            if hasattr(m, n):
                getattr(m, n).normal_(std=0.01)
    return m


def step_fn(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, run=None):
    params = [p for p in module.parameters() if p.requires_grad]
    run = module if run is None else run

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        run(x).backward(dy)

    return step


def lora_floor_fn(dense_step, x: torch.Tensor, dy: torch.Tensor, r: int = 16):
    """The frozen dense step plus LoRA's six branch GEMMs alone (A x, B·h, dyᵀ-side products, dx update) in
    their fastest measured layouts, outputs preallocated: what no LoRA built on BLAS GEMMs can go below."""
    n, i, o = x.shape[0], x.shape[1], dy.shape[1]
    A, B, xd = torch.randn(r, i), torch.randn(o, r), x.detach()
    h, g, y, dx, dA, dBt = (
        torch.empty(n, r),
        torch.empty(n, r),
        torch.empty(n, o),
        torch.empty(n, i),
        torch.empty(r, i),
        torch.empty(r, o),
    )

    def step():
        dense_step()
        torch.mm(xd, A.t(), out=h)
        y.addmm_(h, B.t())
        torch.mm(dy, B, out=g)
        dx.addmm_(g, A)
        torch.mm(g.t(), xd, out=dA)
        torch.mm(h.t(), dy, out=dBt)

    return step


def compiled_fns(base: nn.Linear, x: torch.Tensor, dy: torch.Tensor) -> dict:
    """The same steps through the compilers: dense under Inductor, adapters through the lrcompile backend."""
    pol = {
        "lora": {"method": "lora", "rank": 16, "alpha": 32},
        "dora": {"method": "dora", "rank": 16, "alpha": 32},
        "noble": {"method": "noble", "rank": 32},
    }
    fns = {}
    for name, train_base in (("dense_frozen", False), ("dense_full", True)):
        m = One(copy.deepcopy(base)).requires_grad_(train_base)
        fns[name] = step_fn(m, x, dy, torch.compile(m, backend="inductor"))
    for name, rule in pol.items():
        m = One(copy.deepcopy(base)).requires_grad_(name == "noble")
        c = torch.compile(m, backend="lrcompile", options={"policy": {"rules": [{"match": "fc", **rule}]}})
        c(x)  # the rewrite installs the adapter's parameters: collect them after it
        fns[name] = step_fn(m, x, dy, c)
    return fns


def ratios(t: dict) -> dict:
    return {k: t[k] / t["dense_full" if k == "noble" else "dense_frozen"] for k in t if not k.startswith("dense")}


def row(shape, t: dict) -> list:
    ms, r = {k: v * 1e3 for k, v in t.items()}, ratios(t)
    cells = [shape, f"{ms['dense_frozen']:.1f}", f"{ms['dense_full']:.1f}"]
    return cells + [f"{ms[k]:.1f} ({r[k]:.3f}×)" for k in COLUMNS if k in t]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--no-compiled", action="store_true", help="skip the compiled table")
    add_malloc_flag(ap)
    args = ap.parse_args()
    apply_malloc(args.malloc)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import peft

    rows, crows = [], []
    for in_f, out_f in SHAPES:
        x = torch.randn(TOKENS, in_f, requires_grad=True)
        dy = torch.randn(TOKENS, out_f)
        base = nn.Linear(in_f, out_f)
        frozen = copy.deepcopy(base).requires_grad_(False)
        full = copy.deepcopy(base)
        lora = install(LoRA, copy.deepcopy(base), LoRAConfig(rank=16, alpha=32), False)
        dora = install(DoRA, copy.deepcopy(base), LoRAConfig(rank=16, alpha=32), False)
        noble = install(NOBLE, copy.deepcopy(base), NOBLEConfig(rank=32), True)
        pm = peft.get_peft_model(One(copy.deepcopy(base)), peft.LoraConfig(r=16, lora_alpha=32, target_modules=["fc"]))
        fns = {
            k: step_fn(m, x, dy)
            for k, m in {
                "dense_frozen": frozen,
                "dense_full": full,
                "lora": lora,
                "dora": dora,
                "noble": noble,
                "peft_lora": pm,
            }.items()
        }
        fns["lora_floor"] = lora_floor_fn(step_fn(copy.deepcopy(frozen), x, dy), x, dy)
        t = interleaved(fns, reps=args.reps)
        rows.append(row(f"{in_f}→{out_f}", t))
        print(rows[-1], flush=True)
        if not args.no_compiled:
            torch._dynamo.reset()
            t = interleaved(compiled_fns(base, x, dy), reps=args.reps)
            crows.append(row(f"{in_f}→{out_f}", t))
            print(crows[-1], flush=True)
    headers = ["shape", "dense frozen ms", "dense full ms", *COLUMNS.values()]
    notes = (
        f"{TOKENS} tokens, fp32, eager, forward+backward (grads cleared each step), medians of {args.reps} "
        "interleaved reps. The floor column is the frozen dense step plus LoRA's six branch GEMMs alone "
        "(fastest layouts, outputs preallocated). "
        f"Targets: LoRA ≤ {TARGETS['lora']}×, DoRA ≤ {TARGETS['dora']}×, NOBLE ≤ {TARGETS['noble']}×. "
        f"Shared 2-core machine (1-minute load average {os.getloadavg()[0]:.2f} at the end): other jobs may add "
        "noise; ratios are taken side by side."
    )
    if crows:
        from tabulate import tabulate

        notes += (
            '\n\n## Compiled: `backend="lrcompile"` (default options) vs the dense layer under '
            '`backend="inductor"`\n\n'
            + tabulate(crows, headers=headers[:3] + [COLUMNS[k] for k in ("lora", "dora", "noble")], tablefmt="github")
        )
    write_result("cpu_adapters", "Adapter step cost on CPU (one layer)", rows, headers, notes)


if __name__ == "__main__":
    main()
