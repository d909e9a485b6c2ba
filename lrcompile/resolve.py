"""Find the user's live modules from inside a backend call.

The backend receives only the graph; Dynamo names modules by expressions over the compiled frame's locals
(`L['self'].encoder.layer.0`, `L['args'][0].model`). While the backend runs, the frame's translator is still
current, so its locals resolve those expressions to the real objects.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .compat import placeholder_source
from .dynamo_names import eval_root, strip_root
from .sites import Site


def root_module(sites: list[Site], f_locals: Optional[dict]) -> Optional[nn.Module]:
    """The outermost user module the graph belongs to (the one `torch.compile` wrapped)."""
    if f_locals is None:
        return None
    for s in sites:
        expr = s.module_expr or (_weight_source_name(s) if s.weight_node is not None else None)
        if expr:
            obj = eval_root(expr, f_locals)
            if isinstance(obj, nn.Module):
                return obj
    for v in f_locals.values():
        if isinstance(v, nn.Module):
            return v
    return None


def _weight_source_name(site: Site) -> Optional[str]:
    return placeholder_source(site.weight_node)


def site_module(site: Site, root: nn.Module, f_locals: Optional[dict]) -> Optional[nn.Module]:
    """The module whose forward makes the site's call (the root itself for a call made at the root)."""
    try:
        if site.module_expr is not None:
            base = eval_root(site.module_expr, f_locals) if f_locals is not None else root
            path = strip_root(site.module_expr)
        else:
            name = _weight_source_name(site)
            base = eval_root(name, f_locals) if (name and f_locals is not None) else root
            path = ""
        return base.get_submodule(path) if path else base
    except Exception:
        return None
