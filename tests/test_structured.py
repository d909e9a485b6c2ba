"""Structured families: Monarch, BTT, BLAST — math, projections, init, and the compile / rewrite paths."""
import dataclasses
import math

import pytest
import sympy
import torch

import lrcompile
from conftest import compile_eager
from lrcompile.errors import PolicyError
from lrcompile.param_groups import param_groups
from lrcompile.policy import load_policy
from lrcompile.structures import FAMILIES
from lrcompile.structures.blast import fit_blast
from lrcompile.structures.btt import even_split

D = torch.float64
CFGS = {"monarch": {"blocks": 3}, "btt": {"rank": 2}, "blast": {"blocks": [3, 2], "rank": 4}}
# non-power-of-two shapes; Monarch's include sizes that b does not divide (padding and slicing)
SHAPES = {"monarch": [(30, 45), (20, 17), (45, 30)], "btt": [(30, 42), (24, 36), (42, 30)],
          "blast": [(30, 42), (24, 36), (42, 30)]}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: two OpenMP threads on a shared 2-core machine only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(name, in_f, out_f, dtype=D, init="random", **over):
    cls = FAMILIES[name]
    cfg = cls.Config(**{**CFGS[name], "init": init, **over}).resolve(in_f, out_f)
    return cls, cfg, cls.init(in_f, out_f, cfg, dtype=dtype)


CASES = [(n, i, o) for n in CFGS for (i, o) in SHAPES[n]]


@pytest.mark.parametrize("name,in_f,out_f", CASES)
def test_functional_equals_dense_matmul(name, in_f, out_f):
    cls, cfg, m = make(name, in_f, out_f)
    x = torch.randn(2, 5, in_f, dtype=D)  # leading batch dims
    b = torch.randn(out_f, dtype=D)
    dense = m.to_dense()
    assert dense.shape == (out_f, in_f)
    y = cls.functional(x, None, b, *m.tensors())
    assert y.shape == (2, 5, out_f) and y.is_contiguous()
    torch.testing.assert_close(y, x @ dense.T + b, atol=1e-12, rtol=1e-12)
    assert cls.param_count(in_f, out_f, cfg) == m.params()
    assert cls.flops_per_token(in_f, out_f, cfg) == 2 * m.params()
    tok = sympy.Symbol("tokens", positive=True, integer=True)
    assert sympy.simplify(cls.flops(in_f, out_f, cfg) - 2 * m.params() * tok) == 0


@pytest.mark.parametrize("name,in_f,out_f", [c for c in CASES if c[0] != "blast"])
def test_exact_recovery_and_optimality(name, in_f, out_f):
    """Per-sub-block SVD: exact on family members; on any W its error is the sum of the blocks' SVD tails."""
    cls, cfg, m = make(name, in_f, out_f)
    W = m.to_dense()
    rec = cls.from_dense(W, None, dataclasses.replace(cfg, init="svd"))
    torch.testing.assert_close(rec.to_dense(), W, atol=1e-10, rtol=1e-10)
    a1, a0, c0, c1, t = cls.geometry(in_f, out_f, cfg)
    R = torch.randn(out_f, in_f, dtype=D)
    proj = cls.from_dense(R, None, rec.cfg).to_dense()
    pad = torch.nn.functional.pad(R, (0, a1 * a0 - in_f, 0, c0 * c1 - out_f))
    S = torch.linalg.svdvals(pad.reshape(c0, c1, a1, a0).permute(0, 2, 1, 3))
    with torch.no_grad():
        assert math.isclose(float((R - proj).norm()), float(S[..., t:].norm()), rel_tol=1e-9)


@pytest.mark.parametrize("name", ["monarch", "btt"])
def test_beats_svd_on_block_low_rank(name):
    """A matrix whose sub-blocks are low rank (here: in the family) is exact for Monarch/BTT, and far from
    exact for plain SVD at the same parameter count."""
    in_f, out_f = 48, 60
    cls, cfg, m = make(name, in_f, out_f, blocks=4) if name == "monarch" else make(name, in_f, out_f)
    W = m.to_dense()
    err = (W - cls.from_dense(W, None, dataclasses.replace(cfg, init="svd")).to_dense()).norm() / W.norm()
    r = cls.param_count(in_f, out_f, cfg) // (in_f + out_f)
    S = torch.linalg.svdvals(W)
    svd_err = S[r:].norm() / S.norm()
    assert err < 1e-10 and svd_err > 0.1


def blast_member(out_f, in_f, b1, b2, r, seed):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(b1, out_f // b1, r, generator=g, dtype=D)
    V = torch.randn(b2, in_f // b2, r, generator=g, dtype=D)
    s = torch.randn(b1, b2, r, generator=g, dtype=D)
    return FAMILIES["blast"].functional(torch.eye(in_f, dtype=D), None, None, U, V, s).T


def blast_dense(U, V, s):
    return FAMILIES["blast"].functional(torch.eye(V.shape[0] * V.shape[1], dtype=D), None, None, U, V, s).T


def test_blast_fit_recovers_members_and_never_loses_to_svd():
    """The fit is non-convex (no closed form): members are recovered closely though not always to round-off;
    the low-rank corner of the family (s = 1) exactly."""
    g = torch.Generator().manual_seed(2)
    L = torch.randn(40, 3, dtype=D, generator=g) @ torch.randn(3, 36, dtype=D, generator=g)
    assert (L - blast_dense(*fit_blast(L, 4, 3, 3, progress=False))).norm() / L.norm() < 1e-8
    W = blast_member(36, 24, 3, 3, 4, seed=1)
    U, V, s = fit_blast(W, 3, 3, 4, progress=False)
    assert (W - blast_dense(U, V, s)).norm() / W.norm() < 1e-2
    # deterministic: the same fit twice is bitwise the same
    U2, V2, s2 = fit_blast(W, 3, 3, 4, progress=False)
    assert torch.equal(U, U2) and torch.equal(V, V2) and torch.equal(s, s2)
    # a member the descent does not solve exactly still ends far below SVD at the same rank
    W = blast_member(42, 30, 3, 2, 5, seed=1)
    S = torch.linalg.svdvals(W)
    err = (W - blast_dense(*fit_blast(W, 3, 2, 5, progress=False))).norm() / W.norm()
    assert err < 0.25 * (S[5:].norm() / S.norm())
    # on an unstructured matrix: never worse than plain SVD at rank r (it starts there, the loss only drops)
    R = torch.randn(40, 36, dtype=D, generator=torch.Generator().manual_seed(3))
    S = torch.linalg.svdvals(R)
    err = (R - blast_dense(*fit_blast(R, 4, 3, 6, progress=False))).norm() / R.norm()
    assert err <= S[6:].norm() / S.norm() + 1e-12


@pytest.mark.parametrize("name", list(CFGS))
def test_gradcheck(name):
    in_f, out_f = SHAPES[name][1]
    cls, cfg, m = make(name, in_f, out_f)
    x = torch.randn(3, in_f, dtype=D, requires_grad=True)
    b = torch.randn(out_f, dtype=D, requires_grad=True)
    ts = [t.detach().clone().requires_grad_(t.numel() > 0) for t in m.tensors()]
    assert torch.autograd.gradcheck(lambda x, b, *ts: cls.functional(x, None, b, *ts), (x, b, *ts))


@pytest.mark.parametrize("name", list(CFGS))
def test_bf16_forward_backward(name):
    in_f, out_f = SHAPES[name][0]
    cls, cfg, m = make(name, in_f, out_f, dtype=torch.float32)
    x = torch.randn(4, 7, in_f)
    ref = m(x)
    m16 = m.to(torch.bfloat16)
    x16 = x.bfloat16().requires_grad_()
    y = m16(x16)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()) < 3e-2
    y.float().pow(2).sum().backward()
    assert x16.grad is not None and all(p.grad is not None for p in m16.parameters())
    # from dense in bf16: factors come out in bf16
    W = torch.randn(out_f, in_f).bfloat16()
    assert all(t.dtype == torch.bfloat16 for t in cls.from_dense(W, None, cls.Config(**CFGS[name])).tensors())


@pytest.mark.parametrize("name", list(CFGS))
def test_random_init_scale_and_lr_multipliers(name):
    in_f, out_f = 96, 120
    over = {"blocks": 4} if name != "btt" else {}
    cls, cfg, m = make(name, in_f, out_f, dtype=torch.float32, **over)
    x = torch.randn(512, in_f)
    with torch.no_grad():
        ratio = float(m(x).var() / x.var())
    assert 0.05 < ratio <= 1.2  # μP: never louder than the input, not vanishing
    mult = m.lr_multipliers()
    assert set(mult) == set(n for n, _ in m.named_parameters())
    fans = m._fans()
    for n, v in mult.items():
        assert v == pytest.approx((in_f / fans[n][0]) / len(fans))
    svd = cls.from_dense(torch.randn(out_f, in_f), None, cls.Config(**{**CFGS[name], **over}))
    assert set(svd.lr_multipliers().values()) == {1.0}  # projected factors fine-tune at the dense rate


def test_param_groups_are_generic():
    cls, cfg, m = make("btt", 24, 36, dtype=torch.float32)
    model = torch.nn.Sequential(torch.nn.Linear(5, 24), m, torch.nn.Linear(36, 3))
    model[2].weight.requires_grad_(False)
    groups = param_groups(model, 1e-3)
    seen = [p for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(seen) == len(trainable) and {id(p) for p in seen} == {id(p) for p in trainable}
    assert groups[0]["lr_multiplier"] == 1.0 and groups[0]["lr"] == 1e-3
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for n, v in m.lr_multipliers().items():
        assert lr_of[id(getattr(m, n))] == pytest.approx(1e-3 * v)
    torch.optim.Adam(groups)  # valid optimizer groups


def test_config_validation_and_resolution():
    with pytest.raises(PolicyError, match=r"<policy>.*rule 1.*monarch blocks must be an int"):
        load_policy("rules:\n  - match: '*'\n    method: monarch\n    blocks: 2.5\n")
    with pytest.raises(PolicyError, match=r"rule 1.*unknown option 'rnak'"):
        load_policy({"rules": [{"match": "*", "method": "btt", "rnak": 4}]})
    with pytest.raises(PolicyError, match="tensor-train rank, an int"):
        load_policy({"rules": [{"match": "*", "method": "btt", "rank": 0.5}]})
    with pytest.raises(PolicyError, match="blocks must be an int b >= 1 or a pair"):
        load_policy({"rules": [{"match": "*", "method": "blast", "blocks": [2, 2, 2], "rank": 4}]})
    with pytest.raises(PolicyError, match="needs a 'rank'"):
        load_policy({"rules": [{"match": "*", "method": "blast"}]})
    B = FAMILIES["blast"].Config
    # float rank: ⌊f·in·out/(in+out+b₁b₂)⌋
    assert B(blocks=[2, 3], rank=0.5).resolve(30, 40).rank == math.floor(0.5 * 30 * 40 / (30 + 40 + 6))
    assert B(blocks=4, rank=10_000).resolve(32, 40).rank == 32
    with pytest.raises(ValueError, match=r"do not divide \(out, in\) = \(42, 30\)"):
        B(blocks=4, rank=3).resolve(30, 42)
    T = FAMILIES["btt"].Config
    assert even_split(768, "in_features") == (24, 32)
    c = T(rank=100).resolve(24, 36)
    assert (c.in_factors, c.out_factors, c.rank) == ([4, 6], [6, 6], 6)  # rank capped at min(a₀, c₁)
    with pytest.raises(ValueError, match="in_features 31 is prime"):
        T(rank=2).resolve(31, 36)
    with pytest.raises(ValueError, match="multiply to 20, not in_features 24"):
        T(rank=2, in_factors=[4, 5]).resolve(24, 36)
    with pytest.raises(ValueError, match="exceeds min"):
        FAMILIES["monarch"].Config(blocks=8).resolve(6, 40)
    # Monarch's published size: 2n²/b on a square map
    assert FAMILIES["monarch"].param_count(768, 768, FAMILIES["monarch"].Config(blocks=4)) == 2 * 768 * 768 // 4


def test_shape_the_family_cannot_take_stays_dense(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(31, 24), torch.nn.ReLU(), torch.nn.Linear(24, 36))
    x = torch.randn(3, 31)
    with torch.no_grad():
        ref = model(x)
        out = compile_eager(model, {"defaults": {"min_features": 0}, "rules": [
            {"match": "*", "method": "btt", "rank": 2}]}, report=str(tmp_path / "r.json"))(x)
    import json

    rows = {r["fqn"]: r for r in json.loads((tmp_path / "r.json").read_text())["sites"]}
    assert rows["0"]["status"] == "failed" and "prime" in rows["0"]["reason"]
    assert rows["2"]["status"] == "rewritten"
    assert out.shape == ref.shape


# --- GPT-2 (HF Conv1D sites) through the backend and through rewrite ------------------------------------------
POLICIES = {
    "monarch": {"method": "monarch", "blocks": 4},
    "btt": {"method": "btt", "rank": 2},
    "blast": {"method": "blast", "blocks": 2, "rank": 0.3},
}


def gpt2(seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=101, n_embd=72, n_layer=2, n_head=4, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def policy(name):
    return {"defaults": {"min_features": 0}, "rules": [
        {"match": "lm_head", "method": "dense"}, {"match": "transformer.h.*", **POLICIES[name]}]}


@pytest.mark.slow  # two Dynamo traces of GPT-2 forward+backward: 15-30 s on the shared 2-core machine
@pytest.mark.parametrize("name", list(POLICIES))
def test_gpt2_compile_trains_and_state_dict_round_trips(name, tmp_path):
    model = gpt2(0).train()
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(0))
    c = compile_eager(model, policy(name))
    c(input_ids=ids)  # the first call registers the factors on the model
    factors = {n for n, _ in model.named_parameters() if ".lrcompile." in n}
    assert len(factors) == 8 * len(FAMILIES[name].tensor_names if name != "monarch" else ("W1", "W2"))
    opt = torch.optim.Adam(param_groups(model, 3e-3))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = c(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    params = dict(model.named_parameters())
    assert all(params[n].grad is not None for n in factors)
    model.eval()
    with torch.no_grad():
        ref = c(input_ids=ids).logits
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch._dynamo.reset()
    fresh = gpt2(1).eval()
    c2 = compile_eager(fresh, policy(name))
    with torch.no_grad():
        c2(input_ids=ids)  # same compile/rewrite: the factor modules exist
        fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
        torch.testing.assert_close(c2(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(POLICIES))
def test_gpt2_eager_rewrite(name, tmp_path):
    model = gpt2(0).eval()
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    lrcompile.rewrite(model, policy(name), {"input_ids": ids})
    cls = FAMILIES[name]
    mods = [m for m in model.modules() if isinstance(m, cls)]
    assert len(mods) == 8 and type(model.transformer.h[0].mlp.c_fc) is cls
    rows = [r for r in model.lrcompile_report.rows.values() if r.status == "rewritten"]
    assert len(rows) == 8 and all(0 <= r.rel_error < 1 and r.params_after < r.params_before for r in rows)
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        torch.testing.assert_close(compile_eager(model)(input_ids=ids).logits, eager, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(eager, dense)  # the lossy structure really runs
    torch._dynamo.reset()
    fresh = gpt2(1).eval()
    lrcompile.rewrite(fresh, policy(name), {"input_ids": ids})
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, eager, atol=1e-6, rtol=1e-6)
