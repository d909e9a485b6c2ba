"""Eager API: `rewrite` installs the policy's structures on the model before any optimizer or compile exists.

nn.Linear and HF Conv1D sites are swapped for the family module (the dense weight of a compressed site is
released); functional sites (F.linear with a bare parameter) get their factors attached next to the module,
as the backend does, and run factored under `torch.compile(backend="lrcompile")` (the dense weight of a
compressed functional site stays, frozen). Budgets are planned by `budget.plan_model` over the captured sites,
as in the backend.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..attention.apply import install_attention
from ..attention.factors import AttnFactors
from ..capture.modules import module_sites
from ..capture.trace import CapturedSite, capture_sites
from ..errors import PolicyError
from ..experts.install import expert_names, install_experts
from ..factorize.stats import as_stats
from ..families import Structure
from ..mha.install import install_mha
from ..policy.load import load_policy
from ..runtime import attach as store
from ..runtime.memory import release
from .build import TIE_NOTE, build, decide, tie_broken
from .report import Report


def _swappable(module: Optional[nn.Module], site) -> bool:
    if module is None or getattr(module, "weight", None) is not site.weight:
        return False
    if type(module) is nn.Linear and site.form == "linear":
        return True
    if isinstance(module, nn.Linear) and site.form in ("linear", "matmul") and not site.transposed:
        return _computes_linear(module)  # a subclass (Falcon's FalconLinear): swapped if it is the same function
    return type(module).__name__ == "Conv1D" and site.form == "addmm"  # HF GPT-2: weight stored (in, out)


def _computes_linear(module: nn.Linear) -> bool:
    """The subclass's forward is F.linear with its own weight and bias, checked on a random input."""
    w = module.weight
    x = torch.randn(3, module.in_features, dtype=w.dtype, device=w.device, generator=None)
    try:
        with torch.no_grad():
            got = module(x)
            want = torch.nn.functional.linear(x, w, module.bias)
    except Exception:  # noqa: BLE001 - a forward that cannot run alone is no plain linear
        return False
    return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def layout_of(module: nn.Module, transposed: bool) -> tuple:
    """(class, constructor-free attributes, weight stored (in, out)) of a module a structure replaces."""
    attrs = {
        k: v
        for k, v in vars(module).items()
        if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, bool, tuple))
    }
    return type(module), attrs, bool(transposed)


def restore_layout(layout: tuple, weight: torch.Tensor, bias, requires_grad: bool, training: bool) -> nn.Module:
    """A module of the recorded class holding `weight` (out, in) in its own layout, and `bias`."""
    cls, attrs, transposed = layout
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for k, v in attrs.items():
        setattr(new, k, v)
    new.weight = nn.Parameter((weight.T if transposed else weight).contiguous(), requires_grad=requires_grad)
    new.bias = bias
    new.train(training)
    return new


def _plan_budget(pol, model: nn.Module, stats, captured):
    """The policy budget's ranks, allocated once over the whole model (None without a budget): the backend's
    own planner (`budget.plan_model`) over the captured sites — the backend's enumeration — so both paths give
    every site the same rank."""
    if pol is None or not pol.budget:
        return None
    from ..policy.budget import plan_model

    return plan_model(pol, model, stats, sites=captured)


def rewrite(
    model: nn.Module,
    policy,
    example_inputs=None,
    calibration=None,
    *,
    report: Optional[str] = None,
    verbose: bool = False,
    progress: Optional[bool] = None,
) -> nn.Module:
    """Apply `policy` to `model` in place and return it. `example_inputs`: tuple of args or dict of kwargs; None:
    only nn.Linear and Conv1D modules are sites, found by name without running the model (PEFT's reach)."""
    pol = load_policy(policy)
    if example_inputs is None and (pol.budget or any(r.kind == "attention" for r in pol.rules)):
        what = "a budget" if pol.budget else "attention rules"
        raise PolicyError(f"{pol.source}: {what} need example_inputs (rewrite(model, policy, example_inputs))")
    stats = as_stats(calibration)
    progress = sys.stderr.isatty() if progress is None else progress
    # weak: swapped-out dense weights must be free to go (a WeakSet would compare tensors with ==)
    before = weakref.WeakValueDictionary((id(p), p) for p in model.parameters())
    # attention rules first: their factors are attached and the projections they claim leave the linear rules
    attn_rows, claimed = (
        install_attention(model, pol, example_inputs) if any(r.kind == "attention" for r in pol.rules) else ([], set())
    )
    captured = capture_sites(model, example_inputs) if example_inputs is not None else module_sites(model)
    # MoE experts (3-D weights run per expert) are swapped for ExpertBanks once the linear sites are captured: the
    # bank's forward is opaque to Dynamo (a graph break per layer), the experts' HF forward is not
    expert_rows, made_adapter = install_experts(model, pol, stats)
    mha_rows, mha_adapter = install_mha(model, pol, stats)  # inside F.multi_head_attention_forward: no FX site
    expert_rows, made_adapter = expert_rows + mha_rows, made_adapter or mha_adapter
    rep = Report()
    for row in attn_rows + expert_rows:
        rep.add(row)
    seen: set = set()
    ranks = _plan_budget(pol, model, stats, captured)
    n_sites = len({c.site.fqn for c in captured if c.site.kind == "linear"})
    bar = tqdm(total=n_sites, desc="lrcompile rewrite", unit="site", disable=not progress)
    for c in captured:
        site = c.site
        if site.kind != "linear" or site.fqn in seen or site.fqn in claimed:
            continue
        seen.add(site.fqn)
        bar.update()
        bar.set_postfix_str(site.fqn, refresh=False)
        decision = decide(site, pol, ranks)
        if decision.status == "installed":
            continue
        struct, row = build(site, decision, pol, stats.get(site.fqn) if stats is not None else None)
        rep.add(row)
        if struct is None:
            continue
        _install(model, c, struct, row)
        made_adapter = made_adapter or store.freezes_others(struct)
        struct.policy_digest = pol.digest
        if struct.weight is not None:  # an adapter's base (for Conv1D a transposed copy) is a pre-existing weight
            before[id(struct.weight)] = struct.weight
        for other in captured:  # drop our references so the swapped-out dense weight is freed now, site by site
            if other.site.fqn == site.fqn and other is not c:
                other.site.weight = other.module = None
        c.site.weight = c.module = None
        release()  # the dense weight and the factorisation's buffers: back to the system, not kept as fragments
    for rule in pol.unmatched(seen | expert_names(expert_rows)):
        warnings.warn(f"lrcompile: {pol.where(rule)} matches no site", stacklevel=2)
    if made_adapter:  # PEFT-style: only the new branches train (a rule that matched nothing freezes nothing)
        store.freeze_for_adapters(model, before)
    for m in model.modules():  # an attention rule's factors, made by install_attention above
        if isinstance(m, AttnFactors) and getattr(m, "policy_digest", None) is None:
            m.policy_digest = pol.digest
    bar.close()
    del captured
    model.lrcompile_report = rep
    model.lrcompile_policy_digest = pol.digest  # lrcompile.save writes it per site into plan.json
    if report:
        rep.write(report)
    if verbose:
        print(rep.table())
    return model


def _install(model: nn.Module, c: CapturedSite, struct: Structure, row) -> None:
    site, module = c.site, c.module
    struct.to(device=site.weight.device)
    if _swappable(module, site):
        struct.original_layout = layout_of(module, site.transposed)  # merge gives this module type back
        struct.bias = module.bias
        if not struct.compressing:
            struct.weight = (
                site.weight
                if not site.transposed
                else nn.Parameter(site.dense_weight.detach().contiguous(), requires_grad=site.weight.requires_grad)
            )
        tied = struct.compressing and tie_broken(site, model)
        store.replace_module(model, module, struct)
        if tied:
            row.notes.append(TIE_NOTE)
    elif module is not None:
        store.attach(module, site.weight, struct, site.transposed)
        store.record_versions(struct, site.weight)
        row.notes.append("functional site: factors attached; they run under torch.compile(backend='lrcompile')")
        if struct.compressing:
            # The graph no longer uses the dense weight. A swapped module's weight leaves the model; this one
            # stays (the module's forward names it) but is frozen, so optimizers and DDP's buckets skip it —
            # unless a tie partner (an embedding) still trains it.
            if site.weight_shared or tie_broken(site, model):
                row.notes.append("dense weight left trainable: the model uses it elsewhere too")
            else:
                site.weight.requires_grad_(False)
                row.notes.append("dense weight frozen (requires_grad=False): the compiled graph does not use it")
    else:
        row.status = "failed"
        row.reason = "module not found"
