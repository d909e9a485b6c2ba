"""torch.distributed guards: lrcompile's new parameters must exist before DDP / FSDP2 sees the model.

DDP builds its gradient buckets (and FSDP2 its sharded parameter groups) from the parameters the model has when
it is wrapped. Factors that the backend registers during the first compile come too late: DDP would never
all-reduce their gradients and the ranks would silently drift apart. So under an active DDP module, or on a
model managed by FSDP2, the backend refuses to make new factors and says what to do instead; factors that
`lrcompile.rewrite` installed before wrapping are found and used as they are.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..compat import active_ddp_module
from ..errors import LrcompileError

ADVICE = (
    "call lrcompile.rewrite(model, policy, example_inputs) before wrapping the model in "
    "DistributedDataParallel / fully_shard, then compile the wrapped model"
)


def active_wrapper(root: Optional[nn.Module]) -> Optional[str]:
    """'DistributedDataParallel' or 'fully_shard' when the graph being compiled runs under one, else None."""
    if active_ddp_module() is not None:  # warns once where torch has no way to tell
        return "DistributedDataParallel"
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    if root is not None and any(isinstance(m, FSDPModule) for m in root.modules()):
        return "fully_shard"
    return None


def check_new_factors(what: str, root: Optional[nn.Module]) -> None:
    wrapper = active_wrapper(root)
    if wrapper is not None:
        raise LrcompileError(
            f"lrcompile: {what}: the backend cannot add new parameters under {wrapper} "
            f"(their gradients would not be synchronised); {ADVICE}"
        )
