"""Save a rewritten model and load it into a freshly built one, without factorising again.

`save(model, directory)` writes `model.safetensors` (the whole state_dict; shared tensors such as tied weights
or VeRA's projections stored once) and `plan.json`, the resolved per-site plan: family, resolved config, shape,
dtype, the digest of the policy that made it and where the structure sits (swapped in for a module, or attached
beside one; attention rules' shared bases are attached to the attention module), plus the names of the frozen
parameters. `load(model, directory)` rebuilds that structure on an unmodified model with empty tensors, loads
the weights and restores every parameter's `requires_grad`.

A family adds what else its sites need through `Structure.plan_extra` / `config_from_plan` (VeRA numbers its
shared projection pairs, so sites that shared one when saved share one again after `load`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from torch import nn

from ..attention.factors import AttnFactors, SharedBasis, StackedStructure
from ..errors import PlanError
from ..experts.bank import ExpertBank, is_experts
from ..experts.persist import FAMILY as EXPERTS
from ..experts.persist import experts_entry, rebuild_experts
from ..families import FAMILIES, Structure
from ..mha.install import FAMILY as MHA
from ..mha.install import mha_entry, rebuild_mha
from ..mha.module import FactoredMHA, is_mha_site
from ..plan.build import first_line
from ..plan.rewrite import layout_of
from ..runtime import attach as store
from ..runtime.attach import replace_module

PLAN = "plan.json"
WEIGHTS = "model.safetensors"
FORMAT = "lrcompile-plan-v1"
SHARED = "shared_basis"  # the `family` of an attention rule's factors: a SharedBasis ...
STACKED = "stacked"  # ... or a linear family over the stacked projection (StackedStructure)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _entries(model: nn.Module) -> list[dict]:
    out = []
    shared: dict = {}  # the families' own bookkeeping for this save (Structure.plan_extra)
    for path, mod in model.named_modules():
        if isinstance(mod, AttnFactors):
            out.append(_attention_entry(path, mod))
        if isinstance(mod, ExpertBank) and mod.plans:
            out.append(experts_entry(path, mod))
        if isinstance(mod, FactoredMHA):
            out.append(mha_entry(path, mod))
        if not isinstance(mod, Structure):
            continue
        owner, _, leaf = path.rpartition(".")
        entry = {
            "path": path,
            "family": mod.name,
            "config": dataclasses.asdict(mod.cfg),
            "in_features": mod.in_features,
            "out_features": mod.out_features,
            "bias": mod.bias is not None,
            "dtype": _dtype(mod.tensors()[0]),
            "policy": getattr(mod, "policy_digest", None),
        }
        entry.update(mod.plan_extra(shared))
        if leaf.startswith(store.PREFIX):
            found = store.base_weight(model.get_submodule(owner) if owner else model, leaf)
            entry.update(
                placement="attached",
                owner=owner,
                child=leaf,
                weight=found[0] if found else None,
                transposed=getattr(mod, "base_transposed", None),
            )
        else:
            entry.update(placement="module")
        out.append(entry)
    return out


def _attention_entry(path: str, mod: AttnFactors) -> dict:
    """An attention rule's factors, attached to the attention module (lrcompile.attention)."""
    owner, _, leaf = path.rpartition(".")
    entry = {
        "path": path,
        "placement": "attached",
        "owner": owner,
        "child": leaf,
        "method": mod.method,
        "in_features": mod.in_features,
        "sizes": list(mod.sizes),
        "dtype": _dtype(mod.tensors()[0]),
        "site_fqn": mod.site_fqn,
        "sources": [[src[0], list(src[1]), *src[2:]] for src in mod.sources],
        "policy": getattr(mod, "policy_digest", None),
    }
    if isinstance(mod, StackedStructure):
        entry.update(family=STACKED, structure=mod.family.name, config=dataclasses.asdict(mod.cfg))
    else:
        entry.update(family=SHARED, rank=mod.rank)
    return entry


def save(model: nn.Module, directory: str) -> None:
    from safetensors.torch import save_model

    os.makedirs(directory, exist_ok=True)
    sites = _entries(model)
    plan = {
        "format": FORMAT,
        "torch": torch.__version__,
        "policies": sorted({e["policy"] for e in sites if e.get("policy")}),
        "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
        "sites": sites,
    }
    with open(os.path.join(directory, PLAN), "w") as f:
        json.dump(plan, f, indent=1)
    save_model(model, os.path.join(directory, WEIGHTS))


def _fail(directory: str, entry: dict, msg: str):
    raise PlanError(f"{os.path.join(directory, PLAN)}: site '{entry.get('path')}': {msg}")


def load(model: nn.Module, directory: str, policy=None) -> nn.Module:
    """Rebuild the saved plan's structures on `model` (same architecture, unmodified), then load the weights.

    `policy` (optional): the policy the checkpoint is expected to come from; one that did not make any of the
    saved sites is a warning naming both digests (the plan is loaded as saved either way)."""
    from safetensors.torch import load_model

    plan_path = os.path.join(directory, PLAN)
    try:
        with open(plan_path) as f:
            plan = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{directory}: cannot read {PLAN} ({e})") from None
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        got = plan.get("format") if isinstance(plan, dict) else type(plan).__name__
        raise PlanError(f"{plan_path}: unknown format {got!r} (expected {FORMAT})")
    if policy is not None:
        _check_policy(plan, policy, plan_path)
    undo: list = []  # how to take back each change: a refused load leaves the model as it was
    try:
        _rebuild_all(model, plan, plan_path, directory, undo)
        weights = os.path.join(directory, WEIGHTS)
        _check_shapes(model, weights)
        try:
            missing, unexpected = load_model(model, weights, strict=False)
        except Exception as e:  # noqa: BLE001 - a truncated data section reads as safetensors' own error type
            raise PlanError(f"{weights}: cannot read the weights ({first_line(e)})") from None
        if missing or unexpected:
            what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise PlanError(f"{weights}: weights do not fit the rebuilt model ({what})")
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    for entry in plan["sites"]:  # attached factors are fresh relative to the loaded dense weight
        if entry["placement"] == "attached" and entry.get("weight"):
            owner = model.get_submodule(entry["owner"]) if entry["owner"] else model
            store.record_versions(getattr(owner, entry["child"]), owner.get_parameter(entry["weight"]))
    frozen = set(plan.get("frozen", []))
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return model


def _rebuild_all(model: nn.Module, plan: dict, plan_path: str, directory: str, undo: list) -> None:
    shared: dict = {}  # the families' own bookkeeping for this load (Structure.config_from_plan)
    sites = plan.get("sites", [])
    if not isinstance(sites, list):
        raise PlanError(f"{plan_path}: 'sites' must be a list, got {type(sites).__name__}")
    for entry in sites:
        if not isinstance(entry, dict) or "placement" not in entry:
            raise PlanError(f"{plan_path}: a site entry is not a plan entry: {str(entry)[:80]}")
        try:
            if entry.get("family") in (SHARED, STACKED):
                _rebuild_attention(model, entry, directory, undo)
            elif entry.get("family") in (EXPERTS, MHA):
                _rebuild_experts(model, entry, directory, undo)
            else:
                _rebuild(model, entry, directory, shared, undo)
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # JSON of the wrong types
            _fail(directory, entry, f"bad entry ({first_line(e)})")


def _attach_undoable(owner: nn.Module, child: str, struct: nn.Module, undo: list) -> None:
    had = owner._modules.get(child, _MISSING)
    struct.train(owner.training)
    owner.add_module(child, struct)
    undo.append(lambda: owner.add_module(child, had) if had is not _MISSING else delattr(owner, child))


def _rebuild_experts(  # ExpertBank or FactoredMHA
    model: nn.Module, entry: dict, directory: str, undo: list
) -> None:
    def swap(old, new, put_back):
        replace_module(model, old, new)
        undo.append(lambda: (replace_module(model, new, old), put_back()))

    def fail(msg):
        _fail(directory, entry, msg)

    rebuild, accepts, expected = (
        (rebuild_experts, is_experts, "a transformers experts module")
        if entry.get("family") == EXPERTS
        else (rebuild_mha, is_mha_site, "a packed nn.MultiheadAttention")
    )
    try:
        target = model.get_submodule(entry["path"])
    except AttributeError:
        fail("no such module in this model")
    if not accepts(target):
        fail(f"expected {expected}, found {type(target).__name__}")
    saved = entry.get("projections")
    if not isinstance(saved, dict) or not saved:
        fail("bad entry (no projections)")
    rebuild(
        target,
        saved,
        entry.get("policy"),
        fail=fail,
        config=lambda cls, sub: _config(cls, {**sub, "path": entry.get("path")}, directory),
        dtype=_dtype_of(entry, directory),
        swap=swap,
    )


def _swap_undoable(model: nn.Module, old: nn.Module, new: nn.Module, undo: list) -> None:
    replace_module(model, old, new)
    undo.append(lambda: replace_module(model, new, old))


_MISSING = object()
# No family holds more than a few times the dense layer's parameters; a plan asking for more is refused before
# anything is allocated (a planted plan.json could otherwise ask for terabytes).
MAX_PARAMS_PER_DENSE = 4


def _check_size(directory: str, entry: dict, params: int, in_f: int, out_f: int) -> None:
    if params > MAX_PARAMS_PER_DENSE * in_f * out_f + (1 << 20):
        _fail(directory, entry, f"{params:,} parameters for a {in_f}→{out_f} layer: not a plan lrcompile writes")


def _check_policy(plan: dict, policy, plan_path: str) -> None:
    import warnings

    from ..policy.load import load_policy

    pol = load_policy(policy)
    saved = plan.get("policies") or []
    if saved and pol.digest not in saved:
        warnings.warn(
            f"lrcompile: {plan_path} was saved from policy {', '.join(saved)}, not from {pol.source} "
            f"({pol.digest}); loading the saved plan as it is",
            stacklevel=3,
        )


def _check_shapes(model: nn.Module, weights: str) -> None:
    """A stored tensor whose shape differs from the rebuilt model's is a one-line PlanError naming the key (torch's
    own load_state_dict error spans many lines)."""
    from safetensors import safe_open

    expected = model.state_dict()
    try:
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():
                if key in expected:
                    got = tuple(f.get_slice(key).get_shape())
                    if got != tuple(expected[key].shape):
                        raise PlanError(
                            f"{weights}: '{key}' has shape {got}, the rebuilt model expects "
                            f"{tuple(expected[key].shape)}"
                        )
    except Exception as e:  # noqa: BLE001 - a truncated header reads as safetensors' own error type
        if isinstance(e, PlanError):
            raise
        raise PlanError(
            f"{weights}: cannot read the weights ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None


def _owner(model: nn.Module, entry: dict, directory: str) -> nn.Module:
    try:
        return model.get_submodule(entry["owner"]) if entry["owner"] else model
    except AttributeError:
        _fail(directory, entry, f"the model has no module '{entry['owner']}'")


def _dtype_of(entry: dict, directory: str) -> torch.dtype:
    dtype = getattr(torch, str(entry.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        _fail(directory, entry, f"unknown dtype {entry.get('dtype')!r}")
    return dtype


def _config(cls, entry: dict, directory: str):
    cfg = entry.get("config")
    if not isinstance(cfg, dict):
        _fail(directory, entry, "no config")
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        _fail(directory, entry, f"unknown {cls.name} config field {unknown[0]!r} (known: {', '.join(sorted(known))})")
    try:
        out = cls.Config(**cfg)
        out.validate()
    except (TypeError, ValueError) as e:
        _fail(directory, entry, f"bad {cls.name} config ({str(e).splitlines()[0]})")
    return out


def _rebuild_attention(model: nn.Module, entry: dict, directory: str, undo: list) -> None:
    owner = _owner(model, entry, directory)
    dtype = _dtype_of(entry, directory)
    device = next(owner.parameters(), torch.empty(0)).device
    try:
        method, in_f, sizes = entry["method"], int(entry["in_features"]), [int(s) for s in entry["sizes"]]
        if in_f < 1 or not sizes or min(sizes) < 1:
            _fail(directory, entry, f"bad shapes {in_f}→{sizes}")
        if entry["family"] == SHARED:
            rank = int(entry["rank"])
            _check_size(directory, entry, rank * (in_f + sum(sizes)), in_f, sum(sizes))
            struct = SharedBasis(method, in_f, sizes, rank, dtype=dtype, device=device)
        else:
            cls = FAMILIES.get(entry["structure"])
            if cls is None:
                _fail(directory, entry, f"unknown family {entry['structure']!r} (known: {', '.join(sorted(FAMILIES))})")
            cfg = _config(cls, entry, directory)
            _check_size(directory, entry, _param_count(cls, in_f, sum(sizes), cfg, directory, entry), in_f, sum(sizes))
            made = cls(in_f, sum(sizes), cfg, dtype=dtype, device=device)  # empty tensors of the right shapes
            struct = StackedStructure(method, in_f, sizes, cls, cfg, made)
        struct.site_fqn = entry.get("site_fqn")
        struct.sources = [(src[0], tuple(src[1]), *src[2:]) for src in entry.get("sources", [])]
    except (KeyError, TypeError, ValueError) as e:
        _fail(directory, entry, f"bad attention factors entry ({type(e).__name__}: {str(e).splitlines()[0]})")
    struct.policy_digest = entry.get("policy")
    _attach_undoable(owner, entry["child"], struct, undo)


def _param_count(cls, in_f: int, out_f: int, cfg, directory: str, entry: dict) -> int:
    """What the structure as configured (not as resolved: the constructor takes the config as is) allocates."""
    try:
        return int(cls.param_count(in_f, out_f, cfg))
    except (ValueError, TypeError, ZeroDivisionError):
        pass
    try:
        return int(cls.param_count(in_f, out_f, cfg.resolve(in_f, out_f) if hasattr(cfg, "resolve") else cfg))
    except (ValueError, TypeError, ZeroDivisionError) as e:
        _fail(directory, entry, f"{cls.name} cannot take {in_f}→{out_f} ({first_line(e)})")


def _rebuild(model: nn.Module, entry: dict, directory: str, shared: dict, undo: list) -> None:
    cls = FAMILIES.get(entry.get("family"))
    if cls is None:
        _fail(directory, entry, f"unknown family {entry.get('family')!r} (known: {', '.join(sorted(FAMILIES))})")
    cfg = _config(cls, entry, directory)
    cls.config_from_plan(cfg, entry, shared)
    in_f, out_f = entry["in_features"], entry["out_features"]
    if not all(type(v) is int and v > 0 for v in (in_f, out_f)):
        _fail(
            directory, entry, f"bad entry (in_features and out_features must be positive ints, got {in_f!r}, {out_f!r})"
        )
    dtype = _dtype_of(entry, directory)
    if entry["placement"] == "attached":
        if not isinstance(entry.get("weight"), str) or not isinstance(entry.get("child"), str):
            _fail(directory, entry, "bad entry (an attached site names its weight and child)")
        owner = _owner(model, entry, directory)
        try:
            weight = owner.get_parameter(entry["weight"])
        except AttributeError:
            _fail(directory, entry, f"the model has no parameter {entry['owner']}.{entry['weight']}")
        if tuple(weight.shape) not in ((out_f, in_f), (in_f, out_f)):
            _fail(directory, entry, f"expected a weight of {in_f}→{out_f}, found shape {tuple(weight.shape)}")
        _check_size(directory, entry, _param_count(cls, in_f, out_f, cfg, directory, entry), in_f, out_f)
        struct = cls(in_f, out_f, cfg, dtype=dtype, device=weight.device)
        struct.policy_digest = entry.get("policy")
        if isinstance(entry.get("transposed"), bool):
            struct.base_transposed = entry["transposed"]
        _attach_undoable(owner, entry["child"], struct, undo)
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
    _check_size(directory, entry, _param_count(cls, in_f, out_f, cfg, directory, entry), in_f, out_f)
    struct = cls(in_f, out_f, cfg, dtype=dtype, device=w.device)
    struct.original_layout = layout_of(target, conv1d)
    struct.bias = target.bias
    struct.policy_digest = entry.get("policy")
    if not struct.compressing:
        struct.weight = w if not conv1d else nn.Parameter(w.detach().T.contiguous(), requires_grad=w.requires_grad)
    _swap_undoable(model, target, struct, undo)
