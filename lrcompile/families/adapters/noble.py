"""NOBLE (Smith, 2026; reference: ethansmith2000/noble): a permanent nonlinear low-rank branch for pretraining.

y = x Wᵀ + b + W_up · CosNet(W_down x + b_down), CosNet(z) = cos(ω₂ ⊙ (M cos(ω₁ ⊙ z + φ₁) + c) + φ₂), with
M (r×r) and c the middle linear. The base weight keeps training (rewrite() leaves it trainable even next to
LoRA rules); the branch is nonlinear, so the site is not mergeable. W_down x and the CosNet run in float32
whatever the input dtype (the cosine of a low-precision sum loses the phase); W_up takes the input dtype.

Paper inits: W_down ~ N(0, 1/in), W_up ~ N(0, 0.01²/r) (near-silent, not zero),
ω ~ U[0.8, 1.2], φ ~ N(0, 0.1²), M ~ N(0, 0.25/r); biases zero. `init: scratch` also re-initialises the main
weight N(0, 0.25/in) (training from scratch), handed to the installer through `residual_weight()`.
`lr_multipliers()` gives the paper's per-parameter learning-rate factors for `lrcompile.param_groups`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..base import MethodConfig, mark_owned, register
from .lora import Adapter, add_branch, autocast_on, check_int_rank, flat, unflat


@dataclasses.dataclass
class NOBLEConfig(MethodConfig):
    init: str = "keep"  # keep the base weight as it is; "scratch": re-initialise it N(0, 0.25/in)
    rank: int = 32

    INITS: ClassVar[tuple[str, ...]] = ("keep", "scratch")

    def validate(self) -> None:
        super().validate()
        check_int_rank(self.rank)


@register
class NOBLE(Adapter):
    name = "noble"
    Config = NOBLEConfig
    mergeable = False
    kernel = "noble"
    linear_in_x = False  # cos(ω·(αz) + φ) is not α·cos(ω·z + φ): an input scale stays outside the kernel
    trains_base = True  # a permanent branch for pretraining: the base weight keeps training
    tensor_names = ("down", "down_bias", "omega1", "phi1", "mid", "mid_bias", "omega2", "phi2", "up")

    def __init__(self, in_features: int, out_features: int, cfg: NOBLEConfig, dtype=None, device=None):
        super().__init__(in_features, out_features, cfg, dtype=dtype, device=device)
        r = cfg.rank

        def p(*shape):
            return mark_owned(nn.Parameter(torch.empty(*shape, dtype=dtype, device=device)))

        self.down, self.down_bias = p(r, in_features), p(r)
        self.omega1, self.phi1 = p(r), p(r)
        self.mid, self.mid_bias = p(r, r), p(r)
        self.omega2, self.phi2 = p(r), p(r)
        self.up = p(out_features, r)

    @classmethod
    def init(cls, in_features, out_features, cfg, dtype=None, device=None) -> "NOBLE":
        m = cls(in_features, out_features, cfg, dtype=dtype, device=device)
        r = cfg.rank
        with torch.no_grad():
            nn.init.normal_(m.down, std=1.0 / math.sqrt(in_features))
            nn.init.normal_(m.up, std=0.01 / math.sqrt(r))
            nn.init.normal_(m.mid, std=0.5 / math.sqrt(r))
            for w in (m.omega1, m.omega2):
                nn.init.uniform_(w, 0.8, 1.2)
            for ph in (m.phi1, m.phi2):
                nn.init.normal_(ph, std=0.1)
            m.down_bias.zero_()
            m.mid_bias.zero_()
        return m

    @classmethod
    def from_dense(cls, weight, bias, cfg: NOBLEConfig, stats=None) -> "NOBLE":
        out_f, in_f = weight.shape
        m = cls.init(in_f, out_f, cfg, dtype=weight.dtype, device=weight.device)
        m.keep_base(weight)
        if cfg.init == "scratch":
            m._residual = torch.randn(out_f, in_f, dtype=weight.dtype, device=weight.device) * (0.5 / math.sqrt(in_f))
        return m

    @staticmethod
    def functional(x, weight, bias, down, down_bias, omega1, phi1, mid, mid_bias, omega2, phi2, up):
        x2 = flat(x)
        y = F.linear(x2, weight, bias)
        # the cosine needs the complete W_down x sum, accumulated in fp32 (a bf16 sum loses the phase): also
        # under autocast, which would run these linears in bf16 (entered only then: meta has no autocast)
        with torch.autocast(x.device.type, enabled=False) if autocast_on(x) else contextlib.nullcontext():
            z = F.linear(x2.float(), down.float(), down_bias.float())
            h = torch.cos(torch.addcmul(phi1.float(), z, omega1.float()))
            h = F.linear(h, mid.float(), mid_bias.float())
            h = torch.cos(torch.addcmul(phi2.float(), h, omega2.float()))
        return unflat(add_branch(y, h, up.t()), x)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        ts = self.tensors()
        zero = torch.zeros_like(self.dense_base())
        return self.functional(x, zero, None, *ts)

    def delta(self) -> torch.Tensor:
        raise TypeError("noble sites are not mergeable (the branch is nonlinear)")

    def to_dense(self) -> torch.Tensor:
        """For the report only: W plus the branch's secant on the unit vectors (NOBLE is not linear)."""
        with torch.no_grad():
            W = self.dense_base().detach()
            eye = torch.eye(self.in_features, dtype=W.dtype, device=W.device)
            b = self.branch(torch.cat([eye, torch.zeros_like(eye[:1])]))
            return W + (b[:-1] - b[-1:]).T

    def lr_multipliers(self) -> dict[str, float]:
        """Per-parameter learning-rate factors (paper): ω ×2, φ ×4, W_up ×(min(in, out)/r)^0.4."""
        up = (min(self.in_features, self.out_features) / self.cfg.rank) ** 0.4
        return {"omega1": 2.0, "omega2": 2.0, "phi1": 4.0, "phi2": 4.0, "up": up}

    @classmethod
    def param_count(cls, in_features, out_features, cfg) -> int:
        r = cfg.rank
        return r * (in_features + out_features) + r * r + 6 * r

    @classmethod
    def flops_per_token(cls, in_features, out_features, cfg) -> int:
        r = cfg.rank
        return 2 * r * (in_features + out_features) + 2 * r * r + 8 * r
