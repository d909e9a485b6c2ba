"""Attention sites under `kind: attention` rules: which projections feed them, their factors, their rewrite.

An attention site (an SDPA call or a hand-written softmax(QKᵀ)V chain, lrcompile.sites) is associated with its
Q, K and V projections through the graph's dataflow: from the attention's q/k/v operands back through views,
transposes, RoPE, KV-cache concatenation and GPT-2's split of a fused c_attn, to the first linear site on each
path (with the rows it contributes when the path went through a split of the last dim). The passes live in
lrcompile/passes/ (sdpa.py, fused_qkv.py, shared_kv.py); the factors in attention_factors.py, the dataflow in
attention_dataflow.py; this module decides, builds factors, reports, and applies the plans.

New factors are an `AttnFactors` attached to the attention module (`self_attn.lrcompile_qkv` / `.lrcompile_kv`):
a `SharedBasis` (fused_qkv with `rank`, shared_kv) or a `StackedStructure` (fused_qkv with `structure`: a linear
family over the stacked weight). They are parameters of the model, found again by a recompile or another graph,
and `lrcompile.rewrite` makes them before an optimizer, DDP or FSDP2 exists.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from ..capture.sites import Site
from ..errors import SiteError
from ..families import FAMILIES
from ..families.lowrank import resolve_rank
from ..passes import fused_qkv as fused_pass
from ..passes import shared_kv as shared_pass
from ..passes.projection import Part
from ..plan.report import SiteRow
from .dataflow import projections
from .factors import AttnFactors, AttnFeed, SharedBasis, StackedStructure, stacked_weight

CHILD = {"fused_qkv": "lrcompile_qkv", "shared_kv": "lrcompile_kv"}
ROLES = {"fused_qkv": fused_pass.ROLES, "shared_kv": shared_pass.ROLES}


@dataclasses.dataclass
class AttnPlan:
    site: Optional[Site]  # None: projections of attached factors found without their attention (see _groups)
    method: str
    row: SiteRow
    parts: list = dataclasses.field(default_factory=list)
    struct: Optional[AttnFactors] = None
    feed: Optional[AttnFeed] = None


def _fail(site, rule, policy, method, reason) -> SiteRow:
    where = policy.where(rule)
    if policy.defaults.strict:
        raise SiteError(f"{where}: {site.fqn or '<root>'}: {method} not applied ({reason})")
    return SiteRow(fqn=site.fqn, kind="attention", method=method, status="failed", reason=reason, rule=where)


def plan_attention(
    sites: list[Site],
    policy,
    module_of: Callable[[Site], Optional[nn.Module]],
    orphans: dict,
    on_new: Optional[Callable[[str], None]] = None,
    attached: tuple = (),
) -> tuple[list[AttnPlan], list[SiteRow]]:
    """Decide every attention site of a graph. Returns the plans and rows for every site: the attention rows
    and, for projections an attention rewrite claims, their linear rows.

    `attached`: (factors, owner path in this graph's frame) for the AttnFactors already on the model
    (attached_bases). Their projections are rewritten wherever they appear, even in a graph without the
    attention itself (a graph break, or a DDPOptimizer split at a bucket boundary between the projections and
    the attention); an attention site with attached factors and no rule of its own is reported through them."""
    plans, rows = [], []
    by_node = {s.node: s for s in sites if s.kind == "linear"}
    owners = {path for _, path in attached if path is not None}
    claimed: set = set()
    for site in sites:
        if site.kind != "attention":
            continue
        rule = policy.match(site.fqn, "attention") if policy is not None else None
        if rule is None or rule.method == "dense":
            if site.fqn not in owners:
                rows.append(
                    SiteRow(
                        fqn=site.fqn,
                        kind="attention",
                        method="dense",
                        status="dense",
                        reason=f"{site.form} attention; "
                        + (f"{rule.label} keeps it dense" if rule else "no attention rule matches"),
                        rule=policy.where(rule) if rule else None,
                    )
                )
            continue
        where = policy.where(rule)
        if rule.method == "sdpa":
            if site.form == "sdpa":
                rows.append(
                    SiteRow(
                        fqn=site.fqn,
                        kind="attention",
                        method="sdpa",
                        status="dense",
                        rule=where,
                        reason="already scaled_dot_product_attention",
                    )
                )
            else:
                plans.append(
                    AttnPlan(
                        site,
                        "sdpa",
                        SiteRow(fqn=site.fqn, kind="attention", method="sdpa", status="rewritten", rule=where),
                    )
                )
                rows.append(plans[-1].row)
            continue
        parts, why = projections(site, ROLES[rule.method], by_node)
        if parts is not None and any(id(s) in claimed for s, _ in parts):
            parts, why = None, "a projection is already claimed by another attention site"
        if parts is None and site.fqn in owners:
            continue  # its factors are attached: the graph that holds its projections applies and reports them
        if parts is None:
            rows.append(_fail(site, rule, policy, rule.method, why))
            continue
        plan, prow = _plan_projection(site, rule, policy, parts, module_of, orphans, on_new)
        rows.append(prow)
        if plan is None:
            continue
        plans.append(plan)
        claimed.update(id(s) for s, _ in parts)
        rows.extend(_claimed_rows(plan))
    for struct, owner in attached:
        for parts in _groups(struct, owner, [s for s in sites if s.kind == "linear" and id(s) not in claimed]):
            row = _row(owner if owner is not None else struct.site_fqn, struct.method, None, parts)
            row.status = "installed"
            _account(row, struct, parts)
            row.notes.append("factors attached earlier (lrcompile.rewrite or an earlier compile)")
            plan = AttnPlan(None, struct.method, row, parts, struct, AttnFeed(struct, parts))
            plans.append(plan)
            claimed.update(id(s) for s, _ in parts)
            rows.append(row)
            rows.extend(_claimed_rows(plan))
    return plans, rows


def attached_bases(root: Optional[nn.Module], orphans: dict) -> list[tuple[AttnFactors, Optional[str]]]:
    """Every AttnFactors on the model, with the path (in this frame) of the module it is attached to."""
    found = []
    if root is not None:
        for path, m in root.named_modules():
            if isinstance(m, AttnFactors):
                found.append((m, path.rpartition(".")[0]))
    return found + [(m, None) for m in orphans.values() if isinstance(m, AttnFactors)]


def _source(proj_fqn: str, rows: tuple[int, int], site_fqn: str, owned: bool) -> tuple[str, tuple, bool]:
    """A projection's entry in AttnFactors.sources: relative to the attention module when it lies under it."""
    if owned and (not site_fqn or proj_fqn.startswith(site_fqn + ".")):
        return proj_fqn[len(site_fqn) + 1 if site_fqn else 0 :], rows, True
    return proj_fqn, rows, False


def _groups(struct: AttnFactors, owner: Optional[str], linear: list[Site]):
    """The sets of this graph's linear sites that are `struct`'s recorded projections, one per call."""
    if not struct.sources:
        return
    by_fqn: dict = {}
    for s in linear:
        by_fqn.setdefault(s.fqn, []).append(s)

    base = owner if owner is not None else struct.site_fqn
    names = [(".".join(p for p in (base, path) if p) if rel else path, ab) for path, ab, rel in struct.sources]
    for s0 in by_fqn.get(names[0][0], []):
        parts = []
        for fqn, (a, b) in names:
            cand = [s for s in by_fqn.get(fqn, []) if s.input_node is s0.input_node and s.out_features >= b]
            if not cand or cand[0].in_features != struct.in_features:
                break
            parts.append((cand[0], (a, b)))
        else:
            yield parts


def _row(fqn: str, method: str, where: Optional[str], parts: list[Part]) -> SiteRow:
    in_f = parts[0][0].in_features
    names = ", ".join(
        f"{r}={s.fqn}" + ("" if ab == (0, s.out_features) else f"[{ab[0]}:{ab[1]}]")
        for r, (s, ab) in zip(ROLES[method], parts)
    )
    weights = sum(b - a for _, (a, b) in parts) * in_f
    bias = sum(b - a for s, (a, b) in parts if s.bias is not None)
    row = SiteRow(
        fqn=fqn,
        kind="attention",
        method=method,
        status="rewritten",
        rule=where,
        in_features=in_f,
        out_features=sum(b - a for _, (a, b) in parts),
        params_before=weights + bias,
        params_after=weights + bias,
        flops_before=2 * weights,
        flops_after=2 * weights,
        notes=[f"projections: {names}"],
    )
    return row


def _account(row: SiteRow, struct: AttnFactors, parts: list[Part]) -> None:
    """The row's after-columns for a projection that runs `struct` (the sites' biases stay)."""
    row.rank = struct.rank
    row.params_after = struct.factor_params() + sum(b - a for s, (a, b) in parts if s.bias is not None)
    row.flops_after = struct.factor_flops()
    if isinstance(struct, StackedStructure):
        row.notes.append(f"structure: {struct.family.name} {_options(struct.cfg)}")


def _options(cfg) -> str:
    """The config's shape options: rank and blocks, and whatever else differs from the family's defaults."""
    return ", ".join(
        f"{f.name}={getattr(cfg, f.name)}"
        for f in dataclasses.fields(cfg)
        if f.name in ("rank", "blocks") or getattr(cfg, f.name) != f.default
    )


def _wanted(cfg, in_f: int, out: int) -> tuple:
    """The factors a rule asks for over the stacked in → out projection: ("rank", r) or (family name, config).
    Raises ValueError when the family cannot take the shape (e.g. BLAST blocks that do not divide)."""
    if cfg.rank is not None:
        return ("rank", resolve_rank(cfg.rank, in_f, out))
    family, fcfg = cfg.family()
    return (family.name, fcfg.resolve(in_f, out) if hasattr(fcfg, "resolve") else fcfg)


def _make(method: str, spec: tuple, weight: torch.Tensor, sizes: list[int]) -> AttnFactors:
    if spec[0] == "rank":
        return SharedBasis.from_stacked(method, weight, sizes, spec[1])
    return StackedStructure.from_stacked(method, weight, sizes, FAMILIES[spec[0]], spec[1])


def _plan_projection(site, rule, policy, parts, module_of, orphans, on_new):
    cfg, method, where = rule.config, rule.method, policy.where(rule)
    in_f = parts[0][0].in_features
    sizes = [b - a for _, (a, b) in parts]
    out = sum(sizes)
    row = _row(site.fqn, method, where, parts)
    if cfg.rank is None and getattr(cfg, "structure", None) is None:  # dense fused_qkv: the sites' own weights
        why = fused_pass.refuse(parts, low_rank=False)
        if why is not None:
            row.status, row.reason = "dense", why
            return None, row
        return AttnPlan(site, method, row, parts), row
    try:
        spec = _wanted(cfg, in_f, out)
    except ValueError as e:
        return None, _fail(site, rule, policy, method, str(e))
    min_features = rule.min_features if rule.min_features is not None else policy.defaults.min_features
    if min(in_f, out) < min_features:
        row.status, row.reason = "skipped", f"min(in, out) = {min(in_f, out)} < min_features {min_features}"
        return None, row
    module = module_of(site)
    name = CHILD[method]
    prev = getattr(module, name, None) if module is not None else orphans.get((site.fqn, method))
    if isinstance(prev, AttnFactors) and prev.sizes == sizes and prev.in_features == in_f:
        struct = prev  # made by this session, a recompile, or lrcompile.rewrite; other factors: used as they are
        if prev.spec() != spec:
            row.status = "installed"
            row.notes.append(
                f"factors attached earlier ({_describe_spec(prev.spec())}; the rule asks "
                f"{_describe_spec(spec)}): used as they are"
            )
        else:
            row.notes.append("factors reused")
    else:
        if on_new is not None:
            on_new(f"{site.fqn}.{name}")
        struct = _make(method, spec, stacked_weight(parts), sizes)
        struct.site_fqn = site.fqn
        struct.sources = [_source(s.fqn, ab, site.fqn, module is not None) for s, ab in parts]
        if module is not None:
            struct.train(module.training)
            module.add_module(name, struct)
        else:
            orphans[(site.fqn, method)] = struct
            row.notes.append("module not found: factors are not registered on the model")
    with torch.no_grad():
        w = stacked_weight(parts).double()
        err = float(torch.linalg.norm(w - struct.to_dense().double()) / torch.linalg.norm(w).clamp_min(1e-30))
    limit = rule.max_error if rule.max_error is not None else policy.defaults.max_error
    row.rel_error = err
    _account(row, struct, parts)
    if row.params_after >= row.params_before:
        row.notes.append("saves nothing at this rank (at or above break-even)")
    if limit is not None and err > limit:
        msg = f"{site.fqn}: relative error {err:.3g} > max_error {limit}; kept dense"
        if policy.defaults.strict:
            raise SiteError(f"{where}: {msg}")
        warnings.warn(f"lrcompile: {msg}", stacklevel=2)
        row.status, row.reason = "skipped", f"rel_error {err:.3g} > max_error {limit}"
        row.params_after, row.flops_after = row.params_before, row.flops_before
        return None, row
    feed = AttnFeed(struct, parts, module, name if module is not None else None)
    return AttnPlan(site, method, row, parts, struct, feed), row


def _describe_spec(spec: tuple) -> str:
    return f"rank {spec[1]}" if spec[0] == "rank" else f"{spec[0]} {_options(spec[1])}"


def _shares(total: int, sizes: list[int]) -> list[int]:
    """`total` split over parts in proportion to their rows, the remainder to the first (sums exactly)."""
    out = sum(sizes)
    shares = [total * n // out for n in sizes]
    shares[0] += total - sum(shares)
    return shares


def _claimed_rows(plan: AttnPlan) -> list[SiteRow]:
    """Linear rows of the projections a plan takes over; the factors' parameters and FLOPs are split among them
    by rows so that the report's linear totals stay exact."""
    rows = {}
    sizes = [b - a for _, (a, b) in plan.parts]
    params = _shares(plan.struct.factor_params(), sizes) if plan.struct is not None else None
    flops = _shares(plan.struct.factor_flops(), sizes) if plan.struct is not None else None
    for i, (s, (a, b)) in enumerate(plan.parts):
        r = rows.get(id(s))
        if r is None:
            fl = 2 * s.in_features * s.out_features
            r = rows[id(s)] = SiteRow(
                fqn=s.fqn,
                kind="linear",
                method=plan.method,
                status="rewritten",
                in_features=s.in_features,
                out_features=s.out_features,
                params_before=s.params,
                params_after=s.params,
                flops_before=fl,
                flops_after=fl,
                rank=plan.row.rank,
                reason=f"projection of attention site {plan.row.fqn or '<root>'} ({plan.method})",
            )
        if plan.struct is not None:
            r.params_after += params[i] - (b - a) * s.in_features
            r.flops_after += flops[i] - 2 * (b - a) * s.in_features
    return list(rows.values())


def claimed_ids(plans: list[AttnPlan]) -> set:
    return {id(s) for p in plans for s, _ in p.parts}
