"""Find Linear and attention sites in a Dynamo FX graph, each named by its module path.

A linear site is a call that applies a 2-D parameter W as y = x Wᵀ (+ b):
  linear(x, W, b)            nn.Linear / F.linear
  addmm(b, x, P)             HF GPT-2 Conv1D: P stored (in, out), W = Pᵀ
  matmul/mm(x, P)            a bare parameter as right operand, W = Pᵀ (or P itself when written P.t() / P.T)
Attention sites are scaled_dot_product_attention calls and hand-written softmax(Q Kᵀ) V chains.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from ..compat import LINEAR_OPS, SDPA_OPS, frame_locals, is_fake, placeholder_example, placeholder_source
from ..families import Structure, is_owned
from .names import eval_root, source_path, strip_root

LINEAR_TARGETS = set(LINEAR_OPS)
ADDMM_TARGETS = {torch.addmm, torch.ops.aten.addmm.default}
MATMUL_TARGETS = {torch.matmul, operator.matmul, torch.mm, torch.ops.aten.mm.default}
SDPA_TARGETS = set(SDPA_OPS)
TRANSPOSE_OPS = {
    torch.t,
    torch.Tensor.t,
    torch.ops.aten.t,
    torch.ops.aten.t.default,
    torch.ops.aten.numpy_T,
    torch.ops.aten.numpy_T.default,
}
SOFTMAX_TARGETS = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax}
# Ops that may sit between QKᵀ and softmax, or between softmax and the V matmul, in hand-written attention.
PASSTHROUGH = {
    operator.truediv,
    operator.mul,
    operator.add,
    torch.div,
    torch.mul,
    torch.add,
    torch.where,
    torch.nn.functional.dropout,
    torch.masked_fill,
    torch.Tensor.masked_fill,
}
PASSTHROUGH_METHODS = {
    "masked_fill",
    "to",
    "type",
    "type_as",
    "float",
    "div",
    "mul",
    "add",
    "__truediv__",
    "contiguous",
}


@dataclasses.dataclass
class Site:
    fqn: str
    kind: str  # "linear" | "attention"
    node: fx.Node
    form: str  # linear | addmm | matmul | sdpa | softmax
    module_expr: Optional[str] = None  # nn_module_stack path with Dynamo's root, e.g. "L['self'].encoder.fc"
    module_type: Optional[type] = None
    input_node: Optional[fx.Node] = None
    weight_node: Optional[fx.Node] = None  # the placeholder of the stored parameter
    bias_node: Optional[fx.Node] = None
    weight: Optional[torch.Tensor] = None  # the real parameter as stored
    bias: Optional[torch.Tensor] = None
    transposed: bool = False  # stored parameter is (in, out): W = weightᵀ
    weight_path: Optional[str] = None  # the parameter's own module path (differs from fqn when tied)
    installed: bool = False  # inside a module that lrcompile installed, or applies an lrcompile parameter
    # the graph uses the weight elsewhere too (an embedding lookup, another site): the dense weight stays live
    weight_shared: bool = False

    @property
    def dense_weight(self) -> torch.Tensor:
        """W as (out, in), a view of the stored parameter."""
        return self.weight.T if self.transposed else self.weight

    @property
    def in_features(self) -> int:
        return self.dense_weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.dense_weight.shape[0]

    @property
    def params(self) -> int:
        return self.weight.numel() + (self.bias.numel() if self.bias is not None else 0)


def innermost_module(node: fx.Node) -> tuple[Optional[str], Optional[type]]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None, None
    path, mtype = list(stack.values())[-1]
    return path, mtype


def installed_modules(gm: fx.GraphModule) -> dict[str, type]:
    """{module expression: class} of the lrcompile structures whose forward is in the graph (the outermost one
    in each node's module stack). A structured family (Monarch, BTT, BLAST) computes with batched block products,
    not a linear call a site is found by; the report still owes the user its row."""
    found: dict[str, type] = {}
    for node in gm.graph.nodes:
        for path, mtype in (node.meta.get("nn_module_stack") or {}).values():
            if isinstance(mtype, type) and issubclass(mtype, Structure):
                found.setdefault(path, mtype)
                break
    return found


def _placeholder_tensor(node, real: dict) -> Optional[torch.Tensor]:
    """The tensor a placeholder stands for: the backend's example input, unless that is a fake tensor and the
    grapharg still holds the real one (DDPOptimizer compiles its split subgraphs with fake inputs; a
    parameter's identity is what finds its attached factors)."""
    if node is None or not isinstance(node, fx.Node) or node.op != "placeholder":
        return None
    example = placeholder_example(node)
    t = real.get(node)
    if t is None or (is_fake(t) and isinstance(example, torch.Tensor) and not is_fake(example)):
        return example
    return t


def _owned_by_record(name: Optional[str]) -> bool:
    """The parameter is lrcompile's by its module (a structures.base.Owner listing it): FSDP2 hands Dynamo
    unsharded parameters without lrcompile's mark. The owner module is found from the parameter's source
    expression `name` against the frame being compiled."""
    if name is None:
        return False
    f_locals = frame_locals()
    if f_locals is None:
        return False
    owner_path, _, leaf = source_path(name).rpartition(".")
    root = eval_root(name, f_locals)
    try:
        owner = root.get_submodule(owner_path) if owner_path else root
    except (AttributeError, TypeError):
        return False
    return isinstance(owner, nn.Module) and is_owned(None, owner, leaf)


def _unwrap_transpose(node) -> tuple[Optional[fx.Node], bool]:
    """`P.t()` / `P.T` / `P.transpose(0, 1)` -> (P, True); a placeholder -> (P, False)."""
    if not isinstance(node, fx.Node):
        return None, False
    if node.op == "placeholder":
        return node, False
    if node.op == "call_method" and node.target == "t" and len(node.args) == 1:
        return node.args[0], True
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        return node.args[0], True
    if node.op == "call_function" and node.target in TRANSPOSE_OPS and len(node.args) == 1:
        return node.args[0], True  # torch 2.14 records `P.T` as aten.numpy_T
    if node.op == "call_method" and node.target == "transpose" and sorted(node.args[1:]) in ([0, 1], [-2, -1], [-1, 0]):
        return node.args[0], True
    return None, False


def _is_param(t) -> bool:
    return isinstance(t, nn.Parameter) and t.dim() == 2


def find_sites(gm: fx.GraphModule, example_inputs=None) -> list[Site]:
    """All linear and attention sites of a Dynamo graph, in graph order."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    real = {}
    if example_inputs is not None:
        real = {n: t for n, t in zip(placeholders, example_inputs) if isinstance(t, torch.Tensor)}
    sites: list[Site] = []
    for node in gm.graph.nodes:
        site = _linear_site(node, real) or _attention_site(node)
        if site is not None:
            sites.append(site)
    _disambiguate(sites)
    _mark_shared_weights(sites)
    return sites


def _mark_shared_weights(sites: list[Site]) -> None:
    """`weight_shared` for linear sites whose weight placeholder feeds anything but calls of this one site
    (a module called twice is one site; its transposes `P.t()` count as the call)."""
    calls: dict[str, set] = {}
    for s in sites:
        if s.kind == "linear":
            calls.setdefault(s.fqn, set()).add(s.node)
    for s in sites:
        if s.kind != "linear" or s.weight_node is None:
            continue
        mine = calls[s.fqn]
        for user in s.weight_node.users:
            if user in mine:
                continue
            if _unwrap_transpose(user)[0] is s.weight_node and all(u in mine for u in user.users):
                continue
            s.weight_shared = True
            break


def _arg(node, i, name):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name)


def _linear_site(node: fx.Node, real: dict) -> Optional[Site]:
    if node.op != "call_function":
        return None
    if node.target in LINEAR_TARGETS:
        x, w_node, b_node = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
        w_src, flip = _unwrap_transpose(w_node)
        transposed = flip
        form = "linear"
    elif node.target in ADDMM_TARGETS:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        b_node, x, w_node = _arg(node, 0, "input"), _arg(node, 1, "mat1"), _arg(node, 2, "mat2")
        w_src, flip = _unwrap_transpose(w_node)
        transposed = not flip
        form = "addmm"
    elif node.target in MATMUL_TARGETS:
        x, w_node, b_node = node.args[0], node.args[1], None
        w_src, flip = _unwrap_transpose(w_node)
        transposed = not flip
        form = "matmul"
    else:
        return None
    weight = _placeholder_tensor(w_src, real)
    if not _is_param(weight):
        return None
    bias = _placeholder_tensor(b_node, real) if isinstance(b_node, fx.Node) else None
    if isinstance(b_node, fx.Node) and (bias is None or bias.dim() != 1):
        return None  # bias computed in-graph: not a plain linear
    src = placeholder_source(w_src)
    wpath = source_path(src) if src is not None else w_src.name
    expr, mtype = innermost_module(node)
    fqn = strip_root(expr) if expr is not None else _strip_weight(wpath)
    installed = bool(mtype is not None and issubclass(mtype, Structure)) or is_owned(weight) or _owned_by_record(src)
    return Site(
        fqn=fqn,
        kind="linear",
        node=node,
        form=form,
        module_expr=expr,
        module_type=mtype,
        input_node=x,
        weight_node=w_src,
        bias_node=b_node if isinstance(b_node, fx.Node) else None,
        weight=weight,
        bias=bias,
        transposed=transposed,
        weight_path=wpath,
        installed=installed,
    )


def _strip_weight(path: str) -> str:
    return path[: -len(".weight")] if path.endswith(".weight") else path


def _disambiguate(sites: list[Site]) -> None:
    """Two different weights applied inside one module (functional calls) get `path.param` names."""
    by_fqn: dict[str, set] = {}
    linear = [s for s in sites if s.kind == "linear" and not s.installed]  # an installed module is one site
    for s in linear:
        by_fqn.setdefault(s.fqn, set()).add(id(s.weight))
    for s in linear:
        if len(by_fqn[s.fqn]) > 1:
            leaf = s.weight_path.rsplit(".", 1)[-1]
            s.fqn = f"{s.fqn}.{leaf}" if s.fqn else leaf


def _is_target(node, targets, methods=()) -> bool:
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return node.target in methods
    return False


def _is_matmul(node: fx.Node) -> bool:
    return _is_target(node, MATMUL_TARGETS | {torch.bmm}, ("matmul", "bmm", "__matmul__"))


def _through(node: fx.Node, up: bool, limit: int = 6) -> Optional[fx.Node]:
    """Walk through elementwise ops (scale, mask, dropout, casts) to the nearest matmul.

    Upward every tensor operand is followed, breadth first: in `where(mask, scores, fill)` or `mask + scores`
    the scores are not the first operand. Downward the chain must be single-user (the probabilities feed P·V
    only)."""
    level = [node]
    for _ in range(limit):
        nxt = []
        for n in level:
            if _is_matmul(n):
                return n
            if not _is_target(n, PASSTHROUGH, PASSTHROUGH_METHODS):
                continue
            if up:
                nxt.extend(a for a in n.all_input_nodes if a not in nxt)
            elif len(n.users) == 1:
                nxt.append(next(iter(n.users)))
        if not nxt:
            return None
        level = nxt
    return None


def _attention_site(node: fx.Node) -> Optional[Site]:
    if node.op == "call_function" and node.target in SDPA_TARGETS:
        form = "sdpa"
    elif _is_target(node, SOFTMAX_TARGETS, ("softmax",)):
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if src is None or _through(src, up=True) is None:
            return None
        if len(node.users) != 1 or _through(next(iter(node.users)), up=False) is None:
            return None
        form = "softmax"
    else:
        return None
    expr, mtype = innermost_module(node)
    fqn = strip_root(expr) if expr is not None else ""
    return Site(fqn=fqn, kind="attention", node=node, form=form, module_expr=expr, module_type=mtype)
