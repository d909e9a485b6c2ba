"""lrcompile.compat on the installed torch (CI runs this on 2.11 and 2.13): each function reaches the private
API it wraps, and no other module of the package names a private torch name."""

import gc
import io
import pathlib
import re
import tokenize
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrcompile import compat


def capture(fn, *args, dynamic=False, inside=None):
    """Compile fn with a backend that calls inside(gm, example_inputs) during the backend call; returns what
    that returned."""
    got = []

    def backend(gm, inputs, **_):
        got.append(inside(gm, inputs))
        return gm.forward

    torch.compile(fn, backend=backend, dynamic=dynamic)(*args)
    assert got, "the backend was not called"
    return got[0]


def test_op_identities():
    assert F.linear in compat.LINEAR_OPS and torch._C._nn.linear in compat.LINEAR_OPS
    assert F.scaled_dot_product_attention in compat.SDPA_OPS and F.gelu in compat.GELU_OPS


def test_frame_locals_inside_and_outside_a_backend_call():
    assert compat.frame_locals() is None
    lin = nn.Linear(4, 3)
    f_locals = capture(lin, torch.randn(2, 4), inside=lambda gm, inputs: compat.frame_locals())
    assert f_locals is not None and any(v is lin for v in f_locals.values())
    assert compat.frame_locals() is None  # and none left behind


def test_placeholder_source_and_real_example():
    lin = nn.Linear(4, 3)

    def inside(gm, inputs):
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        return (
            [compat.grapharg(n) is not None for n in phs],
            [compat.placeholder_source(n) for n in phs],
            [compat.placeholder_example(n) for n in phs],
        )

    has, names, examples = capture(lin, torch.randn(2, 4), inside=inside)
    assert all(has)
    i = next(i for i, s in enumerate(names) if s and "weight" in s)
    assert examples[i] is lin.weight  # the real parameter, not a fake
    assert re.search(r"_parameters\['weight'\]|\.weight", names[i])
    assert compat.grapharg(torch.fx.Graph().placeholder("x")) is None


def test_source_name_takes_a_string_a_property_or_a_method():
    class Prop:
        name = "L['x']"

    class Meth:
        def name(self):
            return "L['y']"

    assert compat.source_name("L['z']") == "L['z']"
    assert compat.source_name(Prop()) == "L['x']" and compat.source_name(Meth()) == "L['y']"
    assert compat.source_name(None) is None


def test_example_value_fake_mode_and_fakes():
    def inside(gm, inputs):
        mode = compat.fake_mode_of(inputs)
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        ev = compat.example_value(x)
        t = compat.to_fake(mode, torch.ones(3, 5))
        return mode, ev, t

    mode, ev, t = capture(lambda x: x * 2, torch.randn(2, 3), inside=inside)
    assert mode is not None
    assert compat.is_fake(ev) and tuple(ev.shape) == (2, 3)
    assert compat.fake_in(mode, t) and tuple(t.shape) == (3, 5)
    assert not compat.is_fake(torch.ones(1)) and not compat.fake_in(mode, torch.ones(1))
    other = compat.new_fake_mode()
    assert not compat.fake_in(other, t) and compat.fake_in(other, compat.to_fake(other, torch.ones(2)))


def test_size_hint_and_statically_known_true_on_symbolic_sizes():
    assert compat.size_hint(7) == 7 and compat.statically_known_true(True)

    def inside(gm, inputs):
        fakes = [compat.example_value(n) for n in gm.graph.nodes if n.op == "placeholder"]
        s = next(v for v in fakes if isinstance(v, torch.Tensor)).shape[0]
        return compat.size_hint(s, fallback=1), isinstance(s, torch.SymInt), compat.statically_known_true(s == s)

    hint, symbolic, same = capture(lambda x: x.sum(0), torch.randn(6, 3), dynamic=True, inside=inside)
    assert symbolic and hint == 6 and same


def test_copy_dynamo_metadata_and_mark_new_input():
    def inside(gm, inputs):
        graph, vm = torch.fx.Graph(), {}
        graph.output(graph.graph_copy(gm.graph, vm))
        new = torch.fx.GraphModule(gm, graph)
        compat.copy_dynamo_metadata(gm, new, vm)
        old_ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
        ph = graph.placeholder("extra")
        compat.mark_new_input(ph)
        return (
            getattr(vm[old_ph], "_dynamo_source", "unset") is getattr(old_ph, "_dynamo_source", "unset"),
            getattr(new, "_param_name_to_source", None) == getattr(gm, "_param_name_to_source", None),
            ph._dynamo_source,
        )

    same_src, same_params, extra = capture(nn.Linear(4, 2), torch.randn(1, 4), inside=inside)
    assert same_src and same_params and extra is None


def test_discard_compiled_drops_only_that_backends_frames():
    kept, thrown = [], []
    x = torch.ones(2)

    def keep(gm, inputs):
        kept.append(1)
        return gm.forward

    def throwaway(gm, inputs):
        thrown.append(weakref.ref(gm))
        return gm.forward

    def f(x):
        return x + 1

    def g(x):
        y = x * 2
        torch._dynamo.graph_break()  # a resume function: a code object of Dynamo's own
        return y - 1

    c = torch.compile(f, backend=keep)
    c(x)
    for fn in (f, g):
        torch.compile(fn, backend=throwaway)(x)
    assert len(thrown) == 3
    assert compat.discard_compiled(throwaway) == 3
    gc.collect()
    assert thrown[0]() is None, "a discarded frame still holds its graph"
    assert compat.discard_compiled(throwaway) == 0
    c(x)
    assert kept == [1], "another backend's frame of the same function was recompiled"
    torch.compile(f, backend=throwaway)(x)
    assert len(thrown) == 4, "a discarded frame was reused"


@pytest.mark.parametrize("limit", ["recompile_limit", "accumulated_recompile_limit"])
def test_discarded_frames_do_not_count_toward_the_recompile_limits(limit):
    calls = []

    def count(gm, inputs):
        calls.append(1)
        return gm.forward

    def f(x):
        return x + 1

    with torch._dynamo.config.patch(**{limit: 2}):
        for _ in range(3):

            def throwaway(gm, inputs):
                return gm.forward

            torch.compile(f, backend=throwaway)(torch.ones(2))
            compat.discard_compiled(throwaway)
        torch.compile(f, backend=count)(torch.ones(2))
    assert calls == [1], f"f ran eagerly: the discarded frames counted toward {limit}"


def test_discard_compiled_inside_a_compile():
    """From a backend call (a capture of the model being compiled): the compile in progress still completes and
    its frame is not recompiled."""
    calls, inner = [], []

    def f(x):
        return x * 3

    def throwaway(gm, inputs):
        inner.append(1)
        return gm.forward

    def outer(gm, inputs):
        calls.append(1)
        torch.compile(f, backend=throwaway)(torch.ones(2))
        assert compat.discard_compiled(throwaway) == 1
        return gm.forward

    c = torch.compile(f, backend=outer)
    assert torch.equal(c(torch.ones(2)), torch.full((2,), 3.0))
    assert torch.equal(c(torch.ones(2)), torch.full((2,), 3.0))
    assert calls == [1] and inner == [1]


def test_compiled_original():
    m = nn.Linear(2, 2)
    opt = torch.compile(m, backend="eager")
    assert compat.is_optimized_module(opt) and compat.compiled_original(opt) is m
    assert not compat.is_optimized_module(m) and compat.compiled_original(m) is None
    m2 = nn.Linear(2, 2)
    m2.compile(backend="eager")
    assert compat.compiled_original(m2) is m2
    assert compat.compiled_original(object()) is None


def test_compile_fx_applies_the_mode_options(monkeypatch):
    import torch._inductor
    import torch._inductor.compile_fx as cfx

    seen = []
    monkeypatch.setattr(cfx, "compile_fx", lambda gm, inputs, **kw: seen.append(kw) or gm.forward)
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    compat.compile_fx(gm, [torch.ones(2)], None)
    compat.compile_fx(gm, [torch.ones(2)], "max-autotune-no-cudagraphs")
    assert seen[0]["config_patches"] is None
    assert seen[1]["config_patches"] == torch._inductor.list_mode_options("max-autotune-no-cudagraphs")


@pytest.mark.slow
def test_compile_fx_compiles():
    """Inductor itself (C++ codegen on CPU): the callable it returns computes the graph."""
    captured = {}

    def backend(gm, inputs):
        captured["fn"] = compat.compile_fx(gm, inputs, None)
        return captured["fn"]

    out = torch.compile(lambda x: torch.relu(x) * 3, backend=backend)(torch.tensor([-1.0, 2.0]))
    torch.testing.assert_close(out, torch.tensor([0.0, 6.0]))


def test_is_functorch_wrapped():
    x = torch.randn(3, 2)
    assert not compat.is_functorch_wrapped(x)
    seen = []
    torch.func.vmap(lambda r: seen.append(compat.is_functorch_wrapped(r)) or r)(x)
    assert seen == [True]


def test_active_ddp_module_outside_ddp_and_without_the_api(monkeypatch):
    assert compat.active_ddp_module() is None
    from torch.nn.parallel import DistributedDataParallel

    monkeypatch.delattr(DistributedDataParallel, "_get_active_ddp_module")
    monkeypatch.setattr(compat, "_warned", set())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert compat.active_ddp_module() is None
        assert compat.active_ddp_module() is None
    msgs = [str(x.message) for x in w if "_get_active_ddp_module" in str(x.message)]
    assert len(msgs) == 1  # visible, once


def test_missing_private_api_is_one_line_error(monkeypatch):
    from torch._dynamo.symbolic_convert import InstructionTranslator

    from lrcompile.errors import LrcompileError

    monkeypatch.delattr(InstructionTranslator, "current_tx")
    with pytest.raises(LrcompileError, match=r"^lrcompile: torch \S+ has no InstructionTranslator.current_tx\(\)") as e:
        compat.frame_locals()
    assert "\n" not in str(e.value)


# --- only compat.py names private torch API -------------------------------------------------------------------

PACKAGE = pathlib.Path(compat.__file__).parent
# torch._<x> (not torch.__version__, not the public torch._foreach_* ops), and private names that are reached
# without the torch._ prefix: attributes Dynamo sets, its meta keys, symbolic-shape internals.
PRIVATE = re.compile(
    r"\btorch(?:\.[A-Za-z]\w*)*\._(?!_|foreach_)|\bfrom\s+torch(?:\.\w+)*\s+import\s+\(?\s*_|"
    r"\b_dynamo_source\b|\b_param_name_to_source\b|"
    r"\bcurrent_tx\b|\b_get_active_ddp_module\b|\boptimization_hint\b|[\"']grapharg[\"']|"
    r"[\"']example_value[\"']|\b_orig_mod\b|\b_compiled_call_impl\b|is_functorch_wrapped_tensor|"
    r"\bsymbolic_shapes\b|\bOptimizedModule\b|\bdetect_fake_mode\b|\bFakeTensor(Mode)?\b|"
    r"\blist_mode_options\b"
)


def code_without_comments(path: pathlib.Path) -> str:
    """The file's text with comments blanked: a comment may say what compat wraps."""
    src = path.read_text()
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type != tokenize.COMMENT:
            out.append((tok.start, tok.string))
    return "\n".join(s for _, s in out)


def test_only_compat_names_private_torch_api():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "compat.py" and path.parent == PACKAGE:
            continue
        for m in PRIVATE.finditer(code_without_comments(path)):
            offenders.append(f"{path.relative_to(PACKAGE.parent)}: {m.group(0)}")
    assert not offenders, "private torch names outside lrcompile/compat.py:\n" + "\n".join(offenders)


def test_the_private_name_pattern_catches_what_it_should():
    for bad in (
        "torch._dynamo.reset()",
        "from torch._guards import detect_fake_mode",
        "gm._param_name_to_source",
        "node.meta['grapharg']",
        "torch._C._nn.linear",
        "from torch import _dynamo",
        "x._dynamo_source = None",
        "torch.utils._pytree.tree_leaves(x)",
        "from torch.utils import _pytree",
    ):
        assert PRIVATE.search(bad), bad
    for ok in ("torch.__version__", "torch._foreach_add_(xs, ys)", "torch.compile(m)", "compat.size_hint(s)"):
        assert not PRIVATE.search(ok), ok
