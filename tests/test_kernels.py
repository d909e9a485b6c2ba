"""Every Triton kernel against its torch reference and a float64 reference, under TRITON_INTERPRET=1.

Shapes are tiny, odd and non-power-of-two (rows include 1, in or out features 1, rank 1 where the family allows
it); every output buffer is poisoned with NaN first, so an element a kernel never writes fails the comparison.
Every test checks that Triton really ran (a spy on runtime.launch). The interpreter multiplies in fp32 (its bf16
tl.dot is wrong), so bf16 cases check bf16 storage, casts and epilogues, not bf16 tensor-core arithmetic.
"""

import os
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

triton = pytest.importorskip("triton")

from conftest import spy_launches  # noqa: E402

from lrcompile.families import FAMILIES  # noqa: E402
from lrcompile.kernels import OPS, blast, dora, lora, lowrank, noble, runtime, twocore  # noqa: E402  # noqa: E402
from lrcompile.kernels import epilogue as epi  # noqa: E402
from lrcompile.kernels.gemm import gemm  # noqa: E402
from lrcompile.kernels.op import reference  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
CORE = {
    "lowrank": lowrank.core,
    "lora": lora.core,
    "dora": dora.core,
    "noble": noble.core,
    "twocore": twocore.core,
    "blast": blast.core,
}
OPNAME = {"monarch": "twocore", "btt": "twocore"}


@pytest.fixture(autouse=True)
def launches(monkeypatch):
    """The kernels run interpreted (not the torch fallback): the flag took effect, and every launch is recorded."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert runtime.interpreting() is True
    warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning)
    return spy_launches(monkeypatch)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def family_case(name: str, in_f: int, out_f: int, size=None):
    """(op name, tensors) for one family at (in_f, out_f), random but non-trivial (adapters' B not zero).
    size: the family's rank (monarch: blocks; btt: (rank, in_factors, out_factors); blast: (rank, blocks))."""
    F = FAMILIES
    if name == "lowrank":
        r = size or 5
        return "lowrank", [torch.randn(out_f, r) / 3, torch.randn(r, in_f) / in_f**0.5]
    if name in ("lora", "dora"):
        r = size or 6
        W, A, B = torch.randn(out_f, in_f) / in_f**0.5, torch.randn(r, in_f) / in_f**0.5, torch.randn(out_f, r) / 3
        s = torch.tensor(0.75)
        return name, ([W, A, B, s] if name == "lora" else [W, A, B, torch.rand(out_f) + 0.5, s])
    if name == "noble":
        m = F["noble"].init(in_f, out_f, F["noble"].Config(rank=size or 5))
        torch.nn.init.normal_(m.up, std=0.3)  # audible branch
        return "noble", [torch.randn(out_f, in_f) / in_f**0.5] + [t.detach() for t in m.tensors()]
    if name == "monarch":
        m = F["monarch"].init(in_f, out_f, F["monarch"].Config(blocks=size or 3))
    elif name == "btt":
        rank, fin, fout = size or (2, None, None)
        m = F["btt"].init(in_f, out_f, F["btt"].Config(rank=rank, in_factors=fin, out_factors=fout))
    elif name == "blast":
        rank, blocks = size or (3, [2, 3])
        m = F["blast"].init(in_f, out_f, F["blast"].Config(rank=rank, blocks=blocks))
    return OPNAME.get(name, name), [t.detach() for t in m.tensors()]


# (family) -> [(in, out, size)]: odd sizes, in or out = 1, rank 1 where the family allows it. BTT needs
# factorisable sizes (explicit factors for primes), BLAST divisible ones, Monarch pads.
CASES = {
    "lowrank": [(37, 23, 5), (1, 9, 1), (13, 1, 1), (50, 29, 17)],
    "lora": [(37, 23, 6), (1, 7, 1), (19, 1, 3)],
    "dora": [(29, 19, 6), (1, 5, 1), (11, 1, 2)],
    "noble": [(37, 23, 5), (1, 6, 1), (17, 1, 3)],
    "monarch": [(37, 23, 3), (1, 5, 1), (7, 1, 1), (45, 50, 5)],
    "btt": [
        (35, 22, (2, None, None)),
        (1, 6, (1, [1, 1], [2, 3])),
        (15, 1, (1, [3, 5], [1, 1])),
        (21, 9, (3, None, None)),
    ],
    "blast": [(36, 22, (3, [2, 3])), (1, 5, (1, [1, 1])), (9, 1, (1, [1, 3])), (30, 21, (4, [3, 5]))],
}
CASE_IDS = [(n, i) for n in CASES for i in range(len(CASES[n]))]
EPI = "add_row,gelu,add"


def make_case(name, dtype, lead, epilogue=EPI, case=0):
    in_f, out_f, size = CASES[name][case]
    opname, tensors = family_case(name, in_f, out_f, size)
    tensors = [t.to(dtype) for t in tensors]
    x = torch.randn(*lead, in_f, dtype=dtype)
    operands = []
    for s in epi.parse(epilogue):
        if s.endswith("_row"):
            operands.append(torch.randn(out_f, dtype=dtype))
        elif s in ("add", "mul"):
            operands.append(torch.randn(*lead, out_f, dtype=dtype))
    return opname, x, tensors, operands, out_f


def run_case(name, dtype, lead, epilogue=EPI, alpha=1.3, check_torch=True, case=0):
    opname, x, tensors, operands, out_f = make_case(name, dtype, lead, epilogue, case)
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
@pytest.mark.parametrize("name,case", CASE_IDS, ids=[f"{n}{i}" for n, i in CASE_IDS])
def test_forward_matches_float64(name, case, dtype, launches):
    run_case(name, dtype, (2, 7), case=case)
    if dtype == torch.float32 or CASES[name][case][1] > 1:
        # one row; not a lone bf16 output element: its rounding error relative to a cancelling sum is
        # unbounded (the unfused torch sequence misses 2e-2 there just the same)
        run_case(name, dtype, (1,), epilogue="add_row", check_torch=False, case=case)
    assert launches, "no Triton kernel ran"


def test_lowrank_two_stage_path(monkeypatch, launches):
    """Ranks too wide for the on-chip chain go through two GEMM launches with the same epilogue."""
    monkeypatch.setattr(lowrank, "CHAIN_MAX_R", 0)
    for dtype in (torch.float32, torch.bfloat16):
        run_case("lowrank", dtype, (3, 5))
    assert set(launches) == {"gemm_kernel"}


@pytest.mark.parametrize("name", ["monarch", "btt"])
def test_twocore_one_kernel_and_two_launch_paths(name, monkeypatch, launches):
    """Blocks that fit on chip run as one kernel (z in registers); wider ones as two batched GEMMs."""
    for dtype in (torch.float32, torch.bfloat16):
        run_case(name, dtype, (2, 3), case=0)
    assert set(launches) == {"btt_kernel"}
    launches.clear()
    monkeypatch.setattr(twocore, "ONE_MAX_C1", 0)
    for dtype in (torch.float32, torch.bfloat16):
        run_case(name, dtype, (2, 3), case=0)
    assert set(launches) == {"bgemm_kernel"}


def test_noble_input_scale_applies_before_the_cosine():
    in_f, out_f, size = CASES["noble"][0]
    _, tensors = family_case("noble", in_f, out_f, size)
    x = torch.randn(4, in_f)
    y = OPS["noble"](x, tensors, [], "", 0.6, None)
    y64 = noble.core(0.6 * x.double(), *[t.double() for t in tensors])
    assert rel(y, y64) < 1e-4


def test_noble_rank_above_the_kernel_limit_forms_h_in_torch(monkeypatch, launches):
    """A rank whose (BM × r) tile would not fit on chip: h in torch, the expand and epilogue still fused."""
    monkeypatch.setattr(noble, "MAX_R", 16)
    in_f, out_f = 21, 13
    _, tensors = family_case("noble", in_f, out_f, 17)  # pow2(17) = 32 > 16
    x, b = torch.randn(3, in_f), torch.randn(out_f)
    y = OPS["noble"](x, tensors, [b], "add_row,relu", 1.0, None)
    y64 = reference(noble.core, x.double(), [t.double() for t in tensors], [b.double()], "add_row,relu", 1.0, None)
    assert rel(y, y64) < 1e-4
    assert launches == ["gemm_kernel"]


def test_cosnet_torch_is_the_structure_branch():
    """The backward's and the rank fallback's CosNet is NOBLE.functional's branch."""
    in_f, out_f, size = CASES["noble"][0]
    _, (W, *branch, up) = family_case("noble", in_f, out_f, size)
    x = torch.randn(5, in_f)
    got = noble.cosnet_torch(x, *branch) @ up.T
    assert rel(got, noble.core(x, torch.zeros_like(W), *branch, up)) < 1e-6


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


def _inplace_addmm_flops(self_shape, a_shape, b_shape, *_, out_shape=None, **__) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


INPLACE_ADDMM = {torch.ops.aten.addmm_: _inplace_addmm_flops}


def grads_vs_float64(name, dtype, epilogue, case=0, frozen=()):
    """Gradients of every input but the `frozen` tensor indices, against float64 autograd of the reference."""
    in_f, out_f, size = CASES[name][case]
    opname, tensors = family_case(name, in_f, out_f, size)
    x = torch.randn(3, 4, in_f)
    ops = [
        torch.randn(out_f) if s.endswith("_row") else torch.randn(3, 4, out_f)
        for s in epi.parse(epilogue)
        if s in epi.WITH_OPERAND
    ]
    alpha = 1.0 if name == "noble" else 0.8
    leaves = [t.to(dtype).clone().requires_grad_(i - 1 not in frozen) for i, t in enumerate([x, *tensors, *ops])]
    lx, lt, lo = leaves[0], leaves[1 : 1 + len(tensors)], leaves[1 + len(tensors) :]
    y = OPS[opname](lx, lt, lo, epilogue, alpha, None)
    gy = torch.randn_like(y)
    # the op's backward alone; torch's counter has no entry for in-place addmm_, which the cores use
    with FlopCounterMode(display=False, custom_mapping=INPLACE_ADDMM) as flops:
        y.backward(gy)
    leaves64 = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    y64 = reference(
        CORE[opname], leaves64[0], leaves64[1 : 1 + len(tensors)], leaves64[1 + len(tensors) :], epilogue, alpha, None
    )
    y64.backward(gy.double())
    checked = 0
    for i, (t, t64) in enumerate(zip(leaves, leaves64)):
        if not t.requires_grad:
            assert t.grad is None
            continue
        if not t.numel():  # Monarch's (0, out) width carrier
            continue
        if t64.grad is None:
            assert t.grad is None or not t.grad.any()
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype
        if t.dim() == 0:
            # a scalar's gradient is one reduction, sum(gy * dy/dt), whose terms cancel (random gy): its rounding
            # error is bounded relative to sum(|terms|), not to the sum (DoRA's bf16 scaling: 2% relative at a
            # cancellation of 16x, 0.13% of the terms' scale)
            scale = reduction_scale(opname, leaves64, len(tensors), epilogue, alpha, gy, i)
            err = abs(float(t.grad) - float(t64.grad)) / scale
            assert err < TOL[dtype], (name, dtype, "scalar", err)
        else:
            assert rel(t.grad, t64.grad) < TOL[dtype], (name, dtype, rel(t.grad, t64.grad))
        checked += 1
    assert checked >= 2
    return leaves, flops.get_total_flops()


def reduction_scale(opname, leaves64, n_tensors, epilogue, alpha, gy, i) -> float:
    """sum(|gy * dy/dt|) for the 0-dim leaf i (dy/dt by forward mode, float64): the scale of its gradient's terms."""
    base = [t.detach() for t in leaves64]

    def f(v):
        ls = base[:i] + [v] + base[i + 1 :]
        return reference(CORE[opname], ls[0], ls[1 : 1 + n_tensors], ls[1 + n_tensors :], epilogue, alpha, None)

    _, dy = torch.func.jvp(f, (base[i],), (torch.ones_like(base[i]),))
    return float((gy.double() * dy).abs().sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_backward_matches_float64(name, dtype):
    """The op's autograd (family grads / restricted vjp, torch) against float64 autograd of the reference;
    value-needing (silu, mul) and add-only epilogues."""
    grads_vs_float64(name, dtype, "add_row,silu,add")
    grads_vs_float64(name, dtype, "add_row,add")


@pytest.mark.parametrize(
    "name,case",
    [(n, i) for n in CASES for i in range(1, len(CASES[n]))],
    ids=[f"{n}{i}" for n in CASES for i in range(1, len(CASES[n]))],
)
def test_backward_odd_shapes(name, case):
    grads_vs_float64(name, torch.float32, "mul_row,tanh", case=case)


@pytest.mark.parametrize("name", ["lora", "dora", "noble"])
def test_frozen_base_weight_gets_no_gradient_computation(name):
    """A frozen W: no grad, and the backward runs exactly one (M × out × in) GEMM fewer (gᵀx) than with W
    trainable; the other gradients still match float64."""
    in_f, out_f, _ = CASES[name][0]
    m = 3 * 4

    leaves, frozen_flops = grads_vs_float64(name, torch.float32, "add_row", frozen=(0,))
    assert not leaves[1].requires_grad and leaves[1].grad is None
    _, full_flops = grads_vs_float64(name, torch.float32, "add_row")
    assert full_flops - frozen_flops == 2 * m * out_f * in_f


@pytest.mark.parametrize("opname", ["lowrank", "lora", "dora", "noble", "twocore", "blast"])
def test_opcheck(opname, monkeypatch):
    """torch.library.opcheck: schema, fake impl, autograd registration, AOT dispatch (torch path: fast)."""
    monkeypatch.delenv("TRITON_INTERPRET")
    name = {"twocore": "monarch"}.get(opname, opname)
    in_f, out_f, size = CASES[name][0]
    _, tensors = family_case(name, in_f, out_f, size)
    x = torch.randn(2, 3, in_f)
    args = (x, tensors, [torch.randn(out_f), torch.randn(2, 3, out_f)], "add_row,gelu_tanh,add", 1.0, None)
    torch.library.opcheck(OPS[opname], args)
    grad_args = (x.requires_grad_(), [t.requires_grad_() for t in tensors], args[2], *args[3:])
    torch.library.opcheck(OPS[opname], grad_args)


@pytest.mark.parametrize("name", list(CASES))
def test_opcheck_interpreted(name, launches):
    """opcheck with the Triton path live, on the family's smallest case."""
    case = min(range(len(CASES[name])), key=lambda i: CASES[name][i][0] * CASES[name][i][1])
    in_f, out_f, size = CASES[name][case]
    opname, tensors = family_case(name, in_f, out_f, size)
    x = torch.randn(2, in_f, requires_grad=True)
    args = (
        x,
        [t.requires_grad_() for t in tensors],
        [torch.randn(out_f), torch.randn(2, out_f)],
        "add_row,silu,mul",
        1.0,
        None,
    )
    torch.library.opcheck(OPS[opname], args)
    assert launches


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


def test_old_triton_interpreter_with_numpy_2_4_is_one_clear_error(monkeypatch):
    """triton < 3.7's interpreter fails deep inside under numpy 2.4: the launch says what to install instead."""
    import numpy
    import triton

    from lrcompile.errors import LrcompileError

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    with pytest.raises(LrcompileError, match=r"numpy<2\.4"):
        gemm(torch.randn(5, 17), torch.randn(3, 17), steps=("relu",))
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    runtime.check_interpreter_numpy()
    monkeypatch.setattr(triton, "__version__", "3.7.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    runtime.check_interpreter_numpy()


def test_kernel_source_cached_by_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("LRCOMPILE_CACHE_DIR", str(tmp_path / "shared"))
    (tmp_path / "own").mkdir()
    monkeypatch.setattr(runtime, "_private_dir", str(tmp_path / "own"))
    monkeypatch.setattr(runtime, "_modules", {})  # earlier tests loaded these sources in this process
    a, b = torch.randn(5, 17), torch.randn(3, 17)
    gemm(a, b, steps=("relu",))
    gemm(a, b, steps=("relu",))
    gemm(a, b, steps=("tanh",))
    files = sorted(os.listdir(tmp_path / "own"))
    assert len(files) == 2 and all(f.startswith("gemm_") and f.endswith(".py") for f in files)  # no temp left
    assert not (tmp_path / "shared" / "kernels").exists()  # nothing generated goes to the shared cache


def test_kernel_source_planted_in_the_cache_directory_is_never_run(tmp_path, monkeypatch):
    """Another user of a shared cache writes a file where the kernel for this source would be: not imported."""
    import hashlib

    monkeypatch.setenv("LRCOMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "_modules", {})
    source = "VALUE = 1\n"
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / f"probe_{digest}.py").write_text(f"VALUE = 2\nopen({str(tmp_path / 'ran')!r}, 'w')\n")
    assert runtime.load("probe", source).VALUE == 1
    assert not (tmp_path / "ran").exists()


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


KERNEL_CFG = {
    "lowrank": {"rank": 5},
    "lora": {"rank": 4},
    "dora": {"rank": 4},
    "noble": {"rank": 4},
    "monarch": {"blocks": 3},
    "btt": {"rank": 2},
    "blast": {"rank": 3, "blocks": [2, 3]},
}


@pytest.mark.parametrize("family", sorted(KERNEL_CFG))
def test_autotuner_kernel_candidate_computes_the_family_function(family, launches):
    """The autotuner's `triton` candidate (timed on CUDA only) wraps the family's kernel behind the family's
    functional signature: interpreted here, it must launch the kernel and match the functional, bias included."""
    from lrcompile.tune.candidates import KERNEL, candidates_for, implementation

    cls = FAMILIES[family]
    n = len(cls.tensor_names)
    assert KERNEL in [c.name for c in candidates_for(family, n, "cuda", grad=True)]
    assert KERNEL not in [c.name for c in candidates_for(family, n, "cpu", grad=False)]
    assert KERNEL not in [c.name for c in candidates_for(family, n + 1, "cuda", grad=False)]  # dropout tensor
    in_f, out_f = 36, 22
    W, b = torch.randn(out_f, in_f) / 6, torch.randn(out_f)
    cfg = cls.Config(**KERNEL_CFG[family])
    cfg = cfg.resolve(in_f, out_f) if hasattr(cfg, "resolve") else cfg
    m = cls.from_dense(W, b, cfg)
    with torch.no_grad():
        for p in m.parameters():  # adapters start with a zero branch: make every tensor audible
            p.add_(torch.randn_like(p) * 0.2)
    ts = [t.detach() for t in m.tensors()]
    x = torch.randn(3, 5, in_f)
    got = implementation(family, KERNEL)(x, W, b, *ts)
    ref = cls.functional(x, W, b, *ts)
    assert launches, "the kernel did not launch"
    assert got.shape == ref.shape and rel(got, ref) < 1e-5
    got_nb = implementation(family, KERNEL)(x, W, None, *ts)
    assert rel(got_nb, cls.functional(x, W, None, *ts)) < 1e-5
