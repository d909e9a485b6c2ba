"""The `lrcompile` Dynamo backend: (gm, example_inputs, options) -> callable. Orchestration only.

capture (find sites, resolve their modules) -> session (policy, report, budget) -> plan attention, then linear
sites (decide, tune, build or reuse factors) -> rewrite a copy of the graph -> fuse -> Inductor (or eager with
`inductor: False`) -> a runner that feeds the current factors on every call.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx

from . import compat
from .attention import plan as attention
from .attention.apply import rewrite_attention
from .capture.resolve import enclosing_model, prefixed, relative_names, remapped, root_module, site_module
from .capture.sites import find_sites
from .compat import frame_locals
from .lifecycle.distributed import check_new_factors
from .options import Options
from .passes.rewrite import rewrite_graph
from .plan import coverage
from .plan.graph import plan_graph, report_structures
from .runtime.instances import Instances, Runner
from .runtime.session import plan_budget, session_for


def lrcompile_backend(gm: fx.GraphModule, example_inputs, options: Optional[dict] = None, mode: Optional[str] = None):
    opts = Options.parse(options)
    dynamo_gm = gm  # Dynamo's own graph, never changed: what another instance runs when it cannot share ours
    sites = find_sites(gm, example_inputs)
    f_locals = frame_locals()
    root = root_module(sites, f_locals)  # this frame's module; `model`: the compiled model it lies in
    model, prefix = enclosing_model(root)
    rel = {id(s): relative_names(s) for s in sites}  # this frame's own names, for other instances of the graph
    if prefix:
        sites = [prefixed(s, prefix) for s in sites]
        rel = dict(zip(map(id, sites), rel.values()))
    session = session_for(model, options, opts)
    plan_budget(session, model)
    for rule in coverage.unmatched_linear_rules(session.policy, model):
        coverage.warn_once(
            session,
            ("rule", rule.index),
            f"lrcompile: {session.policy.where(rule)} matches no module or parameter of the model",
        )
    for rule, path in coverage.rewrite_only_sites(session.policy, model):
        coverage.warn_once(
            session,
            ("rewrite-only", path),
            f"lrcompile: {session.policy.where(rule)}: {path}: MoE experts and nn.MultiheadAttention are sites of "
            "lrcompile.rewrite only (no linear of theirs reaches the backend); rewrite the model before compiling",
        )
    for row in coverage.unrecognised_attention(gm, sites, session.policy, prefix):
        session.report.add(row)
        coverage.warn_once(session, ("attention", row.fqn), f"lrcompile: {row.rule}: {row.fqn}: {row.reason}")
    # attention rules first: the projections they claim are no linear rule's sites (lrcompile.attention)
    plans, rows = attention.plan_attention(
        sites,
        session.policy,
        lambda s: (site_module(s, root, f_locals) if s.module_expr else root) if root is not None else None,
        session.orphans,
        on_new=lambda what: check_new_factors(what, model),
        attached=attention.attached_bases(model, session.orphans),
    )
    claimed = attention.claimed_ids(plans)
    linear = [s for s in sites if s.kind == "linear" and id(s) not in claimed]
    chosen, feeds = plan_graph(linear, session, model, f_locals, tune=opts.tune)
    report_structures(gm, session, root, f_locals, prefix)
    by_struct = {id(struct): (site, rel[id(site)]) for site, struct, _ in chosen}
    attn_feeds = []
    if plans:
        gm, vm, attn_feeds = rewrite_attention(gm, plans)
        chosen = [(remapped(site, vm), *rest) for site, *rest in chosen]
    for row in rows:
        session.report.add(row)
    order = []
    if chosen:
        # on CPU Inductor fuses a separate bias add into the consumer's kernel; fused Triton kernels take the
        # bias in their own epilogue (passes/fuse.py), and the eager runner has no consumer kernel to use
        cpu_inductor = (
            opts.inductor and not opts.fuse_enabled() and all(s.weight.device.type == "cpu" for s, *_ in chosen)
        )
        gm, order = rewrite_graph(gm, chosen, bias_epilogue=cpu_inductor)
    feeds = [f.bind(example_inputs) for f in attn_feeds + [feeds[id(s)] for s in order]]
    if order and opts.fuse_enabled():  # sites + prologue/epilogue -> one kernel op each (passes/fuse.py, lower.py)
        from .passes.lower import fuse

        gm, _ = fuse(gm, list(example_inputs) + _fakes(example_inputs, feeds))
    if opts.report:
        session.report.write(opts.report)
    if opts.verbose:
        print(session.report.table())
    fed = {id(site) for site, _ in by_struct.values()}
    dense_sites = {s.fqn: (s, rel[id(s)]) for s in linear if id(s) not in fed}
    others = (
        Instances(
            session,
            model,
            root,
            prefix,
            dynamo_gm,
            example_inputs,
            feeds,
            by_struct,
            list(dense_sites.values()),
            options,
            opts,
        )
        if feeds
        else None
    )
    if not opts.inductor:
        return Runner(gm, feeds, others)
    inputs = list(example_inputs) + _fakes(example_inputs, feeds)
    # torch.compile(mode=...) means Inductor's mode options, as it does with backend="inductor"
    compiled = compat.compile_fx(gm, inputs, mode)
    # compile_fx's callable is called unboxed, whatever its `_boxed_call` says (aot_module_simplified's forward)
    return Runner(compiled, feeds, others)


def _fakes(example_inputs, feeds) -> list:
    """Fake tensors for the factor inputs, made in the graph's own fake mode (static shapes)."""
    mode = compat.fake_mode_of(example_inputs)
    out = []
    for f in feeds:
        for t in f.struct.tensors():
            out.append(compat.to_fake(mode, t) if mode is not None else t)
    return out
