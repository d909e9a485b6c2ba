"""Mixed precision: every family under `torch.autocast` (CPU, bf16) runs, returns what F.linear would (the
autocast dtype), stays near its fp32 result, and trains (gradients near fp32's). In-place ops are not cast by
autocast, so an unguarded `addmm_` with an fp32 factor fails there; fine-tuning under autocast is the common case."""

import pytest
import torch
from conftest import compile_eager, rel_err
from torch import nn

from lrcompile.families import FAMILIES
from lrcompile.families.base import owned_parameters

OPTS = {
    "lowrank": {"rank": 8},
    "monarch": {"blocks": 4},
    "btt": {"rank": 2},
    "blast": {"blocks": 2, "rank": 8},
    "lora": {"rank": 4},
    "dora": {"rank": 4},
    "vera": {"rank": 4},
    "noble": {"rank": 4},
}


def family_module(name, lin):
    cls = FAMILIES[name]
    cfg = cls.Config(**OPTS[name])
    m = cls.from_dense(
        lin.weight, lin.bias, cfg.resolve(lin.in_features, lin.out_features) if hasattr(cfg, "resolve") else cfg
    )
    with torch.no_grad():
        for n in ("lora_B", "up"):  # a trained-looking branch, so that it contributes
            if hasattr(m, n):
                getattr(m, n).normal_(std=0.1)
    return cls, m


def run(cls, m, lin, x, autocast):
    trainable = [t for t in m.tensors() if isinstance(t, nn.Parameter)]
    for t in (x, *trainable):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = cls.functional(x, None if m.compressing else lin.weight, lin.bias, *m.tensors())
    y.float().square().sum().backward()
    return y, [x.grad.clone()] + [t.grad.clone() for t in trainable]


@pytest.mark.parametrize("name", sorted(OPTS))
def test_family_under_bf16_autocast(name):
    assert set(OPTS) == set(FAMILIES), "a new family needs an autocast case"
    torch.manual_seed(0)
    lin = nn.Linear(48, 40).requires_grad_(False)
    cls, m = family_module(name, lin)
    x = torch.randn(2, 5, 48, requires_grad=True)
    y32, g32 = run(cls, m, lin, x, autocast=False)
    y16, g16 = run(cls, m, lin, x, autocast=True)
    assert y16.dtype == torch.bfloat16  # what F.linear gives under the same autocast
    assert rel_err(y16, y32) < 0.02
    for g1, g2 in zip(g16, g32):
        assert g1.dtype == torch.float32 and rel_err(g1, g2) < 0.05


@pytest.mark.parametrize("method", ["lora", "dora", "noble", "lowrank"])
def test_compiled_model_trains_under_bf16_autocast(method):
    """Through the backend: the rewritten graph runs under autocast, gives a gradient to every parameter the
    rewrite installed, and its loss is the fp32 rewritten model's to bf16 precision."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    opts = {"rank": 4} if method != "lowrank" else {"rank": 8, "guard": "off"}
    pol = {"defaults": {"min_features": 0}, "rules": [{"match": "*", "method": method, **opts}]}
    x = torch.randn(4, 6, 32)
    c = compile_eager(model, pol)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = c(x)
        assert y.dtype == model(x).dtype == torch.bfloat16
        loss = y.float().square().mean()
    loss.backward()
    owned = [p for _, p in owned_parameters(model)]  # the factors / branch the rewrite installed
    assert owned and all(p.grad is not None for p in owned)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        ref = c(x).square().mean()  # the same rewritten model in fp32
    assert abs(float(loss) - float(ref)) <= 0.05 * float(ref)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "monarch"])
def test_inductor_output_keeps_the_autocast_dtype(method):
    """Through Inductor (the bias is added after the GEMMs there): the output is bf16 as the dense model's,
    and equals the fp32 rewritten model's to bf16 precision."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    rule = {"match": "*", "method": method, **({"rank": 4} if method == "lora" else {})}
    c = torch.compile(
        model, backend="lrcompile", options={"policy": {"defaults": {"min_features": 0}, "rules": [rule]}}
    )
    x = torch.randn(4, 6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = c(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    with torch.no_grad():
        ref = c(x)
    assert rel_err(y, ref) < 0.02


def test_noble_cosine_branch_stays_fp32_under_autocast():
    """With a large ω₁ a bf16 W_down·x sum puts the cosine's phase off (branch error 0.016 measured with the
    guard removed); NOBLE runs its branch in fp32 under autocast, so only the bf16 output rounding is left."""
    import torch.nn.functional as F

    from lrcompile.families.adapters.noble import NOBLE, NOBLEConfig

    torch.manual_seed(0)
    lin = nn.Linear(64, 40).requires_grad_(False)
    m = NOBLE.from_dense(lin.weight, lin.bias, NOBLEConfig(rank=8))
    with torch.no_grad():
        m.omega1.fill_(40.0)
        m.up.normal_(std=0.3)
        x = torch.randn(16, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, base = NOBLE.functional(x, lin.weight, lin.bias, *m.tensors()), F.linear(x, lin.weight, lin.bias)
        want = NOBLE.functional(x, lin.weight, lin.bias, *m.tensors()) - F.linear(x, lin.weight, lin.bias)
    assert rel_err(y.float() - base.float(), want) < 0.008
