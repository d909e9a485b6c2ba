"""LoRA (Hu et al.; reference semantics: HF PEFT): y = W x + b + s · B A x, with rsLoRA and PiSSA variants.

A (r×in) Kaiming-uniform as PEFT, B (out×r) zero, s = α/r (`rslora: true`: α/√r). The scaling is a buffer
listed in `tensor_names`, so under the backend it enters compiled graphs as an input: loading an adapter with
another alpha recompiles nothing. Dropout on the branch input is driven by a probability tensor that reads 0
outside training mode (present only when `dropout > 0`, so the default costs nothing).

`init: pissa` moves the top-r singular triplets of W into the branch: the base weight must become the residual
W − s·BA. `from_dense` cannot reach the stored parameter, so it keeps the residual and hands it out once
through `residual_weight()`; the installer (plan.build) copies it into the site's weight.

`Adapter` (the base of LoRA, DoRA, VeRA and NOBLE) holds what the adapter families share: the dense weight as
(out, in), the dropout tensor, the residual hand-off and `to_dense`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...compat import autocast_available
from ..base import Candidate, MethodConfig, Structure, mark_owned, register


def check_int_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1 for an adapter, got {rank!r}")


def check_dropout(p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0):
        raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")


def branch_input(x: torch.Tensor, drop: tuple) -> torch.Tensor:
    """Inverted dropout with a tensor probability (0 in eval mode gives x exactly); `drop` empty: no dropout."""
    if not drop:
        return x
    p = drop[0]
    keep = torch.rand_like(x) >= p
    return x * keep / (1.0 - p)


def flat(x: torch.Tensor) -> torch.Tensor:
    """(…, in) -> (N, in): the branch accumulates into the base output with one in-place addmm (no extra (N, out)
    buffer)."""
    return x.reshape(-1, x.shape[-1])


def autocast_on(t: torch.Tensor) -> bool:
    """Whether autocast is active for t's device (devices without autocast, such as meta, never)."""
    dev = t.device.type
    return autocast_available(dev) and torch.is_autocast_enabled(dev)


def add_branch(y: torch.Tensor, h: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """y += h @ b_t in place (no extra (N, out) buffer). Autocast does not cast in-place ops, so under it the
    branch is brought to the base output's dtype here (a no-op otherwise); the casts differentiate."""
    return y.addmm_(h.to(y.dtype), b_t.to(y.dtype))


def unflat(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y.reshape(*x.shape[:-1], y.shape[-1])


class Adapter(Structure):
    """Shared machinery of the non-compressing families (the base weight stays and the branch adds to it)."""

    compressing = False
    mergeable: ClassVar[bool] = True
    # tensors that make up a saved adapter (hot-swap): subclasses list theirs; buffers such as dropout excluded
    adapter_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, in_features: int, out_features: int, cfg, dtype=None, device=None):
        super().__init__(in_features, out_features, cfg)
        self._base: Optional[torch.Tensor] = None  # W (out, in) from from_dense, until a stored weight is set
        self._residual: Optional[torch.Tensor] = None
        p = float(getattr(cfg, "dropout", 0.0) or 0.0)
        if p > 0:
            # an instance-level tensor list: the graph rewrite reads `struct.tensor_names`
            self.tensor_names = type(self).tensor_names + ("dropout_p",)
            self.register_buffer(
                "dropout_p", torch.tensor(p, dtype=dtype or torch.get_default_dtype(), device=device), persistent=False
            )
            self.register_buffer(
                "dropout_off", torch.zeros((), dtype=self.dropout_p.dtype, device=device), persistent=False
            )

    def __setattr__(self, name, value):
        if name == "weight" and value is not None and "_base" in self.__dict__:
            self.__dict__["_base"] = None  # the installed weight is the base now: don't keep the old view alive
        super().__setattr__(name, value)

    def tensors(self) -> list[torch.Tensor]:
        ts = [getattr(self, n) for n in type(self).tensor_names]
        if "dropout_p" in self.tensor_names:
            ts.append(self.dropout_p if self.training else self.dropout_off)
        return ts

    def dense_base(self) -> torch.Tensor:
        """The base weight W as (out, in): the installed Parameter, else the view from_dense was given."""
        w = self.weight if self.weight is not None else self._base
        if w is None:
            raise RuntimeError(f"{self.name}: no base weight (built by init() and never installed)")
        return w

    def keep_base(self, weight: torch.Tensor) -> None:
        self._base = weight.detach()  # a plain tensor attribute: not registered, not in state_dict

    def residual_weight(self) -> Optional[torch.Tensor]:
        """The new base weight (out, in) the installer must copy into the site's weight, once; None if none."""
        r, self._residual = self._residual, None
        return r

    def delta(self) -> torch.Tensor:
        """What merging adds to W (out, in)."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        return self.dense_base().detach() + self.delta()

    def to_dense(self) -> torch.Tensor:
        with torch.no_grad():
            return self.merged_weight()


@dataclasses.dataclass
class LoRAConfig(MethodConfig):
    init: str = "kaiming"  # PEFT's init_lora_weights=True
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False

    # random: A and B both drawn as nn.Linear draws its weight (PEFT's init_lora_weights=False: the branch is not
    # silent at init)
    INITS: ClassVar[tuple[str, ...]] = ("kaiming", "gaussian", "pissa", "random")

    def validate(self) -> None:
        super().validate()
        check_int_rank(self.rank)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"alpha must be a number, got {self.alpha!r}")
        check_dropout(self.dropout)
        if not isinstance(self.rslora, bool):
            raise ValueError(f"rslora must be true or false, got {self.rslora!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def lora_init(A: torch.Tensor, B: torch.Tensor, cfg: LoRAConfig) -> None:
    with torch.no_grad():
        if cfg.init == "gaussian":
            nn.init.normal_(A, std=1.0 / cfg.rank)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if cfg.init == "random":
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            B.zero_()


def pissa_factors(weight: torch.Tensor, cfg: LoRAConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, residual) as PEFT's pissa_init: top-r triplets with S/s split as √ across A and B."""
    out_f, in_f = weight.shape
    if cfg.rank > min(in_f, out_f):
        raise ValueError(f"init pissa needs rank <= min(in, out) = {min(in_f, out_f)}, got {cfg.rank}")
    w = weight.detach().float()
    P, S, Qh = torch.linalg.svd(w, full_matrices=False)
    root = (S[: cfg.rank] / cfg.scaling).sqrt()
    A = root[:, None] * Qh[: cfg.rank]
    B = P[:, : cfg.rank] * root
    residual = w - cfg.scaling * (B @ A)
    return A.to(weight.dtype), B.to(weight.dtype), residual.to(weight.dtype)


def lora_merged(x, weight, bias, lora_A, lora_B, scaling):
    return F.linear(x, torch.addmm(weight, lora_B * scaling, lora_A), bias)


@register
class LoRA(Adapter):
    name = "lora"
    Config = LoRAConfig
    tensor_names = ("lora_A", "lora_B", "scaling")
    adapter_names = ("lora_A", "lora_B", "scaling")
    kernel = "lora"
    candidates = (Candidate("merged", lora_merged, inference_only=True),)

    def __init__(self, in_features: int, out_features: int, cfg: LoRAConfig, dtype=None, device=None):
        super().__init__(in_features, out_features, cfg, dtype=dtype, device=device)
        r = cfg.rank
        self.lora_A = mark_owned(nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device)))
        self.lora_B = mark_owned(nn.Parameter(torch.empty(out_features, r, dtype=dtype, device=device)))
        self.register_buffer(
            "scaling", torch.tensor(cfg.scaling, dtype=dtype or torch.get_default_dtype(), device=device)
        )

    @classmethod
    def init(cls, in_features, out_features, cfg, dtype=None, device=None) -> "LoRA":
        m = cls(in_features, out_features, cfg, dtype=dtype, device=device)
        lora_init(m.lora_A, m.lora_B, cfg)
        return m

    @classmethod
    def from_dense(cls, weight, bias, cfg: LoRAConfig, stats=None) -> "LoRA":
        out_f, in_f = weight.shape
        m = cls.init(in_f, out_f, cfg, dtype=weight.dtype, device=weight.device)
        m.keep_base(weight)
        if cfg.init == "pissa":
            A, B, m._residual = pissa_factors(weight, cfg)
            with torch.no_grad():
                m.lora_A.copy_(A)
                m.lora_B.copy_(B)
        return m

    @staticmethod
    def functional(x, weight, bias, lora_A, lora_B, scaling, *drop):
        x2 = flat(x)
        y = F.linear(x2, weight, bias)
        h = F.linear(branch_input(x2, drop), lora_A) * scaling  # scale the (N, r) side: the cheap one
        return unflat(add_branch(y, h, lora_B.t()), x)  # in place: linear saved x and W, not y

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    @classmethod
    def param_count(cls, in_features, out_features, cfg) -> int:
        return cfg.rank * (in_features + out_features)

    @classmethod
    def flops_per_token(cls, in_features, out_features, cfg) -> int:
        return 2 * cfg.rank * (in_features + out_features) + cfg.rank
