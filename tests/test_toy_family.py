"""A family declares itself: a toy family defined only in this file, registered, and run through the policy, a
policy budget, the autotuner, the fusion pass, save/load and the report, with no other module edited.

The toy is a sum of Kronecker products, W ≈ Σ_{k<terms} A_k ⊗ B_k with A_k (m₁, n₁), B_k (m₂, n₂). Van Loan's
rearrangement R(W) ((m₁n₁) × (m₂n₂), R[(i₁,j₁),(i₂,j₂)] = W[(i₁,i₂),(j₁,j₂)]) turns it into low rank:
‖W − Σ A_k ⊗ B_k‖_F = ‖R(W) − Σ vec(A_k) vec(B_k)ᵀ‖_F, so the truncated SVD of R(W) is the optimal fit and the
tail of its spectrum is the exact error per number of terms: what the budget allocates by. Every check compares
against a float64 dense reference built with torch.kron, independently of the toy's forward.

Nothing below reaches into lrcompile's tables: the family is found through what its class declares (kernel,
candidates, linear_in_x, trains_base, budget_knob / budget_error). With those tables hard-coded again the toy
loses its kernel (no fusion group), its tuner candidate, its budget and its base freezing, and these tests fail.
"""

import copy
import dataclasses
import functools
import json
from typing import ClassVar, Optional

import pytest
import torch
import torch.nn.functional as F
from conftest import compile_eager, rel_err
from torch import nn

import lrcompile
from lrcompile.errors import PolicyError
from lrcompile.families import FAMILIES, Candidate, MethodConfig, Structure, register, unregister
from lrcompile.families.adapters.lora import Adapter
from lrcompile.families.base import mark_owned
from lrcompile.kernels import epilogue as epi
from lrcompile.kernels.op import OPS, define

NAME = "kron"
OP = "toy_kron"


# --- the family --------------------------------------------------------------------------------------------------
def check_int(value, what: str, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")


@dataclasses.dataclass
class KronConfig(MethodConfig):
    terms: Optional[int] = None  # Kronecker products summed; a budget may choose it
    outer: list = dataclasses.field(default_factory=lambda: [2, 2])  # [m₁, n₁]: the shape of every A_k

    INITS: ClassVar[tuple[str, ...]] = ("svd",)

    def validate(self) -> None:
        super().validate()
        check_int(self.terms, "kron terms", allow_none=True)
        if not (isinstance(self.outer, (list, tuple)) and len(self.outer) == 2):
            raise ValueError(f"kron outer must be a pair [m1, n1], got {self.outer!r}")
        for v in self.outer:
            check_int(v, "kron outer entries", allow_none=False)

    def resolve(self, in_features: int, out_features: int) -> "KronConfig":
        self.validate()
        m1, n1 = self.outer
        if out_features % m1 or in_features % n1:
            raise ValueError(f"kron outer {self.outer} does not divide (out, in) = ({out_features}, {in_features})")
        if self.terms is None:
            raise ValueError("kron needs 'terms'")
        full = min(m1 * n1, (out_features // m1) * (in_features // n1))
        return dataclasses.replace(self, terms=min(self.terms, full), outer=[m1, n1])


def shapes(in_f: int, out_f: int, cfg: KronConfig) -> tuple[int, int, int, int]:
    m1, n1 = cfg.outer
    return m1, n1, out_f // m1, in_f // n1


def rearranged(weight: torch.Tensor, m1, n1, m2, n2) -> torch.Tensor:
    """Van Loan's R(W): (m₁n₁, m₂n₂)."""
    return weight.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def kron_apply(x, A, B):
    """x (..., n₁n₂) -> (..., m₁m₂): y[a, c] = Σ_k Σ_{b,d} A_k[a, b] B_k[c, d] x[b, d]."""
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    x3 = x.reshape(-1, n1, n2)
    y = torch.einsum("kab,kcd,nbd->nac", A, B, x3)
    return y.reshape(*x.shape[:-1], m1 * m2)


def kron_two_step(x, weight, bias, A, B):
    """The same function as two batched GEMMs: T_k = X B_kᵀ, then Σ_k A_k T_k (a lossless candidate)."""
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    x3 = x.reshape(-1, n1, n2)
    t = torch.matmul(x3.unsqueeze(1), B.transpose(1, 2))  # (N, k, n₁, m₂)
    y = torch.einsum("kab,nkbc->nac", A, t).reshape(*x.shape[:-1], m1 * m2)
    return y if bias is None else y + bias


class Kron(Structure):
    name = NAME
    Config = KronConfig
    compressing = True
    tensor_names = ("A", "B")
    kernel = OP
    kernel_module = __name__  # the op is defined below, in this file
    candidates = (Candidate("two_step", kron_two_step),)
    budget_knob = "terms"

    def __init__(self, in_features: int, out_features: int, cfg: KronConfig, dtype=None, device=None):
        super().__init__(in_features, out_features, cfg)
        c = cfg.resolve(in_features, out_features)
        m1, n1, m2, n2 = shapes(in_features, out_features, c)
        self.A = mark_owned(nn.Parameter(torch.empty(c.terms, m1, n1, dtype=dtype, device=device)))
        self.B = mark_owned(nn.Parameter(torch.empty(c.terms, m2, n2, dtype=dtype, device=device)))

    @classmethod
    def from_dense(cls, weight, bias, cfg: KronConfig, stats=None) -> "Kron":
        out_f, in_f = weight.shape
        c = cfg.resolve(in_f, out_f)
        m1, n1, m2, n2 = shapes(in_f, out_f, c)
        P, S, Qh = torch.linalg.svd(rearranged(weight.detach().double(), m1, n1, m2, n2), full_matrices=False)
        root = S[: c.terms].sqrt()
        m = cls(in_f, out_f, cfg, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            m.A.copy_((P[:, : c.terms] * root).T.reshape(c.terms, m1, n1))
            m.B.copy_((root[:, None] * Qh[: c.terms]).reshape(c.terms, m2, n2))
        return m

    @staticmethod
    def functional(x, weight, bias, A, B):
        y = kron_apply(x, A, B)
        return y if bias is None else y + bias

    def to_dense(self) -> torch.Tensor:
        return sum(torch.kron(a, b) for a, b in zip(self.A, self.B))

    @classmethod
    def param_count(cls, in_features, out_features, cfg) -> int:
        c = cfg.resolve(in_features, out_features)
        m1, n1, m2, n2 = shapes(in_features, out_features, c)
        return c.terms * (m1 * n1 + m2 * n2)

    @classmethod
    def flops_per_token(cls, in_features, out_features, cfg) -> int:
        c = cfg.resolve(in_features, out_features)
        m1, n1, m2, n2 = shapes(in_features, out_features, c)
        return 2 * c.terms * m2 * n1 * (n2 + m1)

    @classmethod
    def budget_max(cls, in_features, out_features, cfg) -> int:
        m1, n1, m2, n2 = shapes(in_features, out_features, cfg)
        return min(m1 * n1, m2 * n2)

    @classmethod
    def budget_error(cls, weight, stats, cfg: KronConfig):
        """The exact error of `from_dense` at k terms: R(W)'s spectral tail (statistics are not used)."""
        out_f, in_f = weight.shape
        s2 = torch.linalg.svdvals(rearranged(weight.detach().double(), *shapes(in_f, out_f, cfg))).square()
        tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]).tolist() + [0.0]
        return lambda k: tail[min(k, len(tail) - 1)]


class KronDelta(Adapter):
    """An adapter: y = W x + b + Σ_k (A_k ⊗ B_k) x, zero-initialised branch. `trains_base` is flipped by a test."""

    name = "kron_delta"
    Config = KronConfig
    tensor_names = ("A", "B")

    def __init__(self, in_features, out_features, cfg, dtype=None, device=None):
        super().__init__(in_features, out_features, cfg, dtype=dtype, device=device)
        c = cfg.resolve(in_features, out_features)
        m1, n1, m2, n2 = shapes(in_features, out_features, c)
        self.A = mark_owned(nn.Parameter(torch.randn(c.terms, m1, n1, dtype=dtype, device=device)))
        self.B = mark_owned(nn.Parameter(torch.zeros(c.terms, m2, n2, dtype=dtype, device=device)))

    @classmethod
    def from_dense(cls, weight, bias, cfg, stats=None):
        m = cls(weight.shape[1], weight.shape[0], cfg, dtype=weight.dtype, device=weight.device)
        m.keep_base(weight)
        return m

    @staticmethod
    def functional(x, weight, bias, A, B):
        return F.linear(x, weight, bias) + kron_apply(x, A, B)

    def delta(self):
        return sum(torch.kron(a, b) for a, b in zip(self.A, self.B))

    @classmethod
    def param_count(cls, in_features, out_features, cfg) -> int:
        return Kron.param_count(in_features, out_features, cfg)

    @classmethod
    def flops_per_token(cls, in_features, out_features, cfg) -> int:
        return Kron.flops_per_token(in_features, out_features, cfg)


# --- its kernel op: the fused group's contract (lrcompile.kernels.op) with a torch body standing in for Triton --
LAUNCHES: list = []


def kron_core(x, A, B):
    return kron_apply(x, A, B)


def kron_launch(x, tensors, operands, steps, alpha, out_dtype):
    LAUNCHES.append(tuple(steps))
    y = kron_core(x.to(tensors[0].dtype) * alpha, *tensors)
    return epi.apply(y.float(), steps, operands).to(out_dtype or tensors[0].dtype).contiguous()


@functools.lru_cache(maxsize=None)
def kernel_op():
    return define(OP, kron_core, kron_launch, lambda t: t[0].shape[1] * t[1].shape[1])  # once per process


@pytest.fixture(scope="module", autouse=True)
def registered():
    """Registered for this module's tests only (not at import: collection imports every test module first)."""
    register(Kron)
    register(KronDelta)
    OPS[OP] = kernel_op()
    yield
    unregister(NAME)
    unregister("kron_delta")
    OPS.pop(OP, None)
    from lrcompile.kernels import KERNEL_OF
    from lrcompile.passes.fuse import LINEAR_IN_X
    from lrcompile.tune.candidates import EXTRA

    assert NAME not in KERNEL_OF and NAME not in EXTRA and NAME not in LINEAR_IN_X


# --- helpers -----------------------------------------------------------------------------------------------------
def kron_weight(out_f, in_f, outer, sigmas, seed) -> torch.Tensor:
    """A weight whose rearrangement R(W) has exactly the singular values `sigmas`: Σ_k σ_k A_k ⊗ B_k with
    orthonormal vec(A_k), vec(B_k), so k terms leave exactly Σ_{i≥k} σᵢ²."""
    g = torch.Generator().manual_seed(seed)
    m1, n1 = outer
    m2, n2 = out_f // m1, in_f // n1
    t = len(sigmas)
    P, _ = torch.linalg.qr(torch.randn(m1 * n1, t, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(m2 * n2, t, generator=g, dtype=torch.float64))
    R = (P * torch.tensor(sigmas, dtype=torch.float64)) @ Q.T
    return R.reshape(m1, n1, m2, n2).permute(0, 2, 1, 3).reshape(out_f, in_f)


SIGMA_A = [4.0, 3.0]  # exactly two terms, each worth more than any of b's
SIGMA_B = [0.7**k for k in range(16)]


class Two(nn.Module):
    """a: exactly 2 Kronecker terms; b: 16 of geometrically falling weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(24, 16)
        with torch.no_grad():
            self.a.weight.copy_(kron_weight(24, 16, [4, 4], SIGMA_A, seed=1))
            self.b.weight.copy_(kron_weight(16, 24, [4, 4], SIGMA_B, seed=2))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's function in float64 with every toy site as its dense matrix (torch.kron, not the forward)."""

    def lin(m, h):
        w = m.to_dense() if isinstance(m, Kron) else m.weight
        return F.linear(h, w.double(), None if m.bias is None else m.bias.double())

    with torch.no_grad():
        return lin(model.b, torch.relu(lin(model.a, x.double())))


POLICY = """
defaults: {min_features: 0}
budget: {params: 0.5, allocate: spectrum}
rules:
  - match: '*'
    method: kron
    outer: [4, 4]
"""


# --- the tests ---------------------------------------------------------------------------------------------------
def test_the_views_list_the_toy_from_its_declarations():
    from lrcompile.kernels import KERNEL_OF, op_of
    from lrcompile.passes.fuse import LINEAR_IN_X, site_families
    from lrcompile.policy.rules import ADAPTERS
    from lrcompile.tune.candidates import EXTRA, candidates_for

    assert KERNEL_OF[NAME] == OP and op_of(NAME) is OPS[OP]
    assert NAME in LINEAR_IN_X and NAME not in ADAPTERS and "kron_delta" in ADAPTERS
    assert [c.name for c in EXTRA[NAME]] == ["two_step", "triton"]
    assert [c.name for c in candidates_for(NAME, 2, "cpu", False)] == ["functional", "two_step", "dense"]
    fams = site_families()
    assert fams[Kron.functional] == NAME and fams[kron_two_step] == NAME


def test_a_declaration_that_cannot_work_is_refused_at_registration():
    for attrs, msg in (
        ({"budget_knob": "termz"}, "budget_knob 'termz' is not a field of KronConfig"),
        ({"candidates": (kron_two_step,)}, "candidates must be a tuple of Candidate"),
        ({"kernel": ""}, "kernel must be an op name"),
    ):
        bad = type("Bad", (Kron,), {"name": "kron_bad", **attrs})
        with pytest.raises(TypeError, match=msg):
            register(bad)
        assert "kron_bad" not in FAMILIES


def test_functional_and_candidate_match_the_float64_kronecker_reference():
    w = torch.randn(24, 16, dtype=torch.float64)
    m = Kron.from_dense(w, None, KronConfig(terms=16, outer=[4, 4]))  # every term: exact
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    assert rel_err(m.to_dense(), w) < 1e-12
    b = torch.randn(24, dtype=torch.float64)
    want = F.linear(x, w, b)
    assert rel_err(Kron.functional(x, None, b, m.A, m.B), want) < 1e-12
    assert rel_err(kron_two_step(x, None, b, m.A, m.B), want) < 1e-12
    assert Kron.budget_error(w, None, m.cfg)(16) == 0.0


def test_policy_validates_the_toy_options():
    pol = lrcompile.load_policy("rules:\n  - match: '*'\n    method: kron\n    terms: 3\n    outer: [4, 2]\n")
    assert pol.rules[0].config == KronConfig(terms=3, outer=[4, 2])
    cases = [
        ("    termz: 3\n", "unknown option 'termz' for method 'kron' (did you mean 'terms'?)"),
        ("    terms: 0\n", "kron terms must be an int >= 1, got 0"),
        ("    terms: 2\n    outer: [4]\n", "kron outer must be a pair"),
        ("    init: random\n    terms: 2\n", "init must be one of svd"),
        ("", "method 'kron' needs a 'terms' unless the policy sets a budget"),
    ]
    for extra, msg in cases:
        with pytest.raises(PolicyError, match=r"^<policy>:\d+: rule 1") as e:
            lrcompile.load_policy("rules:\n  - match: '*'\n    method: kron\n" + extra)
        assert msg in str(e.value), str(e.value)
    with pytest.raises(PolicyError, match="did you mean 'kron'"):
        lrcompile.load_policy("rules:\n  - match: '*'\n    method: krn\n")
    assert lrcompile.load_policy(POLICY).rules[0].config.terms is None  # a budget will choose it


def test_budget_allocates_terms_and_the_rewrite_reports_and_round_trips(tmp_path):
    """`budget: {params: 0.5}` chooses each site's number of terms by error per parameter: the exact two-term
    site gets exactly 2 (more buys nothing), the other the largest count that still fits — the optimum of
    every pair of counts within the budget, by the exact errors."""
    torch.manual_seed(0)
    model, x = Two(), torch.randn(6, 16)
    with torch.no_grad():
        dense_out = model(x).double()
    lrcompile.rewrite(model, POLICY, (x,), progress=False)
    assert isinstance(model.a, Kron) and isinstance(model.b, Kron)
    rows = {r.fqn: r for r in model.lrcompile_report.sites() if r.kind == "linear"}
    a, b = rows["a"], rows["b"]
    assert a.status == b.status == "rewritten" and a.method == b.method == NAME
    dense_total = (24 * 16 + 24) + (16 * 24 + 16)
    # a: 2 terms of (4·4 + 6·4) = 40 parameters; b takes what is left: 40·k + 16 ≤ 0.5·808 - 104 -> k = 7
    assert (a.allocated_rank, b.allocated_rank) == (2, 7) and (a.rank, b.rank) == (2, 7)
    tail = lambda s, k: sum(v * v for v in s[k:])  # noqa: E731
    fits = [(i, j) for i in range(1, 17) for j in range(1, 17) if 40 * (i + j) + 40 <= 0.5 * dense_total]
    assert min(fits, key=lambda p: (tail(SIGMA_A, p[0]) + tail(SIGMA_B, p[1]), p)) == (2, 7)
    assert (model.a.cfg.terms, model.b.cfg.terms) == (2, 7)
    assert a.params_after == 2 * 40 + 24 and b.params_after == 7 * 40 + 16
    assert a.params_after == sum(p.numel() for p in model.a.parameters())
    assert a.params_after + b.params_after <= 0.5 * dense_total < a.params_after + b.params_after + 40
    assert a.rel_error < 1e-6  # exact in two terms
    with torch.no_grad():
        out = model(x)
    assert rel_err(out, reference(model, x)) < 1e-5  # the forward is the factors' kron matrices
    with torch.no_grad():  # and site a is the original layer's function: two terms are exact
        w_a = kron_weight(24, 16, [4, 4], SIGMA_A, seed=1)
        assert rel_err(model.a(x), F.linear(x.double(), w_a, model.a.bias.double())) < 1e-5
    assert rel_err(out, dense_out) > 1e-3  # b is approximated

    lrcompile.save(model, str(tmp_path / "ck"))
    plan = json.loads((tmp_path / "ck" / "plan.json").read_text())
    assert {e["path"]: (e["family"], e["config"]["terms"]) for e in plan["sites"]} == {"a": (NAME, 2), "b": (NAME, 7)}
    fresh = lrcompile.load(Two(), str(tmp_path / "ck"))
    assert isinstance(fresh.b, Kron) and fresh.b.cfg.terms == 7
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_tuner_times_the_toy_candidates_and_fusion_follows_its_traits(tmp_path, monkeypatch):
    """Tune on: the toy's candidate is timed beside its functional and the dense layer (made the fastest here, on
    top of the real timing, so the choice is deterministic) and emitted; fusion recognises it as the toy's site,
    folds the input scale (the toy is linear in x) and lowers the group to the toy's kernel op with the bias and
    the GELU in its epilogue. Declared not linear in x, the scale stays outside the group."""
    from lrcompile.kernels import runtime
    from lrcompile.passes import lower as lower_mod
    from lrcompile.tune import cache, timing

    real = timing.samples_ms

    def favour_two_step(fns, args, device, budget_s):
        ms = real(fns, args, device, budget_s)
        assert set(ms) == {"functional", "two_step", "dense"}  # really timed, every candidate
        fastest = min(min(v) for v in ms.values())
        return {**ms, "two_step": [fastest / 10] * len(ms["two_step"])}

    monkeypatch.setattr(timing, "samples_ms", favour_two_step)
    groups, lowered = [], []
    real_fuse = lower_mod.fuse

    def spy(gm, inputs):
        gm, gs = real_fuse(gm, inputs)
        groups.extend(gs)
        lowered.append(gm)
        return gm, gs

    monkeypatch.setattr(lower_mod, "fuse", spy)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 24)

        def forward(self, x):
            return F.gelu(self.fc(x * 0.5))

    pol = {"defaults": {"min_features": 0}, "rules": [{"match": "*", "method": NAME, "terms": 3, "outer": [4, 4]}]}
    for linear in (True, False):
        monkeypatch.setattr(Kron, "linear_in_x", linear)
        torch._dynamo.reset()
        groups.clear()
        lowered.clear()
        LAUNCHES.clear()
        torch.manual_seed(0)
        model, x = Scaled(), torch.randn(2, 3, 16)
        path = tmp_path / f"report{linear}.json"
        with torch.no_grad():
            out = compile_eager(model, pol, tune=True, fuse=True, report=str(path))(x)
        row = {r["fqn"]: r for r in json.loads(path.read_text())["sites"]}["fc"]
        assert row["status"] == "rewritten" and row["method"] == NAME and row["impl"] == "two_step"
        assert row["params_after"] == 3 * 40 + 24 and any(n.startswith("tuned") for n in row["notes"])
        entry = next(iter(cache.entries().values()))
        assert set(entry["ms"]) == {"functional", "two_step", "dense"} and entry["spec"]["family"] == NAME
        (g,) = groups
        assert g.family == NAME and g.site.target is kron_two_step
        assert g.steps[:2] == ["add_row", "gelu"]
        assert (g.alpha, len(g.prologue)) == ((0.5, 1) if linear else (1.0, 0))
        (gm,) = lowered
        assert [
            n.target
            for n in gm.graph.nodes
            if n.op == "call_function" and n.target is not getattr(torch.ops.lrcompile, OP).default
        ].count(kron_two_step) == 0  # the site went into the group
        assert sum(n.target is getattr(torch.ops.lrcompile, OP).default for n in gm.graph.nodes) == 1
        if runtime.use_triton(x):  # its launcher ran (else: the op's torch reference)
            assert LAUNCHES == [("add_row", "gelu")]
        want = F.gelu(F.linear(0.5 * x.double(), model.fc.lrcompile.to_dense().double(), model.fc.bias.double()))
        assert rel_err(out, want) < 1e-5
        cache.clear()


def test_an_adapter_declares_whether_its_base_trains(monkeypatch):
    """`trains_base` decides `Policy.has_adapters` and which base weights `rewrite` leaves trainable, also next
    to a LoRA rule (which freezes what the model had)."""
    alone = {
        "defaults": {"min_features": 0},
        "rules": [{"match": "a", "method": "kron_delta", "terms": 2, "outer": [4, 4]}],
    }
    with_lora = {**alone, "rules": alone["rules"] + [{"match": "b", "method": "lora", "rank": 2}]}
    x = torch.randn(3, 16)
    for trains in (False, True):
        monkeypatch.setattr(KronDelta, "trains_base", trains)
        assert lrcompile.load_policy(alone).has_adapters is not trains
        assert lrcompile.load_policy(with_lora).has_adapters
        ref = Two()
        m = lrcompile.rewrite(copy.deepcopy(ref), alone, (x,), progress=False)
        assert isinstance(m.a, KronDelta) and m.a.A.requires_grad and m.a.B.requires_grad
        assert m.a.weight.requires_grad is trains and m.b.weight.requires_grad is trains
        with torch.no_grad():
            assert torch.allclose(m(x), ref(x), atol=1e-6)  # B = 0: silent at init
        m = lrcompile.rewrite(copy.deepcopy(ref), with_lora, (x,), progress=False)
        assert m.a.weight.requires_grad is trains and not m.b.weight.requires_grad and not m.a.bias.requires_grad
        assert m.a.A.requires_grad and m.b.lora_A.requires_grad
    assert FAMILIES["kron_delta"] is KronDelta
