"""The `lrcompile` Dynamo backend: (gm, example_inputs, options) -> callable. Orchestration only, no math.

capture (Dynamo) -> find sites -> decide per site (policy) -> build or reuse factors -> rewrite a copy of the
graph -> hand it to Inductor (or run it eagerly with `inductor: False`). Dynamo may call this once per graph
break; the report and the factors are shared across those calls through a session keyed by the user's model.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import sys
import weakref
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from . import attach as store
from . import attention
from .distributed import check_new_factors
from .options import Options
from .passes.rewrite import rewrite_graph
from .plan import TIE_NOTE, Decision, build, decide, rel_error, site_row, tie_broken
from .policy import Policy, load_policy
from .report import Report, SiteRow
from .resolve import frame_locals, root_module, site_module
from .sites import Site, find_sites
from .structures import FAMILIES, Structure


class Session:
    """State shared by every backend call made for one compiled model."""

    def __init__(self, policy: Optional[Policy], opts: Options, calibration):
        self.policy = policy
        self.report = Report()
        self.calibration = calibration  # held: its id is part of the session key
        self.orphans: dict = {}  # attention factors of sites whose module could not be found (lrcompile.attention)
        self.loose: dict = {}  # linear factors of such sites: id(weight) -> (weakref to the weight, structure)
        self.ranks: Optional[dict] = None  # the policy budget's allocation, planned once over the whole model

    def orphan(self, weight: torch.Tensor) -> Optional[Structure]:
        ref, struct = self.loose.get(id(weight), (None, None))
        return struct if ref is not None and ref() is weight else None  # an id can be reused after GC


_sessions: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
# Compiles whose root module was not found: keyed by the options dict the compile passes on every call (held by
# the session, so its id cannot be reused), a few at most.
_rootless: "collections.OrderedDict[tuple, Session]" = collections.OrderedDict()
ROOTLESS_KEEP = 8


def _policy(opts: Options) -> Optional[Policy]:
    policy = load_policy(opts.policy)
    if policy is not None and opts.strict is not None and policy.defaults.strict != opts.strict:
        # a copy: a Policy object passed in is the user's
        policy = dataclasses.replace(policy, defaults=dataclasses.replace(policy.defaults, strict=opts.strict))
    return policy


def _key(policy: Optional[Policy], opts: Options, calibration) -> tuple:
    """What makes two backend calls one session: the same policy (by digest), report, calibration and strictness
    — never `id(options)`, which a later dict can reuse once the first is collected."""
    calib = None if calibration is None else (
        os.path.abspath(str(opts.calibration)) if isinstance(opts.calibration, (str, os.PathLike)) else id(calibration))
    return (policy.digest if policy is not None else None,
            policy.defaults.strict if policy is not None else None,
            os.path.abspath(opts.report) if opts.report else None, calib)


def _session(root: Optional[nn.Module], options: Optional[dict], opts: Options) -> Session:
    policy = _policy(opts)
    calibration = _load_calibration(opts.calibration)
    key = _key(policy, opts, calibration)
    if root is None:
        key = (id(options), *key)
        if key not in _rootless:
            _rootless[key] = Session(policy, opts, calibration)
            _rootless[key].options = options  # held: its id is in the key
            while len(_rootless) > ROOTLESS_KEEP:
                _rootless.popitem(last=False)
        return _rootless[key]
    per_root = _sessions.setdefault(root, {})
    if key not in per_root:
        per_root[key] = Session(policy, opts, calibration)
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
    if session.policy is not None and session.policy.budget and session.ranks is None and root is not None:
        from .budget import plan_model

        session.ranks = plan_model(session.policy, root, session.calibration)
    # attention rules first: the projections they claim are no linear rule's sites (lrcompile.attention)
    plans, rows = attention.plan_attention(
        sites, session.policy, lambda s: (site_module(s, root, f_locals) if s.module_expr else root) if root is not None else None,
        session.orphans, on_new=lambda what: check_new_factors(what, root),
        attached=attention.attached_bases(root, session.orphans))
    claimed = attention.claimed_ids(plans)
    linear = [s for s in sites if s.kind == "linear" and id(s) not in claimed]
    chosen, feeds = _plan_graph(linear, session, root, f_locals, tune=opts.tune)
    attn_feeds = []
    if plans:
        gm, vm, attn_feeds = attention.rewrite_attention(gm, plans)
        chosen = [(_remap(site, vm), *rest) for site, *rest in chosen]
    for row in rows:
        session.report.add(row)
    order = []
    if chosen:
        # on CPU Inductor fuses a separate bias add into the consumer's kernel; fused Triton kernels take the
        # bias in their own epilogue (passes/fuse.py), and the eager runner has no consumer kernel to use
        cpu_inductor = opts.inductor and not opts.fuse_enabled() and all(s.weight.device.type == "cpu" for s, *_ in chosen)
        gm, order = rewrite_graph(gm, chosen, bias_epilogue=cpu_inductor)
    feeds = attn_feeds + [feeds[id(s)] for s in order]
    if order and opts.fuse_enabled():  # sites + prologue/epilogue -> one kernel op each (passes/fuse.py, lower.py)
        from .passes.lower import fuse

        gm, _ = fuse(gm, list(example_inputs) + _fakes(example_inputs, feeds))
    if opts.report:
        session.report.write(opts.report)
    if opts.verbose:
        print(session.report.table())
    if not opts.inductor:
        return _Runner(gm, feeds)
    from torch._inductor.compile_fx import compile_fx

    inputs = list(example_inputs) + _fakes(example_inputs, feeds)
    # torch.compile(mode=...) means Inductor's mode options, as it does with backend="inductor"
    patches = torch._inductor.list_mode_options(mode) if mode not in (None, "default") else None
    compiled = compile_fx(gm, inputs, config_patches=patches)
    # compile_fx's callable is called unboxed, whatever its `_boxed_call` says (aot_module_simplified's forward)
    return _Runner(compiled, feeds)


def _remap(site: Site, vm: dict) -> Site:
    """The site with its nodes in the attention pass's copy of the graph."""
    get = lambda n: vm[n] if n is not None else None  # noqa: E731
    return dataclasses.replace(site, node=vm[site.node], input_node=get(site.input_node),
                               weight_node=get(site.weight_node), bias_node=get(site.bias_node))


def _plan_graph(sites: list[Site], session: Session, root, f_locals, tune: bool = True):
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
            _report_installed(site, session, root, f_locals)
            continue
        module = site_module(site, root, f_locals) if root is not None else None
        prev = store.attached(module, site.weight) if module is not None else session.orphan(site.weight)
        tuned = _tune(site, decision, policy, prev, tune)
        if tuned is not None and tuned.dense:  # `guard: dense` and the original layer is faster: no factors made
            _, row = build(site, dataclasses.replace(decision, status="skipped", reason=tuned.why), policy)
            tuned.annotate(row)
            session.report.add(row)
            continue
        if prev is not None:
            row = _reused_row(site, prev, decision, session)
            struct = prev
        else:
            if decision.rewrites:
                check_new_factors(site.fqn, root)
            struct, row = build(site, decision, policy, _stats_for(session, site))
            if struct is not None:
                struct.to(device=site.weight.device)
                _keep(site, struct, module, session, row)
                if struct.compressing and tie_broken(site, root):
                    row.notes.append(TIE_NOTE)
        if tuned is not None and struct is not None:
            tuned.annotate(row)
        session.report.add(row)
        if struct is not None:
            chosen.append((site, struct, tuned.fn if tuned is not None else type(struct).functional))
            if id(struct) not in feeds:
                feeds[id(struct)] = store.Feed(struct, site.weight, site.transposed, _stats_for(session, site))
    bar.close()
    return chosen, feeds


def _tune(site: Site, decision: Decision, policy, prev: Optional[Structure], enabled: bool):
    """The autotuner's choice for a site (lrcompile.tune). The original dense layer is a choice only before factors
    exist (attached factors may be trained or loaded: the truth), and then under `guard: dense`, or by default
    where the rewrite is exact (full rank: dense is the same function, no larger); `guard: off` forces it."""
    cls = FAMILIES.get(decision.method)
    if not decision.rewrites or (prev is not None and not store.same_config(prev, cls, decision.config)):
        return None
    from .tune import tune_site

    guard = decision.rule.guard if decision.rule.guard is not None else policy.defaults.guard
    why = None
    if prev is None and cls.compressing:
        if guard == "dense":
            why = "guard: dense"
        elif guard is None and cls.exact(site.in_features, site.out_features, decision.config):
            why = "the rewrite is exact and saves nothing here"
    return tune_site(site, decision, dense_why=why, enabled=enabled)


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
    if session.policy is not None:
        struct.policy_digest = session.policy.digest  # lrcompile.save writes it into plan.json
    if module is not None:
        store.attach(module, site.weight, struct)
    else:
        session.loose[id(site.weight)] = (weakref.ref(site.weight), struct)
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
