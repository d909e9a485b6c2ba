"""Each fused kernel vs the unfused torch sequence and vs the dense cuBLAS GEMM, side by side in one run:
bf16, 8192 tokens, d = 4096.

Goals: fused LoRA r=16 forward ≤ 1.05× dense; NOBLE r=32 forward+backward ≤ 1.04× dense forward+backward;
Monarch-4 and BTT forward ≥ 80% of their FLOP ratio (dense time / kernel time ≥ 0.8 × dense FLOPs / FLOPs).
Every row also checks the kernel against the torch sequence (bf16 relative error): the first time the kernels run
compiled rather than interpreted. A row that fails says why in the table; the others still run. Triton autotunes
each kernel over its few configs on first use (not timed); rows start in goal order until `--budget-s` is spent.

    python bench/gpu_kernels.py [--tokens 8192] [--d 4096] [--budget-s 150]

Without a CUDA device it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

from lrcompile.families import FAMILIES  # noqa: E402
from lrcompile.kernels import OPS, twocore  # noqa: E402

DT = torch.bfloat16


@dataclasses.dataclass
class Case:
    name: str
    fused: Callable[[], torch.Tensor]
    unfused: Callable[[], torch.Tensor]
    dense: Callable[[], torch.Tensor]
    flop_ratio: Optional[float] = None  # dense FLOPs / the family's (compressing families)
    goal: Optional[Callable[[float, float], bool]] = None  # (fused ms, dense ms) -> met
    goal_text: str = ""
    grads: tuple = ()  # leaves of a forward+backward row: their .grad is cleared between calls


def ms(fn, grads=()) -> float:
    import triton.testing

    return float(
        triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads) or None, return_mode="median")
    )


class Builders:
    """One method per table row group, in goal order (if the time budget runs out, what is left is
    informational). Each returns its Cases; all share x (tokens × d) and the dense W."""

    def __init__(self, n: int, d: int, device: str):
        self.n, self.d, self.device = n, d, device
        self.x = self.rnd(n, d)
        self.W = self.rnd(d, d, scale=d**-0.5)
        self.dense_flops = 2 * d * d

    def rnd(self, *shape, scale=1.0):
        return (torch.randn(*shape, device=self.device) * scale).to(DT)

    def dense(self):
        return F.linear(self.x, self.W)

    def structure(self, name, **cfg):
        cls = FAMILIES[name]
        c = cls.Config(**cfg)
        return cls, c, [t.detach() for t in cls.init(self.d, self.d, c, dtype=DT, device=self.device).tensors()]

    def order(self):
        return [self.lora, self.noble, self.monarch, self.btt, self.lowrank, self.dora, self.blast]

    def lora(self):
        x, W, r = self.x, self.W, 16
        A, B = self.rnd(r, self.d, scale=self.d**-0.5), self.rnd(self.d, r, scale=0.02)
        s = torch.tensor(2.0, device=self.device, dtype=DT)
        return [
            Case(
                "LoRA r=16 fwd",
                lambda: OPS["lora"](x, [W, A, B, s], [], "", 1.0, None),
                lambda: FAMILIES["lora"].functional(x, W, None, A, B, s),
                self.dense,
                goal=lambda f, dn: f <= 1.05 * dn,
                goal_text="≤ 1.05× dense",
            )
        ]

    def noble(self):
        _, _, branch = self.structure("noble", rank=32)
        x = self.x.clone().requires_grad_()
        W = self.W.clone().requires_grad_()
        branch = [t.requires_grad_() for t in branch]
        gy = self.rnd(self.n, self.d)

        def step(f):
            def run():
                y = f()
                y.backward(gy)
                return y

            return run

        return [
            Case(
                "NOBLE r=32 fwd+bwd",
                step(lambda: OPS["noble"](x, [W, *branch], [], "", 1.0, None)),
                step(lambda: FAMILIES["noble"].functional(x, W, None, *branch)),
                step(lambda: F.linear(x, W)),
                goal=lambda f, dn: f <= 1.04 * dn,
                goal_text="≤ 1.04× dense fwd+bwd",
                grads=(x, W, *branch),
            )
        ]

    def _twocore(self, label, family, runs, **cfg):
        cls, c, ts = self.structure(family, **cfg)
        ratio = self.dense_flops / cls.flops_per_token(self.d, self.d, c)
        n_out, x = twocore.out_features(ts), self.x
        out = []
        for how, run in runs:
            fused = (
                (lambda: OPS["twocore"](x, ts, [], "", 1.0, None))
                if run is None
                else (lambda run=run: run(x, ts[0], ts[1], n_out, (), [], 1.0, None))
            )
            out.append(
                Case(
                    f"{label} fwd{how}",
                    fused,
                    lambda: cls.functional(x, None, None, *ts),
                    self.dense,
                    flop_ratio=ratio,
                    goal=lambda f, dn: dn / f >= 0.8 * ratio,
                    goal_text="≥ 80% of the FLOP ratio",
                )
            )
        return out

    def monarch(self):
        return self._twocore("Monarch-4", "monarch", [("", None)], blocks=4)

    def btt(self):
        return self._twocore(
            "BTT 64·64, t=16",
            "btt",
            [(" (one kernel)", twocore.one_kernel), (" (two launches)", twocore.two_launch)],
            rank=16,
        )

    def lowrank(self):
        x, out = self.x, []
        for r in (128, 1024):  # on-chip chain; two GEMMs (50% of the parameters)
            U, V = self.rnd(self.d, r, scale=r**-0.5), self.rnd(r, self.d, scale=self.d**-0.5)
            ratio = self.dense_flops / FAMILIES["lowrank"].flops_per_token(
                self.d, self.d, FAMILIES["lowrank"].Config(rank=r)
            )
            out.append(
                Case(
                    f"low-rank r={r} fwd",
                    lambda U=U, V=V: OPS["lowrank"](x, [U, V], [], "", 1.0, None),
                    lambda U=U, V=V: FAMILIES["lowrank"].functional(x, None, None, U, V),
                    self.dense,
                    flop_ratio=ratio,
                )
            )
        b, res, W = self.rnd(self.d), self.rnd(self.n, self.d), self.W
        out.append(
            Case(
                "low-rank r=1024 + bias, GELU, residual",
                lambda: OPS["lowrank"](x, [U, V], [b, res], "add_row,gelu,add", 1.0, None),
                lambda: F.gelu(FAMILIES["lowrank"].functional(x, None, b, U, V)) + res,
                lambda: F.gelu(F.linear(x, W, b)) + res,
                flop_ratio=ratio,
            )
        )
        return out

    def dora(self):
        cls = FAMILIES["dora"]
        m = cls.from_dense(self.W, None, cls.Config(rank=16))
        A, mag, s = m.lora_A.detach(), m.magnitude.detach(), m.scaling
        B, x, W = self.rnd(self.d, 16, scale=0.02), self.x, self.W
        return [
            Case(
                "DoRA r=16 fwd",
                lambda: OPS["dora"](x, [W, A, B, mag, s], [], "", 1.0, None),
                lambda: cls.functional(x, W, None, A, B, mag, s),
                self.dense,
            )
        ]

    def blast(self):
        cls, c, ts = self.structure("blast", rank=1019, blocks=4)  # ≈ 50% of the dense parameters
        x = self.x
        return [
            Case(
                "BLAST 4×4 r=1019 fwd",
                lambda: OPS["blast"](x, ts, [], "", 1.0, None),
                lambda: cls.functional(x, None, None, *ts),
                self.dense,
                flop_ratio=self.dense_flops / cls.flops_per_token(self.d, self.d, c.resolve(self.d, self.d)),
            )
        ]


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def measure(case: Case) -> list:
    y_fused = case.fused()  # compiles and autotunes (not timed)
    err = rel(y_fused, case.unfused())
    for g in case.grads:
        g.grad = None
    t_f, t_u, t_d = (ms(f, case.grads) for f in (case.fused, case.unfused, case.dense))
    speed = t_d / t_f
    row = [
        case.name,
        f"{t_f:.3f}",
        f"{t_u:.3f}",
        f"{t_d:.3f}",
        f"{t_f / t_d:.3f}",
        f"{t_f / t_u:.3f}",
        f"{case.flop_ratio:.2f} / {speed / case.flop_ratio:.0%}" if case.flop_ratio else "—",
        f"{err:.1e}",
    ]
    met = "—" if case.goal is None else (("yes" if case.goal(t_f, t_d) else "NO") + f" ({case.goal_text})")
    return row + [met]


def failed(name: str, what: str, e: Exception) -> list:
    msg = str(e).splitlines()[0][:160] if str(e) else ""
    return [name, "", "", "", "", "", "", "", f"{what}: {type(e).__name__}: {msg}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--budget-s", type=float, default=150.0, help="start no new row after this many seconds")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device here, nothing measured (bench/results/gpu_kernels.md is written on a GPU)")
        return 0
    torch.manual_seed(0)
    t0 = time.perf_counter()
    rows, skipped = [], []
    b = Builders(args.tokens, args.d, "cuda")
    for build in b.order():
        if time.perf_counter() - t0 > args.budget_s:
            skipped.append(build.__name__)
            continue
        try:
            group = build()
        except Exception as e:  # a family that cannot even be set up still gets its row
            rows.append(failed(build.__name__, "setup failed", e))
            continue
        for case in group:
            t1 = time.perf_counter()
            try:
                rows.append(measure(case))
            except Exception as e:
                rows.append(failed(case.name, "failed", e))
            print(f"  {case.name}: {time.perf_counter() - t1:.1f} s", flush=True)
        del group
        torch.cuda.empty_cache()
    headers = [
        "kernel",
        "fused ms",
        "unfused torch ms",
        "dense cuBLAS ms",
        "fused / dense",
        "fused / unfused",
        "FLOP ratio / % reached",
        "rel. err vs torch",
        "goal met",
    ]
    notes = (
        f"{args.tokens} tokens, d = {args.d}, bf16; medians of triton.testing.do_bench (warm-up 25 ms, 100 ms "
        "of repetitions, L2 flushed). `unfused torch` is the family's own functional (the graph the fusion "
        "pass replaces); `dense` is F.linear (cuBLAS) on the same shapes, forward and backward where the row "
        "says fwd+bwd. FLOP ratio = dense FLOPs / the family's; % reached = (dense ms / fused ms) / FLOP "
        f"ratio. Total {time.perf_counter() - t0:.0f} s including compilation and autotuning."
    )
    if skipped:
        notes += f" Not measured (time budget {args.budget_s:.0f} s spent): {', '.join(skipped)}."
    write_result("gpu_kernels", "GPU kernels: fused vs unfused torch vs dense cuBLAS", rows, headers, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
