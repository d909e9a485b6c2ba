"""Implementations of one site's function that the autotuner chooses among.

Every candidate has the family's `functional(x, weight, bias, *tensors)` signature, so the graph rewrite can emit
the chosen one in place of the family's own. `lossless` candidates compute the family's function (another GEMM
layout, an adapter merged into W on the fly) and may always be chosen; `dense` is the original layer, lossy for a
compressing family, and is chosen only where the policy sets `guard: dense`. It is still timed for compressing
families so that the report can say when a rewrite runs slower than the layer it replaced.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from ..structures import FAMILIES
from ..structures.dora import dora_row_norm

REFERENCE = "functional"  # the family's own implementation: the correctness reference and the default
DENSE = "dense"


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    fn: Callable
    lossless: bool = True
    device_types: tuple[str, ...] = ("cpu", "cuda")  # Triton kernels: ("cuda",)
    # timed forward only: a merged adapter's backward needs a full dW GEMM that the forward timing never sees
    inference_only: bool = False
    # computes the function of the family's base tensors only: not where the site passes extra ones (dropout)
    base_tensors_only: bool = False

    def __post_init__(self):
        if self.inference_only:  # merged forms fold the branch into W: the branch input must be x itself
            object.__setattr__(self, "base_tensors_only", True)


def dense(x, weight, bias, *tensors):
    return F.linear(x, weight, bias)


def _rows(x):
    return x.reshape(-1, x.shape[-1])


def lowrank_addmm(x, weight, bias, U, V):
    """(x Vᵀ) Uᵀ as mm + addmm on 2-D rows: the bias rides in the second GEMM's epilogue."""
    h = torch.mm(_rows(x), V.t())
    y = torch.mm(h, U.t()) if bias is None else torch.addmm(bias, h, U.t())
    return y.reshape(*x.shape[:-1], U.shape[0])


def lowrank_pretransposed(x, weight, bias, U, V):
    """Both factors copied to contiguous (in, r) / (r, out) first: row-major B operands for the GEMMs."""
    Vt, Ut = V.t().contiguous(), U.t().contiguous()
    h = torch.mm(_rows(x), Vt)
    y = torch.mm(h, Ut) if bias is None else torch.addmm(bias, h, Ut)
    return y.reshape(*x.shape[:-1], U.shape[0])


def lora_merged(x, weight, bias, lora_A, lora_B, scaling):
    return F.linear(x, torch.addmm(weight, lora_B * scaling, lora_A), bias)


def dora_merged(x, weight, bias, lora_A, lora_B, magnitude, scaling):
    g = magnitude / dora_row_norm(weight, lora_A, lora_B, scaling)
    return F.linear(x, g[:, None] * torch.addmm(weight, lora_B * scaling, lora_A), bias)


def vera_merged(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b):
    out_f, in_f = weight.shape
    delta = torch.mm(vera_B[:out_f] * lambda_b[:, None], lambda_d[:, None] * vera_A[:, :in_f])
    return F.linear(x, weight + delta, bias)


def _kernel_fn(family: str) -> Callable:
    """The family's generated Triton kernel (lrcompile.kernels) behind the family's functional signature, bias in
    its epilogue. Timed on CUDA only: without a GPU the op would run its torch reference (the same numbers, but
    its time says nothing about the kernel); launch configs are Triton's own autotuner's (runtime.py)."""
    from ..kernels import KERNEL_OF, OPS

    cls = FAMILIES[family]

    def kernel(x, weight, bias, *tensors):
        ts = list(tensors) if cls.compressing else [weight, *tensors]
        operands, epilogue = ([bias], "add_row") if bias is not None else ([], "")
        return OPS[KERNEL_OF[family]](x, ts, operands, epilogue, 1.0, None)

    kernel.__name__ = kernel.__qualname__ = f"{family}_triton"
    return kernel


KERNEL = "triton"
_KERNEL_FAMILIES = ("lowrank", "lora", "dora", "noble", "monarch", "btt", "blast")
_KERNELS = {f: Candidate(KERNEL, _kernel_fn(f), device_types=("cuda",), base_tensors_only=True)
            for f in _KERNEL_FAMILIES}

# Alternatives beyond the family's own functional. Merged forms apply only without dropout (the branch input is
# then x itself); `candidates_for` checks that the site passes exactly the family's base tensors.
EXTRA: dict[str, tuple[Candidate, ...]] = {
    # (U V) formed per call is the same function too, but it rebuilds the dense matrix the rewrite was asked to
    # drop (peak memory): not a candidate
    "lowrank": (Candidate("addmm", lowrank_addmm), Candidate("pretransposed", lowrank_pretransposed),
                _KERNELS["lowrank"]),
    "lora": (Candidate("merged", lora_merged, inference_only=True), _KERNELS["lora"]),
    "dora": (Candidate("merged", dora_merged, inference_only=True), _KERNELS["dora"]),
    "vera": (Candidate("merged", vera_merged, inference_only=True),),
    **{f: (_KERNELS[f],) for f in ("noble", "monarch", "btt", "blast")},
}


def candidates_for(family: str, n_tensors: int, device_type: str, grad: bool) -> list[Candidate]:
    """The reference first, then the lossless alternatives that apply, then `dense` for compressing families."""
    cls = FAMILIES[family]
    out = [Candidate(REFERENCE, cls.functional)]
    for c in EXTRA.get(family, ()):
        if device_type not in c.device_types or (grad and c.inference_only):
            continue
        if c.base_tensors_only and n_tensors != len(cls.tensor_names):
            continue  # dropout tensors present: the branch sees a dropped input, merging changes the function
        out.append(c)
    if cls.compressing:
        out.append(Candidate(DENSE, dense, lossless=False))
    return out


def implementation(family: str, name: str) -> Callable:
    """The function a chosen implementation name stands for (a cache entry stores names only)."""
    if name == REFERENCE:
        return FAMILIES[family].functional
    if name == DENSE:
        return dense
    for c in EXTRA.get(family, ()):
        if c.name == name:
            return c.fn
    raise KeyError(f"lrcompile.tune: no implementation {name!r} for family {family!r}")


@functools.lru_cache(maxsize=None)
def source_hash(family: str) -> str:
    """Hash of this file, the family's own file and its Triton kernel's sources: editing any invalidates the
    family's cached timings."""
    from .. import kernels
    from ..kernels import epilogue, op, runtime

    mods = [sys.modules[__name__], sys.modules[FAMILIES[family].__module__]]
    if family in kernels.KERNEL_OF:
        mods += [importlib.import_module(f"{kernels.__name__}.{kernels.KERNEL_OF[family]}"), epilogue, op, runtime]
    h = hashlib.blake2b(digest_size=8)
    for mod in mods:
        h.update(inspect.getsource(mod).encode())
    return h.hexdigest()
