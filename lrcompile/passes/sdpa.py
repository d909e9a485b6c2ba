"""FX pass: hand-written softmax(Q Kᵀ · s + M) V  ->  F.scaled_dot_product_attention(Q, K, V, M, scale=s).

Built on Inductor's pattern matcher (CallFunction / CallMethod / KeywordArg / PatternMatcherPass) at the
Dynamo (torch-function) level, not the ATen level that `register_replacement` sees. The chain's variants are
enumerated as separate patterns (the matcher has no optional nodes):

  scores  matmul(Q, K.transpose(-2, -1))              (method or torch.transpose)
  scale   none | scores * c | c * scores | scores / c  (c a Python number)
  mask    none | + M | masked_fill(B, fill) | where(B, ·, fill)   (fill -inf or a large negative number)
  softmax torch.softmax / F.softmax / .softmax, over the last dim
  post    none | .to/.type(dtype) | dropout (eval or p = 0) | both
  out     matmul(P, V)

Every intermediate node must have one user (the default `_users=1`): a chain whose probabilities are also
returned (output_attentions) is left alone. The handler re-reads the matched chain and refuses what SDPA would
compute differently (training dropout, a non-last softmax dim, a small finite fill), recording why.
"""
from __future__ import annotations

import functools
import itertools
import math
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._inductor.pattern_matcher import (CallFunction, CallMethod, GraphPatternEntry, KeywordArg, Match,
                                            PatternMatcherPass)

MATMUL = [torch.matmul, operator.matmul]
SCALE = [operator.mul, torch.mul, operator.truediv, torch.div]
MUL = [operator.mul, torch.mul]
ADD = [operator.add, torch.add]
SOFTMAX = [torch.softmax, F.softmax, torch.nn.functional.softmax]
DROPOUT = [F.dropout, torch.dropout]
NEG_FILL = -1e4  # a finite fill at or below this acts as -inf after softmax (HF uses finfo.min)

# what the current `apply` call may rewrite, and what happened: set by rewrite_sdpa around the matcher run
_state: dict = {}


def _scores():
    yield CallFunction(MATMUL, KeywordArg("q"), CallMethod("transpose", KeywordArg("k"), KeywordArg("t0"), KeywordArg("t1")))
    yield CallFunction(MATMUL, KeywordArg("q"), CallFunction(torch.transpose, KeywordArg("k"), KeywordArg("t0"), KeywordArg("t1")))


def _scaled(x):
    yield x
    yield CallFunction(SCALE, x, KeywordArg("scale"))
    yield CallFunction(MUL, KeywordArg("scale"), x)


def _masked(x):
    yield x
    yield CallFunction(ADD, x, KeywordArg("mask"))
    yield CallMethod("masked_fill", x, KeywordArg("bmask"), KeywordArg("fill"))
    yield CallFunction([torch.masked_fill], x, KeywordArg("bmask"), KeywordArg("fill"))
    yield CallFunction(torch.where, KeywordArg("keep"), x, KeywordArg("fill"))


def _softmax(x):
    yield CallFunction(SOFTMAX, x, KeywordArg("dim"))
    yield CallFunction(SOFTMAX, x, dim=KeywordArg("dim"))
    yield CallMethod("softmax", x, KeywordArg("dim"))
    yield CallMethod("softmax", x, dim=KeywordArg("dim"))


def _cast(x):
    yield CallMethod(["to", "type"], x, KeywordArg("dtype"))


def _dropout(x):
    yield CallFunction(DROPOUT, x, p=KeywordArg("p"), training=KeywordArg("training"))
    yield CallFunction(DROPOUT, x, KeywordArg("p"), KeywordArg("training"), KeywordArg("inplace"))


def _post(x):
    yield x
    yield from _cast(x)
    for d in _dropout(x):
        yield d
        yield from _cast(d)
    for c in _cast(x):
        yield from _dropout(c)


def patterns():
    for s in _scores():
        for sc in _scaled(s):
            for m in _masked(sc):
                for sm in _softmax(m):
                    for p in _post(sm):
                        yield CallFunction(MATMUL, p, KeywordArg("v"))


@functools.lru_cache(maxsize=1)
def _pass() -> PatternMatcherPass:
    pm = PatternMatcherPass(pass_name="lrcompile_sdpa")
    for pat in patterns():
        GraphPatternEntry(pattern=pat, extra_check=lambda m: True, handler=_replace).register(pm)
    return pm


def _val(node):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _find(match: Match, pred) -> Optional[fx.Node]:
    return next((n for n in match.nodes if pred(n)), None)


def _is_softmax(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in SOFTMAX) or (n.op == "call_method" and n.target == "softmax")


def _interpret(match: Match) -> tuple[Optional[dict], Optional[str]]:
    """The SDPA call's arguments for a matched chain, or (None, why not)."""
    kw = match.kwargs
    ndim = getattr(_val(kw["q"]), "ndim", None)
    dims = {d % ndim for d in (kw["t0"], kw["t1"])} if ndim and isinstance(kw["t0"], int) and isinstance(kw["t1"], int) else None
    if ndim is None or ndim < 3 or dims != {ndim - 2, ndim - 1}:
        return None, "Kᵀ is not a transpose of the last two dims"
    if not isinstance(kw["dim"], int) or kw["dim"] % ndim != ndim - 1:
        return None, f"softmax over dim {kw['dim']}, not the last"
    if "p" in kw and kw["training"] is not False and kw["p"] != 0:
        return None, "dropout in training mode (SDPA would draw different masks)"
    scale = 1.0
    if "scale" in kw:
        c = kw["scale"]
        if isinstance(c, fx.Node) or isinstance(c, bool) or not isinstance(c, (int, float)):
            return None, "the scale is not a constant"
        op = _find(match, lambda n: n.op == "call_function" and n.target in SCALE and c in n.args)
        scale = 1.0 / c if op.target in (operator.truediv, torch.div) else float(c)
    args = {"scale": float(scale)}
    if "mask" in kw:
        if not isinstance(kw["mask"], fx.Node):
            return None, "the additive mask is not a tensor"
        args["mask"] = ("add", kw["mask"])
    elif "fill" in kw:
        fill = kw["fill"]
        if isinstance(fill, fx.Node) or not isinstance(fill, (int, float)) or not (fill == -math.inf or fill <= NEG_FILL):
            return None, f"mask fill {fill!r} is not -inf or a large negative number"
        cond = kw.get("bmask", kw.get("keep"))
        if not isinstance(cond, fx.Node):
            return None, "the boolean mask is not a tensor"
        args["mask"] = ("masked" if "bmask" in kw else "keep", cond, fill)
    return args, None


def _replace(match: Match, *args, **kwargs) -> None:
    graph, out = match.graph, match.output_node()
    sm = _find(match, _is_softmax)
    key = _state.get("keys", {}).get(sm)
    if key is None:  # not a site the policy sends to sdpa
        return
    args, why = _interpret(match)
    if args is None:
        _state["results"][key] = ("failed", why)
        return
    kw = match.kwargs
    with graph.inserting_before(out):
        mask = None
        if "mask" in args:
            m = args["mask"]
            if m[0] == "add":
                mask = m[1]
            elif m[2] == -math.inf:  # SDPA's boolean mask says where to attend
                mask = graph.call_function(torch.logical_not, (m[1],)) if m[0] == "masked" else m[1]
            else:  # a finite fill: the equivalent additive mask
                cond = m[1] if m[0] == "masked" else graph.call_function(torch.logical_not, (m[1],))
                mask = graph.call_function(torch.where, (cond, float(m[2]), 0.0))
        new = graph.call_function(F.scaled_dot_product_attention, (kw["q"], kw["k"], kw["v"]),
                                  {"attn_mask": mask, "dropout_p": 0.0, "is_causal": False, "scale": args["scale"]})
        q_val, o_val = _val(kw["q"]), _val(out)
        if o_val is not None and q_val is not None and o_val.dtype != q_val.dtype:  # the chain's casts
            new = graph.call_method("to", (new, o_val.dtype))
    new.meta.update({k: v for k, v in out.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
    out.replace_all_uses_with(new)
    match.erase_nodes()
    _state["replaced"][out] = new
    _state["results"][key] = ("rewritten", "softmax(QKᵀ)V -> scaled_dot_product_attention")


def rewrite_sdpa(gm: fx.GraphModule, softmax_nodes: dict, replaced: Optional[dict] = None) -> dict:
    """Rewrite, in place, the hand-written attention chains around `softmax_nodes` ({node: key}).

    Returns {key: (status, reason)} for every key: `rewritten`, or `failed` with why the chain was not taken.
    `replaced` receives {erased output node: its SDPA replacement}."""
    results: dict = {}
    _state.update(keys=softmax_nodes, results=results, replaced=replaced if replaced is not None else {})
    try:
        _pass().apply(gm.graph)
    finally:
        _state.clear()
    for key in softmax_nodes.values():
        results.setdefault(key, ("failed", "no supported softmax(QKᵀ)V chain around this softmax"))
    return results
