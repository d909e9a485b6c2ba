"""One layer, 1024 tokens, forward+backward of a fine-tuning step, side by side (TARGETS.md `cpu_adapters`).

LoRA r=16, DoRA r=16 and HF PEFT LoRA r=16 run with the base weight frozen (only dx flows through it) and are
compared with the frozen dense layer's step; NOBLE r=32 trains its base weight and is compared with the dense
layer's full step (dx, dW, db). Medians of interleaved runs; gradients are cleared inside every step.

    python bench/cpu_adapters.py [--reps 20] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved, write_result  # noqa: E402

from lrcompile.structures.dora import DoRA  # noqa: E402
from lrcompile.structures.lora import LoRA, LoRAConfig  # noqa: E402
from lrcompile.structures.noble import NOBLE, NOBLEConfig  # noqa: E402

TOKENS = 1024
SHAPES = [(768, 768), (1024, 1024), (768, 3072)]
TARGETS = {"lora": 1.10, "dora": 1.25, "noble": 1.15}


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


def step_fn(module: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(dy)

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import peft

    rows = []
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
        fns = {k: step_fn(m, x, dy) for k, m in
               {"dense_frozen": frozen, "dense_full": full, "lora": lora, "dora": dora, "noble": noble, "peft_lora": pm}.items()}
        t = interleaved(fns, reps=args.reps)
        ms = {k: v * 1e3 for k, v in t.items()}
        r = {k: t[k] / t["dense_full" if k == "noble" else "dense_frozen"] for k in ("lora", "dora", "noble", "peft_lora")}
        rows.append([f"{in_f}→{out_f}", f"{ms['dense_frozen']:.1f}", f"{ms['dense_full']:.1f}",
                     f"{ms['lora']:.1f} ({r['lora']:.3f}×)", f"{ms['dora']:.1f} ({r['dora']:.3f}×)",
                     f"{ms['noble']:.1f} ({r['noble']:.3f}×)", f"{ms['peft_lora']:.1f} ({r['peft_lora']:.3f}×)"])
        print(rows[-1], flush=True)
    headers = ["shape", "dense frozen ms", "dense full ms", "LoRA r=16 (vs frozen)", "DoRA r=16 (vs frozen)",
               "NOBLE r=32 (vs full)", "PEFT LoRA r=16 eager (vs frozen)"]
    notes = (f"{TOKENS} tokens, fp32, eager, forward+backward (grads cleared each step), medians of {args.reps} "
             f"interleaved reps. Targets: LoRA ≤ {TARGETS['lora']}×, DoRA ≤ {TARGETS['dora']}×, NOBLE ≤ {TARGETS['noble']}×. "
             "Shared 2-core machine: other jobs may add noise; ratios are taken side by side.")
    write_result("cpu_adapters", "Adapter step cost on CPU (one layer)", rows, headers, notes)


if __name__ == "__main__":
    main()
