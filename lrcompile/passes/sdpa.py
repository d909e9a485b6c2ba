"""FX pass: hand-written softmax(Q Kᵀ · s + M) V  ->  F.scaled_dot_product_attention(Q, K, V, M, scale=s).

The chain is read from each softmax node the policy sends to sdpa, by walking the torch-level (Dynamo) graph up
to the scores and down to the P·V matmul, one node at a time, as these variants:

  scores  matmul(Q, K.transpose(-2, -1))              (method or torch.transpose)
  scale   none | scores * c | c * scores | scores / c  (c a Python number)
  mask    none | + M | M + | masked_fill(B, fill) | where(B, ·, fill) | where(B, fill, ·)
          (fill -inf or a large negative number: a Python number or an in-graph constant tensor)
  softmax torch.softmax / F.softmax / .softmax, over the last dim, with or without `dtype`
  post    none | .to/.type(dtype) | dropout (eval or p = 0) | both, in either order
  out     matmul(P, V)

Every node between the scores and the output must have one user: a chain whose probabilities are also
returned (output_attentions) is left alone. The walk records the operands; `_interpret` then refuses what SDPA
would compute differently (training dropout, a non-last softmax dim, a small finite fill), recording why.

Precision: SDPA runs in the dtype the chain's softmax runs in. Llama's `softmax(..., dtype=torch.float32)` over
half-precision scores makes q, k and v float32 (softmax, QKᵀ and PV then run in float32, at least as precise as
the chain); a softmax narrower than q is refused.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..compat import example_value

MATMUL = [torch.matmul, operator.matmul]
SCALE = [operator.mul, torch.mul, operator.truediv, torch.div]
MUL = [operator.mul, torch.mul]
ADD = [operator.add, torch.add]
SOFTMAX = [torch.softmax, F.softmax, torch.nn.functional.softmax]
DROPOUT = [F.dropout, torch.dropout]
NEG_FILL = -1e4  # a finite fill at or below this acts as -inf after softmax (HF uses finfo.min)


@dataclasses.dataclass
class _Chain:
    """A matched chain: its operands by role (q, k, t0, t1, v, dim, dtype, and where present scale, mask | bmask |
    keep with fill, p with training) and its own nodes, scores first, the P·V matmul (`out`) last."""

    kw: dict
    nodes: list
    scale_op: Optional[fx.Node] = None

    @property
    def out(self) -> fx.Node:
        return self.nodes[-1]


def _fn(n, targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _meth(n, names) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target in names


def _inner(n) -> bool:
    """An intermediate of the chain: its one user is the chain's next node."""
    return isinstance(n, fx.Node) and len(n.users) == 1


def _scores(s) -> Optional[tuple[dict, list]]:
    """matmul(q, k.transpose(t0, t1))."""
    if not (_inner(s) and _fn(s, MATMUL) and len(s.args) == 2 and not s.kwargs):
        return None
    q, kt = s.args
    if not (
        _inner(kt)
        and (_meth(kt, ("transpose",)) or _fn(kt, (torch.transpose,)))
        and len(kt.args) == 3
        and not kt.kwargs
    ):
        return None
    k, t0, t1 = kt.args
    return {"q": q, "k": k, "t0": t0, "t1": t1}, [kt, s]


def _scaled(x) -> Optional[tuple[dict, list, Optional[fx.Node]]]:
    """scores | scores * c | scores / c | c * scores."""
    got = _scores(x)
    if got is not None:
        return got[0], got[1], None
    if not (_inner(x) and x.op == "call_function" and len(x.args) == 2 and not x.kwargs):
        return None
    for i, targets in ((0, SCALE), (1, MUL)):
        got = _scores(x.args[i]) if x.target in targets else None
        if got is not None:
            return {**got[0], "scale": x.args[1 - i]}, [*got[1], x], x
    return None


def _masked(x) -> Optional[tuple[dict, list, Optional[fx.Node]]]:
    """The softmax's input: the scaled scores, plus an additive mask, or a masked_fill / where with a fill."""
    got = _scaled(x)
    if got is not None or not _inner(x) or x.kwargs:
        return got
    options = []  # (position of the scaled scores, the other operands by role)
    if _fn(x, ADD) and len(x.args) == 2:
        options = [(0, {"mask": x.args[1]}), (1, {"mask": x.args[0]})]
    elif (_meth(x, ("masked_fill",)) or _fn(x, (torch.masked_fill,))) and len(x.args) == 3:
        options = [(0, {"bmask": x.args[1], "fill": x.args[2]})]
    elif _fn(x, (torch.where,)) and len(x.args) == 3:
        options = [(1, {"keep": x.args[0], "fill": x.args[2]}), (2, {"bmask": x.args[0], "fill": x.args[1]})]
    for i, roles in options:
        got = _scaled(x.args[i])
        if got is not None:
            return {**got[0], **roles}, [*got[1], x], got[2]
    return None


def _softmax_args(sm: fx.Node) -> Optional[tuple]:
    """(input, dim, dtype) of a softmax node; None without a dim. F.softmax's third positional is _stacklevel."""
    names = ("input", "dim", "_stacklevel", "dtype") if sm.target is F.softmax else ("input", "dim", "dtype")
    bound = {**dict(zip(names, sm.args)), **sm.kwargs}
    if len(sm.args) > len(names) or "dim" not in bound or not isinstance(bound.get("input"), fx.Node):
        return None
    return bound["input"], bound["dim"], bound.get("dtype")


def _cast(n, x) -> bool:
    """n is x.to(dtype) / x.type(dtype)."""
    if not (_meth(n, ("to", "type")) and n.args and n.args[0] is x):
        return False
    dtype = n.args[1] if len(n.args) == 2 else n.kwargs.get("dtype") if len(n.args) == 1 else None
    return isinstance(dtype, torch.dtype)


def _dropout(n, x) -> Optional[dict]:
    """{p, training} of a dropout of x (F.dropout or torch.dropout, whose flag is `train`)."""
    if not (_fn(n, DROPOUT) and n.args and n.args[0] is x):
        return None
    names = ("input", "p", "training", "inplace") if n.target is F.dropout else ("input", "p", "train")
    bound = {**dict(zip(names, n.args)), **n.kwargs}
    return {"p": bound.get("p", 0.5), "training": bound.get("training", bound.get("train", True))}


def _chain(sm: fx.Node) -> Optional[_Chain]:
    """The chain around a softmax node, or None where it is none of the variants."""
    if not (_is_softmax(sm) and _inner(sm)):
        return None
    got = _softmax_args(sm)
    up = _masked(got[0]) if got is not None else None
    if up is None:
        return None
    kw, nodes, scale_op = up
    kw.update(dim=got[1], dtype=got[2])
    nodes.append(sm)
    cur, cast, drop = sm, False, False
    while True:  # at most one cast and one dropout, in either order
        nxt = next(iter(cur.users))
        d = None if drop else _dropout(nxt, cur)
        if not cast and _cast(nxt, cur):
            cast = True
        elif d is not None:
            drop = True
            kw.update(d)
        else:
            break
        if not _inner(nxt):
            return None
        nodes.append(nxt)
        cur = nxt
    if not (_fn(nxt, MATMUL) and len(nxt.args) == 2 and nxt.args[0] is cur and not nxt.kwargs):
        return None
    kw["v"] = nxt.args[1]
    nodes.append(nxt)
    return _Chain(kw, nodes, scale_op)


def _val(node):
    return example_value(node) if isinstance(node, fx.Node) else None


def _is_softmax(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in SOFTMAX) or (n.op == "call_method" and n.target == "softmax")


def _compute_dtype(chain: _Chain) -> tuple[Optional[torch.dtype], Optional[str]]:
    """The dtype SDPA must run in to compute what the chain's softmax computes; (None, why) when it cannot."""
    q, sm = _val(chain.kw["q"]), next(n for n in chain.nodes if _is_softmax(n))
    asked, got = chain.kw["dtype"], _val(sm)
    work = asked if isinstance(asked, torch.dtype) else getattr(got, "dtype", None)
    if q is None or work is None:
        return None, "the dtypes of the chain are unknown"
    if work == q.dtype:
        return work, None
    if not (
        work.is_floating_point and q.dtype.is_floating_point and torch.finfo(work).bits > torch.finfo(q.dtype).bits
    ):
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


def _interpret(chain: _Chain) -> tuple[Optional[dict], Optional[str]]:
    """The SDPA call's arguments for a matched chain, or (None, why not)."""
    kw = chain.kw
    ndim = getattr(_val(kw["q"]), "ndim", None)
    dims = (
        {d % ndim for d in (kw["t0"], kw["t1"])}
        if ndim and isinstance(kw["t0"], int) and isinstance(kw["t1"], int)
        else None
    )
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
        scale = 1.0 / c if chain.scale_op.target in (operator.truediv, torch.div) else float(c)
    dtype, why = _compute_dtype(chain)
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


def _replace(graph: fx.Graph, chain: _Chain, args: dict) -> fx.Node:
    """Put the SDPA call in place of the chain's output and erase the chain; returns the new output node."""
    kw, dtype, out = chain.kw, args["dtype"], chain.out
    upcast = dtype != _val(kw["q"]).dtype
    with graph.inserting_before(out):
        q, k, v = (graph.call_method("to", (kw[n], dtype)) if upcast else kw[n] for n in "qkv")
        new = graph.call_function(
            F.scaled_dot_product_attention,
            (q, k, v),
            {
                "attn_mask": _mask(graph, args.get("mask"), dtype),
                "dropout_p": 0.0,
                "is_causal": False,
                "scale": args["scale"],
            },
        )
        o_val = _val(out)
        if o_val is not None and o_val.dtype != dtype:  # the chain's casts
            new = graph.call_method("to", (new, o_val.dtype))
    new.meta.update({k: v for k, v in out.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
    out.replace_all_uses_with(new)
    for n in reversed(chain.nodes):  # users before their inputs; each node's one user is the one erased before it
        if not n.users:
            graph.erase_node(n)
    return new


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
    replaced = replaced if replaced is not None else {}
    for sm, key in softmax_nodes.items():
        if key in results:
            continue
        # read now, not before: an earlier rewrite may have replaced one of this chain's operands
        chain = _chain(sm)
        if chain is None:
            continue
        args, why = _interpret(chain)
        if args is None:
            results[key] = ("failed", why)
            continue
        replaced[chain.out] = _replace(gm.graph, chain, args)
        upcast = args["dtype"] != _val(chain.kw["q"]).dtype
        results[key] = (
            "rewritten",
            "softmax(QKᵀ)V -> scaled_dot_product_attention"
            + (f" (q, k, v upcast to {args['dtype']}: the chain's softmax runs in {args['dtype']})" if upcast else ""),
        )
    for key in softmax_nodes.values():
        results.setdefault(key, ("failed", "no supported softmax(QKᵀ)V chain around this softmax"))
    return results
