"""Implementations of one site's function that the autotuner chooses among.

Every candidate has the family's `functional(x, weight, bias, *tensors)` signature, so the graph rewrite can emit
the chosen one in place of the family's own. `lossless` candidates compute the family's function (another GEMM
layout, an adapter merged into W on the fly) and may always be chosen; `dense` is the original layer, lossy for a
compressing family, and is chosen only where the policy sets `guard: dense`. It is still timed for compressing
families so that the report can say when a rewrite runs slower than the layer it replaced.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys
from typing import Callable

import torch.nn.functional as F

from ..families import FAMILIES, Candidate, FamilyView  # noqa: F401  (Candidate: re-exported)

# the families' own alternatives, re-exported under their old names here
from ..families.adapters.dora import dora_merged  # noqa: F401
from ..families.adapters.lora import lora_merged  # noqa: F401
from ..families.adapters.vera import vera_merged  # noqa: F401
from ..families.lowrank import lowrank_addmm, lowrank_pretransposed  # noqa: F401

REFERENCE = "functional"  # the family's own implementation: the correctness reference and the default
DENSE = "dense"


def dense(x, weight, bias, *tensors):
    return F.linear(x, weight, bias)


KERNEL = "triton"


@functools.lru_cache(maxsize=None)
def _kernel_candidate(cls) -> Candidate:
    """The family's generated Triton kernel (lrcompile.kernels) behind the family's functional signature, bias in
    its epilogue. Timed on CUDA only: without a GPU the op would run its torch reference (the same numbers, but
    its time says nothing about the kernel); launch configs are Triton's own autotuner's (runtime.py). One object
    per class: the fusion pass recognises the function the tuner emitted by identity."""
    from ..kernels import op_of

    family = cls.name

    def kernel(x, weight, bias, *tensors):
        ts = list(tensors) if cls.compressing else [weight, *tensors]
        operands, epilogue = ([bias], "add_row") if bias is not None else ([], "")
        return op_of(family)(x, ts, operands, epilogue, 1.0, None)

    kernel.__name__ = kernel.__qualname__ = f"{family}_triton"
    return Candidate(KERNEL, kernel, device_types=("cuda",), base_tensors_only=True)


def _extra(cls) -> tuple[Candidate, ...]:
    """Alternatives beyond the family's own functional: what it declares, then its kernel. Merged forms apply
    only without dropout (the branch input is then x itself); `candidates_for` checks that the site passes
    exactly the family's base tensors."""
    return (*cls.candidates, *((_kernel_candidate(cls),) if cls.kernel else ()))


EXTRA = FamilyView(lambda cls: _extra(cls) or None)  # family -> its alternatives, from the registered classes


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


def source_hash(family: str) -> str:
    """Hash of this file, the family's own file (and those of its candidates) and its kernel's sources: editing
    any invalidates the family's cached timings."""
    return _source_hash(FAMILIES[family])


@functools.lru_cache(maxsize=None)
def _source_hash(cls) -> str:  # by class: a family registered again under the same name is another one
    from .. import kernels
    from ..kernels import epilogue, op, runtime

    mods = [sys.modules[__name__], sys.modules[cls.__module__]]
    mods += [sys.modules[c.fn.__module__] for c in cls.candidates if c.fn.__module__ in sys.modules]
    if cls.kernel:
        kernels.op_of(cls.name)  # imports its module
        mods += [sys.modules[kernels.kernel_module(cls.name)], epilogue, op, runtime]
    h = hashlib.blake2b(digest_size=8)
    for mod in dict.fromkeys(mods):
        h.update(inspect.getsource(mod).encode())
    return h.hexdigest()
