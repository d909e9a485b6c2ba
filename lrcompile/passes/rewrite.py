"""FX pass: replace each chosen site's call by its family's `functional`, factors entering as new graph inputs.

Dynamo's own graph is never mutated (it reads its placeholders' metadata after the backend returns): the pass
copies the graph and rewrites the copy.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from ..compat import copy_dynamo_metadata, mark_new_input
from ..families import Structure


def _copy(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict]:
    graph = fx.Graph()
    val_map: dict = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    new = fx.GraphModule(gm, graph)
    new.meta = dict(getattr(gm, "meta", {}))
    copy_dynamo_metadata(gm, new, val_map)
    return new, val_map


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name).strip("_") or "root"


def add_bias_after_gemm(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y + bias as a pointwise op that Inductor fuses into the consumer's kernel (GELU, residual add, the QKV
    split copy) instead of a GEMM with beta=1, which first copies the broadcast bias into the whole output.
    The view keeps Inductor's mm+add -> addmm pattern (post_grad) from folding it back on 2-D inputs. The bias
    takes y's dtype, as F.linear's does under autocast (an fp32 bias would promote a bf16 output to fp32)."""
    return (y.unsqueeze(0) + bias.to(y.dtype)).squeeze(0)


def rewrite_graph(
    gm: fx.GraphModule, chosen: list[tuple], bias_epilogue: bool = False
) -> tuple[fx.GraphModule, list[Structure]]:
    """`chosen`: (site, structure) or (site, structure, fn), fn an implementation of the family's `functional`
    (the autotuner's choice). With `bias_epilogue` (Inductor on CPU), a site's bias is added after its GEMMs
    (`add_bias_after_gemm`). Returns the rewritten copy and the structures whose tensors the new trailing inputs
    expect, in order."""
    new, val_map = _copy(gm)
    graph = new.graph
    last_ph = [n for n in graph.nodes if n.op == "placeholder"][-1]
    inputs: dict[int, list[fx.Node]] = {}
    order: list[Structure] = []
    for site, struct, *impl in chosen:
        if id(struct) not in inputs:  # a module called twice is one set of factors
            phs = []
            with graph.inserting_after(last_ph):
                for tname in reversed(struct.tensor_names):
                    ph = graph.placeholder(f"lrc_{_safe(site.fqn)}_{tname}")
                    mark_new_input(ph)
                    phs.insert(0, ph)
            last_ph = phs[-1]
            inputs[id(struct)] = phs
            order.append(struct)
        node = val_map[site.node]
        x = val_map[site.input_node]
        bias = val_map[site.bias_node] if site.bias_node is not None else None
        with graph.inserting_before(node):
            weight = None
            if not struct.compressing:  # adapters read the dense weight as (out, in)
                weight = val_map[site.weight_node]
                if site.transposed:
                    weight = graph.call_method("t", (weight,))
            fn = impl[0] if impl else type(struct).functional
            split = bias_epilogue and bias is not None
            repl = graph.call_function(fn, (x, weight, None if split else bias, *inputs[id(struct)]))
            if split:
                repl = graph.call_function(add_bias_after_gemm, (repl, bias))
        repl.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
        node.replace_all_uses_with(repl)
        graph.erase_node(node)
        val_map[site.node] = repl  # later sites may take this one's output as input
    graph.eliminate_dead_code()
    graph.lint()
    new.recompile()
    return new, order
