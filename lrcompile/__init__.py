"""lrcompile: a torch.compile backend that rewrites Linear sites per a YAML policy.

    torch.compile(model, backend="lrcompile", options={"policy": "policy.yaml"})

The backend is registered through the `torch_dynamo_backends` entry point: no import is needed for that.
"""
from .api import rewrite
from .persist import load, save
from .errors import LrcompileError, PlanError, PolicyError, SiteError
from .policy import Policy, load_policy

__version__ = "0.1.0"
__all__ = ["rewrite", "save", "load", "LrcompileError", "PlanError", "PolicyError", "SiteError", "Policy", "load_policy"]
