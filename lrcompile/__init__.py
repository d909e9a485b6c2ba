"""lrcompile: a torch.compile backend that rewrites Linear sites per a YAML policy.

    torch.compile(model, backend="lrcompile", options={"policy": "policy.yaml"})

The backend is registered through the `torch_dynamo_backends` entry point: no import is needed for that.
"""

from .errors import LrcompileError, PlanError, PolicyError, SiteError
from .factorize.calibrate import CalibrationStats, calibrate
from .lifecycle.adapters import adapter_state_dict, load_adapter_state_dict, merge
from .lifecycle.heal import heal
from .lifecycle.param_groups import param_groups
from .lifecycle.peft_format import load_adapter, save_adapter
from .lifecycle.persist import load, save
from .plan.rewrite import rewrite
from .policy.load import load_policy
from .policy.rules import Policy
from .policy.typed import BLAST, BTT, NOBLE, SDPA, DoRA, FusedQKV, LoRA, LowRank, Monarch, SharedKV, VeRA
from .runtime.refresh import refresh

__version__ = "0.1.0"
__all__ = [
    "rewrite",
    "calibrate",
    "CalibrationStats",
    "heal",
    "save",
    "load",
    "merge",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "save_adapter",
    "load_adapter",
    "param_groups",
    "refresh",
    "LrcompileError",
    "PlanError",
    "PolicyError",
    "SiteError",
    "Policy",
    "load_policy",
    "LowRank",
    "Monarch",
    "BTT",
    "BLAST",
    "LoRA",
    "DoRA",
    "VeRA",
    "NOBLE",
    "SDPA",
    "FusedQKV",
    "SharedKV",
]
