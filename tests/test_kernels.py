"""Every Triton kernel against its torch reference and a float64 reference, under TRITON_INTERPRET=1.

Shapes are tiny, odd and non-power-of-two (rows include 1); every output buffer is poisoned with NaN first, so an
element a kernel never writes fails the comparison. The interpreter multiplies in fp32 (its bf16 tl.dot is
wrong), so bf16 cases check bf16 storage, casts and epilogues, not bf16 tensor-core arithmetic.
"""
import os
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

from lrcompile.kernels import OPS, runtime  # noqa: E402
from lrcompile.kernels import blast, dora, lora, lowrank, noble, twocore  # noqa: E402
from lrcompile.kernels import epilogue as epi  # noqa: E402
from lrcompile.kernels.gemm import gemm  # noqa: E402
from lrcompile.kernels.op import reference  # noqa: E402
from lrcompile.structures import FAMILIES  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
CORE = {"lowrank": lowrank.core, "lora": lora.core, "dora": dora.core, "noble": noble.core,
        "twocore": twocore.core, "blast": blast.core}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(runtime, "POISON", True)
    warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def family_case(name: str, in_f: int, out_f: int):
    """(op name, tensors) for one family at (in_f, out_f), random but non-trivial (adapters' B not zero)."""
    F = FAMILIES
    if name == "lowrank":
        return "lowrank", [torch.randn(out_f, 5) / 3, torch.randn(5, in_f) / in_f**0.5]
    if name in ("lora", "dora"):
        W, A, B = torch.randn(out_f, in_f) / in_f**0.5, torch.randn(6, in_f) / in_f**0.5, torch.randn(out_f, 6) / 3
        s = torch.tensor(0.75)
        return name, ([W, A, B, s] if name == "lora" else [W, A, B, torch.rand(out_f) + 0.5, s])
    if name == "noble":
        m = F["noble"].init(in_f, out_f, F["noble"].Config(rank=5))
        torch.nn.init.normal_(m.up, std=0.3)  # audible branch
        return "noble", [torch.randn(out_f, in_f) / in_f**0.5] + [t.detach() for t in m.tensors()]
    if name == "monarch":
        m = F["monarch"].init(in_f, out_f, F["monarch"].Config(blocks=3))
    elif name == "btt":
        m = F["btt"].init(in_f, out_f, F["btt"].Config(rank=2))
    elif name == "blast":
        m = F["blast"].init(in_f, out_f, F["blast"].Config(rank=3, blocks=[2, 3]))
    return ("blast" if name == "blast" else "twocore"), [t.detach() for t in m.tensors()]


# (family, in, out): odd sizes; BTT needs factorisable sizes, BLAST divisible ones, Monarch pads
SHAPES = {"lowrank": (37, 23), "lora": (37, 23), "dora": (29, 19), "noble": (37, 23), "monarch": (37, 23),
          "btt": (35, 22), "blast": (36, 22)}
EPI = "add_row,gelu,add"


def run_case(name, dtype, lead, epilogue=EPI, alpha=1.3, check_torch=True):
    in_f, out_f = SHAPES[name]
    opname, tensors = family_case(name, in_f, out_f)
    tensors = [t.to(dtype) for t in tensors]
    x = torch.randn(*lead, in_f, dtype=dtype)
    operands = []
    for s in epi.parse(epilogue):
        if s.endswith("_row"):
            operands.append(torch.randn(out_f, dtype=dtype))
        elif s in ("add", "mul"):
            operands.append(torch.randn(*lead, out_f, dtype=dtype))
    if name == "noble":
        alpha = 1.0  # exercised separately: the branch is not linear in x
    y = OPS[opname](x, tensors, operands, epilogue, alpha, None)
    d = lambda ts: [t.double() for t in ts]  # noqa: E731
    y64 = reference(CORE[opname], x.double(), d(tensors), d(operands), epilogue, alpha, None)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    assert not torch.isnan(y).any(), f"{name}: unwritten (NaN-poisoned) outputs"
    assert rel(y, y64) < TOL[dtype], (name, dtype, rel(y, y64))
    if check_torch:
        yt = reference(CORE[opname], x, tensors, operands, epilogue, alpha, None)
        assert rel(yt, y64) < TOL[dtype]
    return x, tensors, operands, opname, alpha


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_matches_float64(name, dtype):
    run_case(name, dtype, (2, 7))
    run_case(name, dtype, (1,), epilogue="add_row", check_torch=False)  # one row


def test_lowrank_two_stage_path(monkeypatch):
    """Ranks too wide for the on-chip chain go through two GEMM launches with the same epilogue."""
    monkeypatch.setattr(lowrank, "CHAIN_MAX_R", 0)
    for dtype in (torch.float32, torch.bfloat16):
        run_case("lowrank", dtype, (3, 5))


def test_noble_input_scale_applies_before_the_cosine():
    in_f, out_f = SHAPES["noble"]
    _, tensors = family_case("noble", in_f, out_f)
    x = torch.randn(4, in_f)
    y = OPS["noble"](x, tensors, [], "", 0.6, None)
    y64 = noble.core(0.6 * x.double(), *[t.double() for t in tensors])
    assert rel(y, y64) < 1e-4


@pytest.mark.parametrize("step", epi.STEPS)
def test_each_epilogue_step(step):
    a, b = torch.randn(9, 21), torch.randn(13, 21)
    ops = [torch.randn(13)] if step.endswith("_row") else [torch.randn(9, 13)] if step in ("add", "mul") else []
    y = gemm(a, b, steps=(step,), operands=ops, alpha=0.9)
    y64 = epi.apply(0.9 * a.double() @ b.double().T, (step,), [o.double() for o in ops])
    assert rel(y, y64) < 1e-5


def test_prologue_cast_and_output_cast():
    """x arrives in fp32 while the factors are bf16 (an absorbed input cast); the output is cast to fp32."""
    _, (U, V) = family_case("lowrank", 37, 23)
    U, V = U.bfloat16(), V.bfloat16()
    x = torch.randn(3, 37)
    y = OPS["lowrank"](x, [U, V], [], "relu", 1.0, torch.float32)
    assert y.dtype == torch.float32
    y64 = reference(CORE["lowrank"], x.bfloat16().double(), [U.double(), V.double()], [], "relu", 1.0, None)
    assert rel(y, y64) < 2e-2


@pytest.mark.parametrize("name", ["lowrank", "lora", "dora", "noble", "monarch", "blast"])
def test_backward_matches_float64(name):
    """The op's autograd (reference vjp in torch) against float64 autograd of the reference."""
    in_f, out_f = SHAPES[name]
    opname, tensors = family_case(name, in_f, out_f)
    x = torch.randn(3, 4, in_f)
    ops = [torch.randn(out_f), torch.randn(3, 4, out_f)]
    alpha = 1.0 if name == "noble" else 0.8
    leaves = [t.clone().requires_grad_() for t in [x, *tensors, *ops]]
    lx, lt, lo = leaves[0], leaves[1:1 + len(tensors)], leaves[1 + len(tensors):]
    y = OPS[opname](lx, lt, lo, "add_row,silu,add", alpha, None)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [g for g in leaves if g.dtype.is_floating_point and g.numel()], gy,
                                allow_unused=True)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = reference(CORE[opname], leaves64[0], leaves64[1:1 + len(tensors)], leaves64[1 + len(tensors):],
                    "add_row,silu,add", alpha, None)
    grads64 = torch.autograd.grad(y64, [g for g in leaves64 if g.numel()], gy.double(), allow_unused=True)
    for g, g64 in zip(grads, grads64):
        if g64 is None:
            assert g is None or not g.any()
            continue
        assert rel(g, g64) < 1e-4


@pytest.mark.parametrize("opname", ["lowrank", "lora", "dora", "noble", "twocore", "blast"])
def test_opcheck(opname, monkeypatch):
    """torch.library.opcheck: schema, fake impl, autograd registration, AOT dispatch (torch path: fast)."""
    monkeypatch.delenv("TRITON_INTERPRET")
    name = {"twocore": "monarch"}.get(opname, opname)
    in_f, out_f = SHAPES[name]
    _, tensors = family_case(name, in_f, out_f)
    x = torch.randn(2, 3, in_f)
    args = (x, tensors, [torch.randn(out_f), torch.randn(2, 3, out_f)], "add_row,gelu_tanh,add", 1.0, None)
    torch.library.opcheck(OPS[opname], args)
    grad_args = (x.requires_grad_(), [t.requires_grad_() for t in tensors], args[2], *args[3:])
    torch.library.opcheck(OPS[opname], grad_args)


def test_without_gpu_or_interpreter_the_torch_path_runs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")

    def boom(*a, **k):
        raise AssertionError("a Triton launch on a CPU tensor without the interpreter")

    monkeypatch.setattr(runtime, "launch", boom)
    _, tensors = family_case("lowrank", 37, 23)
    x = torch.randn(4, 37)
    b = torch.randn(23)
    y = OPS["lowrank"](x, tensors, [b], "add_row,relu", 1.0, None)
    U, V = (t.double() for t in tensors)
    assert rel(y, torch.relu(x.double() @ V.T @ U.T + b.double())) < 1e-5


def test_triton_imported_before_the_interpreter_flag_falls_back_with_a_warning(monkeypatch):
    """TRITON_INTERPRET set after triton's import cannot take effect: the torch path runs, and says so."""
    import triton.language as tl

    monkeypatch.setattr(tl, "zeros", object())  # what a compiled-mode import leaves there
    monkeypatch.setattr(runtime, "_late_warned", False)
    with pytest.warns(UserWarning, match="set after triton was imported"):
        assert not runtime.interpreting()


def test_kernel_source_cached_by_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("LRCOMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "_modules", {})  # earlier tests loaded these sources in this process
    a, b = torch.randn(5, 17), torch.randn(3, 17)
    gemm(a, b, steps=("relu",))
    gemm(a, b, steps=("relu",))
    gemm(a, b, steps=("tanh",))
    files = sorted(os.listdir(tmp_path / "kernels"))
    assert len(files) == 2 and all(f.startswith("gemm_") and f.endswith(".py") for f in files)


@pytest.mark.slow
def test_compiled_training_step_through_the_kernel_op():
    """The op inside an Inductor-compiled graph, forward and backward, under the interpreter."""
    _, (U, V) = family_case("lowrank", 37, 23)
    U, V = U.requires_grad_(), V.requires_grad_()
    x = torch.randn(2, 5, 37, requires_grad=True)
    b, r = torch.randn(23), torch.randn(2, 5, 23)

    def f(x, U, V):
        return OPS["lowrank"](x, [U, V], [b, r], "add_row,gelu,add", 1.0, None).square().sum()

    loss = torch.compile(f, backend="inductor")(x, U, V)
    g = torch.autograd.grad(loss, (x, U, V))
    x64, U64, V64 = (t.detach().double().requires_grad_() for t in (x, U, V))
    loss64 = reference(CORE["lowrank"], x64, [U64, V64], [b.double(), r.double()], "add_row,gelu,add", 1.0, None)
    g64 = torch.autograd.grad(loss64.square().sum(), (x64, U64, V64))
    assert rel(loss, loss64.square().sum()) < 1e-4
    assert all(rel(a, c) < 1e-4 for a, c in zip(g, g64))
