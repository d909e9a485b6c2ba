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


# LRCOMPILE_NOOP=backend | rewrite runs the suite against a backend that returns Dynamo's graph unchanged, or a
# `rewrite` that changes nothing: a test that passes then does not prove that feature (README, Tests and benchmarks).
NOOP = os.environ.get("LRCOMPILE_NOOP", "")
if NOOP:
    import lrcompile
    import lrcompile.backend
    import lrcompile.plan.rewrite

    if NOOP == "backend":
        lrcompile.backend.lrcompile_backend = lambda gm, example_inputs, options=None, mode=None: gm.forward
    elif NOOP == "rewrite":

        def _noop_rewrite(model, policy, example_inputs, calibration=None, **kw):
            return model

        lrcompile.rewrite = lrcompile.plan.rewrite.rewrite = _noop_rewrite
    else:
        raise ValueError(f"LRCOMPILE_NOOP={NOOP!r}: expected 'backend' or 'rewrite'")


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


def structures(model: nn.Module) -> dict:
    """{module path: family class name} of every lrcompile structure on the model, swapped in (`fc`) or attached
    beside a module (`fc.lrcompile`): what a rewrite, a load or the backend installed. An output compared against
    the dense model proves nothing about a rewrite that did nothing; this does."""
    from lrcompile.families import Structure

    return {p: type(m).__name__ for p, m in model.named_modules() if isinstance(m, Structure)}


def lowered(model: nn.Module, kind: str = "linear") -> dict:
    """{site: report status} of the `kind` sites over every compile of `model` by the backend: `rewritten` (the
    backend made the structure), `installed` (it lowered one that rewrite / load put there), `dense`, `skipped`,
    `failed`. Empty when the backend never planned a graph of this model (LRCOMPILE_NOOP=backend): a compiled output
    that matches eager proves nothing without it."""
    from lrcompile.runtime import session

    sessions = session._sessions.get(model, {}).values()
    return {r.fqn: r.status for s in sessions for r in s.report.sites() if r.kind == kind}


def unlowered(model: nn.Module) -> set:
    """Paths of the structures swapped into the model (rewrite / load) that no compile of it reported `installed`:
    empty when the backend lowered every one of them."""
    return set(structures(model)) - {f for f, s in lowered(model).items() if s == "installed"}


def all_lowrank(rank, **extra):
    """Every site low-rank. `guard: off` unless given: a full-rank test must exercise the factors, not the dense
    layer the autotuner may pick for an exact rewrite."""
    return {
        "defaults": {"min_features": 0, "guard": "off", **extra},
        "rules": [{"match": "*", "method": "lowrank", "rank": rank}],
    }


def spy_launches(monkeypatch) -> list:
    """Every Triton launch, by kernel name, with output buffers poisoned (NaN) so an unwritten element fails."""
    from lrcompile.kernels import runtime

    monkeypatch.setattr(runtime, "POISON", True)
    seen = []
    real = runtime.launch

    def spy(mod, name, *args, **kwargs):
        seen.append(name)
        return real(mod, name, *args, **kwargs)

    monkeypatch.setattr(runtime, "launch", spy)
    return seen


def tiny_hf(
    kind: str, width: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int, tokens: int, bare=False
):
    """(model in eval mode, inputs) for a random-weight HF BERT / GPT-2 / Llama built from a config; inputs are
    a (2, tokens) batch (BERT also gets an all-ones attention mask). `bare`: a Llama without its LM head."""
    import transformers

    ids = {"input_ids": torch.randint(0, vocab, (2, tokens))}
    if kind == "bert":
        cfg = transformers.BertConfig(
            vocab_size=vocab,
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=inter,
            max_position_embeddings=64,
        )
        return transformers.BertModel(cfg).eval(), {**ids, "attention_mask": torch.ones(2, tokens, dtype=torch.long)}
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=heads, n_positions=64)
        return transformers.GPT2LMHeadModel(cfg).eval(), ids
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
    )
    return (transformers.LlamaModel if bare else transformers.LlamaForCausalLM)(cfg).eval(), ids


def hf_output(out) -> torch.Tensor:
    """The tensor to compare of an HF model's output: logits, else the last hidden state, else its first entry."""
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def masked_id_batches(n: int, rows: int, seq: int, vocab: int, padded: int, seed: int, low: int = 0) -> list:
    """n dict batches of token ids in [low, vocab) whose last row ends in `padded` masked-out positions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(rows, seq, dtype=torch.long)
        mask[rows - 1, seq - padded :] = 0
        out.append({"input_ids": torch.randint(low, vocab, (rows, seq), generator=g), "attention_mask": mask})
    return out


@pytest.fixture
def one_thread():
    """Tiny shapes: a second OpenMP thread on a shared 2-core machine only adds contention (spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
