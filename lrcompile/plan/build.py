"""Decide what happens at each site: the matching rule, its resolved options, and the report row.

`decide` is pure (no factorisation); `build` makes the family module from the dense weight and measures its
error; both the backend and the eager `rewrite` go through them, so the two paths cannot disagree.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Optional

import torch

from ..capture.sites import Site
from ..errors import SiteError, first_line
from ..factorize import cache as factor_cache
from ..families import FAMILIES, Structure
from ..families.base import dense_flops, site_label, site_scope
from ..policy.rules import KEEP, Policy, Rule
from .report import SiteRow


@dataclasses.dataclass
class Decision:
    site_fqn: str
    rule: Optional[Rule]
    method: str
    status: str  # what the report says if nothing fails later
    config: object = None  # resolved family config (rank an int), when the site is to be rewritten
    reason: Optional[str] = None
    notes: list = dataclasses.field(default_factory=list)
    allocated_rank: Optional[int] = None  # the size (the family's `budget_knob`) a policy budget gave this site

    @property
    def rewrites(self) -> bool:
        return self.status == "rewritten"


def _row(site: Site, method: str, status: str, **kw) -> SiteRow:
    if site.kind != "linear":
        return SiteRow(fqn=site.fqn, kind=site.kind, method=method, status=status, **kw)
    fl = dense_flops(site.in_features, site.out_features, tokens=1)
    return SiteRow(
        fqn=site.fqn,
        kind=site.kind,
        method=method,
        status=status,
        in_features=site.in_features,
        out_features=site.out_features,
        params_before=site.params,
        params_after=site.params,
        flops_before=fl,
        flops_after=fl,
        **kw,
    )


def decide(site: Site, policy: Optional[Policy], ranks: Optional[dict] = None) -> Decision:
    """`ranks`: the budget's allocation (lrcompile.budget.plan_ranks), FQN -> the family's knob value (rank) or
    None (stay dense)."""
    if site.installed:
        return Decision(
            site.fqn,
            None,
            site.module_type.name if _is_structure(site.module_type) else "installed",
            "installed",
            reason="installed by lrcompile",
        )
    rule = policy.match(site.fqn, site.kind) if policy is not None else None
    if rule is None:
        return Decision(site.fqn, None, KEEP, "dense", reason="no rule matches" if policy else "no policy")
    if rule.method == KEEP:
        return Decision(site.fqn, rule, KEEP, "dense", reason=f"{rule.label} keeps it dense")
    if site.kind != "linear":
        return Decision(
            site.fqn, rule, rule.method, "failed", reason=f"method {rule.method} does not apply to {site.kind}"
        )
    cls = FAMILIES[rule.method]
    min_features = rule.min_features if rule.min_features is not None else policy.defaults.min_features
    if cls.compressing and min(site.in_features, site.out_features) < min_features:
        return Decision(
            site.fqn,
            rule,
            rule.method,
            "skipped",
            reason=f"min(in, out) = {min(site.in_features, site.out_features)} < min_features {min_features}",
        )
    cfg, allocated = rule.config, None
    planned = ranks is not None and site.fqn in ranks
    knob = cls.budget_knob
    if knob is not None and (planned or getattr(cfg, knob) is None):
        if not planned:
            return Decision(
                site.fqn, rule, rule.method, "skipped", reason=f"no {knob}: the budget planned none for this site"
            )
        if ranks[site.fqn] is None:  # unprofitable: "skipped", not a rule's "dense"
            return Decision(
                site.fqn,
                rule,
                rule.method,
                "skipped",
                reason=f"the budget keeps it dense ({rule.method} saves too little)",
            )
        allocated = int(ranks[site.fqn])
        cfg = cls.with_size(cfg, allocated)
    try:  # a shape the family cannot take (e.g. BLAST blocks that do not divide) keeps the site dense
        cfg = cfg.resolve(site.in_features, site.out_features) if hasattr(cfg, "resolve") else cfg
    except ValueError as e:
        if policy.defaults.strict:
            raise SiteError(
                f"{policy.where(rule)}: {site.fqn or '<root>'}: {rule.method} cannot take {site.in_features}→"
                f"{site.out_features} ({e})"
            ) from None
        return Decision(site.fqn, rule, rule.method, "failed", reason=str(e))
    d = Decision(site.fqn, rule, rule.method, "rewritten", config=cfg, allocated_rank=allocated)
    if cls.compressing and cls.param_count(site.in_features, site.out_features, cfg) >= site.weight.numel():
        d.notes.append("saves nothing at this rank (at or above break-even)")
    return d


def _is_structure(t) -> bool:
    return isinstance(t, type) and issubclass(t, Structure)


def rel_error(struct: Structure, weight: torch.Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F in float64 (for adapters: the branch's size relative to W)."""
    with torch.no_grad():
        w = weight.detach().double()
        approx = struct.to_dense().double() if struct.compressing else (struct.to_dense().double())
        return float(torch.linalg.norm(w - approx) / torch.linalg.norm(w).clamp_min(1e-30))


# What `from_dense` leaves on a structure for the report; kept in the factor cache beside the tensors.
FACTOR_STATS = ("kept_energy", "init_used", "svd_algorithm", "energy_total")


SITE_MARK = "<site>"  # stands for the site's label in the warnings an entry keeps (a hit may be another site)


def from_dense_cached(cls, weight: torch.Tensor, cfg, stats, use_cache: bool) -> tuple[Structure, bool]:
    """`cls.from_dense`, through the on-disk factor cache for deterministic (compressing, non-random) families.
    The warnings `from_dense` gives (an activation-aware init without statistics falling back to plain svd) are
    kept with the entry and given again on a hit: warm and cold compiles say the same."""
    cacheable = use_cache and cls.compressing and getattr(cfg, "init", None) != "random"
    if cacheable:
        k = factor_cache.key(weight, cls.name, cfg, factor_cache.stats_digest(stats))
        hit = factor_cache.lookup(k)
        struct = cls(weight.shape[1], weight.shape[0], cfg, dtype=weight.dtype, device=weight.device) if hit else None
        if hit is not None and not _fits(struct, cls, hit.tensors):
            warnings.warn(
                f"lrcompile: factor cache entry {k} does not fit {cls.name} {tuple(weight.shape)} "
                "(other tensors or shapes); computing the factors instead",
                stacklevel=3,
            )
            factor_cache.evict(k)
            hit = None
        if hit is not None:
            with torch.no_grad():
                for n in cls.tensor_names:
                    getattr(struct, n).copy_(hit.tensors[n])
            for n in FACTOR_STATS:
                if n in hit.meta:
                    setattr(struct, n, hit.meta[n])
            if "warnings" in hit.meta:
                label = site_label(stats, f"this {weight.shape[0]}x{weight.shape[1]} weight")
                for msg in hit.meta["warnings"]:
                    warnings.warn(str(msg).replace(SITE_MARK, label), stacklevel=3)
            else:  # an entry from before warnings were kept
                _warn_fallback(cls, struct, cfg, weight)
            return struct, True
    if not cacheable:
        return cls.from_dense(weight, None, cfg, stats), False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        struct = cls.from_dense(weight, None, cfg, stats)
    for w in caught:  # given now as they would have been (the user's filters apply), and kept for later hits
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    label = site_label(stats, "")
    said = [
        str(w.message).replace(label, SITE_MARK) if label else str(w.message)
        for w in caught
        if issubclass(w.category, UserWarning)
    ]
    meta = {n: getattr(struct, n) for n in FACTOR_STATS if getattr(struct, n, None) is not None}
    factor_cache.store(k, {n: getattr(struct, n) for n in cls.tensor_names}, {**meta, "warnings": said})
    return struct, False


def _fits(struct: Structure, cls, tensors: dict) -> bool:
    """The entry holds exactly the family's tensors, each of the shape the structure has."""
    if set(tensors) != set(cls.tensor_names):
        return False
    return all(tuple(tensors[n].shape) == tuple(getattr(struct, n).shape) for n in cls.tensor_names)


def _warn_fallback(cls, struct: Structure, cfg, weight: torch.Tensor) -> None:
    """An entry without kept warnings: say the activation-aware fallback again (the entry records the init
    used; one without it is judged by the missing stats)."""
    init = getattr(cfg, "init", None)
    used = getattr(struct, "init_used", None)
    if used is None and init in getattr(cfg, "ACTIVATION_AWARE", ()):
        used = "svd"  # only stats-less entries can lack it: with statistics the key differs and from_dense ran
        struct.init_used = used
    if used is not None and used != init:
        where = site_label(None, f"this {weight.shape[0]}x{weight.shape[1]} weight")
        warnings.warn(
            f"lrcompile: {where}: {cls.name} init {init!r} has no calibration statistics; using plain "
            f"{used} (factors from cache)",
            stacklevel=4,
        )


TIE_NOTE = "tied weight: this site now has its own factors (tie broken)"


def tie_broken(site: Site, root=None) -> bool:
    """The site's weight is reachable outside the site's module (an embedding reused by the head): factors made
    for the site are its own, the partner keeps the dense weight. `root`: also look for aliases on the model."""

    def outside(path: str) -> bool:
        return bool(site.fqn) and path != site.fqn and not path.startswith(site.fqn + ".")

    if site.weight_path and outside(site.weight_path):
        return True
    return root is not None and any(
        p is site.weight and outside(n) for n, p in root.named_parameters(remove_duplicate=False)
    )


def _take_residual(site: Site, struct: Structure) -> None:
    """Adapter inits that move part of W into the branch (PiSSA; NOBLE `init: scratch`) hand the new base weight
    over once through `residual_weight()`; it replaces the stored weight's values in place (same Parameter)."""
    take = getattr(struct, "residual_weight", None)
    res = take() if take is not None else None
    if res is None:
        return
    wpath = site.weight_path or site.fqn
    if wpath != site.fqn and not wpath.startswith(site.fqn + "."):
        raise ValueError(f"init {struct.cfg.init} replaces the base weight, which is tied to '{wpath}'; untie it first")
    with torch.no_grad():
        site.dense_weight.copy_(res)


def build(
    site: Site, decision: Decision, policy: Policy, stats=None, use_cache: bool = True
) -> tuple[Optional[Structure], SiteRow]:
    """Factorise one site. A failure or an error over `max_error` keeps it dense (raises under `strict`)."""
    if not decision.rewrites:
        row = _row(
            site,
            decision.method,
            decision.status,
            reason=decision.reason,
            rule=policy.where(decision.rule) if decision.rule and policy else None,
        )
        return None, row
    cls = FAMILIES[decision.method]
    where = policy.where(decision.rule)
    t0 = time.perf_counter()
    try:
        with site_scope(site.fqn):  # the families' warnings name the site (the backend path too)
            struct, cached = from_dense_cached(cls, site.dense_weight, decision.config, stats, use_cache)
        _take_residual(site, struct)
        err = rel_error(struct, site.dense_weight)
    except Exception as e:  # any failure leaves the site dense, loudly
        msg = f"{site.fqn}: {decision.method} failed ({first_line(e)}); kept dense"
        if policy.defaults.strict:
            raise SiteError(f"{where}: {msg}") from e
        warnings.warn(f"lrcompile: {msg}", stacklevel=2)
        return None, _row(site, decision.method, "failed", reason=first_line(e), rule=where)
    seconds = time.perf_counter() - t0
    limit = decision.rule.max_error if decision.rule.max_error is not None else policy.defaults.max_error
    if cls.compressing and limit is not None and err > limit:
        msg = f"{site.fqn}: relative error {err:.3g} > max_error {limit}; kept dense"
        if policy.defaults.strict:
            raise SiteError(f"{where}: {msg}")
        warnings.warn(f"lrcompile: {msg}", stacklevel=2)
        return None, _row(
            site,
            decision.method,
            "skipped",
            rel_error=err,
            reason=f"rel_error {err:.3g} > max_error {limit}",
            rule=where,
        )
    notes = list(decision.notes) + (["factors from cache"] if cached else [])
    from ..factorize.whiten import site_quality

    return struct, site_row(
        site,
        struct,
        "rewritten",
        rel_error=err,
        rule=where,
        notes=notes,
        seconds=seconds,
        allocated_rank=decision.allocated_rank,
        svd=getattr(struct, "svd_algorithm", None),
        **site_quality(struct, site.dense_weight, stats, notes, rel_err=err),
    )


def site_row(site: Site, struct: Structure, status: str, **kw) -> SiteRow:
    """Report row for a site that runs `struct` (built now, reused, or installed earlier)."""
    bias = site.bias.numel() if site.bias is not None else 0
    after = struct.param_count(struct.in_features, struct.out_features, struct.cfg) + bias
    if not struct.compressing:
        after += site.weight.numel()
    row = _row(site, struct.name, status, rank=getattr(struct.cfg, struct.budget_knob or "rank", None), **kw)
    row.params_after = after
    row.flops_after = struct.flops_per_token(struct.in_features, struct.out_features, struct.cfg) + (
        0 if struct.compressing else row.flops_before
    )
    return row
