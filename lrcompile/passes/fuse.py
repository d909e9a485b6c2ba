"""FX pass: partition the rewritten graph into fusion groups, each grown around one structured or adapter site.

A group is: an optional prologue (an input cast to the compute dtype, a scale by a number) → the site (a call of
its family's `functional`, or of a lossless alternative the autotuner chose: the same function) → an epilogue
chain (bias, GELU/SiLU/ReLU/tanh, residual or branch add, multiply by a same-shape tensor, dtype cast, views that
keep the last dim, eval-mode dropout). Everything else stays with Inductor. A node joins a group only if
  - it does no duplicated work: every member but the last has all its users inside the group (a prologue node's
    only user is the site; an epilogue node's only user is the next one),
  - no other group holds it: groups grow in graph order and each claims its members, so the partition is
    disjoint (Llama's gate(x)·up(x): the gate group takes the product, the up group ends at its site and
    becomes the product's operand), and
  - the group stays contractible: contracting it must leave the graph acyclic (checked with networkx on the
    graph condensed by the groups, per step and once more over the whole partition).
Shapes come from fake-tensor propagation; a node without them ends its group.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..compat import GELU_OPS, example_value, fake_in, fake_mode_of, new_fake_mode, statically_known_true, to_fake
from ..families import FAMILIES, FamilyView

ADD = {operator.add, torch.add}
MUL = {operator.mul, torch.mul}
DIV = {operator.truediv, torch.div}
ACT_FUNCS = {
    torch.nn.functional.silu: "silu",
    torch.nn.functional.relu: "relu",
    torch.relu: "relu",
    torch.tanh: "tanh",
    torch.nn.functional.tanh: "tanh",
}
GELU = set(GELU_OPS)
ACT_METHODS = {"relu": "relu", "tanh": "tanh"}
CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}
VIEW_METHODS = {"view", "reshape", "contiguous"}
# Families whose map is linear in x (`Structure.linear_in_x`): an input scale folds into the accumulator.
LINEAR_IN_X = FamilyView(lambda cls: True if cls.linear_in_x else None)


@dataclasses.dataclass
class Group:
    site: fx.Node
    family: str
    x: fx.Node  # the input the kernel reads (before any absorbed prologue)
    tensors: list  # the family's tensors (adapters: the dense weight first)
    prologue: list = dataclasses.field(default_factory=list)
    epilogue: list = dataclasses.field(default_factory=list)  # absorbed nodes after the site, in order
    steps: list = dataclasses.field(default_factory=list)
    operands: list = dataclasses.field(default_factory=list)  # (node, is_row) per operand step
    views: list = dataclasses.field(default_factory=list)  # absorbed view/reshape nodes to replay on the output
    alpha: float = 1.0

    @property
    def members(self) -> list[fx.Node]:
        return [*self.prologue, self.site, *self.epilogue]

    @property
    def last(self) -> fx.Node:
        return self.epilogue[-1] if self.epilogue else self.site


def _val(node) -> Optional[torch.Tensor]:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _same(a, b) -> bool:
    if len(a) != len(b):
        return False
    return all(
        statically_known_true(x == y) if not (isinstance(x, int) and isinstance(y, int)) else x == y
        for x, y in zip(a, b)
    )


def propagate(gm: fx.GraphModule, inputs) -> bool:
    """Fill node.meta['val'] by fake-tensor propagation; False (and a warning) if that fails."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = fake_mode_of(inputs) or new_fake_mode()
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = []
    for ph, inp in zip(phs, inputs):
        ev = example_value(ph)
        if fake_in(mode, ev):
            args.append(ev)
        elif fake_in(mode, inp):
            args.append(inp)
        elif isinstance(inp, torch.Tensor):
            args.append(to_fake(mode, inp))
        else:
            args.append(inp)
    try:
        with mode:
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*args)
    except Exception as e:  # fusion is an optimisation: the unfused graph is still right
        warnings.warn(
            f"lrcompile: fusion skipped, shape propagation failed: {type(e).__name__}: {e}".splitlines()[0],
            stacklevel=2,
        )
        return False
    return True


def site_families() -> dict:
    """Site function -> family, for the families that have a kernel (`Structure.kernel`): each family's
    `functional` and the lossless alternatives the autotuner may have emitted in its place (same signature, same
    function)."""
    from ..kernels import KERNEL_OF
    from ..tune.candidates import EXTRA

    fams = {cls.functional: name for name, cls in FAMILIES.items() if name in KERNEL_OF}
    for name, cands in EXTRA.items():
        if name in KERNEL_OF:
            fams.update({c.fn: name for c in cands if c.lossless})
    return fams


def _dag(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n)
        for i in n.all_input_nodes:
            g.add_edge(i, n)
    return g


def contractible(dag: nx.DiGraph, members) -> bool:
    """Contracting `members` to one node leaves the graph acyclic: no path leaves the set and comes back."""
    inside = set(members)
    outside_reach = set()
    for m in members:
        for u in dag.successors(m):
            if u not in inside and u not in outside_reach:
                outside_reach |= {u} | nx.descendants(dag, u)
    return not any(p in outside_reach for m in members for p in dag.predecessors(m) if p not in inside)


def condensed(dag: nx.DiGraph, groups: list[Group]) -> nx.DiGraph:
    owner = {m: i for i, g in enumerate(groups) for m in g.members}
    c = nx.DiGraph()
    for n in dag.nodes:
        c.add_node(("g", owner[n]) if n in owner else n)
    for u, v in dag.edges:
        a, b = (("g", owner[u]) if u in owner else u), (("g", owner[v]) if v in owner else v)
        if a != b:
            c.add_edge(a, b)
    return c


def _is_cast(n: fx.Node) -> bool:
    if n.op != "call_method":
        return False
    if n.target in CAST_METHODS:
        return len(n.args) == 1 and not n.kwargs
    if n.target == "to":
        dt = n.args[1] if len(n.args) == 2 else n.kwargs.get("dtype")
        extra = set(n.kwargs) - {"dtype"}
        return isinstance(dt, torch.dtype) and not extra and len(n.args) <= 2
    return False


def _scale_of(n: fx.Node) -> Optional[tuple[fx.Node, float]]:
    """(tensor input, factor) if `n` is x * c, c * x or x / c with c a Python number."""
    is_call = n.op == "call_function" or (n.op == "call_method" and n.target in ("mul", "div"))
    if not is_call or n.kwargs or len(n.args) != 2:
        return None
    a, b = n.args
    mul = n.target in MUL or n.target == "mul"
    div = n.target in DIV or n.target == "div"
    if mul and isinstance(a, fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return a, float(b)
    if mul and isinstance(b, fx.Node) and isinstance(a, (int, float)) and not isinstance(a, bool):
        return b, float(a)
    if div and isinstance(a, fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool) and b != 0:
        return a, 1.0 / float(b)
    return None


def _activation(n: fx.Node, cur: fx.Node) -> Optional[str]:
    if n.op == "call_function" and n.args[:1] == (cur,):
        if n.target in GELU and len(n.args) == 1 and set(n.kwargs) <= {"approximate"}:
            return {"none": "gelu", "tanh": "gelu_tanh"}.get(n.kwargs.get("approximate", "none"))
        if (
            n.target in ACT_FUNCS
            and len(n.args) == 1
            and not n.kwargs.get("inplace", False)
            and set(n.kwargs) <= {"inplace"}
        ):
            return ACT_FUNCS[n.target]
    if n.op == "call_method" and n.target in ACT_METHODS and n.args == (cur,) and not n.kwargs:
        return ACT_METHODS[n.target]
    return None


def _is_eval_dropout(n: fx.Node, cur: fx.Node) -> bool:
    if n.op != "call_function" or n.target is not F.dropout or n.args[:1] != (cur,):
        return False
    training = n.args[2] if len(n.args) > 2 else n.kwargs.get("training", True)
    return training is False


def _binary(n: fx.Node, cur: fx.Node, targets, method: str) -> Optional[fx.Node]:
    """The other operand if `n` is cur (+|*) other with both tensors."""
    ok = (n.op == "call_function" and n.target in targets) or (n.op == "call_method" and n.target == method)
    if not ok or n.kwargs or len(n.args) != 2:
        return None
    a, b = n.args
    other = b if a is cur else a if b is cur else None
    return other if isinstance(other, fx.Node) and other is not cur else None


def _epilogue_step(n: fx.Node, cur: fx.Node, width: int):
    """(kind, payload) for absorbing `n` after `cur`, or None. kind: step | view | skip | cast."""
    vc, vn = _val(cur), _val(n)
    if vc is None or vn is None or vn.dim() == 0 or not _same(vn.shape[-1:], (width,)):
        return None
    act = _activation(n, cur)
    if act is not None:
        return "step", (act, None)
    if _is_eval_dropout(n, cur):
        return "skip", None
    if _is_cast(n) and n.args[0] is cur:
        return "cast", None
    if n.op == "call_method" and n.target in VIEW_METHODS and n.args[0] is cur:
        return ("skip", None) if n.target == "contiguous" else ("view", None)
    if n.op == "call_function" and n.target is torch.reshape and n.args[0] is cur:
        return "view", None
    for targets, method, name in ((ADD, "add", "add"), (MUL, "mul", "mul")):
        other = _binary(n, cur, targets, method)
        if other is None:
            continue
        vo = _val(other)
        if vo is None or not _same(vn.shape, vc.shape):
            return None  # broadcasting that grows the output is not an epilogue
        if _same(vo.shape, vc.shape):
            return "step", (name, (other, False))
        if vo.dim() >= 1 and _same(vo.shape[-1:], (width,)) and all(_same((d,), (1,)) for d in vo.shape[:-1]):
            return "step", (f"{name}_row", (other, True))
        return None
    return None


def _compute_dtype(tensors) -> Optional[torch.dtype]:
    v = _val(tensors[0]) if tensors and isinstance(tensors[0], fx.Node) else None
    return v.dtype if v is not None else None


def _grow(site: fx.Node, family: str, dag: nx.DiGraph, claimed: set) -> Optional[Group]:
    """The group around `site`, never taking a node in `claimed` (another group's)."""
    cls = FAMILIES[family]
    x, weight, bias, *tensors = site.args
    names = cls.tensor_names
    if len(tensors) != len(names) or not isinstance(x, fx.Node):
        return None  # dropout on the branch input (an extra tensor): random, left unfused
    tensors = ([weight] if not cls.compressing else []) + list(tensors)
    out = _val(site)
    if out is None or _compute_dtype(tensors) is None:
        return None
    width = out.shape[-1]
    g = Group(site=site, family=family, x=x, tensors=tensors)
    if bias is not None:
        g.steps.append("add_row")
        g.operands.append((bias, True))
    cd = _compute_dtype(tensors)
    # prologue: at most one cast (to the compute dtype) and one scale, each used only by the group
    for _ in range(2):
        p = g.x
        if p.op not in ("call_function", "call_method") or len(p.users) != 1 or p in claimed:
            break
        if _is_cast(p) and _val(p) is not None and _val(p).dtype == cd and not any(_is_cast(q) for q in g.prologue):
            nxt = p.args[0]
        elif family in LINEAR_IN_X and _scale_of(p) is not None and g.alpha == 1.0:
            nxt, factor = _scale_of(p)
            g.alpha = factor
        else:
            break
        if not isinstance(nxt, fx.Node):
            break
        g.prologue.insert(0, p)
        g.x = nxt
    # epilogue: follow the single user while it is an epilogue op
    while True:
        cur = g.last
        users = list(cur.users)
        if len(users) != 1:
            break
        u = users[0]
        if u in claimed:
            break
        step = _epilogue_step(u, cur, width)
        if step is None:
            break
        trial = [*g.members, u]
        if not contractible(dag, trial):
            break
        kind, payload = step
        g.epilogue.append(u)
        if kind == "step":
            name, operand = payload
            g.steps.append(name)
            if operand is not None:
                g.operands.append(operand)
        elif kind == "view":
            g.views.append(u)
        if kind == "cast":
            break  # a cast ends the group: what follows would run at the new precision
    return g


def find_groups(gm: fx.GraphModule, inputs) -> list[Group]:
    """The fusion groups of `gm` (which is not changed, apart from node.meta['val'])."""
    fams = site_families()
    sites = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in fams]
    if not sites or not propagate(gm, inputs):
        return []
    dag = _dag(gm.graph)
    groups, claimed = [], set()
    for s in sites:  # graph order
        g = _grow(s, fams[s.target], dag, claimed)
        if g is not None:
            groups.append(g)
            claimed.update(g.members)
    # The whole partition, condensed, must be a DAG; drop a group on any cycle until it is (never expected:
    # each group only leaks through its last node, but this is what keeps lowering safe).
    while groups:
        c = condensed(dag, groups)
        try:
            cycle = nx.find_cycle(c)
        except nx.NetworkXNoCycle:
            break
        bad = next(k[1] for e in cycle for k in e[:2] if isinstance(k, tuple) and k[:1] == ("g",))
        groups.pop(bad)
    return groups
