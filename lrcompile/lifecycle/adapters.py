"""Adapter life cycle: merge into dense weights, save only the adapter, hot-swap another one in place.

`merge(model)` folds every LoRA / DoRA / VeRA site into its dense weight and puts a plain nn.Linear back (NOBLE
is not mergeable and stays). A merged weight that was tied to another parameter gets its own Parameter (the
tie partner never changes silently); an untied one is updated in place (same Parameter object, so optimizer
state and state_dict keys survive). A compiled model must be compiled again after a merge.

`adapter_state_dict(model)` holds only the adapters' tensors (LoRA A/B, DoRA magnitudes, VeRA λ's and
projections, and the scaling; MoE experts' stacked LoRA and nn.MultiheadAttention's too), keyed by their full
`state_dict` names; a tensor reachable under several names (VeRA's projections, shared by every site of a pair)
appears once, under its first name, so that `safetensors.torch.save_file` accepts the dict.
`load_adapter_state_dict(model, sd)` maps each saved tensor back to every name of its target and copies into the
existing tensors in place — a smaller rank is zero-padded to the installed one, the scaling comes from the saved
value — so a compiled model recompiles nothing (the tensors are graph inputs).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LrcompileError
from ..families.adapters.lora import Adapter
from ..families.adapters.vera import own_projections
from ..runtime import attach as store


def _is_swappable_adapter(mod) -> bool:
    return isinstance(mod, Adapter) and bool(mod.adapter_names)


def zero_pad(t: torch.Tensor, shape) -> torch.Tensor:
    """`t` zero-padded at the end of each dimension up to `shape` (rank padding: extra A rows / B columns
    of zeros add nothing to B·A)."""
    shape = tuple(shape)
    if t.dim() != len(shape) or any(s > d for s, d in zip(t.shape, shape)):
        raise ValueError(f"cannot pad shape {tuple(t.shape)} to {shape}")
    if tuple(t.shape) == shape:
        return t
    out = t.new_zeros(shape)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    from ..experts.bank import ExpertBank
    from ..mha.module import Factored

    out = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        pre = f"{path}." if path else ""
        if _is_swappable_adapter(mod):
            for n in mod.adapter_names:
                out[pre + n] = getattr(mod, n)
        elif isinstance(mod, ExpertBank):  # per-expert adapters, stacked: `<proj>_lora_A` [experts, r, in]
            for proj, plan in mod.plans.items():
                for n in getattr(plan.family, "adapter_names", ()):
                    out[f"{pre}{proj}_{n}"] = getattr(mod, f"{proj}_{n}")
        elif isinstance(mod, Factored):  # nn.MultiheadAttention's in_proj / out_proj
            for n in getattr(mod.family, "adapter_names", ()):
                out[pre + n] = getattr(mod, n)
    return out


def _aliases(tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names grouped by tensor identity, in first-seen order."""
    groups: dict[int, list[str]] = {}
    for k, v in tensors.items():
        groups.setdefault(id(v), []).append(k)
    return list(groups.values())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter parameters and buffers (detached, sharing storage), each tensor once (module doc)."""
    tensors = _adapter_tensors(model)
    return {names[0]: tensors[names[0]].detach() for names in _aliases(tensors)}


def load_adapter_state_dict(model: nn.Module, state_dict: dict, strict: bool = True) -> nn.Module:
    """Copy an adapter into the installed one in place (smaller ranks zero-padded); returns the model."""
    own_projections(model)  # a VeRA pair shared with another model is copied first: loading must not reach it
    targets = _adapter_tensors(model)
    unexpected = [k for k in state_dict if k not in targets]
    if unexpected:
        raise LrcompileError(
            f"load_adapter_state_dict: no adapter tensor named {unexpected[0]!r} in the model "
            f"({len(unexpected)} unexpected)"
        )
    groups = _aliases(targets)
    missing = [names[0] for names in groups if not any(k in state_dict for k in names)]
    if strict and missing:
        raise LrcompileError(
            f"load_adapter_state_dict: {missing[0]!r} missing from the state dict ({len(missing)} missing)"
        )
    with torch.no_grad():
        for names in groups:
            given = [k for k in names if k in state_dict]
            if not given:
                continue
            k, src = given[0], state_dict[given[0]]
            for other in given[1:]:
                if not torch.equal(state_dict[other], src):
                    raise LrcompileError(
                        f"load_adapter_state_dict: {k!r} and {other!r} are one tensor in the model "
                        "but differ in the state dict"
                    )
            dst = targets[k]
            try:
                dst.copy_(zero_pad(src.to(device=dst.device), dst.shape))
            except ValueError:
                raise LrcompileError(
                    f"load_adapter_state_dict: {k}: saved shape {tuple(src.shape)} does not fit the "
                    f"installed {tuple(dst.shape)} (a larger rank cannot be loaded)"
                ) from None
    return model


def _names_of(model: nn.Module, mod: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is mod]


def _tied(model: nn.Module, p: torch.Tensor, is_own) -> bool:
    """Whether `p` is reachable under a name that `is_own` rejects (a tie to another module)."""
    return any(q is p and not is_own(n) for n, q in model.named_parameters(remove_duplicate=False))


def _attached_weight(owner: nn.Module, child: str, struct: Adapter) -> tuple[str, torch.Tensor, bool]:
    """(parameter name, parameter, transposed) of the dense weight an attached adapter augments."""
    for name, p in owner.named_parameters():
        if name.startswith(store.PREFIX) or store.child_name(owner, p) != child:
            continue
        recorded = getattr(struct, "base_transposed", None)
        if recorded is not None:  # recorded when attached: storage pointers change with copies and loads
            return name, p, recorded
        base = struct._base
        if base is not None and base.data_ptr() == p.data_ptr():
            return name, p, base.stride() != p.stride() or base.shape != p.shape
        transposed = tuple(p.shape) != (struct.out_features, struct.in_features) or type(owner).__name__ == "Conv1D"
        return name, p, transposed
    raise LrcompileError(f"merge: cannot find the weight that adapter '{child}' augments")


def merge(model: nn.Module) -> nn.Module:
    """Fold LoRA / DoRA / VeRA into the dense weights in place; NOBLE sites stay (not mergeable). MoE experts'
    adapters fold into their 3-D weights; a bank left with nothing else gives the original experts module back."""
    _merge_experts(model)
    merge_mha(model)
    for path, mod in list(model.named_modules()):
        if not isinstance(mod, Adapter) or not mod.mergeable or not path:
            continue
        owner_path, _, leaf = path.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        if leaf.startswith(store.PREFIX) and getattr(owner, leaf, None) is mod:  # attached beside its site
            _merge_attached(model, owner, owner_path, leaf, mod)
        else:
            _merge_module(model, mod)
    return model


def merge_mha(model: nn.Module) -> None:
    from ..mha.install import merge_mha as fold

    fold(model)


def _merge_experts(model: nn.Module) -> None:
    from ..experts.bank import ExpertBank
    from ..runtime.attach import replace_module

    for mod in [m for m in model.modules() if isinstance(m, ExpertBank)]:
        for proj in [p for p, plan in mod.plans.items() if not plan.family.compressing]:
            mod.fold(proj)
        if not mod.plans:
            mod.original.train(mod.training)
            replace_module(model, mod, mod.original)


def _merge_module(model: nn.Module, mod: Adapter) -> None:
    from ..plan.rewrite import restore_layout
    from ..runtime.attach import replace_module

    W = mod.weight
    if W is None:
        raise LrcompileError(f"merge: {mod.name} module has no base weight (built by init(), never installed)")
    names = _names_of(model, mod)
    with torch.no_grad():
        merged = mod.merged_weight().to(W.dtype)
        if _tied(model, W, lambda n: any(n.startswith(f"{pre}.") for pre in names)):
            W = nn.Parameter(merged, requires_grad=W.requires_grad)
        else:
            W.copy_(merged)
    layout = getattr(mod, "original_layout", None)
    if layout is not None:  # the module type and weight layout the adapter replaced (a GPT-2 Conv1D stays one)
        new = restore_layout(layout, W.detach(), mod.bias, W.requires_grad, mod.training)
        if not layout[2]:
            new.weight = W  # the same Parameter where the layout allows: optimizers and ties keep it
    else:
        new = nn.Linear(mod.in_features, mod.out_features, bias=False, device="meta")
        new.weight = W
        new.bias = mod.bias
    replace_module(model, mod, new)


def _merge_attached(model: nn.Module, owner: nn.Module, owner_path: str, leaf: str, mod: Adapter) -> None:
    name, p, transposed = _attached_weight(owner, leaf, mod)
    dense = p.T if transposed else p
    with torch.no_grad():
        merged = (dense.detach() + _delta_on(mod, dense)).to(p.dtype)
        own = {f"{n}.{name}" if n else name for n in _names_of(model, owner)}
        if _tied(model, p, lambda n: n in own):
            new = nn.Parameter((merged.T if transposed else merged).contiguous(), requires_grad=p.requires_grad)
            holder, _, attr = name.rpartition(".")
            setattr(owner.get_submodule(holder) if holder else owner, attr, new)
        else:
            dense.copy_(merged)
    delattr(owner, leaf)


def _delta_on(mod: Adapter, dense: torch.Tensor) -> torch.Tensor:
    """The adapter's merge delta computed against `dense` (an attached adapter may hold no base of its own)."""
    saved = mod._base
    mod._base = dense.detach()
    try:
        return mod.delta()
    finally:
        mod._base = saved


__all__ = ["merge", "adapter_state_dict", "load_adapter_state_dict", "zero_pad"]
