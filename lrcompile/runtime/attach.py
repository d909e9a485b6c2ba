"""Where factors live on the user's model, and how they are kept fresh.

Backend path: the user's modules stay as they are; a site's factors are registered as a child module of the
site's module (`fc.lrcompile`, or `blk.lrcompile_w` for a functional call with parameter `w`), so they appear in
`model.parameters()` and `state_dict()`, an optimizer built afterwards trains them, and a recompile (or a
second graph that calls the same module) finds and reuses them instead of factorising again.

Freshness (lrcompile.fresh): factors whose dense weight changed while they did not are refit before the graph
runs; trained factors are the truth. A failed refit makes the feed say `failed`: the backend runs that graph
dense until a later change of the weight is refit successfully.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Iterator, Optional

import torch
from torch import nn

from ..families import Structure
from . import fresh

PREFIX = "lrcompile"


def child_name(module: nn.Module, weight: torch.Tensor) -> str:
    if getattr(module, "weight", None) is weight:
        return PREFIX
    for name, p in module.named_parameters(recurse=True):
        if p is weight:
            return f"{PREFIX}_{name.replace('.', '_')}"
    return f"{PREFIX}_w{id(weight):x}"


def base_weight(owner: nn.Module, child: str) -> Optional[tuple[str, nn.Parameter]]:
    """(name, parameter) of `owner` whose factors are its child `child`: the inverse of `child_name`."""
    for name, p in owner.named_parameters():
        if not name.startswith(PREFIX) and child_name(owner, p) == child:
            return name, p
    return None


def installed(model: nn.Module) -> Iterator[tuple[str, Structure, Optional[torch.Tensor]]]:
    """(path, structure, the stored dense weight it augments or replaces) for every lrcompile structure on the
    model: swapped in for a module (an adapter keeps its base as `.weight`) or attached beside one."""
    for path, mod in model.named_modules():
        if not isinstance(mod, Structure):
            continue
        owner_path, _, leaf = path.rpartition(".")
        if leaf.startswith(PREFIX):
            found = base_weight(model.get_submodule(owner_path) if owner_path else model, leaf)
            yield path, mod, found[1] if found is not None else None
        else:
            yield path, mod, mod.weight


def freezes_others(struct: Structure) -> bool:
    """An adapter whose base stays frozen (LoRA, DoRA, VeRA): installing one makes the model PEFT-style."""
    return not struct.compressing and not struct.trains_base


def freeze_for_adapters(model: nn.Module, before) -> None:
    """The one freezing rule of both paths: every parameter the model had before adapters were installed is
    frozen, except the base weights of adapters that train theirs (`Structure.trains_base`: NOBLE). `before`:
    id -> parameter of those parameters."""
    keep = {id(w) for _, s, w in installed(model) if s.trains_base and w is not None}
    for p in model.parameters():
        if before.get(id(p)) is p and id(p) not in keep:
            p.requires_grad_(False)


def attached(module: nn.Module, weight: torch.Tensor) -> Optional[Structure]:
    child = getattr(module, child_name(module, weight), None)
    return child if isinstance(child, Structure) else None


def attach(module: nn.Module, weight: torch.Tensor, struct: Structure, transposed: Optional[bool] = None) -> str:
    """Register `struct` beside `weight` on `module`. `transposed`: the weight is stored (in, out); recorded so
    that merge never has to guess the orientation of a square weight (copies and loads change storage)."""
    name = child_name(module, weight)
    if transposed is not None:
        struct.base_transposed = bool(transposed)
    struct.train(module.training)  # the model's mode: no adapter dropout in an eval model
    module.add_module(name, struct)
    return name


def detach(module: nn.Module, weight: torch.Tensor) -> None:
    """Remove the factors attached for `weight` (a graph compiled with them then runs dense: Placement)."""
    name = child_name(module, weight)
    if isinstance(getattr(module, name, None), Structure):
        delattr(module, name)


def record_versions(struct: Structure, weight: torch.Tensor) -> None:
    """The factors describe `weight` as it is now (lrcompile.fresh)."""
    fresh.record(struct, [weight])


def same_config(struct: Structure, cls: type, cfg) -> bool:
    return type(struct) is cls and struct.cfg == cfg


def arg_index(example_inputs, t) -> Optional[int]:
    """Where the graph receives `t` among its inputs (None: not an input)."""
    return next((i for i, x in enumerate(example_inputs) if x is t), None) if t is not None else None


class Placement:
    """Where a feed's factors sit on the model (owner module, child name). A compiled graph follows its model:
    factors replaced by others of the same family and config (`lrcompile.load`) are used from then on; factors
    removed or replaced by something else (`lrcompile.merge`, another rewrite) leave the graph without a
    function to run, and it runs the dense weights instead, with one warning saying to compile again."""

    def __init__(self, owner: Optional[nn.Module], child: Optional[str]):
        self.owner = weakref.ref(owner) if owner is not None else None
        self.child = child
        self.gone = False

    def follow(self, struct):
        """The factors to use now: `struct`, its same-config replacement, or None (gone)."""
        owner = self.owner() if self.owner is not None else None
        if owner is None or self.gone:
            return None if self.gone else struct
        cur = getattr(owner, self.child, None)
        if cur is struct:
            return struct
        if (
            type(cur) is type(struct)
            and getattr(cur, "cfg", None) == getattr(struct, "cfg", None)
            and ([tuple(t.shape) for t in cur.tensors()] == [tuple(t.shape) for t in struct.tensors()])
        ):
            return cur
        self.gone = True
        warnings.warn(
            f"lrcompile: the factors '{self.child}' this graph was compiled with were removed or replaced "
            "(merge, load or another rewrite); it runs the dense weights instead (uncompiled): compile the "
            "model again",
            stacklevel=5,
        )
        return None


class Feed:
    """Supplies one site's factors to a compiled graph on every call, refitting stale factors first
    (lrcompile.fresh). The weight is read from the call's own arguments when the graph takes it as an input, so
    a parameter replaced on the module (`load_state_dict(assign=True)`) is seen."""

    def __init__(
        self,
        struct: Structure,
        weight: Optional[torch.Tensor],
        transposed: bool,
        stats=None,
        owner: Optional[nn.Module] = None,
    ):
        self.struct = struct
        self.placement = Placement(owner, child_name(owner, weight) if owner is not None else None)
        self.weight = weight  # stored parameter the factors came from (None: installed, nothing to track)
        self.transposed = transposed
        self.stats = stats
        self.arg: Optional[int] = None  # the weight's index among the graph's inputs (bind)
        self.refit_failed = False  # the last stale repair failed: the factors are not the weight's
        if weight is not None and not fresh.is_recorded(struct):
            fresh.record(struct, [weight])

    @property
    def failed(self) -> bool:
        """The factors are not the model's function: the graph must run the dense weights."""
        return self.refit_failed or self.placement.gone

    def bind(self, example_inputs) -> "Feed":
        self.arg = arg_index(example_inputs, self.weight)
        return self

    def tensors(self, args=None) -> list[torch.Tensor]:
        cur = self.placement.follow(self.struct)
        if cur is None:
            return self.struct.tensors()
        self.struct = cur
        w = self.weight
        if w is not None and self.struct.compressing:
            if args is not None and self.arg is not None and args[self.arg] is not w:
                w = self.weight = args[self.arg]
            dense = w.detach().T if self.transposed else w.detach()
            got = fresh.refresh(
                self.struct, [w], lambda: self.struct.refit(dense, self.stats), f"{self.struct.name} factors"
            )
            if got is not None:
                self.refit_failed = not got
        return self.struct.tensors()


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    """Swap every reference to `old` inside `model` for `new`; returns the names it was reachable by."""
    names = [n for n, m in model.named_modules(remove_duplicate=False) if m is old and n]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new.train(old.training)  # the swapped-in module keeps the mode of the one it replaces
        setattr(parent, attr, new)
    return names
