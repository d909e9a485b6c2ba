"""FX pass: hand-written softmax(Q Kᵀ · s + M) V  ->  F.scaled_dot_product_attention(Q, K, V, M, scale=s).

Built on Inductor's pattern matcher (CallFunction / CallMethod / KeywordArg / PatternMatcherPass) at the
Dynamo (torch-function) level, not the ATen level that `register_replacement` sees. The chain's variants are
enumerated as separate patterns (the matcher has no optional nodes):

  scores  matmul(Q, K.transpose(-2, -1))              (method or torch.transpose)
  scale   none | scores * c | c * scores | scores / c  (c a Python number)
  mask    none | + M | M + | masked_fill(B, fill) | where(B, ·, fill) | where(B, fill, ·)
          (fill -inf or a large negative number: a Python number or an in-graph constant tensor)
  softmax torch.softmax / F.softmax / .softmax, over the last dim, with or without `dtype`
  post    none | .to/.type(dtype) | dropout (eval or p = 0) | both
  out     matmul(P, V)

Every intermediate node must have one user (the default `_users=1`): a chain whose probabilities are also
returned (output_attentions) is left alone. The handler re-reads the matched chain and refuses what SDPA would
compute differently (training dropout, a non-last softmax dim, a small finite fill), recording why.

Precision: SDPA runs in the dtype the chain's softmax runs in. Llama's `softmax(..., dtype=torch.float32)` over
half-precision scores makes q, k and v float32 (softmax, QKᵀ and PV then run in float32, at least as precise as
the chain); a softmax narrower than q is refused. The matcher itself ignores node kwargs that a pattern does not
name, so the dtype is read from the softmax node, never from the pattern alone.
"""
from __future__ import annotations

import functools
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
    yield CallFunction(ADD, KeywordArg("mask"), x)
    yield CallMethod("masked_fill", x, KeywordArg("bmask"), KeywordArg("fill"))
    yield CallFunction([torch.masked_fill], x, KeywordArg("bmask"), KeywordArg("fill"))
    yield CallFunction(torch.where, KeywordArg("keep"), x, KeywordArg("fill"))
    yield CallFunction(torch.where, KeywordArg("bmask"), KeywordArg("fill"), x)


def _softmax(x):
    # the dtype variants first: the first pattern that matches a chain decides it (see _replace)
    for call in (lambda *a, **k: CallFunction(SOFTMAX, x, *a, **k), lambda *a, **k: CallMethod("softmax", x, *a, **k)):
        yield call(KeywordArg("dim"), KeywordArg("dtype"))
        yield call(KeywordArg("dim"), dtype=KeywordArg("dtype"))
        yield call(dim=KeywordArg("dim"), dtype=KeywordArg("dtype"))
        yield call(KeywordArg("dim"))
        yield call(dim=KeywordArg("dim"))


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


def _softmax_dtype(sm: fx.Node):
    """The `dtype` a softmax node asks for (torch.softmax(x, dim, dtype) or dtype=), else None."""
    return sm.kwargs.get("dtype", sm.args[2] if len(sm.args) > 2 else None)


def _compute_dtype(match: Match) -> tuple[Optional[torch.dtype], Optional[str]]:
    """The dtype SDPA must run in to compute what the chain's softmax computes; (None, why) when it cannot."""
    q, sm = _val(match.kwargs["q"]), _find(match, _is_softmax)
    asked, got = _softmax_dtype(sm), _val(sm)
    work = asked if isinstance(asked, torch.dtype) else getattr(got, "dtype", None)
    if q is None or work is None:
        return None, "the dtypes of the chain are unknown"
    if work == q.dtype:
        return work, None
    if not (work.is_floating_point and q.dtype.is_floating_point and torch.finfo(work).bits > torch.finfo(q.dtype).bits):
        return None, f"softmax in {work} is narrower than q ({q.dtype})"
    return work, None


def _constant(v):
    """A Python number, or the value of an in-graph constant tensor (torch.tensor(c), torch.full([], c))."""
    if not isinstance(v, fx.Node):
        return v
    if v.op == "call_function" and v.target in (torch.tensor, torch.scalar_tensor) and v.args:
        return v.args[0] if isinstance(v.args[0], (int, float)) else None
    if v.op == "call_function" and v.target is torch.full and len(v.args) > 1 and list(v.args[0]) == []:
        return v.args[1] if isinstance(v.args[1], (int, float)) else None
    return None


def _describe(v) -> str:
    return repr(v) if not isinstance(v, fx.Node) else f"tensor {v.name}"


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
    dtype, why = _compute_dtype(match)
    if why is not None:
        return None, why
    args = {"scale": float(scale), "dtype": dtype}
    if "mask" in kw:
        if not isinstance(kw["mask"], fx.Node):
            return None, "the additive mask is not a tensor"
        args["mask"] = ("add", kw["mask"])
    elif "fill" in kw:
        fill = _constant(kw["fill"])
        if not isinstance(fill, (int, float)) or isinstance(fill, bool) or not (fill == -math.inf or fill <= NEG_FILL):
            return None, f"mask fill {_describe(kw['fill'])} is not -inf or a large negative number"
        cond = kw.get("bmask", kw.get("keep"))
        if not isinstance(cond, fx.Node):
            return None, "the boolean mask is not a tensor"
        args["mask"] = ("masked" if "bmask" in kw else "keep", cond, float(fill))
    return args, None


def _replace(match: Match, *args, **kwargs) -> None:
    graph, out = match.graph, match.output_node()
    sm = _find(match, _is_softmax)
    key = _state.get("keys", {}).get(sm)
    if key is None or key in _state["results"]:  # not a site the policy sends to sdpa; or decided already
        return
    args, why = _interpret(match)
    if args is None:
        _state["results"][key] = ("failed", why)
        return
    kw, dtype = match.kwargs, args["dtype"]
    upcast = dtype != _val(kw["q"]).dtype
    with graph.inserting_before(out):
        q, k, v = (graph.call_method("to", (kw[n], dtype)) if upcast else kw[n] for n in "qkv")
        new = graph.call_function(F.scaled_dot_product_attention, (q, k, v),
                                  {"attn_mask": _mask(graph, args.get("mask"), dtype), "dropout_p": 0.0,
                                   "is_causal": False, "scale": args["scale"]})
        o_val = _val(out)
        if o_val is not None and o_val.dtype != dtype:  # the chain's casts
            new = graph.call_method("to", (new, o_val.dtype))
    new.meta.update({k: v for k, v in out.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
    out.replace_all_uses_with(new)
    match.erase_nodes()
    _state["replaced"][out] = new
    _state["results"][key] = ("rewritten", "softmax(QKᵀ)V -> scaled_dot_product_attention" + (
        f" (q, k, v upcast to {dtype}: the chain's softmax runs in {dtype})" if upcast else ""))


def _mask(graph: fx.Graph, m: Optional[tuple], dtype: torch.dtype) -> Optional[fx.Node]:
    """SDPA's attn_mask for the chain's mask: additive (float, in the compute dtype) or boolean (True attends)."""
    if m is None:
        return None
    if m[0] == "add":  # a boolean one is added as 0/1 by the chain: SDPA would read it as where to attend
        val = _val(m[1])
        return m[1] if val is not None and val.dtype == dtype else graph.call_method("to", (m[1], dtype))
    if m[2] == -math.inf:
        return graph.call_function(torch.logical_not, (m[1],)) if m[0] == "masked" else m[1]
    # a finite fill: the equivalent additive mask
    cond = m[1] if m[0] == "masked" else graph.call_function(torch.logical_not, (m[1],))
    return graph.call_method("to", (graph.call_function(torch.where, (cond, m[2], 0.0)), dtype))


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
