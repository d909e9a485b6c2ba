"""Adapter families (LoRA, rsLoRA, PiSSA, DoRA, VeRA, NOBLE): parity with HF PEFT, merge, training, hot-swap."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import compile_eager, lowered, rel_err, structures, unlowered
from torch import nn

import lrcompile
from lrcompile.families import Structure
from lrcompile.families.adapters.dora import DoRA, dora_row_norm
from lrcompile.families.adapters.lora import LoRA
from lrcompile.families.adapters.noble import NOBLE
from lrcompile.families.adapters.vera import VeRA

peft = pytest.importorskip("peft")


class MLP(nn.Module):
    """Linears of different shapes (VeRA's shared projections are sliced per layer)."""

    def __init__(self, d=24, h=40):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)
        self.head = nn.Linear(d, 8, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


TARGETS = ["fc1", "fc2", "head"]


def policy(method, **opts):
    return {"defaults": {"min_features": 0}, "rules": [{"match": TARGETS, "method": method, **opts}]}


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peft_layer(pm, name):
    return pm.get_submodule(f"base_model.model.{name}")


def both(method, peft_config, **opts):
    """The same base model under PEFT and under lrcompile.rewrite."""
    torch.manual_seed(0)
    base = MLP()
    x = torch.randn(5, 3, 24)
    pm = peft.get_peft_model(copy.deepcopy(base), peft_config)
    ours = lrcompile.rewrite(copy.deepcopy(base), policy(method, **opts), (x,))
    return base, pm, ours, x


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_peft(rslora):
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS, use_rslora=rslora)
    _, pm, ours, x = both("lora", cfg, rank=4, alpha=12, rslora=rslora)
    assert trainable(ours) == trainable(pm)
    with torch.no_grad():
        for n in TARGETS:
            pl = peft_layer(pm, n)
            pl.lora_B["default"].weight.normal_()  # B is zero at init: make the branch count
            getattr(ours, n).lora_A.copy_(pl.lora_A["default"].weight)
            getattr(ours, n).lora_B.copy_(pl.lora_B["default"].weight)
            assert float(getattr(ours, n).scaling) == pytest.approx(pl.scaling["default"])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), pm(x2)
    assert rel_err(y1, y2) < 1e-6
    dy = torch.randn_like(y1)
    y1.backward(dy), y2.backward(dy)
    assert rel_err(x1.grad, x2.grad) < 1e-5
    for n in TARGETS:  # the adapter's gradients, not only its output, match PEFT's
        pl = peft_layer(pm, n)
        assert rel_err(getattr(ours, n).lora_A.grad, pl.lora_A["default"].weight.grad) < 1e-5
        assert rel_err(getattr(ours, n).lora_B.grad, pl.lora_B["default"].weight.grad) < 1e-5


def test_lora_functional_gradcheck_every_input():
    """float64 gradcheck with x (3-D), W, bias, A, B and the scaling all requiring a gradient (its in-place addmm_
    must not corrupt what autograd saved), and with bias None and W frozen (the fine-tuning case)."""
    torch.manual_seed(0)
    d = dict(dtype=torch.float64)
    x, W, b = torch.randn(2, 3, 5, **d), torch.randn(7, 5, **d), torch.randn(7, **d)
    A, B, s = torch.randn(3, 5, **d), torch.randn(7, 3, **d), torch.tensor(0.7, **d)
    ts = [t.requires_grad_() for t in (x, W, b, A, B, s)]
    assert torch.autograd.gradcheck(LoRA.functional, ts)
    assert torch.autograd.gradcheck(lambda x, A, B: LoRA.functional(x, W.detach(), None, A, B, s.detach()), (x, A, B))
    with torch.no_grad():  # no autograd node where no gradient is wanted
        assert LoRA.functional(*ts).grad_fn is None


def test_lora_init_is_peft_distribution_and_silent():
    base = MLP()
    x = torch.randn(4, 24)
    ref = base(x)
    m = lrcompile.rewrite(copy.deepcopy(base), policy("lora"), (x,))  # PEFT defaults: rank 8, alpha 8
    assert m.fc1.lora_A.shape == (8, 24) and float(m.fc1.scaling) == 1.0
    assert torch.equal(m.fc1.lora_B, torch.zeros_like(m.fc1.lora_B))
    torch.testing.assert_close(m(x), ref)
    # PEFT-style freezing: only the branches train, the base weight is the same Parameter object
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {f"{t}.lora_{ab}" for t in TARGETS for ab in "AB"}


def test_lora_a_is_kaiming_uniform_a_sqrt5():
    """kaiming_uniform(a=√5): bound = √(2/(1+5))·√(3/in) = 1/√in, std = bound/√3 (zeros would fail both)."""
    A = LoRA.from_dense(torch.randn(64, 256), None, LoRA.Config(rank=32)).lora_A.detach()
    bound = 1 / 256**0.5
    assert 0.99 * bound < float(A.abs().max()) <= bound
    assert float(A.std()) == pytest.approx(bound / 3**0.5, rel=4 / (2 * A.numel()) ** 0.5)
    assert abs(float(A.mean())) < 4 * bound / (3 * A.numel()) ** 0.5


def test_pissa_matches_peft_and_keeps_the_function():
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa")
    base, pm, ours, x = both("lora", cfg, rank=4, alpha=8, init="pissa")
    for n in TARGETS:
        pl, ol = peft_layer(pm, n), getattr(ours, n)
        # singular vectors are defined up to sign: compare the products and the residual
        torch.testing.assert_close(
            ol.lora_B @ ol.lora_A, pl.lora_B["default"].weight @ pl.lora_A["default"].weight, atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(ol.weight, pl.base_layer.weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours(x), base(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours(x), pm(x), atol=1e-5, rtol=1e-4)


def test_pissa_through_the_backend_replaces_the_base_weight():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(6, 24)
    ref, w0 = m(x), m.fc1.weight.detach().clone()
    out = compile_eager(m, policy("lora", rank=4, init="pissa"))(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(m.fc1.weight, w0)  # the residual replaced the stored weight in place
    br = m.fc1.lrcompile
    torch.testing.assert_close(m.fc1.weight + br.scaling * br.lora_B @ br.lora_A, w0, atol=1e-5, rtol=1e-4)


def test_dora_matches_peft_output_and_gradients():
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    _, pm, ours, x = both("dora", cfg, rank=4, alpha=8)
    assert trainable(ours) == trainable(pm)
    with torch.no_grad():
        for n in TARGETS:
            pl, ol = peft_layer(pm, n), getattr(ours, n)
            torch.testing.assert_close(ol.magnitude, pl.lora_magnitude_vector["default"].weight)  # init: row norms
            pl.lora_B["default"].weight.normal_()
            pl.lora_magnitude_vector["default"].weight.mul_(torch.rand_like(ol.magnitude) + 0.5)
            ol.lora_A.copy_(pl.lora_A["default"].weight)
            ol.lora_B.copy_(pl.lora_B["default"].weight)
            ol.magnitude.copy_(pl.lora_magnitude_vector["default"].weight)
    yo, yp = ours(x), pm(x)
    torch.testing.assert_close(yo, yp, atol=1e-5, rtol=1e-5)
    yo.square().sum().backward()
    yp.square().sum().backward()
    for n in TARGETS:
        pl, ol = peft_layer(pm, n), getattr(ours, n)
        torch.testing.assert_close(ol.lora_A.grad, pl.lora_A["default"].weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ol.lora_B.grad, pl.lora_B["default"].weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            ol.magnitude.grad, pl.lora_magnitude_vector["default"].weight.grad, atol=1e-4, rtol=1e-4
        )


def test_dora_functional_gradients_match_autograd_of_the_formula():
    """Every input requiring a gradient, float64: DoRA.functional (norm formula without BA) against autograd of
    g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b with the norm detached (PEFT's semantics); x, m and b also by gradcheck."""
    torch.manual_seed(1)
    d = dict(dtype=torch.float64)
    x, W, b = torch.randn(2, 3, 5, **d), torch.randn(7, 5, **d), torch.randn(7, **d)
    A, B, m, s = torch.randn(3, 5, **d), torch.randn(7, 3, **d), torch.rand(7, **d) + 0.5, torch.tensor(0.7, **d)
    ts = [t.requires_grad_() for t in (x, W, b, A, B, m, s)]

    def formula(x, W, b, A, B, m, s):
        n = torch.linalg.norm(W + s * B @ A, dim=1).detach()
        return (m / n) * (x @ W.t() + s * (x @ A.t()) @ B.t()) + b

    dy = torch.randn(2, 3, 7, **d)
    got = torch.autograd.grad(DoRA.functional(*ts), ts, dy)
    want = torch.autograd.grad(formula(*ts), ts, dy)
    for name, g1, g2 in zip("x W b A B m s".split(), got, want):
        assert rel_err(g1, g2) < 1e-10, name
    assert torch.autograd.gradcheck(
        lambda x, b, m: DoRA.functional(x, W.detach(), b, A.detach(), B.detach(), m, s.detach()), (x, b, m)
    )


def dora_formula_ref(x, W, b, A, B, m, s):
    n = torch.linalg.norm(W + s * B @ A, dim=1).detach()
    y = (m / n) * (x @ W.t() + s * (x @ A.t()) @ B.t())
    return y if b is None else y + b


def dora_case(seed=2, dtype=torch.float64):
    torch.manual_seed(seed)
    d = dict(dtype=dtype)
    x, W, b = torch.randn(3, 11, 13, **d), torch.randn(9, 13, **d), torch.randn(9, **d)
    A, B, m, s = torch.randn(4, 13, **d), torch.randn(9, 4, **d), torch.rand(9, **d) + 0.5, torch.tensor(0.7, **d)
    return x, W, b, A, B, m, s


@pytest.mark.parametrize(
    "need,bias", [("x b A B m", True), ("A B m", True), ("x A", True), ("x A B m", False), ("b", True)]
)
def test_dora_frozen_base_backward_matches_autograd_of_the_formula(need, bias):
    """A frozen base weight takes FrozenBaseDoRA (its backward written out): float64, non-square shapes, with
    and without bias; the gradients of whichever inputs require one equal autograd's of the formula."""
    x, W, b, A, B, m, s = dora_case()
    b = b if bias else None
    named = dict(zip("x b A B m".split(), (x, b, A, B, m)))
    ts = [named[k].requires_grad_() for k in need.split()]
    dy = torch.randn(3, 11, 9, dtype=torch.float64)
    y = DoRA.functional(x, W, b, A, B, m, s)
    assert y.grad_fn.next_functions[0][0].name().startswith("FrozenBaseDoRA")  # under unflat's view
    torch.testing.assert_close(y, dora_formula_ref(x, W, b, A, B, m, s), rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(y, ts, dy)
    want = torch.autograd.grad(dora_formula_ref(x, W, b, A, B, m, s), ts, dy)
    for name, g1, g2 in zip(need.split(), got, want):
        assert rel_err(g1, g2) < 1e-10, name


def test_dora_frozen_base_double_backward_is_the_formulas():
    """create_graph=True (a gradient penalty): second-order gradients equal the formula's, the magnitude's too."""
    x, W, b, A, B, m, s = dora_case()
    ts = [t.requires_grad_() for t in (x, A, B, m)]

    def second(f):
        (gx,) = torch.autograd.grad(f(x, W, b, A, B, m, s).square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), ts[1:])

    for name, g1, g2 in zip("A B m".split(), second(DoRA.functional), second(dora_formula_ref)):
        assert rel_err(g1, g2) < 1e-10, name


def test_dora_mixed_dtypes_and_bf16_take_a_working_path():
    """bf16 factors with an fp32 bias or magnitude (the written-out step needs one dtype): the formula path
    runs and matches the fp64 result to bf16 precision; an all-bf16 layer takes the fast path."""
    x, W, b, A, B, m, s = dora_case()
    want = dora_formula_ref(x, W, b, A, B, m, s)
    bf = torch.bfloat16
    for b_dt, m_dt in ((torch.float32, bf), (bf, torch.float32), (bf, bf)):
        ts = [
            x.to(bf).requires_grad_(),
            W.to(bf),
            b.to(b_dt),
            A.to(bf).requires_grad_(),
            B.to(bf).requires_grad_(),
            m.to(m_dt).requires_grad_(),
            s.float(),
        ]
        y = DoRA.functional(*ts)
        y.float().sum().backward()
        assert rel_err(y, want) < 0.02, (b_dt, m_dt)
        assert all(ts[i].grad is not None for i in (0, 3, 4, 5))
        fast = y.grad_fn.next_functions[0][0].name().startswith("FrozenBaseDoRA")
        assert fast == (b_dt == m_dt == bf)


def test_dora_frozen_base_step_makes_three_output_sized_buffers():
    """The written-out step allocates z and y in the forward and one (N, out) buffer in the backward (autograd
    of the formula makes more): each costs a pass, and on CPU page faults on top."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.n = numel, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view and not func._schema.is_mutable:  # in place and out= allocate nothing
                self.n += sum(
                    t.numel() == self.numel for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)
                )
            return out

    N, i, o = 64, 24, 40
    x, W, b = torch.randn(N, i, requires_grad=True), torch.randn(o, i), torch.randn(o)
    A, B = torch.randn(4, i, requires_grad=True), torch.randn(o, 4, requires_grad=True)
    m, s = (torch.rand(o) + 0.5).requires_grad_(), torch.tensor(0.5)
    dy = torch.randn(N, o)
    with Count(N * o) as c:
        DoRA.functional(x, W, b, A, B, m, s).backward(dy)
    assert c.n == 3, c.n


def test_dora_norm_without_materialising_ba():
    W, A, B = (
        torch.randn(40, 24, dtype=torch.float64),
        torch.randn(4, 24, dtype=torch.float64),
        torch.randn(40, 4, dtype=torch.float64),
    )
    torch.testing.assert_close(dora_row_norm(W, A, B, 0.7), torch.linalg.norm(W + 0.7 * B @ A, dim=1))


def test_dora_norm_makes_no_weight_sized_temporary():
    """‖W‖²_row by a reduction: no op inside dora_row_norm may allocate an (out, in)-sized tensor (views of
    W such as detach allocate nothing and are not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numels = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                self.numels += [t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            return out

    W, A, B = torch.randn(96, 80), torch.randn(4, 80), torch.randn(96, 4)
    with Sizes() as rec:
        norm = dora_row_norm(W, A, B, torch.tensor(0.5))
    assert rec.numels and max(rec.numels) < W.numel() // 4
    torch.testing.assert_close(norm, torch.linalg.norm(W + 0.5 * B @ A, dim=1))


class FixedMask(nn.Module):
    """Inverted dropout with a given keep mask (the one lrcompile draws from the same seed)."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.view(x.shape) / (1 - self.p)


def test_dora_dropout_matches_peft_in_train_mode():
    """PEFT's DoRA with dropout: y = W x + b + (g − 1) ⊙ W x̃ + g ⊙ s·B A x̃, x̃ = dropout(x), g detached.
    Same mask on both sides: lrcompile draws it with rand_like from a seed; PEFT's dropout module is replaced
    by one applying that mask."""
    p, seed = 0.3, 7
    torch.manual_seed(0)
    base, x = nn.Sequential(nn.Linear(24, 40)), torch.randn(5, 3, 24)
    pm = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, lora_dropout=p)
    )
    ours = lrcompile.rewrite(
        copy.deepcopy(base),
        {
            "defaults": {"min_features": 0},
            "rules": [{"match": "0", "method": "dora", "rank": 4, "alpha": 8, "dropout": p}],
        },
        (x,),
    )
    pl, ol = peft_layer(pm, "0"), ours[0]
    with torch.no_grad():
        pl.lora_B["default"].weight.normal_()
        pl.lora_magnitude_vector["default"].weight.mul_(torch.rand(40) + 0.5)
        ol.lora_A.copy_(pl.lora_A["default"].weight)
        ol.lora_B.copy_(pl.lora_B["default"].weight)
        ol.magnitude.copy_(pl.lora_magnitude_vector["default"].weight)
    torch.manual_seed(seed)
    keep = torch.rand(15, 24) >= p
    pl.lora_dropout["default"] = FixedMask(keep, p)
    pm.train()
    ours.train()
    torch.manual_seed(seed)
    yo = ours(x)
    yp = pm(x)
    torch.testing.assert_close(yo, yp, atol=1e-5, rtol=1e-5)
    # the formula itself, in float64
    W, b = base[0].weight.double(), base[0].bias.double()
    A, B, m, s = ol.lora_A.double(), ol.lora_B.double(), ol.magnitude.double(), float(ol.scaling)
    g = m / torch.linalg.norm(W + s * B @ A, dim=1)
    xd, xt = x.double(), x.double() * keep.view(x.shape) / (1 - p)
    ref = xd @ W.T + b + (g - 1) * (xt @ W.T) + g * s * (xt @ A.T @ B.T)
    torch.testing.assert_close(yo.double(), ref, atol=1e-5, rtol=1e-5)
    yo.square().sum().backward()
    yp.square().sum().backward()
    for ours_p, peft_p in [
        (ol.lora_A, pl.lora_A["default"].weight),
        (ol.lora_B, pl.lora_B["default"].weight),
        (ol.magnitude, pl.lora_magnitude_vector["default"].weight),
    ]:
        torch.testing.assert_close(ours_p.grad, peft_p.grad, atol=1e-4, rtol=1e-4)
    ours.eval()
    pm.eval()
    with torch.no_grad():  # eval: dropout off on both sides, the plain DoRA formula
        torch.testing.assert_close(ours(x), pm(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours(x), yo, atol=1e-3)


def test_vera_matches_peft_without_copying_projections():
    cfg = peft.VeraConfig(r=16, target_modules=TARGETS)
    _, pm, ours, x = both("vera", cfg, rank=16)
    assert trainable(ours) == trainable(pm)
    # one pair at the largest (in, out), drawn from PEFT's seeded generator: the very same numbers
    A, B = pm.base_model.vera_A["default"], pm.base_model.vera_B["default"]
    assert ours.fc1.vera_A is ours.fc2.vera_A is ours.head.vera_A and ours.fc1.vera_B is ours.head.vera_B
    torch.testing.assert_close(ours.fc1.vera_A, A, atol=0, rtol=0)
    torch.testing.assert_close(ours.fc1.vera_B, B, atol=0, rtol=0)
    assert not ours.fc1.vera_A.requires_grad
    with torch.no_grad():
        for n in TARGETS:
            pl, ol = peft_layer(pm, n), getattr(ours, n)
            torch.testing.assert_close(ol.lambda_d, pl.vera_lambda_d["default"])
            pl.vera_lambda_b["default"].normal_()
            pl.vera_lambda_d["default"].normal_()
            ol.lambda_b.copy_(pl.vera_lambda_b["default"])
            ol.lambda_d.copy_(pl.vera_lambda_d["default"])
    torch.testing.assert_close(ours(x), pm(x), atol=1e-5, rtol=1e-5)
    # stored once when saved
    sd = ours.state_dict()
    assert sd["fc1.vera_A"].data_ptr() == sd["fc2.vera_A"].data_ptr()


def test_vera_init_is_silent():
    """λ_b starts at 0 (PEFT), λ_d at d_initial: the rewritten model computes exactly the base model."""
    torch.manual_seed(0)
    base, x = MLP(), torch.randn(6, 24)
    m = lrcompile.rewrite(copy.deepcopy(base), policy("vera", rank=8, d_initial=0.25), (x,))
    for t in TARGETS:
        assert torch.equal(getattr(m, t).lambda_b, torch.zeros(getattr(m, t).out_features))
        assert torch.equal(getattr(m, t).lambda_d, torch.full((8,), 0.25))
    torch.testing.assert_close(m(x), base(x), atol=1e-6, rtol=0)


def perturb_adapters(model, scale=0.3):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def test_vera_projections_are_stored_once_in_files(tmp_path):
    """lrcompile.save writes one vera_A / vera_B; loading into a fresh model reproduces it and shares them
    again. adapter_state_dict holds each projection once too, so safetensors.save_file accepts it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    base, x = MLP(), torch.randn(4, 24)
    a = lrcompile.rewrite(copy.deepcopy(base), policy("vera", rank=8), (x,))
    perturb_adapters(a)
    ref = a(x)
    lrcompile.save(a, str(tmp_path / "full"))
    with safe_open(str(tmp_path / "full" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert sum(k.endswith(".vera_A") for k in keys) == 1 and sum(k.endswith(".vera_B") for k in keys) == 1
    fresh = lrcompile.load(copy.deepcopy(base), str(tmp_path / "full"))
    torch.testing.assert_close(fresh(x), ref, atol=0, rtol=0)
    assert fresh.fc1.vera_A is fresh.fc2.vera_A is fresh.head.vera_A
    sd = lrcompile.adapter_state_dict(a)
    assert [k for k in sd if "vera_" in k] == ["fc1.vera_A", "fc1.vera_B"]
    save_file(sd, str(tmp_path / "adapter.safetensors"))  # refuses aliased tensors: this must not raise
    b = lrcompile.rewrite(copy.deepcopy(base), policy("vera", rank=8, seed=3), (x,))
    lrcompile.load_adapter_state_dict(b, load_file(str(tmp_path / "adapter.safetensors")))
    torch.testing.assert_close(b(x), ref, atol=0, rtol=0)
    assert b.fc2.vera_A is b.fc1.vera_A  # the one saved tensor went back to every site


def test_vera_models_never_share_projections():
    """Two models rewritten one after the other (nothing run in between) get their own pairs: loading an
    adapter into one, or growing a pair for a larger model, leaves the other as it was."""
    torch.manual_seed(0)
    base, x = MLP(), torch.randn(4, 24)
    m1 = lrcompile.rewrite(copy.deepcopy(base), policy("vera", rank=8), (x,))
    m2 = lrcompile.rewrite(copy.deepcopy(base), policy("vera", rank=8), (x,))
    assert m1.fc1.vera_A is not m2.fc1.vera_A and m1.fc1.vera_A is m1.head.vera_A
    A1, ref1 = m1.fc1.vera_A.clone(), None
    perturb_adapters(m1)
    ref1 = m1(x)
    other = lrcompile.rewrite(copy.deepcopy(base), policy("vera", rank=8, seed=5), (x,))
    perturb_adapters(other)
    lrcompile.load_adapter_state_dict(m2, lrcompile.adapter_state_dict(other))
    torch.testing.assert_close(m2(x), other(x), atol=0, rtol=0)
    assert torch.equal(m1.fc1.vera_A, A1)
    torch.testing.assert_close(m1(x), ref1, atol=0, rtol=0)
    # a larger model rewritten next to an untouched, unused one does not regrow the first one's pair
    m3 = lrcompile.rewrite(copy.deepcopy(base), policy("vera", rank=4), (x,))
    A3 = m3.fc1.vera_A.clone()
    lrcompile.rewrite(
        nn.Sequential(nn.Linear(96, 96)),
        {"defaults": {"min_features": 0}, "rules": [{"match": "*", "method": "vera", "rank": 4}]},
        (torch.randn(2, 96),),
    )
    assert m3.fc1.vera_A.shape == A3.shape and torch.equal(m3.fc1.vera_A, A3)


def test_vera_load_copies_a_pair_shared_with_another_model():
    """One Policy object reused for two rewrites is one adapter (one pair, as one PEFT config would be);
    loading into one model then gives that model a private copy first: the other keeps its numbers."""
    torch.manual_seed(0)
    base, x = MLP(), torch.randn(4, 24)
    pol = lrcompile.load_policy(policy("vera", rank=8))
    m1 = lrcompile.rewrite(copy.deepcopy(base), pol, (x,))
    m2 = lrcompile.rewrite(copy.deepcopy(base), pol, (x,))
    assert m1.fc1.vera_A is m2.fc1.vera_A
    A1 = m1.fc1.vera_A.clone()
    other = lrcompile.rewrite(copy.deepcopy(base), policy("vera", rank=8, seed=5), (x,))
    perturb_adapters(other)
    lrcompile.load_adapter_state_dict(m2, lrcompile.adapter_state_dict(other))
    assert torch.equal(m1.fc1.vera_A, A1) and m1.fc1.vera_A is m1.fc2.vera_A
    assert m2.fc1.vera_A is m2.fc2.vera_A is m2.head.vera_A and m2.fc1.vera_A is not m1.fc1.vera_A
    torch.testing.assert_close(m2(x), other(x), atol=0, rtol=0)


def test_vera_pair_in_use_never_changes():
    x = torch.randn(2, 24)
    m1 = lrcompile.rewrite(MLP(), policy("vera", rank=4), (x,))
    m1(x)  # used: its projections are final
    A1 = m1.fc1.vera_A.clone()
    big = nn.Sequential(nn.Linear(96, 96))
    lrcompile.rewrite(
        big,
        {"defaults": {"min_features": 0}, "rules": [{"match": "*", "method": "vera", "rank": 4}]},
        (torch.randn(2, 96),),
    )
    assert big[0].vera_A is not m1.fc1.vera_A and torch.equal(m1.fc1.vera_A, A1)


@pytest.mark.parametrize(
    "method,opts", [("lora", {"rank": 4, "alpha": 16}), ("dora", {"rank": 4, "rslora": True}), ("vera", {"rank": 8})]
)
def test_merge_equals_unmerged(method, opts):
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(7, 24)
    lrcompile.rewrite(m, policy(method, **opts), (x,))
    assert set(structures(m)) == set(TARGETS)  # something to merge
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    ref = m(x)
    w = m.fc1.weight
    assert lrcompile.merge(m) is m
    assert type(m.fc1) is nn.Linear and type(m.head) is nn.Linear
    assert m.fc1.weight is w  # untied: updated in place, same Parameter
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


def test_merge_gives_a_tied_site_its_own_weight():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(30, 16)
            self.head = nn.Linear(16, 30, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.relu(self.embed(ids)))

    m, ids = Tied(), torch.randint(0, 30, (2, 5))
    lrcompile.rewrite(
        m, {"defaults": {"min_features": 0}, "rules": [{"match": "head", "method": "lora", "rank": 2}]}, (ids,)
    )
    with torch.no_grad():
        m.head.lora_B.normal_()
    ref, emb = m(ids), m.embed.weight.detach().clone()
    lrcompile.merge(m)
    assert m.head.weight is not m.embed.weight and torch.equal(m.embed.weight, emb)
    torch.testing.assert_close(m(ids), ref, atol=1e-5, rtol=1e-5)


def test_merge_backend_attached_adapter():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(3, 24)
    compiled = compile_eager(m, policy("lora", rank=4))
    compiled(x)
    with torch.no_grad():
        for t in TARGETS:
            getattr(m, t).lrcompile.lora_B.normal_()
    ref = compiled(x)  # the compiled graph reads the current factors
    w = m.fc1.weight
    lrcompile.merge(m)
    assert not hasattr(m.fc1, "lrcompile") and m.fc1.weight is w
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


def test_noble_is_not_merged_and_dropout_is_training_only():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(64, 24)
    lrcompile.rewrite(
        m,
        {
            "defaults": {"min_features": 0},
            "rules": [
                {"match": "fc1", "method": "noble", "rank": 4},
                {"match": "fc2", "method": "lora", "rank": 4, "dropout": 0.5},
            ],
        },
        (x,),
    )
    with torch.no_grad():
        m.fc2.lora_B.normal_()
    m.eval()
    e1, e2 = m(x), m(x)
    torch.testing.assert_close(e1, e2)
    m.train()
    assert not torch.allclose(m(x), e1)  # dropout active on the branch input
    m.eval()
    lrcompile.merge(m)
    assert isinstance(m.fc1, NOBLE) and type(m.fc2) is nn.Linear
    torch.testing.assert_close(m(x), e1, atol=1e-5, rtol=1e-5)


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=2, vocab_size=50, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return transformers.GPT2LMHeadModel(cfg)


def copy_task(n=16, t=16, vocab=50):
    """Next token = previous + 1 (mod vocab): learnable from the context alone."""
    start = torch.randint(0, vocab, (n, 1))
    return (start + torch.arange(t)) % vocab


@pytest.mark.parametrize("method", ["lora", pytest.param("dora", marks=pytest.mark.slow)])
def test_gpt2_finetune_under_compile_trains_only_adapters(method):
    torch.manual_seed(0)
    model = tiny_gpt2()
    ids = copy_task()
    pol = {
        "defaults": {"min_features": 0},
        "rules": [{"match": "re:.*\\.(c_attn|c_proj|c_fc)", "method": method, "rank": 4, "alpha": 8}],
    }
    lrcompile.rewrite(model, pol, {"input_ids": ids[:2]})
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and adapters and all("lora_" in n or "magnitude" in n for n in adapters)
    compiled = torch.compile(model, backend="lrcompile", options={"inductor": False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(25):
        loss = compiled(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert not unlowered(model)  # the graph ran the adapters the backend lowered
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, adapters[n]), n


def test_noble_pretraining_trains_with_param_groups():
    torch.manual_seed(0)
    model = tiny_gpt2()
    ids = copy_task()
    lrcompile.rewrite(
        model,
        {
            "defaults": {"min_features": 0},
            "rules": [{"match": "re:.*\\.(c_attn|c_proj|c_fc)", "method": "noble", "rank": 8}],
        },
        {"input_ids": ids[:2]},
    )
    assert all(p.requires_grad for p in model.parameters())  # NOBLE freezes nothing: the base trains too
    site = model.transformer.h[0].mlp.c_fc
    assert isinstance(site, NOBLE)
    groups = lrcompile.param_groups(model, 1e-3)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(site.omega1)] == pytest.approx(2e-3) and lr_of[id(site.phi2)] == pytest.approx(4e-3)
    assert lr_of[id(site.up)] == pytest.approx(1e-3 * (64 / 8) ** 0.4) and lr_of[id(site.weight)] == pytest.approx(1e-3)
    w0 = site.weight.detach().clone()
    compiled = torch.compile(model, backend="lrcompile", options={"inductor": False})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    for g in opt.param_groups:
        g["lr"] *= 10
    losses = []
    for _ in range(25):
        loss = compiled(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert not unlowered(model)  # the graph ran the NOBLE sites the backend lowered
    assert not torch.equal(site.weight, w0) and site.up.grad is not None


def noble_reference(n, x):
    """The branch in float64: W_up · cos(ω₂ ⊙ (M cos(ω₁ ⊙ (W_down x + b_down) + φ₁) + c) + φ₂)."""
    d = {k: v.detach().double() for k, v in n.named_parameters()}
    z = x.double() @ d["down"].T + d["down_bias"]
    h = torch.cos(d["omega1"] * z + d["phi1"])
    h = torch.cos(d["omega2"] * (h @ d["mid"].T + d["mid_bias"]) + d["phi2"])
    return h @ d["up"].T


def test_noble_bf16_sums_w_down_in_fp32():
    """bf16 inputs of magnitude ~100: a bf16 W_down·x (rounded before the cosine) puts ~2% error on the
    branch (measured 0.024); summed in fp32 only the bf16 rounding of h and y remains (measured 0.002)."""
    torch.manual_seed(0)
    W = torch.zeros(64, 256, dtype=torch.bfloat16)
    n = NOBLE.from_dense(W, None, NOBLE.Config(rank=16)).to(torch.bfloat16)
    with torch.no_grad():
        n.up.normal_()  # a loud branch, so its error is measurable
    x = (torch.randn(64, 256) * 100).bfloat16()
    y = n.functional(x, W, None, *n.tensors())
    assert y.dtype == torch.bfloat16
    assert rel_err(y, noble_reference(n, x)) < 5e-3
    # and a whole site in bf16: base plus a near-silent branch (W_up ~ N(0, 0.01²/r))
    lin = nn.Linear(48, 32).to(torch.bfloat16)
    site = NOBLE.from_dense(lin.weight, None, NOBLE.Config(rank=8))
    site.weight, site.bias = lin.weight, lin.bias
    x = torch.randn(5, 48, dtype=torch.bfloat16)
    base = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert rel_err(site(x), base + noble_reference(site, x)) < 5e-3
    assert (site(x).double() - base).abs().max() < 0.05


def test_noble_inits_follow_the_paper():
    """The paper's inits: W_down ~ N(0, 1/in), W_up ~ N(0, 0.01²/r), M ~ N(0, 0.25/r), ω ~ U[0.8, 1.2],
    φ ~ N(0, 0.1²), biases 0; `init: scratch` re-initialises the main weight N(0, 0.25/in), `keep` keeps it."""
    in_f, out_f, r = 512, 384, 64
    n = NOBLE.from_dense(torch.randn(out_f, in_f), None, NOBLE.Config(rank=r))

    def check_normal(t, std):
        t = t.detach()
        tol = 4 / (2 * t.numel()) ** 0.5
        assert float(t.std()) == pytest.approx(std, rel=tol) and abs(float(t.mean())) < 4 * std / t.numel() ** 0.5

    check_normal(n.down, 1 / in_f**0.5)
    check_normal(n.up, 0.01 / r**0.5)
    check_normal(n.mid, 0.5 / r**0.5)
    check_normal(torch.cat([n.phi1, n.phi2]), 0.1)
    omega = torch.cat([n.omega1, n.omega2]).detach()
    assert 0.8 <= float(omega.min()) < 0.82 and 1.18 < float(omega.max()) <= 1.2
    assert float(omega.std()) == pytest.approx(0.4 / 12**0.5, rel=4 / (2 * omega.numel()) ** 0.5)
    assert torch.equal(n.down_bias, torch.zeros(r)) and torch.equal(n.mid_bias, torch.zeros(r))
    # init: scratch through rewrite: the stored weight itself is re-drawn (same Parameter), keep leaves it alone
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_f, out_f), nn.Linear(out_f, 96))
    w0, w1 = model[0].weight, model[1].weight.detach().clone()
    lrcompile.rewrite(
        model,
        {
            "defaults": {"min_features": 0},
            "rules": [
                {"match": "0", "method": "noble", "rank": r, "init": "scratch"},
                {"match": "1", "method": "noble", "rank": 8},
            ],
        },
        (torch.randn(2, in_f),),
    )
    assert model[0].weight is w0
    check_normal(model[0].weight, 0.5 / in_f**0.5)
    assert torch.equal(model[1].weight, w1)


def test_adapter_state_dict_round_trips_into_a_fresh_model():
    torch.manual_seed(0)
    base, x = MLP(), torch.randn(4, 24)
    pol = {
        "defaults": {"min_features": 0},
        "rules": [
            {"match": ["fc1"], "method": "dora", "rank": 4},
            {"match": ["fc2"], "method": "vera", "rank": 8},
            {"match": ["head"], "method": "lora", "rank": 2, "alpha": 5},
        ],
    }
    a = lrcompile.rewrite(copy.deepcopy(base), pol, (x,))
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    sd = {k: v.clone() for k, v in lrcompile.adapter_state_dict(a).items()}
    assert set(sd) == {
        "fc1.lora_A",
        "fc1.lora_B",
        "fc1.magnitude",
        "fc1.scaling",
        "fc2.vera_A",
        "fc2.vera_B",
        "fc2.lambda_d",
        "fc2.lambda_b",
        "head.lora_A",
        "head.lora_B",
        "head.scaling",
    }
    b = lrcompile.rewrite(copy.deepcopy(base), pol, (x,))
    assert not torch.allclose(b(x), a(x))
    lrcompile.load_adapter_state_dict(b, sd)
    torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)


# (other adapter, the one compiled, a larger one) per family; other: smaller rank and another scaling/seed
SWAPS = {
    "lora": ({"rank": 4, "alpha": 32, "rslora": True}, {"rank": 8, "alpha": 16}, {"rank": 16}),
    "dora": ({"rank": 4, "alpha": 32, "rslora": True}, {"rank": 8, "alpha": 16}, {"rank": 16}),
    "vera": ({"rank": 4, "seed": 5}, {"rank": 8}, {"rank": 16}),
}


def hot_swap_recompiles_nothing(method, compile_fn):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    base, x = MLP(), torch.randn(6, 24)
    other_opts, opts, big_opts = SWAPS[method]
    # built before compiling (rewrite resets Dynamo)
    other = lrcompile.rewrite(copy.deepcopy(base), policy(method, **other_opts), (x,))
    big = lrcompile.rewrite(copy.deepcopy(base), policy(method, **big_opts), (x,))
    m = lrcompile.rewrite(copy.deepcopy(base), policy(method, **opts), (x,))
    perturb_adapters(m)
    perturb_adapters(other)
    compiled = compile_fn(m)
    torch.testing.assert_close(compiled(x), m(x), atol=1e-5, rtol=1e-5)
    assert lowered(m) == {t: "installed" for t in TARGETS}  # the graph runs the adapters: a swap must reach it
    graphs = counters["stats"]["unique_graphs"]
    lrcompile.load_adapter_state_dict(m, lrcompile.adapter_state_dict(other))
    torch.testing.assert_close(compiled(x), other(x), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile
    with pytest.raises(lrcompile.LrcompileError, match="larger rank"):
        lrcompile.load_adapter_state_dict(m, lrcompile.adapter_state_dict(big))
    return m


@pytest.mark.parametrize("method", list(SWAPS))
def test_hot_swap_smaller_rank_other_scaling_recompiles_nothing(method):
    m = hot_swap_recompiles_nothing(method, compile_eager)
    if method == "lora":  # rsLoRA α=32, r=4: scaling 16 instead of 2; rank 4 zero-padded to 8
        assert float(m.fc1.scaling) == 16.0 and torch.equal(m.fc1.lora_A[4:], torch.zeros(4, 24))
    if method == "vera":  # rank 4 projections and λ_d zero-padded to rank 8
        assert torch.equal(m.fc1.lambda_d[4:], torch.zeros(4)) and torch.equal(m.fc1.vera_A[4:], torch.zeros(4, 40))


@pytest.mark.slow  # Inductor compile of the MLP
def test_hot_swap_through_inductor_recompiles_nothing():
    hot_swap_recompiles_nothing("lora", lambda m: torch.compile(m, backend="lrcompile"))


def test_backend_policy_path_matches_eager_rewrite():
    torch.manual_seed(0)
    base, x = MLP(), torch.randn(6, 24)
    for method in ("lora", "dora", "vera", "noble"):
        a = copy.deepcopy(base)
        out = compile_eager(a, policy(method, rank=4))(x)
        torch.testing.assert_close(out, base(x), atol=0.05 if method == "noble" else 1e-6, rtol=1e-5)
        assert isinstance(a.fc1.lrcompile, (LoRA, DoRA, VeRA, NOBLE))


def test_options_are_validated_with_one_line_errors():
    with pytest.raises(lrcompile.PolicyError, match="dropout"):
        lrcompile.load_policy(policy("lora", dropout=1.5))
    with pytest.raises(lrcompile.PolicyError, match="rank"):
        lrcompile.load_policy(policy("dora", rank=0.5))
    with pytest.raises(lrcompile.PolicyError, match="alhpa|alpha"):
        lrcompile.load_policy(policy("lora", alhpa=3))
    cfg = lrcompile.load_policy(policy("lora")).rules[0].config
    assert (cfg.rank, cfg.alpha, cfg.dropout) == (8, 8.0, 0.0)


def _noisy_branches(model: nn.Module) -> None:
    """Non-zero adapter branches (B and λ_b start at zero, which would hide dropout)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and any(k in n for k in ("lora_", "lambda", "magnitude")):
                p.add_(torch.randn_like(p) * 0.5)


@pytest.mark.parametrize("path", ["backend", "rewrite", "load"])
@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_installed_adapters_follow_the_models_mode(path, method, tmp_path):
    """No adapter dropout in an eval model, whichever path installed the adapter; dropout again in train()."""
    torch.manual_seed(0)
    build = lambda: nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))  # noqa: E731
    pol = {"defaults": {"min_features": 0}, "rules": [{"match": "*", "method": method, "rank": 4, "dropout": 0.5}]}
    x = torch.randn(8, 16)
    m = build()
    if path == "backend":
        m.eval()
        c = compile_eager(m, pol)
        c(x)
    else:  # the mode is set before the adapters are installed, never after
        if path == "rewrite":
            m.eval()
        lrcompile.rewrite(m, pol, (x,))
        if path == "load":
            lrcompile.save(m, str(tmp_path / "ck"))
            m = lrcompile.load(build().eval(), str(tmp_path / "ck"))
        c = compile_eager(m)
    installed = [s for s in m.modules() if isinstance(s, Structure)]
    assert len(installed) == 2 and not any(s.training for s in installed)  # really installed, in the model's mode
    _noisy_branches(m)
    torch.testing.assert_close(c(x), c(x), atol=0, rtol=0)  # deterministic: no dropout at inference
    assert set(lowered(m).values()) == {"rewritten" if path == "backend" else "installed"}  # the graph ran them
    m.train()
    assert all(s.training for s in installed)
    assert not torch.equal(c(x), c(x))  # the dropout is there and follows train()


def _live_lora():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    x = torch.randn(4, 16)
    pol = {"defaults": {"min_features": 0}, "rules": [{"match": "*", "method": "lora", "rank": 4}]}
    c = compile_eager(m, pol)
    c(x)
    assert isinstance(m[0].lrcompile, LoRA)  # the backend attached the adapter: the graph runs it
    _noisy_branches(m)
    return m, c, x


def test_merge_on_a_live_compiled_model_is_not_applied_twice():
    m, c, x = _live_lora()
    before = c(x).detach()
    lrcompile.merge(m)
    assert not any(isinstance(s, LoRA) for s in m.modules())
    with pytest.warns(UserWarning, match="removed or replaced .*compile the model again"):
        out = c(x)
    torch.testing.assert_close(out, before, atol=1e-5, rtol=1e-5)  # the merged weights' function, once
    torch.testing.assert_close(out, m(x), atol=1e-5, rtol=1e-5)


def test_load_into_a_live_compiled_model_follows_the_loaded_factors(tmp_path):
    m, c, x = _live_lora()
    other = copy.deepcopy(m)
    _noisy_branches(other)  # other adapter weights, same plan
    lrcompile.save(other, str(tmp_path / "ck"))
    expected = compile_eager(copy.deepcopy(other))(x)
    lrcompile.load(m, str(tmp_path / "ck"))
    torch.testing.assert_close(c(x), expected, atol=1e-5, rtol=1e-5)


def test_merged_gpt2_keeps_conv1d_and_round_trips_through_save_pretrained(tmp_path):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 6))
    pol = {"defaults": {"min_features": 0}, "rules": [{"match": "re:.*(c_attn|c_fc)", "method": "lora", "rank": 4}]}
    lrcompile.rewrite(m, pol, (ids,))
    assert isinstance(m.transformer.h[0].attn.c_attn, LoRA)
    _noisy_branches(m)
    with torch.no_grad():
        ref = m(ids).logits
    lrcompile.merge(m)
    conv1d = type(transformers.GPT2Model(cfg).h[0].attn.c_attn)
    assert type(m.transformer.h[0].attn.c_attn) is conv1d and type(m.transformer.h[0].mlp.c_fc) is conv1d
    assert m.transformer.h[0].attn.c_attn.weight.shape == (32, 96)  # Conv1D's (in, out) layout
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, ref, atol=1e-5, rtol=1e-5)
    m.save_pretrained(tmp_path / "hf")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref, atol=1e-5, rtol=1e-5)


class SquareMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.P = nn.Parameter(torch.randn(16, 16) / 4)

    def forward(self, x):
        return x @ self.P  # W = Pᵀ: the orientation cannot be read off a square shape


@pytest.mark.parametrize("via", ["deepcopy", "save_load"])
def test_merge_of_a_square_matmul_site_after_a_copy(tmp_path, via):
    m = SquareMatmul()
    x = torch.randn(4, 16)
    pol = {"defaults": {"min_features": 0}, "rules": [{"match": "P", "method": "lora", "rank": 4}]}
    compile_eager(m, pol)(x)
    assert structures(m) == {"lrcompile_P": "LoRA"}  # the backend attached the adapter
    _noisy_branches(m)
    expected = compile_eager(copy.deepcopy(m))(x)  # the adapter, applied by the graph
    if via == "deepcopy":
        m2 = copy.deepcopy(m)
    else:
        lrcompile.save(m, str(tmp_path / "ck"))
        m2 = lrcompile.load(SquareMatmul(), str(tmp_path / "ck"))
    lrcompile.merge(m2)
    torch.testing.assert_close(m2(x), expected, atol=1e-5, rtol=1e-5)


def test_both_paths_freeze_by_one_rule():
    """rewrite and the backend path alike: adapters make the model PEFT-style (only their branches train); a rule
    that matches nothing freezes nothing."""
    pol = {"defaults": {"min_features": 0}, "rules": [{"match": "0", "method": "lora", "rank": 4}]}
    x = torch.randn(4, 16)
    for path in ("rewrite", "backend"):
        m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        if path == "rewrite":
            lrcompile.rewrite(m, pol, (x,))
        else:
            compile_eager(m, pol)(x)
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable), (path, trainable)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    nothing = {"defaults": {"min_features": 0}, "rules": [{"match": "nope", "method": "lora", "rank": 4}]}
    with pytest.warns(UserWarning, match="matches no site"):
        lrcompile.rewrite(m, nothing, (x,))
    assert all(p.requires_grad for p in m.parameters())


def test_dora_installed_by_rewrite_compiles_without_graph_breaks():
    """The frozen-base fast path's checks (torch.func wrapping) are not traceable: under Dynamo the formula runs,
    so the compiled model is one graph (before: a graph break per DoRA call, then the recompile limit)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16)).eval()
    x = torch.randn(3, 16)
    lrcompile.rewrite(
        m, {"defaults": {"min_features": 0}, "rules": [{"match": "*", "method": "dora", "rank": 4}]}, (x,)
    )
    assert all(isinstance(mod, DoRA) for mod in (m[0], m[2]))
    with torch.no_grad():
        ref = m(x)
        torch._dynamo.reset()
        counters.clear()
        out = compile_eager(m)(x)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.allclose(out, ref, atol=1e-6)
