"""Keeping factors fresh: one mechanism for every set of factors made from dense weights.

A linear site's Structure and attention's stacked AttnFactors are both made from dense weights (their sources).
When they are made, a stamp of each source and of the factors' own tensors is recorded on the factors. Before a
compiled graph runs, the sources are stamped again. A source that is another tensor now
(`load_state_dict(assign=True)`, a parameter swapped on the module), whose version counter moved (`copy_`,
`load_state_dict`, an optimizer step), or whose storage, dtype or device changed (`param.data = t`, `.to()`)
makes the factors stale, unless the factors' own stamp moved too: they were trained or loaded, and are the
truth. Stale factors are refit from the current weights. A failed refit is one warning, never an error inside
the user's forward; the feed then says `failed` and the caller runs the dense weights' function.

A storage is known by its identity, not its address: FSDP2 frees every unsharded parameter's storage after the
forward and refills the same storage (version counter preserved) before the next, often at another address.
Were the address stamped, a dense weight that moved while its factors happened to land where they were would
look stale, and trained factors would be overwritten by the dense weights' refit.

What no stamp sees: in-place writes through `.data` (`param.data.mul_(2)`), which bypass the version counter
and keep the storage, and, under FSDP2, writes to the sharded parameters (the unsharded ones are refilled with
their version preserved). `lrcompile.refresh(model)` refits on demand (README, update paths).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch

from ..compat import storage_identity
from ..errors import first_line


def _version(t: torch.Tensor) -> Optional[int]:
    # inference tensors (made under torch.inference_mode) keep no version counter
    return None if t.is_inference() else t._version


def stamp(tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple(
        (id(t), _version(t), storage_identity(t), t.storage_offset(), t.dtype, t.device, tuple(t.shape))
        for t in tensors
    )


def record(factors, sources: Sequence[torch.Tensor]) -> None:
    """The factors describe `sources` as they are now."""
    factors._lrc_sources = stamp(sources)
    factors._lrc_factors = stamp(factors.tensors())


def is_recorded(factors) -> bool:
    return hasattr(factors, "_lrc_sources")


def refresh(factors, sources: Sequence[torch.Tensor], refit: Callable[[], None], what: str) -> Optional[bool]:
    """Refit `factors` if they are stale. None: fresh or trained (nothing to do); True: refit; False: the refit
    failed (warned once per factors). The new stamp is recorded either way: no retry on every call."""
    if not is_recorded(factors):
        record(factors, sources)
        return None
    if stamp(sources) == factors._lrc_sources:
        return None
    ok = None
    if stamp(factors.tensors()) == factors._lrc_factors:  # untouched factors of changed weights: stale
        try:
            refit()
            ok = True
        except Exception as e:  # noqa: BLE001 - inside the user's forward a failure is a warning, not a crash
            ok = False
            if not getattr(factors, "_lrc_warned", False):
                factors._lrc_warned = True
                warnings.warn(
                    f"lrcompile: recomputing stale {what} failed ({first_line(e)}); the graph runs the dense "
                    "weights instead (uncompiled) "
                    "until they change again",
                    stacklevel=4,
                )
    record(factors, sources)
    return ok
