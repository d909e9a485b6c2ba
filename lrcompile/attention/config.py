"""Typed options of the attention methods (`kind: attention` rules), validated like the linear families'.

  sdpa       hand-written softmax(QKᵀ·s + M)V -> F.scaled_dot_product_attention (no options)
  fused_qkv  the Q, K, V projections that read one input become one matmul; `rank` makes it low rank
             (one shared basis for Q, K and V: [W_q; W_k; W_v] ≈ U V by truncated SVD); `structure` makes the
             stacked projection a compressing linear family ({method: monarch, blocks: 4}, lowrank, btt, blast)
             built by the family's own from_dense
  shared_kv  K and V share one low-rank basis: [W_k; W_v] ≈ [U_k; U_v] V; x·Vᵀ is computed once

`rank` follows the linear rules over the stacked weight (in × out_total): an int is the exact rank (at or
above min(in, out_total) it is full rank), a float f in (0, 1] gives ⌊f·in·out_total/(in+out_total)⌋. The
options of a `structure` are the family's, read as over a linear in → out_total.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Union

from ..errors import PolicyError
from ..families import FAMILIES
from ..families.base import MethodConfig, parse_config
from ..families.lowrank import check_rank


@dataclasses.dataclass
class SdpaConfig(MethodConfig):
    INITS: ClassVar[tuple[str, ...]] = ("svd",)


@dataclasses.dataclass
class FusedQKVConfig(MethodConfig):
    rank: Optional[Union[int, float]] = None  # None (and no structure): a dense fused projection, nothing new
    structure: Optional[Union[dict, str]] = None  # {method: <compressing family>, <its options>}, or its name
    INITS: ClassVar[tuple[str, ...]] = ("svd",)

    def validate(self) -> None:
        super().validate()
        check_rank(self.rank, allow_none=True)
        if self.structure is not None:
            if self.rank is not None:
                raise ValueError("give either rank (one shared low-rank basis) or structure, not both")
            self.family()

    def family(self) -> tuple[type, MethodConfig]:
        """The structure's family class and its validated config, parsed once per rule (parse_config binds
        per-rule state); ValueError naming `structure` otherwise."""
        if getattr(self, "_family", None) is None:
            self._family = self._parse_structure()
        return self._family

    def _parse_structure(self) -> tuple[type, MethodConfig]:
        s = {"method": self.structure} if isinstance(self.structure, str) else self.structure  # `structure: monarch`
        names = sorted(n for n, c in FAMILIES.items() if c.compressing)
        if not isinstance(s, dict) or s.get("method") not in names:
            got = s.get("method") if isinstance(s, dict) else s
            raise ValueError(f"structure must be a mapping with method: one of {', '.join(names)}, got {got!r}")
        try:
            cfg = parse_config(FAMILIES[s["method"]], {k: v for k, v in s.items() if k != "method"}, "structure")
        except PolicyError as e:
            raise ValueError(str(e)) from None
        if getattr(cfg, "rank", 0) is None:
            raise ValueError(f"structure: method '{s['method']}' needs a 'rank' (no budget plans attention sites)")
        return FAMILIES[s["method"]], cfg


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
