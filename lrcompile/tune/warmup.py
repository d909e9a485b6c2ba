"""Ahead-of-time tuning: every site shape a model/policy will hit, or every shape in the shape log.

For a model, the shapes come from one eager compile of it (`inductor: False, tune: False`), which also fills the
factor cache; then each distinct shape is tuned with a progress bar. `tokens` adds token counts the example did
not show (e.g. other batch sizes).
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Iterable, Optional

import torch

from ..compat import discard_compiled
from ..families import FAMILIES
from . import shapelog
from .select import TIME_BUDGET_S, Spec, has_choice, lookup_or_measure


def model_specs(model, example_inputs, policy) -> list[Spec]:
    from ..backend import lrcompile_backend
    from ..capture.trace import call_model

    # a backend of its own: Dynamo reuses a frame compiled with an equal one (same options), so a compile of the
    # model made earlier in this process would show no shapes; afterwards only this one's frames are thrown away
    backend = functools.partial(lrcompile_backend, options={"policy": policy, "inductor": False, "tune": False})
    try:
        with shapelog.collect() as got, torch.no_grad():
            call_model(torch.compile(model, backend=backend), example_inputs)
    finally:
        discard_compiled(backend)
    return [Spec.from_dict(d) for d in got]


def log_specs() -> tuple[list[Spec], list[str]]:
    """Specs in the shape log that this machine can tune, and one line per entry it skipped."""
    specs, skipped = [], []
    for d in shapelog.read():
        try:
            spec = Spec.from_dict(d)
        except (TypeError, KeyError, ValueError) as e:
            skipped.append(f"unreadable shape-log entry {d!r} ({e})")
            continue
        if spec.family not in FAMILIES:
            skipped.append(f"{spec.family}: unknown family")
        elif spec.device == "cuda" and not torch.cuda.is_available():
            skipped.append(f"{spec.family} {spec.in_features}x{spec.out_features}: logged on cuda, no GPU here")
        else:
            specs.append(spec)
    return specs, skipped


def expand(specs: Iterable[Spec], tokens: Optional[list[int]]) -> list[Spec]:
    """Each spec at each token count (bucketed); the specs as they are when no counts are given. Specs with only
    the family's own implementation are left out: nothing to choose."""
    out, seen = [], set()
    for s in filter(has_choice, specs):
        for t in tokens or [s.tokens]:
            v = s.with_tokens(t)
            if v not in seen:
                seen.add(v)
                out.append(v)
    return out


def tune_all(specs: list[Spec], budget_s: float = TIME_BUDGET_S, progress: bool = True) -> dict:
    """Tune every spec (cache hits cost nothing); returns counts and seconds for the CLI's summary."""
    from tqdm import tqdm

    t0, measured, failed = time.perf_counter(), 0, 0
    for spec in tqdm(specs, desc="lrcompile warmup", unit="shape", disable=not progress):
        try:
            _, cached = lookup_or_measure(spec, budget_s)
        except Exception as e:  # one shape that cannot run does not stop the others
            warnings.warn(
                f"lrcompile: warmup of {spec.family} {spec.in_features}x{spec.out_features} at "
                f"{spec.tokens} tokens failed ({type(e).__name__}: {e})",
                stacklevel=2,
            )
            failed += 1
            continue
        measured += not cached
    return {
        "shapes": len(specs),
        "measured": measured,
        "cached": len(specs) - measured - failed,
        "failed": failed,
        "seconds": time.perf_counter() - t0,
    }
