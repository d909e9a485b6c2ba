"""Typed options of the attention methods (`kind: attention` rules), validated like the linear families'.

  sdpa       hand-written softmax(QKᵀ·s + M)V -> F.scaled_dot_product_attention (no options)
  fused_qkv  the Q, K, V projections that read one input become one matmul; `rank` makes it low rank
             (one shared basis for Q, K and V: [W_q; W_k; W_v] ≈ U V by truncated SVD)
  shared_kv  K and V share one low-rank basis: [W_k; W_v] ≈ [U_k; U_v] V; x·Vᵀ is computed once

`rank` follows the linear rules over the stacked weight (in × out_total): an int is the exact rank (at or
above min(in, out_total) it is full rank), a float f in (0, 1] gives ⌊f·in·out_total/(in+out_total)⌋.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Union

from .structures.base import MethodConfig
from .structures.lowrank import check_rank


@dataclasses.dataclass
class SdpaConfig(MethodConfig):
    INITS: ClassVar[tuple[str, ...]] = ("svd",)


@dataclasses.dataclass
class FusedQKVConfig(MethodConfig):
    rank: Optional[Union[int, float]] = None  # None: a dense fused projection (no new parameters)
    INITS: ClassVar[tuple[str, ...]] = ("svd",)

    def validate(self) -> None:
        super().validate()
        check_rank(self.rank, allow_none=True)


@dataclasses.dataclass
class SharedKVConfig(MethodConfig):
    rank: Optional[Union[int, float]] = None
    INITS: ClassVar[tuple[str, ...]] = ("svd",)

    def validate(self) -> None:
        super().validate()
        check_rank(self.rank, allow_none=False)


class _Method:
    """What `parse_config` needs of a method: its name and config class."""

    def __init__(self, name: str, config: type):
        self.name, self.Config = name, config


ATTENTION_CONFIGS = {
    "sdpa": _Method("sdpa", SdpaConfig),
    "fused_qkv": _Method("fused_qkv", FusedQKVConfig),
    "shared_kv": _Method("shared_kv", SharedKVConfig),
}
