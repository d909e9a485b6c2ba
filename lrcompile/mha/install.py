"""`rewrite`'s step for nn.MultiheadAttention: `<path>.in_proj` (the packed q/k/v weight, 3E×E) and
`<path>.out_proj` are linear sites, decided and factorised as any other; save/load entries and merge for them."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

from torch import nn

from ..capture.sites import Site
from ..families import FAMILIES
from ..plan.build import build, decide
from ..plan.report import SiteRow
from ..policy.rules import Policy
from .module import MHA_FAMILIES, Factored, FactoredMHA, factored_mha, is_mha_site

FAMILY = "mha"
NOTE = "nn.MultiheadAttention: its forward runs the rebuilt matrix (parameters saved, not FLOPs)"


def _weights(mha: nn.MultiheadAttention, proj: str) -> tuple[nn.Parameter, object]:
    if proj == "in_proj":
        return mha.in_proj_weight, mha.in_proj_bias
    return mha.out_proj.weight, mha.out_proj.bias


def _site(path: str, mha: nn.MultiheadAttention, proj: str) -> Site:
    w, b = _weights(mha, proj)
    fqn = f"{path}.{proj}" if path else proj
    return Site(fqn=fqn, kind="linear", node=None, form="mha", module_type=type(mha), weight=w, bias=b, weight_path=fqn)


def _factored(struct, site: Site) -> Factored:
    tensors = {n: getattr(struct, n) for n in type(struct).tensor_names}
    base = None if struct.compressing else site.weight
    bias = site.bias if site.fqn.endswith("out_proj") else None  # the MHA reads in_proj_bias itself
    return Factored(struct.name, struct.cfg, struct.in_features, struct.out_features, tensors, base, bias)


def install_mha(model: nn.Module, policy: Policy, stats=None) -> tuple[list[SiteRow], bool]:
    """Swap every packed nn.MultiheadAttention a rule reaches for a FactoredMHA. Returns the report rows and
    whether an adapter that freezes the rest (LoRA) was installed."""
    rows, made_adapter = [], False
    for path, mha in [(p, m) for p, m in model.named_modules() if is_mha_site(m)]:
        made = {}
        for proj in ("in_proj", "out_proj"):
            site = _site(path, mha, proj)
            d = decide(site, policy)
            if d.rewrites and d.method not in MHA_FAMILIES:
                d.status, d.reason = "failed", f"method {d.method} does not apply to nn.MultiheadAttention"
                warnings.warn(f"lrcompile: {site.fqn}: {d.reason} ({', '.join(MHA_FAMILIES)} do)", stacklevel=3)
            elif d.rewrites and (getattr(d.config, "dropout", 0.0) or getattr(d.config, "init", None) == "pissa"):
                d.status, d.reason = "failed", "dropout and pissa need the projection's input (not a module input)"
                warnings.warn(f"lrcompile: {site.fqn}: {d.reason}", stacklevel=3)
            struct, row = build(site, d, policy, stats.get(site.fqn) if stats is not None else None)
            rows.append(row)
            if struct is None:
                continue
            row.notes.append(NOTE)
            if struct.compressing:
                row.flops_after = row.flops_before
            made[proj] = _factored(struct, site)
            made_adapter = made_adapter or (not struct.compressing and not struct.trains_base)
        if made:
            new = factored_mha(mha, made.get("in_proj"), made.get("out_proj"))
            new.policy_digest = policy.digest
            _swap(model, mha, new)
    return rows, made_adapter


def _swap(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    from ..runtime.attach import replace_module

    replace_module(model, old, new)


def merge_mha(model: nn.Module) -> None:
    """Fold the adapters of every FactoredMHA into their weights; one left with no compressed projection gives
    a plain nn.MultiheadAttention back."""
    from ..runtime.attach import replace_module

    for mha in [m for m in model.modules() if isinstance(m, FactoredMHA)]:
        if any(f.family.compressing for f in _factored_children(mha).values()):
            continue  # compressed projections stay factored (as compressed Structures do)
        replace_module(model, mha, mha.restore())


def _factored_children(mha: FactoredMHA) -> dict:
    return {k: m for k, m in mha._modules.items() if isinstance(m, Factored)}


def mha_entry(path: str, mha: FactoredMHA) -> dict:
    facs = _factored_children(mha)
    first = next(iter(facs.values()))
    return {
        "path": path,
        "placement": "module",
        "family": FAMILY,
        "dtype": str(getattr(first, first.tensor_names[0]).dtype).replace("torch.", ""),
        "policy": getattr(mha, "policy_digest", None),
        "projections": {
            k: {
                "family": f.family.name,
                "config": dataclasses.asdict(f.cfg),
                "in_features": f.in_features,
                "out_features": f.out_features,
            }
            for k, f in facs.items()
        },
    }


def rebuild_mha(
    target: nn.Module, saved: dict, digest, fail: Callable, config: Callable, dtype, swap: Callable
) -> None:
    """The FactoredMHA of a plan entry with empty tensors in place of `target` (see experts.persist)."""
    made = {}
    for proj, sub in saved.items():
        if proj not in ("in_proj", "out_proj") or not isinstance(sub, dict):
            fail(f"bad projection {proj!r} (in_proj or out_proj)")
        cls = FAMILIES.get(sub.get("family"))
        if cls is None or cls.name not in MHA_FAMILIES:
            fail(f"{proj}: family {sub.get('family')!r} does not run here ({', '.join(MHA_FAMILIES)} do)")
        cfg = config(cls, sub)
        w, b = _weights(target, proj)
        in_f, out_f = sub.get("in_features"), sub.get("out_features")
        if tuple(w.shape) != (out_f, in_f):
            fail(f"{proj}: expected {in_f}→{out_f}, found {tuple(w.shape[::-1])}")
        if cls.param_count(in_f, out_f, cfg) > 4 * in_f * out_f:
            fail(f"{proj}: {cls.name} {cfg} is larger than the dense projection: not a plan lrcompile writes")
        one = cls(in_f, out_f, cfg, dtype=dtype, device=w.device)  # empty tensors of the right shapes
        tensors = {n: getattr(one, n) for n in cls.tensor_names}
        bias = b if proj == "out_proj" else None
        made[proj] = Factored(cls.name, cfg, in_f, out_f, tensors, None if cls.compressing else w, bias)
    new = factored_mha(target, made.get("in_proj"), made.get("out_proj"))
    new.policy_digest = digest
    swap(target, new, lambda: None)
