"""Choose one site's implementation: a cached measurement, or time the candidates now and cache the result.

A measurement depends on shapes only (random inputs of the site's shapes), never on the weights' values: the
cache serves every model with the same shapes, and `warmup --from-log` needs no model. Tokens are bucketed to
the next power of two, so dynamic batch/sequence sizes share entries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import platform
import statistics
import time
from typing import Optional

import torch

from ..compat import autocast_available
from ..families import FAMILIES
from . import cache, timing
from .candidates import DENSE, REFERENCE, candidates_for, source_hash

TIME_BUDGET_S = 0.5  # per distinct shape, all candidates together (keeps a cold compile within 2x of Inductor's)
MARGIN = 0.05  # another implementation replaces the reference only when this much faster: below it, noise decides
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


@dataclasses.dataclass(frozen=True)
class Spec:
    family: str
    in_features: int
    out_features: int
    tensor_shapes: tuple  # shapes of the tensors `functional` takes after (x, weight, bias)
    bias: bool
    tokens: int  # a power-of-two bucket
    dtype: str  # "float32"
    device: str  # "cpu", "cuda"
    grad: bool  # compiled with gradients enabled: inference-only candidates are out
    size: str = ""  # the family's size option, e.g. "rank 64" (shown by `cache list`; the shapes are in the key)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tensor_shapes"] = [list(s) for s in self.tensor_shapes]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Spec":
        d = dict(d)
        d["tensor_shapes"] = tuple(tuple(s) for s in d["tensor_shapes"])
        d.setdefault("size", "")
        return cls(**d)

    def with_tokens(self, tokens: int) -> "Spec":
        return dataclasses.replace(self, tokens=bucket(tokens))

    def key(self) -> str:
        shapes = ",".join("x".join(map(str, s)) or "()" for s in self.tensor_shapes)
        local = (
            f"{self.family}|{self.in_features}x{self.out_features}|{shapes}|bias{int(self.bias)}|"
            f"tok{self.tokens}|{self.dtype}|grad{int(self.grad)}"
        )
        env = environment(self.device)
        tag = hashlib.blake2b(json.dumps([env, source_hash(self.family)]).encode(), digest_size=6).hexdigest()
        return f"{local}|{tag}"


def bucket(tokens: int) -> int:
    return 1 << max(0, int(tokens) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def environment(device: str) -> dict:
    """What a timing depends on besides shapes: the device, its thread count and the software versions."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        name = _cpu_model()
    try:
        from importlib.metadata import version

        triton = version("triton")
    except Exception:
        triton = "none"
    return {"device": name, "threads": torch.get_num_threads(), "torch": torch.__version__, "triton": triton}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def spec_for(
    family: str,
    cfg,
    in_features: int,
    out_features: int,
    bias: bool,
    tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    grad: bool,
) -> Spec:
    """The tensor shapes come from the family built on the meta device: nothing allocated, no factorisation."""
    m = FAMILIES[family](in_features, out_features, cfg, dtype=dtype, device="meta")
    shapes = tuple(tuple(t.shape) for t in m.tensors())
    return Spec(
        family,
        in_features,
        out_features,
        shapes,
        bias,
        bucket(tokens),
        str(dtype).removeprefix("torch."),
        torch.device(device).type,
        grad,
        _size(FAMILIES[family], cfg),
    )


def _size(cls, cfg) -> str:
    """The option a budget would size (`rank`, `blocks`, ...), else the config's non-default numbers."""
    if cls.budget_knob is not None:
        return f"{cls.budget_knob} {getattr(cfg, cls.budget_knob)}"
    fields = getattr(cfg, "__dataclass_fields__", {})
    return ", ".join(
        f"{n} {getattr(cfg, n)}" for n in ("rank", "blocks") if n in fields and getattr(cfg, n) is not None
    )


def _inputs(spec: Spec, dtype: torch.dtype, device: torch.device) -> tuple:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(shape, generator=g).to(dtype=dtype, device=device)

    x = rnd(spec.tokens, spec.in_features)
    w = rnd(spec.out_features, spec.in_features) / spec.in_features**0.5
    b = rnd(spec.out_features) if spec.bias else None
    return (x, w, b, *[rnd(*s) for s in spec.tensor_shapes])


def measure(spec: Spec, budget_s: float = TIME_BUDGET_S) -> dict:
    """Time every candidate that passes the correctness gate; returns a cache entry. Autocast is off while it
    runs: the spec's dtype is what is timed. A compile under torch.autocast tunes inside the backend call, where
    torch 2.11 leaves autocast in effect (candidates with out= GEMMs then fail on mixed dtypes)."""
    device = torch.device(spec.device)
    with torch.autocast(device.type, enabled=False) if autocast_available(device.type) else contextlib.nullcontext():
        return _measure(spec, budget_s)


def _measure(spec: Spec, budget_s: float) -> dict:
    dtype, device = getattr(torch, spec.dtype), torch.device(spec.device)
    t0 = time.perf_counter()
    args = _inputs(spec, dtype, device)
    cands = candidates_for(spec.family, len(spec.tensor_shapes), device.type, spec.grad)
    ref = timing.run(cands[0].fn, args).double()
    scale = float(ref.norm()) or 1.0
    tol = TOLERANCE.get(dtype, 1e-2)
    discarded, runnable = {}, []
    for c in cands:
        try:
            out = ref if c.name == REFERENCE else timing.run(c.fn, args)
        except Exception as e:  # a candidate that cannot run this shape is out, not the compile
            discarded[c.name] = f"{type(e).__name__}: {e}"
            continue
        if c.lossless and c.name != REFERENCE:
            err = float((out.double() - ref).norm()) / scale
            if not err <= tol:
                discarded[c.name] = f"output differs from the reference (rel. error {err:.2g} > {tol:g})"
                continue
        runnable.append(c)
    if device.type == "cuda":
        torch.cuda.synchronize()
    # the correctness gate (which doubles as the warm-up) spends the same budget
    samples = timing.samples_ms({c.name: c.fn for c in runnable}, args, device, budget_s - (time.perf_counter() - t0))
    ms = {k: round(statistics.median(v), 5) for k, v in samples.items()}
    entry = {
        "ms": ms,
        "discarded": discarded,
        "spec": spec.as_dict(),
        "env": environment(spec.device),
        "source": source_hash(spec.family),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    noisy = timing.unstable(samples)
    if noisy:
        entry["unstable"] = noisy
    return entry


def has_choice(spec: Spec) -> bool:
    """False where only the family's own implementation applies: nothing to time."""
    return len(candidates_for(spec.family, len(spec.tensor_shapes), spec.device, spec.grad)) > 1


def lookup_or_measure(spec: Spec, budget_s: float = TIME_BUDGET_S) -> tuple[dict, bool]:
    """(entry, True) from the persistent cache, else measured now, stored, and (entry, False)."""
    key = spec.key()
    entry = cache.lookup(key)
    if entry is not None:
        return entry, True
    entry = measure(spec, budget_s)
    if not entry.get("unstable"):  # a burst of load decides this compile only, never later ones
        cache.store({key: entry})
    return entry, False


def pick(entry: dict, dense_why: Optional[str], known: Optional[set] = None) -> tuple[str, str]:
    """(implementation, why) from a cache entry. `dense` only when allowed: `dense_why` says why it may be.
    `known`: the implementations this code has; an entry's others (an imported cache from other code) are
    ignored, as are times that are not positive finite numbers."""
    ms = {
        k: v
        for k, v in entry["ms"].items()
        if (known is None or k in known or k == DENSE) and isinstance(v, (int, float)) and 0 < v < float("inf")
    }
    if REFERENCE not in ms:
        return REFERENCE, f"{REFERENCE}: the cached entry has no usable time for it"
    ref = ms[REFERENCE]
    lossless = {k: v for k, v in ms.items() if k != DENSE}
    best = min(lossless, key=lossless.get)
    if best != REFERENCE and lossless[best] > ref * (1 - MARGIN):
        best = REFERENCE
    if best != REFERENCE:
        why = f"{best} at least {MARGIN:.0%} faster than {REFERENCE} ({_fmt(ms)})"
    else:
        why = f"{REFERENCE}: no alternative {MARGIN:.0%} faster ({_fmt(ms)})"
    if DENSE in ms and ms[DENSE] < lossless[best] * (1 - MARGIN):
        if dense_why:
            return DENSE, f"{dense_why}: the original layer is faster ({_fmt(ms)})"
        why += "; slower than the dense layer it replaced (set guard: dense to fall back)"
    return best, why


def _fmt(ms: dict) -> str:
    return ", ".join(f"{k} {v:.3g} ms" for k, v in sorted(ms.items(), key=lambda kv: kv[1]))


def site_tokens(example) -> Optional[int]:
    """Rows a linear site's input holds (product of all but the last dim), from a (fake) tensor; symbolic sizes
    read through their hints without adding guards."""
    shape = getattr(example, "shape", None)
    if shape is None:
        return None
    from ..compat import size_hint

    n = 1
    for s in list(shape)[:-1]:
        n *= size_hint(s, fallback=1)
    return int(n)
