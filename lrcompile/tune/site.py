"""The backend's entry to the autotuner: one site's decision in, the implementation to emit (and why) out."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional

import torch

from ..compat import example_value
from ..families import FAMILIES
from . import shapelog
from .candidates import DENSE, REFERENCE, candidates_for, implementation
from .select import has_choice, lookup_or_measure, pick, site_tokens, spec_for

NOTE_PREFIX = "tuned"


@dataclasses.dataclass
class Tuned:
    family: str
    impl: str
    why: str
    ms: dict
    cached: bool
    tokens: Optional[int]

    @property
    def fn(self) -> Callable:
        return implementation(self.family, self.impl)

    @property
    def dense(self) -> bool:
        return self.impl == DENSE

    def annotate(self, row) -> None:
        """Report fields: the implementation, its time, the dense layer's time, and a note saying why."""
        row.impl = self.impl
        row.tuned_ms = self.ms.get(self.impl)
        row.dense_ms = self.ms.get(DENSE)
        src = "autotune cache" if self.cached else ("measured now" if self.ms else "no timing")
        row.notes = [n for n in row.notes if not n.startswith(NOTE_PREFIX)]
        row.notes.append(f"{NOTE_PREFIX} at {self.tokens} tokens ({src}): {self.why}")


def tune_site(site, decision, dense_why: Optional[str], enabled: bool) -> Optional[Tuned]:
    """Records the site's shape in the shape log; with `enabled`, chooses its implementation (cache or timing).
    `dense_why`: why the original layer may be chosen where it measures faster (None: it may not). None when the
    site cannot be described (no input shape) or tuning is off. Never raises: a failure keeps the family's own
    functional, with a warning."""
    tokens = site_tokens(example_value(site.input_node)) if site.input_node is not None else None
    if tokens is None or not decision.rewrites:
        return None
    try:
        spec = spec_for(
            decision.method,
            decision.config,
            site.in_features,
            site.out_features,
            site.bias is not None,
            tokens,
            site.weight.dtype,
            site.weight.device,
            torch.is_grad_enabled(),
        )
        shapelog.record(spec.as_dict())
        if not enabled:
            return None
        if not has_choice(spec):
            return Tuned(
                decision.method, REFERENCE, f"{REFERENCE}: the only implementation here", {}, False, spec.tokens
            )
        entry, cached = lookup_or_measure(spec)
        known = {c.name for c in candidates_for(spec.family, len(spec.tensor_shapes), spec.device, spec.grad)}
        impl, why = pick(entry, dense_why if FAMILIES[decision.method].compressing else None, known)
        if entry.get("unstable"):
            why += f"; timings unstable under load ({', '.join(entry['unstable'])}): not cached"
    except Exception as e:
        warnings.warn(
            f"lrcompile: autotune of {site.fqn} failed ({type(e).__name__}: {e}); using {decision.method}'s "
            f"own implementation",
            stacklevel=2,
        )
        return Tuned(decision.method, REFERENCE, f"not tuned ({type(e).__name__}: {e})", {}, False, tokens)
    return Tuned(decision.method, impl, why, entry["ms"], cached, spec.tokens)
