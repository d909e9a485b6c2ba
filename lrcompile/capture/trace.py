"""The one enumeration of a model's sites outside the backend: Dynamo traces of the model with a recording backend.

`rewrite`, `calibrate`, the budget planner and `lrcompile check` all list sites here, through the backend's own
`find_sites` on Dynamo's graphs, so that they see exactly the sites (and names) the backend sees under
`torch.compile` — functional ones (`F.linear(x, self.w)`, `x @ self.P`) included. Names are the compiled model's:
a frame Dynamo compiles for a submodule (a graph break inside a loop over blocks) is named from the model, and
where Dynamo runs one graph for several instances of a module (blocks.1 calling the graph made for blocks.0,
with its own weights as inputs), each run is named for the instance whose weights it is given — as the backend
names them (backend._Instances).

A `Recorder` can also instrument its graphs: a call inserted before each linear site hands the site's input rows
to an observer as the graph runs (calibration statistics for sites that module hooks cannot see).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import weakref
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch import nn

from .. import compat
from ..compat import frame_locals
from .names import eval_root, strip_root
from .resolve import compiled_callers, path_in, root_module, site_module
from .sites import Site, find_sites


@dataclasses.dataclass
class CapturedSite:
    site: Site
    module: Optional[nn.Module]  # the module whose forward makes the call


@dataclasses.dataclass
class Call:
    """Positional and keyword arguments of one call (what a compiled model was called with)."""

    args: tuple
    kwargs: dict


def batch_items(batch) -> tuple:
    """The values of a batch as `call_model` passes them: a dict's values, a tuple's items, or the one tensor."""
    if isinstance(batch, dict):
        return tuple(batch.values())
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def call_model(model: nn.Module, example_inputs):
    """`example_inputs` is a tuple of positional arguments, a dict of keyword arguments or a Call."""
    if isinstance(example_inputs, Call):
        return model(*example_inputs.args, **example_inputs.kwargs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


# Instrumented graphs call `_observe(token, group, x)`: FX code can only hold plain constants, so the recorder
# is found by its token.
_RECORDERS: dict[int, "Recorder"] = {}
_TOKENS = itertools.count()


def _observe(token: int, group: int, x) -> None:
    rec = _RECORDERS.get(token)
    if rec is not None:
        rec._observed(group, x)


def _named(prefix: str, rel: str) -> str:
    return prefix + rel if rel else prefix[:-1]


def _example_value(node):
    return compat.example_value(node)


@dataclasses.dataclass
class _Graph:
    """One recorded graph: its sites named for the frame's own instance, and what renames them for another."""

    entries: list  # [(site, module, rel fqn, rel module path, rel weight path, weight index, bias index)]
    prefix: str  # the frame's module path in the model, with a trailing dot ('' for the model itself)
    anchor: Optional[tuple]  # (input index, rel path) of a parameter whose path in the model gives the prefix
    groups: list  # per observer group: [rel fqn of each site that group's input feeds]
    bound: dict = dataclasses.field(default_factory=dict)  # prefix -> [CapturedSite] (named for that instance)


class Recorder:
    """A Dynamo backend that records each graph's sites as the backend names them and runs the graph as it is
    (`observe`: instrumented, see the module docstring). `sites` keeps every non-installed linear site by name
    (first call's), `calls` every site call in order (`keep_calls`). `structures`: the observer also sees the
    input of each installed lrcompile structure, under its module path (a compressed model calibrated against
    its reference)."""

    def __init__(
        self,
        model: nn.Module,
        observe: Optional[Callable] = None,
        *,
        structures: bool = False,
        keep_calls: bool = False,
    ):
        self.model = model
        self.observe = observe
        self.structures = structures
        self.keep_calls = keep_calls
        self.sites: dict[str, CapturedSite] = {}
        self.calls: list[CapturedSite] = []
        self.graphs = 0  # graphs compiled
        self.observed = 0  # observer calls made
        self.token = next(_TOKENS)
        self._running: list[tuple[_Graph, str]] = []
        self._graphs: list[_Graph] = []
        self._paths: Optional[dict] = None
        _RECORDERS[self.token] = self

    def close(self) -> None:
        """Stop recording. The runners hold the recorder weakly: one still running (a frame that recursion or
        another thread entered) then runs its graph as it is."""
        _RECORDERS.pop(self.token, None)
        self.model = self.observe = None
        self._paths = None
        self._graphs.clear()

    # --- compile time ---------------------------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs, **_):
        sites = find_sites(gm, example_inputs)
        f_locals = frame_locals()
        root = root_module(sites, f_locals)
        root = self.model if root is None else root
        path = path_in(self.model, root) if root is not None else None
        prefix = path + "." if path else ""
        index = {id(t): i for i, t in enumerate(example_inputs)}
        entries, anchor = [], None
        for s in sites:
            module = site_module(s, root, f_locals) if root is not None else None
            rel = (s.fqn, strip_root(s.module_expr) if s.module_expr else "", s.weight_path)
            wi = index.get(id(s.weight)) if s.weight is not None else None
            bi = index.get(id(s.bias)) if s.bias is not None else None
            named = dataclasses.replace(
                s, fqn=_named(prefix, s.fqn), weight_path=prefix + s.weight_path if s.weight_path else None
            )
            entries.append([named, module, *rel, wi, bi])
            if anchor is None and wi is not None and s.weight_path and self._holds(prefix + s.weight_path, s.weight):
                anchor = (wi, s.weight_path)
        g = _Graph(entries, prefix, anchor, [])
        if self.observe is not None:
            self._instrument(gm, g, sites, f_locals)
        for e in entries:  # drop graph references (nodes hold fake tensors and the graph alive)
            e[0].node = e[0].input_node = e[0].weight_node = e[0].bias_node = None
        self.graphs += 1
        self._graphs.append(g)
        return _runner(gm.forward, weakref.ref(self), len(self._graphs) - 1)

    def _holds(self, path: str, t) -> bool:
        try:
            return self.model.get_parameter(path) is t
        except (AttributeError, TypeError):
            return False

    def _instrument(self, gm: fx.GraphModule, g: _Graph, sites: list[Site], f_locals) -> None:
        """Before the first call of each distinct linear-site input, a call handing it to the observer: sites
        fed by one tensor (q, k, v) share one group and one set of statistics work."""
        groups: dict = {}  # input node -> (node to insert before, [rel fqn])
        for s, e in zip(sites, g.entries):
            if s.kind != "linear" or s.installed or not isinstance(s.input_node, fx.Node):
                continue
            at, names = groups.setdefault(s.input_node, (s.node, []))
            if e[2] not in names:
                names.append(e[2])
        if self.structures:
            for x, (at, name) in self._structure_inputs(gm, f_locals).items():
                groups.setdefault(x, (at, []))[1].append(name)
        for x, (at, names) in groups.items():
            with gm.graph.inserting_before(at):
                gm.graph.call_function(_observe, (self.token, len(g.groups), x))
            g.groups.append(names)
        gm.recompile()

    def _structure_inputs(self, gm: fx.GraphModule, f_locals) -> dict:
        """{input node: (its first use in the call, rel module path)} for each call of an installed structure:
        the tensor from outside the call that the structure's ops consume, of its in_features."""
        from ..families import Structure

        calls: dict = {}  # nn_module_stack key -> (expr, nodes in the call)
        for n in gm.graph.nodes:
            if n.op == "placeholder":  # parameters carry their module's stack too
                continue
            for key, (expr, mtype) in (n.meta.get("nn_module_stack") or {}).items():
                if isinstance(mtype, type) and issubclass(mtype, Structure):
                    calls.setdefault(key, (expr, []))[1].append(n)
        out = {}
        for expr, nodes in calls.values():
            base = eval_root(expr, f_locals) if f_locals is not None else None
            try:
                mod = base.get_submodule(strip_root(expr)) if strip_root(expr) else base
            except Exception:
                continue
            inside = set(nodes)
            for n in nodes:
                x = next(
                    (
                        a
                        for a in n.all_input_nodes
                        if a not in inside
                        and a.op != "get_attr"
                        and not isinstance(_example_value(a), nn.Parameter)
                        and getattr(_example_value(a), "shape", (None,))[-1:] == (mod.in_features,)
                        and not _is_param_input(a)
                    ),
                    None,
                )
                if x is not None:
                    out[x] = (n, strip_root(expr))
                    break
        return out

    # --- run time -------------------------------------------------------------------------------------------
    def _bind(self, g: _Graph, args) -> str:
        """The prefix of the instance this call runs for; records its sites."""
        prefix = g.prefix
        if g.anchor is not None:
            i, rel = g.anchor
            if not self._holds(g.prefix + rel, args[i]):
                prefix = self._prefix_of(args[i], rel)
        bound = g.bound.get(prefix)
        if bound is None:
            bound = g.bound[prefix] = [self._rebind(e, prefix, g.prefix, args) for e in g.entries]
        for c in bound:
            s = c.site
            if s.kind == "linear" and not s.installed and s.fqn not in self.sites:
                self.sites[s.fqn] = c
        if self.keep_calls:
            self.calls.extend(dataclasses.replace(c, site=dataclasses.replace(c.site)) for c in bound)
        return prefix

    def _prefix_of(self, param, rel: str) -> str:
        if self._paths is None:
            self._paths = {}
            for name, p in self.model.named_parameters(remove_duplicate=False):
                self._paths.setdefault(id(p), []).append(name)
        for p in self._paths.get(id(param), ()):
            if p == rel or p.endswith("." + rel):
                return p[: len(p) - len(rel)]
        raise RuntimeError(
            f"lrcompile: a graph ran with a parameter that is not {type(self.model).__name__}'s "
            f"(expected one at ….{rel}): its sites cannot be named"
        )

    def _rebind(self, e: list, prefix: str, own: str, args) -> CapturedSite:
        site, module, rel_fqn, rel_module, rel_weight, wi, bi = e
        if prefix == own:
            return CapturedSite(site, module)
        inst = self.model.get_submodule(prefix[:-1]) if prefix else self.model
        s = dataclasses.replace(
            site,
            fqn=_named(prefix, rel_fqn),
            weight_path=prefix + rel_weight if rel_weight else None,
            weight=args[wi] if wi is not None else site.weight,
            bias=args[bi] if bi is not None else site.bias,
        )
        try:
            module = inst.get_submodule(rel_module) if rel_module else inst
        except AttributeError:
            module = None
        return CapturedSite(s, module)

    def _observed(self, group: int, x) -> None:
        if not self._running or self.observe is None:
            return
        g, prefix = self._running[-1]
        self.observed += 1
        self.observe([_named(prefix, rel) for rel in g.groups[group]], x)


def _runner(fn, ref, gi: int):
    def run(*args):
        rec = ref()
        if rec is None or rec.model is None:  # closed
            return fn(*args)
        g = rec._graphs[gi]
        rec._running.append((g, rec._bind(g, args)))
        try:
            return fn(*args)
        finally:
            rec._running.pop()

    return run


def _is_param_input(node: fx.Node) -> bool:
    if node.op != "placeholder":
        return False
    return isinstance(compat.placeholder_example(node), nn.Parameter)


@contextlib.contextmanager
def recording(model: nn.Module, recorder: Recorder, *, dynamic: Optional[bool] = False):
    """`model` compiled with `recorder` as its backend, for the block's calls. Afterwards the frames Dynamo
    compiled with it are thrown away, and only those: they hold the model's tensors, and must stay out of later
    compiles, while a Dynamo reset would recompile every other model in the process (and break a compile in
    progress, from whose backend a capture may run)."""
    try:
        yield torch.compile(model, backend=recorder, dynamic=dynamic)
    finally:
        recorder.close()
        compat.discard_compiled(recorder)


def capture_sites(model: nn.Module, example_inputs) -> list[CapturedSite]:
    """Every site of the model in call order (a module called twice appears once per call)."""
    rec = Recorder(model, keep_calls=True)
    with recording(model, rec) as compiled, torch.no_grad():
        call_model(compiled, example_inputs)
    return rec.calls


def linear_sites(captured) -> list[Site]:
    """The distinct linear sites the backend could rewrite (a module called twice is one site), in call order."""
    out = {}
    for c in captured:
        s = c.site if isinstance(c, CapturedSite) else c
        if s.kind == "linear" and not s.installed and s.fqn not in out:
            out[s.fqn] = s
    return list(out.values())


def model_sites(model: nn.Module, example_inputs, *, nested: bool = False) -> list[Site]:
    """`linear_sites` of one call of `model`. `nested`: from inside a backend call (a compile in progress),
    leaving no trace of the extra call — the RNG state and the buffers (batch
    norm statistics) are restored."""
    rec = Recorder(model)
    with contextlib.ExitStack() as stack:
        if nested:
            devices = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
            stack.enter_context(torch.random.fork_rng(devices=devices))
            saved = [(b, b.detach().clone()) for b in model.buffers()]
            stack.callback(lambda: [b.data.copy_(v) for b, v in saved])
        compiled = stack.enter_context(recording(model, rec))
        stack.enter_context(torch.no_grad())
        call_model(compiled, example_inputs)
    return [c.site for c in rec.sites.values()]


def call_inputs(model: nn.Module) -> Optional[Call]:
    """The arguments the compiled `model` is being called with, from the Python stack (during a backend call):
    the outermost frame of a compiled module (`torch.compile(model)` or `model.compile()`, DDP wrappers seen
    through) whose module is `model`. None where `model` was not compiled itself (`torch.compile(fn)`)."""
    found = None
    for cand, loc in compiled_callers():
        if cand is model and isinstance(loc.get("args"), tuple) and isinstance(loc.get("kwargs"), dict):
            found = Call(loc["args"], loc["kwargs"])
    return found
