"""What an attention rewrite attaches: the stacked Q/K/V projection in a compressed form, and its feed.

New factors are an `AttnFactors` attached to the attention module (`self_attn.lrcompile_qkv` / `.lrcompile_kv`):
a `SharedBasis` (fused_qkv with `rank`, shared_kv) or a `StackedStructure` (fused_qkv with `structure`: a linear
family over the stacked weight). They are parameters of the model, found again by a recompile or another graph.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..families.base import Owner, mark_owned
from ..families.lowrank import truncated_svd
from ..passes.projection import Part
from ..runtime import fresh
from ..runtime.attach import Placement, arg_index


class AttnFactors(Owner):
    """What an attention rewrite attaches: the stacked projection [W_1; …; W_n] (n = 3 for Q, K, V) in a
    compressed form, applied once to the shared input and split back. Subclasses fix the form.

    `site_fqn` and `sources` are recorded when the factors are made, so that a graph holding the projections
    but not the attention (a graph break, a DDPOptimizer split, a per-layer FSDP2 unit compiled as its own
    frame) still finds them: sources are (path, rows, relative), the path relative to the module the factors are
    attached to when the projection lies under it (frame roots differ between compiles), else as named then."""

    compressing = True

    def __init__(self, method: str, in_features: int, sizes: list[int]):
        super().__init__()
        self.method, self.in_features, self.sizes = method, in_features, list(sizes)
        self.site_fqn: Optional[str] = None
        self.sources: list = []

    @property
    def out_features(self) -> int:
        return sum(self.sizes)

    def tensors(self) -> list[torch.Tensor]:
        """Read from the module each time: FSDP2 swaps the registered parameters (sharded / unsharded)."""
        return [getattr(self, n) for n in self.tensor_names]

    def spec(self) -> tuple:
        """What a rule would have to ask for to make exactly these factors."""
        raise NotImplementedError

    def factor_params(self) -> int:
        return sum(t.numel() for t in self.tensors() if isinstance(t, nn.Parameter))

    def factor_flops(self) -> int:
        """Multiply-add FLOPs per token of the stacked projection, without the bias."""
        raise NotImplementedError

    def project(self, graph: fx.Graph, x: fx.Node, bias: Optional[fx.Node], inputs: list[fx.Node]) -> fx.Node:
        """The stacked projection y = x Ŵᵀ + b in `graph`, the factors entering as `inputs`."""
        raise NotImplementedError


class SharedBasis(AttnFactors):
    """[W_1; …; W_n] ≈ U V: V (r × in) shared, U (Σout × r); y_i = (x Vᵀ) U_iᵀ. Balanced split of the SVD."""

    tensor_names = ("V", "U")

    def __init__(self, method: str, in_features: int, sizes: list[int], rank: int, dtype=None, device=None):
        super().__init__(method, in_features, sizes)
        self.rank = rank
        self.V = mark_owned(nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device)))
        self.U = mark_owned(nn.Parameter(torch.empty(sum(sizes), rank, dtype=dtype, device=device)))

    @classmethod
    def from_stacked(cls, method: str, weight: torch.Tensor, sizes: list[int], rank: int) -> "SharedBasis":
        m = cls(method, weight.shape[1], sizes, rank, dtype=weight.dtype, device=weight.device)
        m.refit(weight)
        return m

    def refit(self, weight: torch.Tensor) -> None:
        P, S, Qh = truncated_svd(weight, self.rank)
        with torch.no_grad():
            self.U.copy_(P * S.sqrt())
            self.V.copy_(S.sqrt()[:, None] * Qh)

    def spec(self) -> tuple:
        return ("rank", self.rank)

    def factor_flops(self) -> int:
        return 2 * self.rank * (self.in_features + self.out_features)

    def project(self, graph, x, bias, inputs):
        V, U = inputs
        return graph.call_function(F.linear, (graph.call_function(F.linear, (x, V)), U, bias))

    def to_dense(self) -> torch.Tensor:
        return self.U @ self.V

    def extra_repr(self) -> str:
        return f"{self.method}: in={self.in_features}, out={self.sizes}, rank={self.rank}"


class StackedStructure(AttnFactors):
    """The stacked projection as a linear family (lrcompile.structures: lowrank, monarch, btt, blast) over
    in → Σout, made by the family's from_dense. The family's tensors are registered here directly (not as a
    child Structure: that would read as a linear site's factors to save/load and to the site finder)."""

    def __init__(self, method: str, in_features: int, sizes: list[int], family: type, cfg, made: nn.Module):
        super().__init__(method, in_features, sizes)
        self.family, self.cfg, self.tensor_names = family, cfg, tuple(family.tensor_names)
        self.rank = getattr(cfg, "rank", None)
        for n in self.tensor_names:
            t = getattr(made, n)
            if isinstance(t, nn.Parameter):
                self.register_parameter(n, mark_owned(t))
            else:
                self.register_buffer(n, t, persistent=n not in made._non_persistent_buffers_set)

    @classmethod
    def from_stacked(cls, method: str, weight: torch.Tensor, sizes: list[int], family: type, cfg) -> "StackedStructure":
        return cls(method, weight.shape[1], sizes, family, cfg, family.from_dense(weight, None, cfg))

    def refit(self, weight: torch.Tensor) -> None:
        fresh = self.family.from_dense(weight, None, self.cfg)
        with torch.no_grad():
            for n in self.tensor_names:
                getattr(self, n).copy_(getattr(fresh, n))

    def spec(self) -> tuple:
        return (self.family.name, self.cfg)

    def factor_params(self) -> int:
        return self.family.param_count(self.in_features, self.out_features, self.cfg)

    def factor_flops(self) -> int:
        return self.family.flops_per_token(self.in_features, self.out_features, self.cfg)

    def project(self, graph, x, bias, inputs):
        return graph.call_function(self.family.functional, (x, None, bias, *inputs))

    def to_dense(self) -> torch.Tensor:
        t = self.tensors()
        eye = torch.eye(self.in_features, dtype=t[0].dtype, device=t[0].device)
        return self.family.functional(eye, None, None, *t).T

    def extra_repr(self) -> str:
        return f"{self.method}: in={self.in_features}, out={self.sizes}, {self.family.name} {self.cfg}"


def stacked_weight(parts: list[Part]) -> torch.Tensor:
    return torch.cat([s.dense_weight[a:b] for s, (a, b) in parts]).detach()


class AttnFeed:
    """Supplies attention factors to the compiled graph, refitting stale ones first (lrcompile.fresh), as a
    linear site's Feed does. Under FSDP2 weights and factors are all-gathered together before each forward, so
    both stamps move and nothing is refit."""

    def __init__(
        self, struct: AttnFactors, parts: list[Part], owner: Optional[nn.Module] = None, child: Optional[str] = None
    ):
        self.struct = struct
        self.placement = Placement(owner, child)
        self.sources = [(s.weight, s.transposed, ab) for s, ab in parts]
        self.args: list = [None] * len(self.sources)  # each source weight's index among the graph's inputs
        self.refit_failed = False
        if not fresh.is_recorded(struct):
            fresh.record(struct, self._weights())

    @property
    def failed(self) -> bool:
        return self.refit_failed or self.placement.gone

    def _weights(self) -> list[torch.Tensor]:
        return [w for w, _, _ in self.sources]

    def bind(self, example_inputs) -> "AttnFeed":
        self.args = [arg_index(example_inputs, w) for w, _, _ in self.sources]
        return self

    def tensors(self, args=None) -> list[torch.Tensor]:
        cur = self.placement.follow(self.struct)
        if cur is None:
            return self.struct.tensors()
        self.struct = cur
        if args is not None:
            self.sources = [(args[i] if i is not None else w, t, ab) for (w, t, ab), i in zip(self.sources, self.args)]

        def refit():
            self.struct.refit(torch.cat([(w.T if t else w)[a:b] for w, t, (a, b) in self.sources]).detach())

        got = fresh.refresh(self.struct, self._weights(), refit, f"{self.struct.method} attention factors")
        if got is not None:
            self.refit_failed = not got
        return self.struct.tensors()
