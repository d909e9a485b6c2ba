"""Monarch (Dao et al.): two block-diagonal factors with a fixed shuffle between them, b blocks per factor.

Input blocks a₁ = b of a₀ = ⌈in/b⌉ features (the input is zero-padded up to b·a₀), output blocks c₀ = b of
c₁ = ⌈out/b⌉ (the output is sliced back to out). Each (output block, input block) pair is connected through
t = ⌈min(a₀, c₁)/b⌉ channels of the intermediate, so every (c₁ × a₀) sub-block of the dense matrix has rank ≤ t:
the first factor is block-diagonal (b blocks a₀ → b·t), the second block-diagonal (b blocks b·t → c₁). On a
square n×n map that is 2n²/b parameters (b = 4 keeps 50%), as in the papers. The output blocks are contiguous
(Monarch's interleaved output is a fixed row permutation of this), which makes it BTT with a₁ = c₀ = b; the
forward, the projection (per-sub-block truncated SVD: optimal, exact on Monarch matrices) and the μP init are
TwoCore's.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .base import register
from .btt import TwoCore, btt_matmul
from .whitening_blocks import StructuredConfig


@dataclasses.dataclass
class MonarchConfig(StructuredConfig):
    blocks: int = 4  # b: diagonal blocks in each factor (the GPT-2 and ViT runs used 4)

    def validate(self) -> None:
        super().validate()
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1:
            raise ValueError(f"monarch blocks must be an int >= 1, got {self.blocks!r}")

    def resolve(self, in_features: int, out_features: int) -> "MonarchConfig":
        self.validate()
        if self.blocks > min(in_features, out_features):
            raise ValueError(f"monarch blocks {self.blocks} exceeds min(in, out) = {min(in_features, out_features)}")
        return dataclasses.replace(self)


@register
class Monarch(TwoCore):
    name = "monarch"
    Config = MonarchConfig
    # `trim` is an empty (0, out) buffer: its shape carries the true output width past the padded factors
    # into `functional`, which sees only tensors; it costs no memory and is not saved.
    tensor_names = ("W1", "W2", "trim")

    def __init__(self, in_features: int, out_features: int, cfg: MonarchConfig, dtype=None, device=None):
        super().__init__(in_features, out_features, cfg, dtype=dtype, device=device)
        self.register_buffer("trim", torch.empty(0, out_features, dtype=dtype, device=device), persistent=False)

    @classmethod
    def geometry(cls, in_features, out_features, cfg):
        b = cfg.resolve(in_features, out_features).blocks
        a0, c1 = math.ceil(in_features / b), math.ceil(out_features / b)
        return b, a0, b, c1, math.ceil(min(a0, c1) / b)

    @staticmethod
    def functional(x, weight, bias, W1, W2, trim):
        return btt_matmul(x, W1, W2, bias, trim.shape[-1])
