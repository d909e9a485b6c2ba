"""A small bundled transformer encoder for the demo and the CLI (no download, no extra dependency).

Its weights are random with power-law singular spectra (σ_k ∝ k^-0.7), the shape of spectra that trained
transformer weights have; plain Gaussian weights would have flat spectra that no low-rank method can
compress, which would make the demo meaningless.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def power_law_(weight: torch.Tensor, decay: float = 0.7, generator=None) -> torch.Tensor:
    out_f, in_f = weight.shape
    k = min(out_f, in_f)
    q1, _ = torch.linalg.qr(torch.randn(out_f, k, generator=generator))
    q2, _ = torch.linalg.qr(torch.randn(in_f, k, generator=generator))
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    w = (q1 * s) @ q2.T
    with torch.no_grad():
        weight.copy_(w * (math.sqrt(out_f * in_f) / (w.norm() * math.sqrt(3 * in_f))))
    return weight


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.mlp = nn.ModuleDict({"fc_in": nn.Linear(d, 4 * d), "fc_out": nn.Linear(4 * d, d)})

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp["fc_out"](F.gelu(self.mlp["fc_in"](self.ln2(x))))


class TinyTransformer(nn.Module):
    def __init__(
        self, vocab: int = 1000, d: int = 256, heads: int = 4, layers: int = 4, max_len: int = 256, seed: int = 0
    ):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(max_len, d, generator=g) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                power_law_(m.weight, generator=g)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, ids):
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def demo_model(d: int = 256, layers: int = 4, batch: int = 8, seq: int = 128):
    """(model, example_inputs): the factory `lrcompile check --model lrcompile.demo.tiny:demo_model` uses."""
    model = TinyTransformer(d=d, layers=layers).eval()
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(1))
    return model, (ids,)
