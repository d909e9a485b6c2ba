"""lrcompile: a torch.compile backend that rewrites Linear sites per a YAML policy.

    torch.compile(model, backend="lrcompile", options={"policy": "policy.yaml"})

The backend is registered through the `torch_dynamo_backends` entry point: no import is needed for that.
"""
from .api import rewrite
from .calibrate import CalibrationStats, calibrate
from .heal import heal
from .persist import load, save
from .refresh import refresh
from .adapters import adapter_state_dict, load_adapter_state_dict, merge
from .param_groups import param_groups
from .errors import LrcompileError, PlanError, PolicyError, SiteError
from .policy import Policy, load_policy

__version__ = "0.1.0"
__all__ = ["rewrite", "calibrate", "CalibrationStats", "heal", "save", "load", "merge", "adapter_state_dict", "load_adapter_state_dict", "param_groups", "refresh", "LrcompileError", "PlanError", "PolicyError", "SiteError", "Policy", "load_policy"]
