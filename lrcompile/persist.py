"""Save a rewritten model and load it into a freshly built one, without factorising again.

`save(model, directory)` writes `model.safetensors` (the whole state_dict; shared tensors such as tied weights
or VeRA's projections stored once) and `plan.json`, the resolved per-site plan: family, resolved config, shape,
dtype and where the structure sits (swapped in for a module, or attached beside one). `load(model, directory)`
rebuilds that structure on an unmodified model with empty tensors, then loads the weights.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch
from torch import nn

from . import attach as store
from .api import _replace_module
from .errors import PlanError
from .structures import FAMILIES, Structure

PLAN = "plan.json"
WEIGHTS = "model.safetensors"
FORMAT = "lrcompile-plan-v1"


def _entries(model: nn.Module) -> list[dict]:
    out = []
    for path, mod in model.named_modules():
        if not isinstance(mod, Structure):
            continue
        owner, _, leaf = path.rpartition(".")
        entry = {"path": path, "family": mod.name, "config": dataclasses.asdict(mod.cfg),
                 "in_features": mod.in_features, "out_features": mod.out_features,
                 "bias": mod.bias is not None, "dtype": str(mod.tensors()[0].dtype).replace("torch.", "")}
        if leaf.startswith(store.PREFIX):
            parent = model.get_submodule(owner) if owner else model
            entry.update(placement="attached", owner=owner, child=leaf, weight=_weight_name(parent, leaf))
        else:
            entry.update(placement="module")
        out.append(entry)
    return out


def _weight_name(parent: nn.Module, child: str) -> Optional[str]:
    for name, p in parent.named_parameters():
        if not name.startswith(store.PREFIX) and store.child_name(parent, p) == child:
            return name
    return None


def save(model: nn.Module, directory: str) -> None:
    from safetensors.torch import save_model

    os.makedirs(directory, exist_ok=True)
    plan = {"format": FORMAT, "torch": torch.__version__, "sites": _entries(model)}
    with open(os.path.join(directory, PLAN), "w") as f:
        json.dump(plan, f, indent=1)
    save_model(model, os.path.join(directory, WEIGHTS))


def _fail(directory: str, entry: dict, msg: str):
    raise PlanError(f"{os.path.join(directory, PLAN)}: site '{entry['path']}': {msg}")


def load(model: nn.Module, directory: str) -> nn.Module:
    """Rebuild the saved plan's structures on `model` (same architecture, unmodified), then load the weights."""
    from safetensors.torch import load_model

    try:
        with open(os.path.join(directory, PLAN)) as f:
            plan = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{directory}: cannot read {PLAN} ({e})") from None
    if plan.get("format") != FORMAT:
        raise PlanError(f"{os.path.join(directory, PLAN)}: unknown format {plan.get('format')!r} (expected {FORMAT})")
    for entry in plan["sites"]:
        _rebuild(model, entry, directory)
    missing, unexpected = load_model(model, os.path.join(directory, WEIGHTS), strict=False)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise PlanError(f"{os.path.join(directory, WEIGHTS)}: weights do not fit the rebuilt model ({what})")
    for entry in plan["sites"]:  # attached factors are fresh relative to the loaded dense weight
        if entry["placement"] == "attached" and entry.get("weight"):
            owner = model.get_submodule(entry["owner"]) if entry["owner"] else model
            store.record_versions(getattr(owner, entry["child"]), owner.get_parameter(entry["weight"]))
    return model


def _rebuild(model: nn.Module, entry: dict, directory: str) -> None:
    cls = FAMILIES.get(entry["family"])
    if cls is None:
        _fail(directory, entry, f"unknown family {entry['family']!r} (known: {', '.join(sorted(FAMILIES))})")
    cfg = cls.Config(**entry["config"])
    in_f, out_f = entry["in_features"], entry["out_features"]
    dtype = getattr(torch, entry["dtype"])
    if entry["placement"] == "attached":
        try:
            owner = model.get_submodule(entry["owner"]) if entry["owner"] else model
            weight = owner.get_parameter(entry["weight"])
        except AttributeError:
            _fail(directory, entry, f"the model has no parameter {entry['owner']}.{entry['weight']}")
        struct = cls(in_f, out_f, cfg, dtype=dtype, device=weight.device)
        if weight.shape not in ((out_f, in_f), (in_f, out_f)):
            _fail(directory, entry, f"expected a weight of {in_f}→{out_f}, found shape {tuple(weight.shape)}")
        owner.add_module(entry["child"], struct)
        return
    try:
        target = model.get_submodule(entry["path"])
    except AttributeError:
        _fail(directory, entry, "no such module in this model")
    w = getattr(target, "weight", None)
    conv1d = type(target).__name__ == "Conv1D"
    if not (type(target) is nn.Linear or conv1d) or w is None:
        _fail(directory, entry, f"expected a Linear, found {type(target).__name__}")
    shape = (in_f, out_f) if conv1d else (out_f, in_f)
    if tuple(w.shape) != shape:
        found = f"{w.shape[0]}→{w.shape[1]}" if conv1d else f"{w.shape[1]}→{w.shape[0]}"
        _fail(directory, entry, f"expected a Linear {in_f}→{out_f}, found {found}")
    if (target.bias is not None) != entry["bias"]:
        _fail(directory, entry, f"bias mismatch (plan {'has' if entry['bias'] else 'has no'} bias)")
    struct = cls(in_f, out_f, cfg, dtype=dtype, device=w.device)
    struct.bias = target.bias
    if not struct.compressing:
        struct.weight = w if not conv1d else nn.Parameter(w.detach().T.contiguous(), requires_grad=w.requires_grad)
    _replace_module(model, target, struct)
