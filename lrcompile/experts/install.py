"""`rewrite`'s step for MoE experts: every expert's matrix of a transformers 5 experts module is a linear site.

Names: `<experts module>.<parameter>.<expert>` (`model.layers.0.mlp.experts.gate_up_proj.3`). A rule matches an
expert by that name or by the parameter's own path (`*.experts.gate_up_proj`: every expert of it); the first
rule in order that matches either wins. Each expert is decided and factorised as any linear site (rank, min_features,
max_error, report row); then the experts of one parameter are stacked into one `ExpertBank` projection, which asks
that they share one family and configuration. A compressing rule takes every expert of its parameter or none (the
3-D weight is then released: no expert slice of it can go stale); adapters may take any subset.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..capture.sites import Site
from ..errors import PolicyError
from ..plan.build import build, decide
from ..plan.report import SiteRow
from ..policy.rules import Policy
from .bank import EXPERT_FAMILIES, ExpertBank, Projection, is_experts, projections


class _ParamPolicy:
    """`policy` whose `match` also tries the 3-D parameter's path (all experts) after the expert's own name."""

    def __init__(self, policy: Policy, param_fqn: str):
        self._policy, self._param = policy, param_fqn

    def match(self, fqn: str, kind: str = "linear"):
        for rule in self._policy.rules:
            if rule.kind == kind and (rule.matches(fqn) or rule.matches(self._param)):
                return rule
        return None

    def __getattr__(self, name):
        return getattr(self._policy, name)


def expert_sites(path: str, module: nn.Module, proj: str) -> list[Site]:
    """One linear site per expert of `module.<proj>`: W[e] as (out, in) (a view of the 3-D parameter)."""
    w = module._parameters[proj]
    b = module._parameters.get(f"{proj}_bias") if module.has_bias else None
    param_fqn = f"{path}.{proj}" if path else proj
    return [
        Site(
            fqn=f"{param_fqn}.{e}",
            kind="linear",
            node=None,
            form="expert",
            module_type=type(module),
            weight=w[e],
            bias=b[e] if b is not None else None,
            transposed=bool(module.is_transposed),
            weight_path=f"{param_fqn}.{e}",  # the expert's own slice: PiSSA may write its residual there
        )
        for e in range(w.shape[0])
    ]


def _stack(structs: list, proj: str, where: str) -> tuple[object, list[torch.Tensor]]:
    cls, cfg = type(structs[0]), structs[0].cfg
    for s in structs[1:]:
        if type(s) is not cls or s.cfg != cfg:
            raise PolicyError(
                f"{where}: the experts of one parameter take one method and configuration; {proj} has "
                f"{cls.name} {cfg} and {type(s).name} {s.cfg}"
            )
    stacked = []
    for name in cls.tensor_names:
        parts = [getattr(s, name).detach() for s in structs]
        t = torch.stack(parts)
        trains = isinstance(getattr(structs[0], name), nn.Parameter)  # a buffer (LoRA's scaling) stays one
        stacked.append(nn.Parameter(t, requires_grad=True) if trains else t)
    return cfg, stacked


def install_experts(model: nn.Module, policy: Policy, stats=None) -> tuple[list[SiteRow], bool]:
    """Swap every transformers 5 experts module that a rule reaches for an ExpertBank. Returns the report rows
    (one per expert) and whether an adapter that freezes the rest (LoRA) was installed."""
    rows: list[SiteRow] = []
    made_adapter = False
    found = [(p, m) for p, m in model.named_modules() if is_experts(m) or isinstance(m, ExpertBank)]
    todo = []
    for path, current in found:
        # a bank from an earlier rewrite: its projections are installed (never sites again), the others are
        module = current.original if isinstance(current, ExpertBank) else current
        if getattr(module, "_is_expert_parallel", False):
            raise PolicyError(f"{path}: expert-parallel experts modules are not supported as sites")
        plans = dict(current.plans) if isinstance(current, ExpertBank) else {}
        stacked = {p: current.stacked(p) for p in plans}
        for proj in projections(module):
            if proj in plans:
                continue
            pol = _ParamPolicy(policy, f"{path}.{proj}" if path else proj)
            sites = expert_sites(path, module, proj)
            chosen, wanted = [], 0
            for site in sites:
                d = decide(site, pol)
                wanted += d.rewrites
                if d.rewrites and d.method not in EXPERT_FAMILIES:
                    d.status, d.reason = "failed", f"method {d.method} does not apply to expert sites"
                    warnings.warn(f"lrcompile: {site.fqn}: {d.reason} ({', '.join(EXPERT_FAMILIES)} do)", stacklevel=3)
                elif d.rewrites and getattr(d.config, "dropout", 0.0):
                    raise PolicyError(
                        f"{policy.where(d.rule)}: {site.fqn}: dropout is not supported on expert sites "
                        "(the branch input of one expert is not a module input; PEFT refuses it too)"
                    )
                struct, row = build(site, d, pol, stats.get(site.fqn) if stats is not None else None)
                row.notes.append(f"expert {site.fqn.rsplit('.', 1)[1]} of the 3-D parameter {path}.{proj}")
                rows.append(row)
                if struct is not None:
                    chosen.append((int(site.fqn.rsplit(".", 1)[1]), struct, d, row))
            if not chosen:
                continue
            structs = [c[1] for c in chosen]
            where = policy.where(chosen[0][2].rule)
            if structs[0].compressing and wanted != len(sites):
                raise PolicyError(
                    f"{where}: {path}.{proj}: a compressing method takes every expert of the parameter or none "
                    f"(the rules send {wanted} of {len(sites)} experts to one)"
                )
            if structs[0].compressing and len(chosen) != len(sites):  # max_error or a failure kept some dense
                k = len(sites) - len(chosen)
                reason = f"{k} other experts of {path}.{proj} stay dense: so does this one"
                warnings.warn(f"lrcompile: {path}.{proj}: {k} of its experts stay dense, so all do", stacklevel=3)
                for c in chosen:
                    c[3].status, c[3].reason = "skipped", reason
                    c[3].params_after, c[3].flops_after = c[3].params_before, c[3].flops_before
                continue
            cfg, stacked[proj] = _stack(structs, proj, where)
            s0 = structs[0]
            plans[proj] = Projection(s0.name, cfg, tuple(c[0] for c in chosen), s0.in_features, s0.out_features)
            made_adapter = made_adapter or (not s0.compressing and not s0.trains_base)
        if plans.keys() != (current.plans.keys() if isinstance(current, ExpertBank) else set()):
            todo.append((current, module, plans, stacked))
    for current, module, plans, stacked in todo:  # swapped once every bank is planned: a refusal changes nothing
        bank = ExpertBank(module, plans, stacked)
        bank.policy_digest = policy.digest
        for proj, plan in plans.items():
            if plan.family.compressing:  # the 3-D weight leaves the model: the factors replace it
                module._parameters.pop(proj, None)
        _swap(model, current, bank)
    return rows, made_adapter


def _swap(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    from ..runtime.attach import replace_module

    replace_module(model, old, new)


def expert_names(rows: list[SiteRow]) -> set[str]:
    """Every name a rule may match an expert by: the expert's own and its 3-D parameter's."""
    return {r.fqn for r in rows} | {r.fqn.rsplit(".", 1)[0] for r in rows}
