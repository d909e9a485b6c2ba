"""Epilogues: the elementwise steps a kernel applies to its fp32 accumulator before the one store.

An epilogue is a comma-separated list of steps, applied in order:
  add_row / mul_row   an (out,) vector operand broadcast over rows (bias, DoRA's column scale)
  add / mul           an operand with the output's shape (residual, adapter branch, SwiGLU's other half)
  gelu gelu_tanh silu relu tanh
The same string drives the torch reference (`apply`) and the Triton code generator (`source`), so the two
cannot disagree about order. Operands are consumed left to right by the steps that take one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WITH_OPERAND = ("add_row", "mul_row", "add", "mul")
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu", "tanh")
STEPS = WITH_OPERAND + ACTIVATIONS


def parse(epilogue: str) -> tuple[str, ...]:
    steps = tuple(s for s in epilogue.split(",") if s)
    for s in steps:
        if s not in STEPS:
            raise ValueError(f"lrcompile: unknown epilogue step {s!r} (known: {', '.join(STEPS)})")
    return steps


def n_operands(steps) -> int:
    return sum(s in WITH_OPERAND for s in steps)


def needs_value(steps) -> bool:
    """Whether the epilogue's vjp depends on its input's value (anything but additions)."""
    return any(s not in ("add_row", "add") for s in steps)


def apply(y: torch.Tensor, steps, operands) -> torch.Tensor:
    """Torch reference: `y` (..., out) in the working dtype; operands as the kernels take them."""
    ops = iter(operands)
    for s in steps:
        if s in ("add_row", "mul_row"):
            v = next(ops).reshape(-1).to(y.dtype)
            y = y + v if s == "add_row" else y * v
        elif s in ("add", "mul"):
            o = next(ops).reshape(y.shape).to(y.dtype)
            y = y + o if s == "add" else y * o
        elif s == "gelu":
            y = F.gelu(y)
        elif s == "gelu_tanh":
            y = F.gelu(y, approximate="tanh")
        elif s == "silu":
            y = F.silu(y)
        elif s == "relu":
            y = torch.relu(y)
        elif s == "tanh":
            y = torch.tanh(y)
    return y


def operand_views(operands, steps, m: int, n: int) -> list[torch.Tensor]:
    """Each operand as an (m, n) strided view for the kernels (row vectors get a zero row stride)."""
    out, ops = [], iter(operands)
    for s in steps:
        if s not in WITH_OPERAND:
            continue
        o = next(ops)
        out.append(o.reshape(-1).expand(m, n) if s.endswith("_row") else o.reshape(m, n))
    return out


def operand_args(views) -> tuple:
    return tuple(a for v in views for a in (v, v.stride(0), v.stride(1)))


def signature(steps) -> str:
    """Kernel parameters for the operands: pointer, row stride, column stride each."""
    return "".join(f"e{i}_ptr, e{i}_sm, e{i}_sn, " for i in range(n_operands(steps)))


def source(steps, indent: str = "    ") -> str:
    """Triton code applying `steps` to `acc` (BM, BN fp32); the template defines rm, rn (global row/column
    indices) and mask (the tile's valid outputs)."""
    lines, i = [], 0
    for s in steps:
        if s in ("add_row", "mul_row"):
            lines.append(f"_e = tl.load(e{i}_ptr + rn * e{i}_sn, mask=rn < N_OUT, other=0.0).to(tl.float32)")
            lines.append("acc = acc + _e[None, :]" if s == "add_row" else "acc = acc * _e[None, :]")
            i += 1
        elif s in ("add", "mul"):
            lines.append(
                f"_e = tl.load(e{i}_ptr + rm[:, None] * e{i}_sm + rn[None, :] * e{i}_sn, mask=mask, "
                "other=0.0).to(tl.float32)"
            )
            lines.append("acc = acc + _e" if s == "add" else "acc = acc * _e")
            i += 1
        elif s == "gelu":
            lines.append("acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))")
        elif s == "gelu_tanh":  # tanh(z) = 2·sigmoid(2z) − 1: tl has no portable tanh
            lines.append(
                "acc = 0.5 * acc * (2.0 * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc)))"
            )
        elif s == "silu":
            lines.append("acc = acc * tl.sigmoid(acc)")
        elif s == "relu":
            lines.append("acc = tl.maximum(acc, 0.0)")
        elif s == "tanh":
            lines.append("acc = 2.0 * tl.sigmoid(2.0 * acc) - 1.0")
    return "\n".join(indent + ln for ln in lines) if lines else indent + "pass"
