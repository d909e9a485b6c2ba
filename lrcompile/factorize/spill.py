"""Whitened bases kept on disk between the allocation curves and the factorisation: each site decomposed once.

The default allocation's curves (fisher.py) need every site's whitened basis at every rank, and the factorisation
then needs the same basis at the one rank the budget gave. Holding every basis in memory until `rewrite` would
cost about the dense model's size again, so `calibrate` writes each to a private temporary directory (removed
with its statistics object) and the factorisation reads back the first r components. A basis is used only for
the weight it was made from (a checksum of its values) at the same damping; any other weight is decomposed anew.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import weakref
from typing import Optional

import torch


def fingerprint(W: torch.Tensor) -> tuple:
    """Shape and two seeded random projections of W's values: changes when any value changes (not a defence
    against an adversary: the directory is ours and private)."""
    out_f, in_f = W.shape
    g = torch.Generator().manual_seed(out_f * 1_000_003 + in_f)
    u = torch.randn(2, out_f, generator=g, dtype=torch.float64)
    v = torch.randn(in_f, 2, generator=g, dtype=torch.float64)
    p = u @ (W.detach().cpu().to(torch.float64) @ v)
    return (out_f, in_f, float(p[0, 0]), float(p[1, 1]))


@dataclasses.dataclass
class Spilled:
    path: str
    fingerprint: tuple
    damping: float
    k: int  # components stored
    projection: bool  # B = AᵀW, not stored
    energy: torch.Tensor  # every component's whitened energy (for the kept fraction)


class Spill:
    """A private temporary directory of bases; removed when this object is collected (or at exit)."""

    def __init__(self, need_bytes: int):
        self.dir, self.count = None, 0
        try:
            if shutil.disk_usage(tempfile.gettempdir()).free < 2 * need_bytes + (1 << 30):
                return  # not enough disk: bases stay in memory (in groups) and the factorisation decomposes again
            self.dir = tempfile.mkdtemp(prefix="lrcompile-bases-")
        except OSError:
            return
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.dir, True)

    def put(self, W: torch.Tensor, damping: float, A, B, energy, k: int, projection: bool) -> Optional[Spilled]:
        """Store the first k components of W = Σ A_i B_i; None when there is no directory or it cannot be written."""
        if self.dir is None:
            return None
        from safetensors.torch import save_file

        self.count += 1
        path = os.path.join(self.dir, f"{self.count}.safetensors")
        tensors = {"At": A[:, :k].T.contiguous()}
        if not projection:
            tensors["B"] = B[:k].contiguous()
        try:
            save_file(tensors, path)
        except OSError:  # the disk filled up meanwhile: this basis stays in memory
            return None
        return Spilled(path, fingerprint(W), float(damping), k, projection, energy.detach().clone())


def load(ref: Spilled, with_b: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(A (out × k), B (k × in); B is None for a projection basis or when not asked for) as stored."""
    from safetensors import safe_open

    with safe_open(ref.path, framework="pt") as f:
        At = f.get_tensor("At")
        B = None if ref.projection or not with_b else f.get_tensor("B")
    return At.T, B


def take(ref: Optional[Spilled], W: torch.Tensor, damping: float, rank: int):
    """(U (out × rank), V (rank × in), energy) from a spilled basis made for this weight and damping, else None."""
    if ref is None or rank > ref.k or float(damping) != ref.damping or not os.path.exists(ref.path):
        return None
    if fingerprint(W) != ref.fingerprint:
        return None
    from safetensors import safe_open

    try:
        with safe_open(ref.path, framework="pt") as f:
            At = f.get_slice("At")[:rank]
            B = None if ref.projection else f.get_slice("B")[:rank]
    except Exception:  # noqa: BLE001 - a file that cannot be read back: decompose again
        return None
    if tuple(At.shape) != (rank, W.shape[0]) or (B is not None and tuple(B.shape) != (rank, W.shape[1])):
        return None
    U = At.T
    V = U.T @ W.detach().to(U.dtype) if B is None else B
    return U, V, ref.energy


class Parked:
    """The statistics' moment matrices (XᵀX, E[yᵀy]: a third of a 1B model's size) moved to the spill directory
    while the curves' backward passes run — the bases are already decomposed, so nothing reads them then — and
    put back afterwards, sites that shared a tensor sharing it again. A file per tensor: safetensors builds a
    file's bytes in memory. `restore` is safe to call more than once."""

    FIELDS = ("xtx", "yty")

    def __init__(self, spill: Spill, stats):
        self.stats, self.files = stats, {}  # path -> [(fqn, field)]
        if spill is None or spill.dir is None:
            return
        from safetensors.torch import save_file

        done: dict[int, str] = {}
        try:
            for fqn, s in stats.sites.items():
                for field in self.FIELDS:
                    t = getattr(s, field, None)
                    if t is None:
                        continue
                    path = done.get(id(t))
                    if path is None:
                        path = done[id(t)] = os.path.join(spill.dir, f"parked-{len(done)}.safetensors")
                        save_file({"t": t.detach().contiguous()}, path)
                    self.files.setdefault(path, []).append((fqn, field))
        except OSError:  # no room: they stay in memory
            for path in self.files:
                if os.path.exists(path):
                    os.remove(path)
            self.files = {}
            return
        for refs in self.files.values():
            for fqn, field in refs:
                setattr(stats.sites[fqn], field, None)

    def restore(self) -> None:
        from safetensors import safe_open

        for path, refs in self.files.items():
            with safe_open(path, framework="pt") as f:
                t = f.get_tensor("t").clone()  # own memory, not the file's mapping
            for fqn, field in refs:
                setattr(self.stats.sites[fqn], field, t)
            os.remove(path)
        self.files = {}
