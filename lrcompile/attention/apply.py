"""Applying attention plans: to a copy of Dynamo's graph (the backend), or eagerly as factors attached to the
model before any optimizer, DDP or FSDP exists (`lrcompile.rewrite`)."""

from __future__ import annotations

import functools

import torch
import torch.fx as fx
from torch import nn

from ..compat import discard_compiled, frame_locals, mark_new_input
from ..passes import fused_qkv as fused_pass
from ..passes import shared_kv as shared_pass
from ..passes.rewrite import _copy, _safe
from ..passes.sdpa import rewrite_sdpa
from ..plan.report import SiteRow
from .plan import AttnPlan, plan_attention


def rewrite_attention(gm: fx.GraphModule, plans: list[AttnPlan]) -> tuple[fx.GraphModule, dict, list]:
    """Apply the plans to a copy of `gm`. Returns (copy, map from gm's nodes to the copy's, feeds in the order of
    the new trailing graph inputs). sdpa rows are updated with what the matcher did."""
    new, vm = _copy(gm)
    graph = new.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    feeds, replaced = [], {}
    for plan in plans:
        if plan.method == "sdpa":
            continue
        project = None
        if plan.struct is not None:
            inputs = []
            for tname in plan.struct.tensor_names:
                with graph.inserting_after(last):
                    last = graph.placeholder(f"lrc_{_safe(plan.row.fqn)}_{plan.method}_{tname}")
                mark_new_input(last)
                inputs.append(last)
            project = functools.partial(plan.struct.project, inputs=inputs)
            feeds.append(plan.feed)
        fn = fused_pass.rewrite_fused_qkv if plan.method == "fused_qkv" else shared_pass.rewrite_shared_kv
        replaced.update(fn(new, vm, plan.parts, project))
    sdpa = {vm[p.site.node]: i for i, p in enumerate(plans) if p.method == "sdpa"}
    if sdpa:
        for i, (status, reason) in rewrite_sdpa(new, sdpa, replaced).items():
            plans[i].row.status, plans[i].row.reason = status, reason
    for old, n in list(vm.items()):  # later passes read original nodes through vm: follow the replacements
        while n in replaced:
            n = replaced[n]
        vm[old] = n
    graph.eliminate_dead_code()
    graph.lint()
    new.recompile()
    return new, vm, feeds


def install_attention(model: nn.Module, policy, example_inputs) -> tuple[list[SiteRow], set]:
    """Make and attach the factors of the policy's attention rules before any optimizer, DDP or FSDP exists.
    The dense weights that a low-rank rewrite fully replaces are frozen (the compiled graph no longer reads
    them, and DDP would otherwise wait for their gradients). Returns the report rows and the claimed linear
    site FQNs (no linear rule may rewrite those)."""
    from ..capture.resolve import root_module, site_module
    from ..capture.sites import find_sites
    from ..capture.trace import call_model

    rows: list[SiteRow] = []
    claimed: set = set()
    orphans: dict = {}

    def record(gm, inputs, **_):
        sites = find_sites(gm, inputs)
        f_locals = frame_locals()
        root = root_module(sites, f_locals) or model
        plans, got = plan_attention(
            sites, policy, lambda s: site_module(s, root, f_locals) if s.module_expr else root, orphans
        )
        rows.extend(got)
        for p in plans:
            if p.method == "sdpa":  # a graph-level rewrite: nothing to install, it happens under compile
                p.row.notes.append("applied under torch.compile(backend='lrcompile')")
            claimed.update(s.fqn for s, _ in p.parts)
            if p.struct is None:
                continue
            for s, _ in p.parts:
                if sum(b - a for t, (a, b) in p.parts if t is s) == s.out_features:
                    s.weight.requires_grad_(False)
        return gm.forward

    try:
        with torch.no_grad():
            call_model(torch.compile(model, backend=record, dynamic=False), example_inputs)
    finally:
        discard_compiled(record)  # its frames hold the model: only they go, other compiled models keep theirs
    return rows, claimed
