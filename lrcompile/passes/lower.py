"""FX pass: each fusion group (fuse.py) becomes one call of its family's kernel op.

  out = torch.ops.lrcompile.<op>(x, [tensors], [operands], "step,step,...", alpha, out_dtype)
followed by the group's own views (the op returns (..., out) in x's leading shape; views that keep the last dim
only regroup rows, and every epilogue step is elementwise, so replaying them on the result is exact). The call is
inserted just before the group's last node, after every operand it reads.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .fuse import Group, find_groups


def lower(gm: fx.GraphModule, groups: list[Group]) -> fx.GraphModule:
    from ..kernels import KERNEL_OF, op_of

    graph = gm.graph
    done: dict = {}  # a lowered group's last node -> its replacement (another group's operand or input)
    for g in groups:
        new = lambda n: done.get(n, n)  # noqa: E731
        op_of(g.family)  # its module imported: the op is registered
        op = getattr(torch.ops.lrcompile, KERNEL_OF[g.family]).default
        last = g.last
        out_dtype = last.meta["val"].dtype
        compute = g.tensors[0].meta["val"].dtype
        with graph.inserting_before(last):
            node = graph.call_function(
                op,
                (
                    new(g.x),
                    [new(t) for t in g.tensors],
                    [new(o) for o, _ in g.operands],
                    ",".join(g.steps),
                    float(g.alpha),
                    None if out_dtype == compute else out_dtype,
                ),
            )
            node.meta = {
                k: v for k, v in g.site.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")
            }
            for v in g.views:
                node = (
                    graph.call_method(v.target, (node, *v.args[1:]), dict(v.kwargs))
                    if v.op == "call_method"
                    else graph.call_function(v.target, (node, *v.args[1:]), dict(v.kwargs))
                )
        last.replace_all_uses_with(node)
        done[last] = node
        for n in reversed(g.members):
            graph.erase_node(n)
    graph.lint()
    gm.recompile()
    return gm


def fuse(gm: fx.GraphModule, inputs) -> tuple[fx.GraphModule, list[Group]]:
    """Partition and lower in one go; `inputs` are the graph's example inputs (real or fake)."""
    groups = find_groups(gm, inputs)
    return (lower(gm, groups) if groups else gm), groups
