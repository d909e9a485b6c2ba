"""VeRA (Kopiczko et al.; reference semantics: HF PEFT `VeraConfig`): y = W x + b + λ_b ⊙ B (λ_d ⊙ A x).

A (r×in_max) and B (out_max×r) are frozen random projections shared by the VeRA sites of one adapter: one
tensor object registered as a buffer in each module (so `state_dict` shows it per site but it is stored once),
sliced per layer to [:, :in] and [:out]. They are drawn exactly as PEFT draws them — a CPU generator seeded with
`seed` (PEFT's projection_prng_key, default 0), Kaiming-uniform A then B at the largest (in, out) over the
sites — so the same targets give PEFT's very numbers. Sites are built one at a time, so the pair grows (in
place: the same tensor object, regenerated at the larger size) while a larger site arrives; growing is safe
only while every user is untouched (λ_b = 0 at init makes the branch silent). Once a pair has been used (a
forward outside compile, a feed to a compiled graph, or its λ's trained or loaded) it never changes again;
later sites that do not fit get a fresh pair.

One adapter is one VeRA rule of one loaded policy (PEFT: a pair per adapter config). The rule's config carries
a scope (`VeRAConfig.bind`) that keys its pairs, and `rewrite` loads its policy per call (the backend once per
compiled model), so two models rewritten one after the other never share projections: neither growing nor
loading one reaches the other. A Policy object reused for several models is one adapter and shares; a config
made outside a policy is its own adapter (bound when a site first uses it; persist.load binds one scope per
saved pair). The pairs live in their scope, not in a process-wide table. `load_adapter_state_dict` first gives
the model private copies of pairs another model shares (`own_projections`).

Trainable: λ_d (r, init `d_initial` = 0.1) and λ_b (out, init 0). Options default as in PEFT: rank 256.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Candidate, MethodConfig, mark_owned, register
from .lora import Adapter, add_branch, branch_input, check_dropout, check_int_rank, flat, unflat


@dataclasses.dataclass
class VeRAConfig(MethodConfig):
    init: str = "kaiming"
    rank: int = 256  # PEFT VeraConfig default
    dropout: float = 0.0
    d_initial: float = 0.1
    seed: int = 0  # PEFT projection_prng_key

    INITS: ClassVar[tuple[str, ...]] = ("kaiming",)

    def bind(self) -> None:
        self._projection_scope = ProjectionScope()  # this rule's sites share one pair (module doc)

    def validate(self) -> None:
        super().validate()
        check_int_rank(self.rank)
        check_dropout(self.dropout)
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)):
            raise ValueError(f"d_initial must be a number, got {self.d_initial!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")


def _kaiming(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's vera `_kaiming_init`: U(±√3·√2/√fan_in), fan_in = shape[1], drawn in float32 on the CPU."""
    t = torch.empty(shape)
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)


class ProjectionScope:
    """One adapter (a policy rule): it holds its projection pairs, keyed by (rank, seed, dtype, device), weakly
    (a pair lives as long as a site uses it)."""

    def __init__(self):
        self.pairs: "weakref.WeakValueDictionary[tuple, SharedProjections]" = weakref.WeakValueDictionary()


class SharedProjections:
    """One (A, B) pair: the same two tensor objects for every site that uses it."""

    def __init__(self, rank: int, seed: int, dtype, device):
        self.rank, self.seed, self.dtype, self.device = rank, seed, dtype, device
        self.A = torch.empty(rank, 0, dtype=dtype, device=device)
        self.B = torch.empty(0, rank, dtype=dtype, device=device)
        self.users: "weakref.WeakSet[VeRA]" = weakref.WeakSet()
        self.sealed = False

    def fits(self, in_features: int, out_features: int) -> bool:
        return self.A.shape[1] >= in_features and self.B.shape[0] >= out_features

    def growable(self) -> bool:
        return not self.sealed and all(u.untouched() for u in self.users)

    def grow(self, in_features: int, out_features: int) -> None:
        in_max, out_max = max(self.A.shape[1], in_features), max(self.B.shape[0], out_features)
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        A = _kaiming((self.rank, in_max), g)
        B = _kaiming((out_max, self.rank), g)
        with torch.no_grad():  # same tensor objects, new storage: every user's buffer follows
            self.A.set_(A.to(dtype=self.dtype, device=self.device))
            self.B.set_(B.to(dtype=self.dtype, device=self.device))

    def copy(self) -> "SharedProjections":
        """A private, final copy (new tensor objects with the same numbers)."""
        new = SharedProjections(self.rank, self.seed, self.dtype, self.device)
        new.A, new.B, new.sealed = self.A.detach().clone(), self.B.detach().clone(), True
        return new


def shared_projections(
    rank: int, seed: int, in_features: int, out_features: int, dtype, device, scope: ProjectionScope
) -> SharedProjections:
    key = (rank, seed, dtype, str(torch.device(device) if device is not None else torch.device("cpu")))
    pair = scope.pairs.get(key)
    if pair is None or not pair.growable():  # a used pair keeps its numbers: later sites get their own
        pair = SharedProjections(rank, seed, dtype, device)
        scope.pairs[key] = pair
    if not pair.fits(in_features, out_features):
        pair.grow(in_features, out_features)
    return pair


def vera_merged(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b):
    out_f, in_f = weight.shape
    delta = torch.mm(vera_B[:out_f] * lambda_b[:, None], lambda_d[:, None] * vera_A[:, :in_f])
    return F.linear(x, weight + delta, bias)


@register
class VeRA(Adapter):
    name = "vera"
    Config = VeRAConfig
    tensor_names = ("vera_A", "vera_B", "lambda_d", "lambda_b")
    adapter_names = ("vera_A", "vera_B", "lambda_d", "lambda_b")
    candidates = (Candidate("merged", vera_merged, inference_only=True),)  # no kernel

    def __init__(self, in_features: int, out_features: int, cfg: VeRAConfig, dtype=None, device=None):
        super().__init__(in_features, out_features, cfg, dtype=dtype, device=device)
        dtype = dtype or torch.get_default_dtype()
        r = cfg.rank
        self.lambda_d = mark_owned(nn.Parameter(torch.full((r,), float(cfg.d_initial), dtype=dtype, device=device)))
        self.lambda_b = mark_owned(nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)))
        self._lrc_init_versions = (self.lambda_d._version, self.lambda_b._version)
        self._pair = shared_projections(r, cfg.seed, in_features, out_features, dtype, device, self._scope(cfg))
        self._pair.users.add(self)
        self.register_buffer("vera_A", self._pair.A)
        self.register_buffer("vera_B", self._pair.B)

    @staticmethod
    def _scope(cfg: VeRAConfig) -> ProjectionScope:
        if getattr(cfg, "_projection_scope", None) is None:
            cfg.bind()  # made outside a policy: this config is one adapter
        return cfg._projection_scope

    def use_pair(self, pair: SharedProjections) -> None:
        self._pair.users.discard(self)
        self._pair = pair
        pair.users.add(self)
        self.vera_A, self.vera_B = pair.A, pair.B  # registered buffers: rebinds them

    def untouched(self) -> bool:
        return (self.lambda_d._version, self.lambda_b._version) == self._lrc_init_versions

    def plan_extra(self, shared: dict) -> dict:
        """The number of this site's projection pair: sites that share one when saved share one after load."""
        pairs = shared.setdefault("vera_pairs", {})  # id of a pair's A -> its number
        return {"projections": pairs.setdefault(id(self.vera_A), len(pairs))}

    @classmethod
    def config_from_plan(cls, cfg: VeRAConfig, entry: dict, shared: dict) -> None:
        # one scope per saved pair, new in each load: a loaded model shares nothing with another model, and two
        # adapters of different sizes do not collapse into one pair; a plan without numbers shared one pair
        scopes = shared.setdefault("vera_scopes", {})
        cfg._projection_scope = scopes.setdefault(entry.get("projections", 0), ProjectionScope())

    @classmethod
    def init(cls, in_features, out_features, cfg, dtype=None, device=None) -> "VeRA":
        return cls(in_features, out_features, cfg, dtype=dtype, device=device)

    @classmethod
    def from_dense(cls, weight, bias, cfg: VeRAConfig, stats=None) -> "VeRA":
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, cfg, dtype=weight.dtype, device=weight.device)
        m.keep_base(weight)
        return m

    def tensors(self) -> list[torch.Tensor]:
        if not torch.compiler.is_compiling():
            self._pair.sealed = True  # about to be used (eager forward or a compiled graph's feed): sizes are final
        return super().tensors()

    @staticmethod
    def functional(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, *drop):
        x2 = flat(x)
        y = F.linear(x2, weight, bias)
        h = F.linear(branch_input(x2, drop), vera_A[:, : x.shape[-1]]) * lambda_d
        # λ_b folded into the (out×r) slice of B: one addmm instead of a pass over the (N, out) output
        return unflat(add_branch(y, h, (vera_B[: weight.shape[0]] * lambda_b[:, None]).t()), x)

    def delta(self) -> torch.Tensor:
        A = self.vera_A[:, : self.in_features]
        B = self.vera_B[: self.out_features]
        return self.lambda_b[:, None] * (B @ (self.lambda_d[:, None] * A))

    @classmethod
    def param_count(cls, in_features, out_features, cfg) -> int:
        return cfg.rank + out_features

    @classmethod
    def flops_per_token(cls, in_features, out_features, cfg) -> int:
        return 2 * cfg.rank * (in_features + out_features) + cfg.rank


def own_projections(model: nn.Module) -> None:
    """Make the VeRA pairs of `model` its own before writing into them: a pair that a module outside `model`
    also uses (a model built next to it under the same Policy object or config) is replaced, for `model`'s sites, by a
    private copy — so loading into `model` cannot change another model."""
    mine = [m for m in model.modules() if isinstance(m, VeRA)]
    ids = {id(m) for m in mine}
    copies: dict[int, SharedProjections] = {}
    for m in mine:
        pair = m._pair
        if id(pair) not in copies and any(id(u) not in ids for u in pair.users):
            copies[id(pair)] = pair.copy()
        if id(pair) in copies:
            m.use_pair(copies[id(pair)])
