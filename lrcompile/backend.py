"""The `lrcompile` Dynamo backend: (gm, example_inputs, options) -> callable. Orchestration only, no math.

capture (Dynamo) -> find sites -> decide per site (policy) -> build or reuse factors -> rewrite a copy of the
graph -> hand it to Inductor (or run it eagerly with `inductor: False`). Dynamo may call this once per graph
break; the report and the factors are shared across those calls through a session keyed by the user's model.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from . import attach as store
from .options import Options
from .passes.rewrite import rewrite_graph
from .plan import Decision, build, decide, rel_error, site_row
from .policy import Policy, load_policy
from .report import Report, SiteRow
from .resolve import frame_locals, root_module, site_module
from .sites import Site, find_sites
from .structures import FAMILIES, Structure


class Session:
    """State shared by every backend call made for one compiled model."""

    def __init__(self, opts: Options):
        self.policy: Optional[Policy] = load_policy(opts.policy)
        if self.policy is not None and opts.strict is not None:
            self.policy.defaults.strict = opts.strict
        self.report = Report()
        self.calibration = _load_calibration(opts.calibration)
        self.orphans: dict = {}  # factors of sites whose module could not be found, keyed by weight identity


_sessions: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _session(root: Optional[nn.Module], options: Optional[dict], opts: Options) -> Session:
    key = id(options) if options is not None else None
    if root is None:
        return Session(opts)
    per_root = _sessions.setdefault(root, {})
    if key not in per_root:
        per_root[key] = Session(opts)
    return per_root[key]


def _load_calibration(calibration):
    if calibration is None:
        return None
    from .calibrate import CalibrationStats

    return calibration if isinstance(calibration, CalibrationStats) else CalibrationStats.load(calibration)


def lrcompile_backend(gm: fx.GraphModule, example_inputs, options: Optional[dict] = None, mode: Optional[str] = None):
    opts = Options.parse(options)
    sites = find_sites(gm, example_inputs)
    f_locals = frame_locals()
    root = root_module(sites, f_locals)
    session = _session(root, options, opts)
    chosen, feeds = _plan_graph(sites, session, root, f_locals)
    if chosen:
        gm, order = rewrite_graph(gm, chosen)
        feeds = [feeds[id(s)] for s in order]
    if opts.report:
        session.report.write(opts.report)
    if opts.verbose:
        print(session.report.table())
    if not opts.inductor:
        return _Runner(gm, feeds)
    from torch._inductor.compile_fx import compile_fx

    inputs = list(example_inputs) + _fakes(example_inputs, feeds)
    compiled = compile_fx(gm, inputs)
    # compile_fx's callable is called unboxed, whatever its `_boxed_call` says (aot_module_simplified's forward)
    return _Runner(compiled, feeds)


def _plan_graph(sites: list[Site], session: Session, root, f_locals):
    """Decide every site of this graph; returns [(site, structure)] to rewrite and their feeds by structure id."""
    policy = session.policy
    chosen, feeds = [], {}
    for site in sites:
        if site.kind != "linear":
            session.report.add(SiteRow(fqn=site.fqn, kind=site.kind, method="dense", status="dense",
                                       reason=f"{site.form} attention (attention rewrites not enabled)"))
            continue
        decision = decide(site, policy)
        if decision.status == "installed":
            _report_installed(site, session, root, f_locals)
            continue
        module = site_module(site, root, f_locals) if root is not None else None
        prev = store.attached(module, site.weight) if module is not None else session.orphans.get(id(site.weight))
        if prev is not None:
            row = _reused_row(site, prev, decision, session)
            struct = prev
        else:
            struct, row = build(site, decision, policy, _stats_for(session, site))
            if struct is not None:
                struct.to(device=site.weight.device)
                _keep(site, struct, module, session, row)
        session.report.add(row)
        if struct is not None:
            chosen.append((site, struct))
            if id(struct) not in feeds:
                feeds[id(struct)] = store.Feed(struct, site.weight, site.transposed, _stats_for(session, site))
    return chosen, feeds


def _stats_for(session: Session, site: Site):
    return session.calibration.get(site.fqn) if session.calibration is not None else None


def _reused_row(site: Site, prev: Structure, decision: Decision, session: Session) -> SiteRow:
    """Factors found on the model: made by this session earlier (another graph, a recompile), or installed by
    `rewrite`/`load`/an earlier compile. They are used as they are: installed parameters are never re-sited."""
    same = decision.rewrites and store.same_config(prev, FAMILIES[decision.method], decision.config)
    if same and (site.kind, site.fqn) in session.report.rows:
        return session.report.rows[(site.kind, site.fqn)]
    status = "rewritten" if same else "installed"
    row = site_row(site, prev, status, rel_error=rel_error(prev, site.dense_weight) if prev.compressing else None,
                   rule=session.policy.where(decision.rule) if same else None)
    row.notes.append("factors reused" if same else "factors attached earlier (rewrite, load or a previous compile)")
    return row


def _keep(site: Site, struct: Structure, module, session: Session, row: SiteRow) -> None:
    row.notes.append("dense weight stays alive on the module (backend path; lrcompile.rewrite releases it)")
    if module is not None:
        store.attach(module, site.weight, struct)
    else:
        session.orphans[id(site.weight)] = struct
        row.notes.append("module not found: factors are not registered on the model")


def _report_installed(site: Site, session: Session, root, f_locals) -> None:
    module = site_module(site, root, f_locals) if root is not None else None
    if not isinstance(module, Structure):
        return  # an lrcompile parameter used functionally: its owner module reports it
    row = SiteRow(fqn=site.fqn, kind="linear", method=module.name, status="installed",
                  in_features=module.in_features, out_features=module.out_features,
                  rank=getattr(module.cfg, "rank", None), params_after=module.params(),
                  params_before=module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0),
                  flops_before=2 * module.in_features * module.out_features,
                  flops_after=module.flops_per_token(module.in_features, module.out_features, module.cfg),
                  reason="installed by lrcompile.rewrite/load")
    session.report.add(row)


def _fakes(example_inputs, feeds) -> list:
    """Fake tensors for the factor inputs, made in the graph's own fake mode (static shapes)."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode(example_inputs)
    out = []
    for f in feeds:
        for t in f.struct.tensors():
            out.append(mode.from_tensor(t, static_shapes=True) if mode is not None else t)
    return out


class _Runner:
    """Calls the compiled graph with the current factors appended to Dynamo's arguments."""

    def __init__(self, fn, feeds: list):
        self.fn = fn
        self.feeds = feeds

    def __call__(self, *args):
        return self.fn(*args, *[t for f in self.feeds for t in f.tensors()])
