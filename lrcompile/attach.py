"""Where factors live on the user's model, and how they are kept fresh.

Backend path: the user's modules stay as they are; a site's factors are registered as a child module of the
site's module (`fc.lrcompile`, or `blk.lrcompile_w` for a functional call with parameter `w`), so they appear in
`model.parameters()` and `state_dict()`, an optimizer built afterwards trains them, and a recompile (or a
second graph that calls the same module) finds and reuses them instead of factorising again.

Freshness: a site records the dense weight's `_version` and its factors' versions when the factors are made.
If the weight moved (e.g. `load_state_dict`) while the factors did not, the factors are recomputed in place;
if the factors moved (training), they are the truth and are kept. If recomputing fails, the factors no longer
describe the weight: the feed says so (`failed`) and the backend runs that graph dense until a later change of
the weight is recomputed successfully.
"""
from __future__ import annotations

import warnings
from typing import Iterator, Optional

import torch
from torch import nn

from .plan import first_line
from .structures import Structure

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


def attached(module: nn.Module, weight: torch.Tensor) -> Optional[Structure]:
    child = getattr(module, child_name(module, weight), None)
    return child if isinstance(child, Structure) else None


def attach(module: nn.Module, weight: torch.Tensor, struct: Structure) -> str:
    name = child_name(module, weight)
    module.add_module(name, struct)
    return name


def record_versions(struct: Structure, weight: torch.Tensor) -> None:
    struct._lrc_weight_version = weight._version
    struct._lrc_factor_versions = tuple(t._version for t in struct.tensors())


def same_config(struct: Structure, cls: type, cfg) -> bool:
    return type(struct) is cls and struct.cfg == cfg


class Feed:
    """Supplies one site's factors to a compiled graph on every call, repairing stale factors first."""

    def __init__(self, struct: Structure, weight: Optional[torch.Tensor], transposed: bool, stats=None):
        self.struct = struct
        self.warned = False
        self.weight = weight  # stored parameter the factors came from (None: installed, nothing to track)
        self.transposed = transposed
        self.stats = stats
        self.failed = False  # the last stale repair failed: the factors are not the weight's
        if weight is not None and not hasattr(struct, "_lrc_weight_version"):
            record_versions(struct, weight)

    def tensors(self) -> list[torch.Tensor]:
        w = self.weight
        if w is not None and w._version != self.struct._lrc_weight_version:
            trained = tuple(t._version for t in self.struct.tensors()) != self.struct._lrc_factor_versions
            if not trained and self.struct.compressing:
                self.failed = not self._refit(w)
            record_versions(self.struct, w)
        return self.struct.tensors()

    def _refit(self, w: torch.Tensor) -> bool:
        """Stale repair runs inside the user's forward: a failure is one warning, never an error (DESIGN), and the
        site then runs dense (see the module doc). The new version is recorded either way: no retry per call."""
        try:
            self.struct.refit(w.detach().T if self.transposed else w.detach(), self.stats)
            return True
        except Exception as e:
            if not self.warned:
                self.warned = True
                warnings.warn(f"lrcompile: recomputing stale {self.struct.name} factors failed ({first_line(e)}); "
                              "the graph runs the dense weights instead (uncompiled) until they change again",
                              stacklevel=3)
            return False
