"""The backend's plan for one graph: decide each linear site, tune it, reuse or build its factors, keep them.

The same `decide` and `build` (lrcompile.plan) serve `lrcompile.rewrite`; what differs here is where factors go
(attached beside the user's module, which stays as it is) and that factors already on the model are reused.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
import weakref
from typing import Optional

from ..capture.names import strip_root
from ..capture.resolve import module_at, prefixed_name, site_module
from ..capture.sites import Site, installed_modules
from ..families import FAMILIES, Structure
from ..lifecycle.distributed import check_new_factors
from ..runtime import attach as store
from ..runtime import fresh
from ..runtime.session import Session
from .build import TIE_NOTE, Decision, build, decide, rel_error, site_row, tie_broken
from .report import SiteRow


def plan_graph(sites: list[Site], session: Session, root, f_locals, tune: bool = True):
    """Decide every site of this graph; returns [(site, structure, implementation)] to rewrite and their feeds by
    structure id."""
    from tqdm.auto import tqdm

    policy = session.policy
    chosen, feeds = [], {}
    bar = tqdm(sites, desc="lrcompile", unit="site", disable=not sys.stderr.isatty() or not sites, leave=False)
    for site in bar:
        bar.set_postfix_str(site.fqn, refresh=False)
        decision = decide(site, policy, session.ranks)
        if decision.status == "installed":
            report_installed(site, session, root, f_locals)
            continue
        module = site_module(site, root, f_locals) if root is not None else None
        prev = store.attached(module, site.weight) if module is not None else session.orphan(site.weight)
        replaced = prev is not None and _superseded(site, prev, decision, session, module)
        if replaced:
            prev = None
        tuned = _tune(site, decision, policy, prev, tune)
        if tuned is not None and tuned.dense:  # `guard: dense` and the original layer is faster: no factors made
            _, row = build(site, dataclasses.replace(decision, status="skipped", reason=tuned.why), policy)
            tuned.annotate(row)
            session.report.add(row)
            continue
        if prev is not None:
            row = reused_row(site, prev, decision, session)
            struct = prev
        else:
            if decision.rewrites:
                check_new_factors(site.fqn, root)
            struct, row = build(site, decision, policy, stats_for(session, site))
            if replaced:
                row.notes.append("replaces the factors an earlier compile made under another policy")
            if struct is not None:
                struct.to(device=site.weight.device)
                keep_factors(site, struct, module, session, row)
                if store.freezes_others(struct) and root is not None and not session.frozen:
                    _freeze_once(root, session)
                if struct.compressing and tie_broken(site, root):
                    row.notes.append(TIE_NOTE)
        if tuned is not None and struct is not None:
            tuned.annotate(row)
        session.report.add(row)
        if struct is not None:
            chosen.append((site, struct, tuned.fn if tuned is not None else type(struct).functional))
            if id(struct) not in feeds:
                feeds[id(struct)] = store.Feed(
                    struct, site.weight, site.transposed, stats_for(session, site), owner=module
                )
    bar.close()
    return chosen, feeds


def _freeze_once(model, session: Session) -> None:
    """The backend path follows `rewrite`'s rule: adapters make the model PEFT-style, frozen but for them."""
    from ..families import is_owned

    session.frozen = True
    store.freeze_for_adapters(model, {id(p): p for p in model.parameters() if not is_owned(p)})


def _superseded(site: Site, prev: Structure, decision: Decision, session: Session, module) -> bool:
    """A new policy takes effect: factors that an earlier backend compile attached under another policy, which
    this policy would not make, are removed (a `dense` rule runs the dense weight again; another family or rank
    gets new factors). Factors that `rewrite` or `load` installed are the user's and are never replaced."""
    policy = session.policy
    if (
        policy is None
        or module is None
        or getattr(prev, "_lrc_origin", None) != "backend"
        or prev.policy_digest == policy.digest
    ):
        return False
    if decision.rewrites and store.same_config(prev, FAMILIES[decision.method], decision.config):
        return False
    if fresh.is_recorded(prev) and fresh.stamp(prev.tensors()) != prev._lrc_factors:
        warnings.warn(
            f"lrcompile: {site.fqn}: trained {prev.name} factors of an earlier compile are dropped: this "
            "policy asks for something else (save them first with lrcompile.save)",
            stacklevel=4,
        )
    store.detach(module, site.weight)
    return True


def _tune(site: Site, decision: Decision, policy, prev: Optional[Structure], enabled: bool):
    """The autotuner's choice for a site (lrcompile.tune). The original dense layer is a choice only before factors
    exist (attached factors may be trained or loaded: the truth), and then under `guard: dense`, or by default
    where the rewrite is exact (full rank: dense is the same function, no larger); `guard: off` forces it."""
    cls = FAMILIES.get(decision.method)
    if not decision.rewrites or (prev is not None and not store.same_config(prev, cls, decision.config)):
        return None
    from ..tune import tune_site

    guard = decision.rule.guard if decision.rule.guard is not None else policy.defaults.guard
    why = None
    if prev is None and cls.compressing:
        if guard == "dense":
            why = "guard: dense"
        elif guard is None and cls.exact(site.in_features, site.out_features, decision.config):
            why = "the rewrite is exact and saves nothing here"
    return tune_site(site, decision, dense_why=why, enabled=enabled)


def stats_for(session: Session, site: Site):
    return session.calibration.get(site.fqn) if session.calibration is not None else None


def reused_row(site: Site, prev: Structure, decision: Decision, session: Session) -> SiteRow:
    """Factors found on the model: made by this session earlier (another graph, a recompile), or installed by
    `rewrite`/`load`/an earlier compile. They are used as they are: installed parameters are never re-sited."""
    same = decision.rewrites and store.same_config(prev, FAMILIES[decision.method], decision.config)
    if same and (site.kind, site.fqn) in session.report.rows:
        return session.report.rows[(site.kind, site.fqn)]
    status = "rewritten" if same else "installed"
    row = site_row(
        site,
        prev,
        status,
        rel_error=rel_error(prev, site.dense_weight) if prev.compressing else None,
        rule=session.policy.where(decision.rule) if same else None,
    )
    row.notes.append("factors reused" if same else "factors attached earlier (rewrite, load or a previous compile)")
    return row


def keep_factors(site: Site, struct: Structure, module, session: Session, row: SiteRow) -> None:
    row.notes.append("dense weight stays alive on the module (backend path; lrcompile.rewrite releases it)")
    if session.policy is not None:
        struct.policy_digest = session.policy.digest  # lrcompile.save writes it into plan.json
    struct._lrc_origin = "backend"  # a later compile under another policy may replace these (_superseded)
    if module is not None:
        store.attach(module, site.weight, struct, site.transposed)
    else:
        session.loose[id(site.weight)] = (weakref.ref(site.weight), struct)
        row.notes.append("module not found: factors are not registered on the model")


def report_installed(site: Site, session: Session, root, f_locals, module=None) -> None:
    if module is None:
        module = site_module(site, root, f_locals) if root is not None else None
    if isinstance(module, Structure):  # else an lrcompile parameter used functionally: its owner module reports it
        session.report.add(installed_row(site.fqn, module))


def report_structures(gm, session: Session, root, f_locals, prefix: str) -> None:
    """Rows for the installed structures of this graph that no linear site stood for (capture.installed_modules)."""
    if root is None:
        return
    for expr in installed_modules(gm):
        fqn = prefixed_name(strip_root(expr), prefix)
        module = module_at(expr, root, f_locals) if ("linear", fqn) not in session.report.rows else None
        if isinstance(module, Structure):
            session.report.add(installed_row(fqn, module))


def installed_row(fqn: str, module: Structure) -> SiteRow:
    return SiteRow(
        fqn=fqn,
        kind="linear",
        method=module.name,
        status="installed",
        in_features=module.in_features,
        out_features=module.out_features,
        rank=getattr(module.cfg, "rank", None),
        params_after=module.params(),
        params_before=module.in_features * module.out_features
        + (module.bias.numel() if module.bias is not None else 0),
        flops_before=2 * module.in_features * module.out_features,
        flops_after=module.flops_per_token(module.in_features, module.out_features, module.cfg),
        reason="installed by lrcompile.rewrite/load",
    )
