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
import warnings
import weakref
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from . import attach as store
from . import attention
from . import compat
from .compat import frame_locals
from .distributed import check_new_factors
from .options import Options
from .passes.rewrite import rewrite_graph
from .plan import TIE_NOTE, Decision, build, decide, rel_error, site_row, tie_broken
from .policy import KEEP, Policy, load_policy
from .report import Report, SiteRow
from .dynamo_names import strip_root
from .resolve import root_module, site_module
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
    dynamo_gm = gm  # Dynamo's own graph, never changed: what another instance runs when it cannot share ours
    sites = find_sites(gm, example_inputs)
    f_locals = frame_locals()
    root = root_module(sites, f_locals)  # this frame's module; `model`: the compiled model it lies in
    model, prefix = _enclosing(root)
    rel = {id(s): _relative(s) for s in sites}  # this frame's own names, for other instances of the graph
    if prefix:
        sites = [_prefixed(s, prefix) for s in sites]
        rel = dict(zip(map(id, sites), rel.values()))
    session = _session(model, options, opts)
    _plan_budget(session, model)
    # attention rules first: the projections they claim are no linear rule's sites (lrcompile.attention)
    plans, rows = attention.plan_attention(
        sites, session.policy, lambda s: (site_module(s, root, f_locals) if s.module_expr else root) if root is not None else None,
        session.orphans, on_new=lambda what: check_new_factors(what, model),
        attached=attention.attached_bases(model, session.orphans))
    claimed = attention.claimed_ids(plans)
    linear = [s for s in sites if s.kind == "linear" and id(s) not in claimed]
    chosen, feeds = _plan_graph(linear, session, model, f_locals, tune=opts.tune)
    by_struct = {id(struct): (site, rel[id(site)]) for site, struct, _ in chosen}
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
    fed = {id(site) for site, _ in by_struct.values()}
    dense_sites = {s.fqn: (s, rel[id(s)]) for s in linear if id(s) not in fed}
    others = _Instances(session, model, root, prefix, dynamo_gm, example_inputs, feeds, by_struct,
                        list(dense_sites.values()), options, opts) if feeds else None
    if not opts.inductor:
        return _Runner(gm, feeds, others)
    inputs = list(example_inputs) + _fakes(example_inputs, feeds)
    # torch.compile(mode=...) means Inductor's mode options, as it does with backend="inductor"
    compiled = compat.compile_fx(gm, inputs, mode)
    # compile_fx's callable is called unboxed, whatever its `_boxed_call` says (aot_module_simplified's forward)
    return _Runner(compiled, feeds, others)


def _plan_budget(session: Session, model: Optional[nn.Module]) -> None:
    """The policy budget's ranks, planned once per session over the whole compiled model."""
    if session.policy is not None and session.policy.budget and session.ranks is None and model is not None:
        from .budget import plan_model

        session.ranks = plan_model(session.policy, model, session.calibration)


def _path_in(model: nn.Module, module: nn.Module) -> Optional[str]:
    return next((n for n, m in model.named_modules(remove_duplicate=False) if m is module), None)


_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def _enclosing(root: Optional[nn.Module]) -> tuple[Optional[nn.Module], str]:
    """(model, prefix): the model being compiled that `root` (the module of the frame Dynamo compiles now) lies
    in, and root's path in it with a trailing dot. Dynamo compiles a submodule's forward as a frame of its own
    when it cannot trace through the caller (a graph break inside a loop over blocks skips the caller's frame):
    such sites are named from the compiled model (`blocks.0.a`, not `a`) and share its session and report. The
    compiled model is the outermost `torch.compile`d module (`torch.compile(module)` or `module.compile()`) on the
    Python stack that contains `root`; none: root itself."""
    if root is None:
        return None, ""
    found, f = None, sys._getframe(1)
    while f is not None:
        code = f.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            cand = compat.compiled_original(f.f_locals.get("self"))
            while isinstance(cand, _WRAPPERS):  # names are the user's model's, not `module.…`
                cand = cand.module
            if isinstance(cand, nn.Module) and (cand is root or any(m is root for m in cand.modules())):
                found = cand
        f = f.f_back
    if found is None or found is root:
        return root, ""
    return found, _path_in(found, root) + "."


def _relative(site: Site) -> tuple:
    """(fqn, calling module's path, weight path), relative to the frame's module."""
    return site.fqn, strip_root(site.module_expr) if site.module_expr else "", site.weight_path


def _prefixed(site: Site, prefix: str) -> Site:
    return dataclasses.replace(site, fqn=prefix + site.fqn if site.fqn else prefix[:-1],
                               weight_path=prefix + site.weight_path if site.weight_path else None)


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


def _report_installed(site: Site, session: Session, root, f_locals, module=None) -> None:
    if module is None:
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
    mode = compat.fake_mode_of(example_inputs)
    out = []
    for f in feeds:
        for t in f.struct.tensors():
            out.append(compat.to_fake(mode, t) if mode is not None else t)
    return out


class _Runner:
    """Calls the compiled graph with the current factors appended to Dynamo's arguments: those of the module
    instance the call runs for (see _Instances)."""

    def __init__(self, fn, feeds: list, others: Optional["_Instances"] = None):
        self.fn = fn
        self.feeds = feeds
        self.others = others

    def __call__(self, *args):
        feeds = self.feeds
        if self.others is not None and not self.others.matches(args):
            feeds = self.others.feeds_for(args)
            if feeds is None:  # this instance cannot share the rewritten graph: Dynamo's own, dense
                return self.others.gm(*args)
        factors = [t for f in feeds for t in f.tensors()]
        if self.others is not None and any(getattr(f, "failed", False) for f in feeds):
            return self.others.gm(*args)  # stale factors that could not be recomputed: the dense weights' function
        return self.fn(*args, *factors)


def _index(example_inputs, t) -> Optional[int]:
    return next((i for i, x in enumerate(example_inputs) if x is t), None) if t is not None else None


class _Instances:
    """Other instances of the frame's module class running this compiled graph.

    When a module's forward is compiled as a frame of its own (a graph break inside a loop over blocks, or
    each block compiled by itself), Dynamo runs that one graph for every instance of the class: parameters are
    graph inputs, so blocks.1 calls the graph made for blocks.0 with its own weights. The factors fed with
    them must be blocks.1's too. On the first call with other parameters they are found (attached earlier) or
    made, when the policy gives the site the graph's family and config; otherwise that instance runs Dynamo's
    graph as it is (dense, uncompiled) with one warning. Either way its sites are reported under its names."""

    def __init__(self, session, model, root, prefix, gm, example_inputs, feeds, by_struct, dense_sites, options,
                 opts):
        self.session, self.prefix, self.gm, self.options, self.opts = session, prefix, gm, options, opts
        self.model = weakref.ref(model) if model is not None else None
        self.root_type = type(root) if root is not None else None
        # real parameters only: DDPOptimizer's split graphs get fake ones, which no call passes again
        self.params = [i for i, t in enumerate(example_inputs)
                       if isinstance(t, nn.Parameter) and not compat.is_fake(t)]
        self.seen = [weakref.ref(example_inputs[i]) for i in self.params]  # weak: the runner outlives models
        self.feeds = feeds
        self.slots = []  # per feed: (weight index, bias index, site, relative names); None: not rebindable
        for f in feeds:
            site, rel = by_struct.get(id(f.struct), (None, None))
            wi = _index(example_inputs, getattr(f, "weight", None))
            ok = site is not None and wi is not None and rel[2] is not None
            self.slots.append((wi, _index(example_inputs, site.bias), site, rel) if ok else None)
        self.dense_sites = dense_sites  # sites this graph runs dense: (site, relative names)
        self.variants: dict = {}  # ids of the parameters -> (their weakrefs, feeds or None: run dense)

    def matches(self, args) -> bool:
        return all(args[i] is r() for i, r in zip(self.params, self.seen))

    def feeds_for(self, args) -> Optional[list]:
        key = tuple(id(args[i]) for i in self.params)
        got = self.variants.get(key)
        if got is not None and all(r() is args[i] for r, i in zip(got[0], self.params)):
            return got[1]
        with torch.inference_mode(False):  # factors made during an inference-mode call must be trainable later
            feeds = self._bind(args)
        self.variants[key] = ([weakref.ref(args[i]) for i in self.params], feeds)
        return feeds

    def _instance(self, args) -> Optional[nn.Module]:
        """The module this call runs for: on the stack, of the frame module's class, holding these weights."""
        def holds(obj) -> bool:
            try:
                return all(s is None or obj.get_parameter(s[3][2]) is args[s[0]] for s in self.slots)
            except AttributeError:
                return False

        f = sys._getframe(2)
        while f is not None and self.root_type is not None:
            for obj in f.f_locals.values():
                if type(obj) is self.root_type and holds(obj):
                    return obj
            f = f.f_back
        return None

    def _where(self, inst) -> tuple[Session, Optional[nn.Module], str]:
        model = self.model() if self.model is not None else None
        path = _path_in(model, inst) if model is not None else None
        if path is not None:
            return self.session, model, path + "." if path else ""
        model, prefix = _enclosing(inst)  # another compiled model (each block compiled by itself)
        session = _session(model, self.options, self.opts)
        _plan_budget(session, model)
        return session, model, prefix

    def _bind(self, args) -> Optional[list]:
        shared = f"'{self.prefix[:-1]}'" if self.prefix else f"a {self.root_type.__name__ if self.root_type else 'graph'}"
        inst = self._instance(args)
        if inst is None:
            return self._dense(None, [], f"the graph compiled for {shared} runs for other weights, whose module "
                                         "was not found")
        session, model, prefix = self._where(inst)
        policy = session.policy
        plan, why = [], None
        for f, slot in zip(self.feeds, self.slots):
            if slot is None:
                why = why or "attention factors are not shared between instances"
                continue
            wi, bi, site, rel = slot
            s2, module = self._site(site, rel, prefix, inst, args[wi], args[bi] if bi is not None else None)
            cls, cfg = type(f.struct), f.struct.cfg
            prev = store.attached(module, s2.weight)
            if prev is not None:
                if type(prev) is not cls or prev.cfg != cfg:
                    why = why or f"{s2.fqn} has {prev.name} factors attached that differ from the graph's"
                plan.append((f, s2, module, prev, None))
                continue
            d = decide(s2, policy, session.ranks)
            if not (d.rewrites and FAMILIES.get(d.method) is cls and d.config == cfg):
                asked = f"{d.method} {d.config}" if d.rewrites else f"{d.status} ({d.reason})"
                why = why or f"the policy gives {s2.fqn} {asked}, the graph runs {cls.name} {cfg}"
            plan.append((f, s2, module, None, d))
        if why is not None:
            return self._dense(session, [p[1] for p in plan], why, shared)
        feeds = []
        for f, s2, module, prev, d in plan:
            if prev is not None:
                row, struct = _reused_row(s2, prev, d or decide(s2, policy, session.ranks), session), prev
            else:
                check_new_factors(s2.fqn, model)
                struct, row = build(s2, d, policy, _stats_for(session, s2))
                if struct is None:  # failed or over max_error: the rows say why; the whole graph runs dense
                    session.report.add(row)
                    return self._dense(session, [p[1] for p in plan if p[1] is not s2],
                                       f"{s2.fqn} could not be rewritten ({row.reason})", shared)
                struct.to(device=s2.weight.device)
                _keep(s2, struct, module, session, row)
                if struct.compressing and tie_broken(s2, model):
                    row.notes.append(TIE_NOTE)
            row.notes.append(f"runs the graph compiled for {shared}")
            session.report.add(row)
            feeds.append(store.Feed(struct, s2.weight, s2.transposed, _stats_for(session, s2)))
        self._report_dense_sites(session, inst, prefix)
        self._write(session)
        return feeds

    def _site(self, site: Site, rel: tuple, prefix: str, inst: nn.Module, weight, bias) -> tuple[Site, nn.Module]:
        fqn, module_path, weight_path = rel
        s2 = dataclasses.replace(site, fqn=prefix + fqn if fqn else prefix[:-1], weight=weight, bias=bias,
                                 weight_path=prefix + weight_path if weight_path else None)
        return s2, inst.get_submodule(module_path) if module_path else inst

    def _report_dense_sites(self, session: Session, inst: nn.Module, prefix: str) -> None:
        """Sites the graph runs dense: reported as the policy decides for this instance; one the policy would
        rewrite here cannot be (the graph is fixed), and says so."""
        for site, rel in self.dense_sites:
            try:
                s2, module = self._site(site, rel, prefix, inst, inst.get_parameter(rel[2]) if rel[2] else None, None)
            except AttributeError:
                continue
            if s2.weight is None:
                continue
            d = decide(s2, session.policy, session.ranks)
            if d.status == "installed":
                _report_installed(s2, session, None, None, module=module)
                continue
            if d.rewrites:
                seen = self.session.report.rows.get((site.kind, site.fqn))
                if seen is not None and seen.method == d.method and seen.status == "skipped":
                    # kept dense for the compiled instance by what holds here too (the tuner's dense choice)
                    row = dataclasses.replace(seen, fqn=s2.fqn, notes=[*seen.notes, f"as for {site.fqn}"])
                    session.report.add(row)
                    continue
                d = dataclasses.replace(d, status="failed", reason="its instance shares a compiled graph that keeps "
                                                                    "this site dense; compile the whole model to rewrite it")
                warnings.warn(f"lrcompile: {s2.fqn}: {d.reason}", stacklevel=3)
            session.report.add(build(s2, d, session.policy)[1])

    def _dense(self, session: Optional[Session], sites: list, why: str, shared: str = "") -> None:
        warnings.warn(f"lrcompile: {why}; that instance runs Dynamo's graph as it is (dense, uncompiled)",
                      stacklevel=4)
        if session is not None:
            for s2 in sites:
                if (s2.kind, s2.fqn) not in session.report.rows or session.report.rows[(s2.kind, s2.fqn)].status != "failed":
                    row = build(s2, Decision(s2.fqn, None, KEEP, "failed", reason=f"runs dense: {why}"), session.policy)[1]
                    row.notes.append(f"would run the graph compiled for {shared}")
                    session.report.add(row)
            self._write(session)
        return None

    def _write(self, session: Session) -> None:
        if self.opts.report:
            session.report.write(self.opts.report)

