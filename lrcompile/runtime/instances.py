"""Calling a compiled graph: the runner appends the current factors to Dynamo's arguments, for whichever
module instance the call runs for."""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from typing import Optional

import torch
from torch import nn

from .. import compat
from ..capture.resolve import caller_locals, enclosing_model, path_in
from ..capture.sites import Site
from ..families import FAMILIES
from ..lifecycle.distributed import check_new_factors
from ..plan.build import TIE_NOTE, Decision, build, decide, tie_broken
from ..plan.graph import keep_factors, report_installed, reused_row, stats_for
from ..policy.rules import KEEP
from . import attach as store
from .attach import arg_index
from .session import Session, plan_budget, session_for


class Runner:
    """Calls the compiled graph with the current factors appended to Dynamo's arguments: those of the module
    instance the call runs for (see Instances)."""

    def __init__(self, fn, feeds: list, others: Optional["Instances"] = None):
        self.fn = fn
        self.feeds = feeds
        self.others = others

    def __call__(self, *args):
        feeds = self.feeds
        if self.others is not None and not self.others.matches(args):
            feeds = self.others.feeds_for(args)
            if feeds is None:  # this instance cannot share the rewritten graph: Dynamo's own, dense
                return self.others.gm(*args)
        factors = [t for f in feeds for t in f.tensors(args)]
        if self.others is not None and any(getattr(f, "failed", False) for f in feeds):
            return self.others.gm(*args)  # stale factors that could not be recomputed: the dense weights' function
        return self.fn(*args, *factors)


class Instances:
    """Other instances of the frame's module class running this compiled graph.

    When a module's forward is compiled as a frame of its own (a graph break inside a loop over blocks, or
    each block compiled by itself), Dynamo runs that one graph for every instance of the class: parameters are
    graph inputs, so blocks.1 calls the graph made for blocks.0 with its own weights. The factors fed with
    them must be blocks.1's too. On the first call with other parameters they are found (attached earlier) or
    made, when the policy gives the site the graph's family and config; otherwise that instance runs Dynamo's
    graph as it is (dense, uncompiled) with one warning. Either way its sites are reported under its names."""

    def __init__(self, session, model, root, prefix, gm, example_inputs, feeds, by_struct, dense_sites, options, opts):
        self.session, self.prefix, self.gm, self.options, self.opts = session, prefix, gm, options, opts
        self.model = weakref.ref(model) if model is not None else None
        self.root_type = type(root) if root is not None else None
        # real parameters only: DDPOptimizer's split graphs get fake ones, which no call passes again
        self.params = [i for i, t in enumerate(example_inputs) if isinstance(t, nn.Parameter) and not compat.is_fake(t)]
        self.seen = [weakref.ref(example_inputs[i]) for i in self.params]  # weak: the runner outlives models
        # the frame module's own parameter names: a call for that same module whose parameters were replaced
        # (load_state_dict(assign=True)) is no other instance; its feeds read the new weights from the call
        self.root = weakref.ref(root) if root is not None else None
        names = {id(p): n for n, p in root.named_parameters(remove_duplicate=False)} if root is not None else {}
        self.param_paths = [names.get(id(example_inputs[i])) for i in self.params]
        self.feeds = feeds
        self.slots = []  # per feed: (weight index, bias index, site, relative names); None: not rebindable
        for f in feeds:
            site, rel = by_struct.get(id(f.struct), (None, None))
            wi = arg_index(example_inputs, getattr(f, "weight", None))
            ok = site is not None and wi is not None and rel[2] is not None
            self.slots.append((wi, arg_index(example_inputs, site.bias), site, rel) if ok else None)
        self.dense_sites = dense_sites  # sites this graph runs dense: (site, relative names)
        self.variants: dict = {}  # ids of the parameters -> (their weakrefs, feeds or None: run dense)

    def matches(self, args) -> bool:
        if all(args[i] is r() for i, r in zip(self.params, self.seen)):
            return True
        root = self.root() if self.root is not None else None
        if root is None or None in self.param_paths:
            return False
        try:
            same = all(root.get_parameter(n) is args[i] for i, n in zip(self.params, self.param_paths))
        except AttributeError:
            return False
        if same:
            self.seen = [weakref.ref(args[i]) for i in self.params]
        return same

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
        """The module this call runs for: of the frame module's class, holding these weights. Looked for in the
        compiled model first; only a module outside it (each block compiled by itself) is looked for among the
        callers' locals."""

        def holds(obj) -> bool:
            try:
                return all(s is None or obj.get_parameter(s[3][2]) is args[s[0]] for s in self.slots)
            except AttributeError:
                return False

        if self.root_type is None:
            return None
        model = self.model() if self.model is not None else None
        if model is not None:
            found = next((m for m in model.modules() if type(m) is self.root_type and holds(m)), None)
            if found is not None:
                return found
        return next((obj for obj in caller_locals(skip=3) if type(obj) is self.root_type and holds(obj)), None)

    def _where(self, inst) -> tuple[Session, Optional[nn.Module], str]:
        model = self.model() if self.model is not None else None
        path = path_in(model, inst) if model is not None else None
        if path is not None:
            return self.session, model, path + "." if path else ""
        model, prefix = enclosing_model(inst)  # another compiled model (each block compiled by itself)
        session = session_for(model, self.options, self.opts)
        plan_budget(session, model)
        return session, model, prefix

    def _bind(self, args) -> Optional[list]:
        shared = (
            f"'{self.prefix[:-1]}'" if self.prefix else f"a {self.root_type.__name__ if self.root_type else 'graph'}"
        )
        inst = self._instance(args)
        if inst is None:
            return self._dense(
                None, [], f"the graph compiled for {shared} runs for other weights, whose module was not found"
            )
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
        for _, s2, module, prev, d in plan:
            if prev is not None:
                row, struct = reused_row(s2, prev, d or decide(s2, policy, session.ranks), session), prev
            else:
                check_new_factors(s2.fqn, model)
                struct, row = build(s2, d, policy, stats_for(session, s2))
                if struct is None:  # failed or over max_error: the rows say why; the whole graph runs dense
                    session.report.add(row)
                    return self._dense(
                        session,
                        [p[1] for p in plan if p[1] is not s2],
                        f"{s2.fqn} could not be rewritten ({row.reason})",
                        shared,
                    )
                struct.to(device=s2.weight.device)
                keep_factors(s2, struct, module, session, row)
                if struct.compressing and tie_broken(s2, model):
                    row.notes.append(TIE_NOTE)
            row.notes.append(f"runs the graph compiled for {shared}")
            session.report.add(row)
            feeds.append(store.Feed(struct, s2.weight, s2.transposed, stats_for(session, s2), owner=module).bind(args))
        self._report_dense_sites(session, inst, prefix)
        self._write(session)
        return feeds

    def _site(self, site: Site, rel: tuple, prefix: str, inst: nn.Module, weight, bias) -> tuple[Site, nn.Module]:
        fqn, module_path, weight_path = rel
        s2 = dataclasses.replace(
            site,
            fqn=prefix + fqn if fqn else prefix[:-1],
            weight=weight,
            bias=bias,
            weight_path=prefix + weight_path if weight_path else None,
        )
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
                report_installed(s2, session, None, None, module=module)
                continue
            if d.rewrites:
                seen = self.session.report.rows.get((site.kind, site.fqn))
                if seen is not None and seen.method == d.method and seen.status == "skipped":
                    # kept dense for the compiled instance by what holds here too (the tuner's dense choice)
                    row = dataclasses.replace(seen, fqn=s2.fqn, notes=[*seen.notes, f"as for {site.fqn}"])
                    session.report.add(row)
                    continue
                d = dataclasses.replace(
                    d,
                    status="failed",
                    reason="its instance shares a compiled graph that keeps "
                    "this site dense; compile the whole model to rewrite it",
                )
                warnings.warn(f"lrcompile: {s2.fqn}: {d.reason}", stacklevel=3)
            session.report.add(build(s2, d, session.policy)[1])

    def _dense(self, session: Optional[Session], sites: list, why: str, shared: str = "") -> None:
        warnings.warn(f"lrcompile: {why}; that instance runs Dynamo's graph as it is (dense, uncompiled)", stacklevel=4)
        if session is not None:
            for s2 in sites:
                if (s2.kind, s2.fqn) not in session.report.rows or session.report.rows[
                    (s2.kind, s2.fqn)
                ].status != "failed":
                    row = build(
                        s2, Decision(s2.fqn, None, KEEP, "failed", reason=f"runs dense: {why}"), session.policy
                    )[1]
                    row.notes.append(f"would run the graph compiled for {shared}")
                    session.report.add(row)
            self._write(session)
        return None

    def _write(self, session: Session) -> None:
        if self.opts.report:
            session.report.write(self.opts.report)
