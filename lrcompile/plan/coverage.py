"""Rules that cannot take effect are said, once per compiled model, never silently skipped.

A linear rule that matches no module or parameter path of the model can match no site the backend will see.
An attention rule that matches a module whose graph holds a softmax but no attention lrcompile recognises
(another formulation: a fused baddbmm, a soft-capped score, a custom autograd function) leaves that module as it
is: it gets a `failed` report row and one warning, instead of an output bit-identical to dense.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch.fx as fx
from torch import nn

from ..capture.names import strip_root
from ..capture.sites import SOFTMAX_TARGETS, Site, innermost_module
from .report import SiteRow


def candidate_names(model: nn.Module) -> set[str]:
    """Every name a site of `model` can have: module paths, parameter paths and those without `.weight`."""
    names = {n for n, _ in model.named_modules()}
    for n, _ in model.named_parameters():
        names.add(n)
        if n.endswith(".weight") or n == "weight":
            names.add(n[: -len(".weight")] if "." in n else "")
    return names


def unmatched_linear_rules(policy, model: Optional[nn.Module]) -> list:
    if policy is None or model is None:
        return []
    names = candidate_names(model)
    return policy.unmatched(names)


def rewrite_only_sites(policy, model: Optional[nn.Module]) -> list[tuple[object, str]]:
    """(rule, module path) where a non-dense linear rule reaches MoE experts or an nn.MultiheadAttention that
    `rewrite` has not made sites: the backend sees no linear inside them (grouped matmuls, one opaque MHA call)."""
    if policy is None or model is None:
        return []
    from ..experts.bank import is_experts, projections
    from ..mha.module import is_mha_site

    out = []
    for path, mod in model.named_modules():
        if is_experts(mod):
            names = [f"{path}.{p}" for p in projections(mod)]
            names += [f"{n}.{e}" for n in names for e in range(int(mod.num_experts))]
        elif is_mha_site(mod):
            names = [f"{path}.in_proj", f"{path}.out_proj"]
        else:
            continue
        for rule in policy.rules:
            if rule.kind == "linear" and rule.method != "dense" and any(rule.matches(n) for n in names):
                out.append((rule, path))
                break
    return out


def _is_softmax(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in SOFTMAX_TARGETS or "softmax" in getattr(node.target, "__name__", "")
    return node.op == "call_method" and node.target == "softmax"


_SCORES = {"matmul", "bmm", "baddbmm", "einsum", "__matmul__", "mm"}


def _after_scores(node: fx.Node, hops: int = 8) -> bool:
    """A product of two activations feeds this softmax within a few ops (attention scores, not a router's
    softmax over a linear layer's logits)."""
    level, seen = [node], set()
    for _ in range(hops):
        nxt = []
        for n in level:
            for a in n.all_input_nodes:
                if a in seen:
                    continue
                seen.add(a)
                name = a.target if isinstance(a.target, str) else getattr(a.target, "__name__", "")
                if a.op in ("call_function", "call_method") and name in _SCORES:
                    return True
                nxt.append(a)
        level = nxt
    return False


def unrecognised_attention(gm: fx.GraphModule, sites: list[Site], policy, prefix: str = "") -> list[SiteRow]:
    """A `failed` row for each module an attention rule sends somewhere whose softmax is no attention site."""
    if policy is None or not any(r.kind == "attention" and r.method != "dense" for r in policy.rules):
        return []
    found = {s.fqn for s in sites if s.kind == "attention"}
    rows: dict[str, SiteRow] = {}
    for node in gm.graph.nodes:
        if not _is_softmax(node) or not _after_scores(node):
            continue
        expr, _ = innermost_module(node)
        if expr is None:
            continue
        path = prefix + strip_root(expr) if strip_root(expr) else prefix[:-1]
        if path in found or path in rows:
            continue
        rule = policy.match(path, "attention")
        if rule is None or rule.method == "dense":
            continue
        rows[path] = SiteRow(
            fqn=path,
            kind="attention",
            method=rule.method,
            status="failed",
            rule=policy.where(rule),
            reason="a softmax here is no attention lrcompile recognises (SDPA or softmax(QKᵀ)V); "
            "the module runs as it is",
        )
    return list(rows.values())


def warn_once(session, key, message: str) -> None:
    if key not in session.warned:
        session.warned.add(key)
        warnings.warn(message, stacklevel=4)
