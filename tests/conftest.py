import os
import warnings

# Before anything imports triton: `triton.jit` decides interpreted-or-compiled when it decorates (triton's own
# language helpers too). Kernels run under the interpreter only where the test enables the Triton path (fusion on,
# CPU tensors); a test that wants the torch path unsets the variable (lrcompile.kernels.runtime reads it per call).
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")


@pytest.fixture(autouse=True)
def _fresh_dynamo(tmp_path, monkeypatch):
    """Each test compiles from scratch, with its own lrcompile cache directory."""
    monkeypatch.setenv("LRCOMPILE_CACHE_DIR", str(tmp_path / "lrc-cache"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


class Block(nn.Module):
    """nn.Linear, a functional linear with a bare parameter, and nesting."""

    def __init__(self, d=24, h=40):
        super().__init__()
        self.fc = nn.Linear(d, h)
        self.w = nn.Parameter(torch.randn(d, h) / h**0.5)

    def forward(self, x):
        return x + F.linear(torch.relu(self.fc(x)), self.w)


class Toy(nn.Module):
    """ModuleList + ModuleDict nesting, a module called twice, a root-level functional linear, tied weights."""

    def __init__(self, d=24, vocab=30):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.heads = nn.ModuleDict({"shared": nn.Linear(d, d)})
        self.v = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = self.heads["shared"](b(x))  # `heads.shared` called once per block
        x = F.linear(x, self.v)  # at the root: named by its weight path, `v`
        return self.lm_head(x)


@pytest.fixture
def toy():
    m = Toy()
    ids = torch.randint(0, 30, (3, 7))
    return m, ids


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64: fp32 parity checks that elementwise tolerances would fail on near-zero entries."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compile_eager(model, policy=None, **options):
    """The backend without Inductor: the rewritten graph runs as is (fast tests)."""
    opts = {"inductor": False, **options}
    if policy is not None:
        opts["policy"] = policy
    return torch.compile(model, backend="lrcompile", options=opts)


def all_lowrank(rank, **extra):
    """Every site low-rank. `guard: off` unless given: a full-rank test must exercise the factors, not the dense
    layer the autotuner may pick for an exact rewrite."""
    return {"defaults": {"min_features": 0, "guard": "off", **extra},
            "rules": [{"match": "*", "method": "lowrank", "rank": rank}]}
