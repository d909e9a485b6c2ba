"""lrcompile: a torch.compile backend that rewrites Linear sites per a YAML policy.

    torch.compile(model, backend="lrcompile", options={"policy": "policy.yaml"})
"""
from .errors import LrcompileError, PlanError, PolicyError, SiteError
from .policy import Policy, load_policy

__version__ = "0.1.0"
__all__ = ["LrcompileError", "PlanError", "PolicyError", "SiteError", "Policy", "load_policy"]
