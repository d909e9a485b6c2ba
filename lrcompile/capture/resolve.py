"""Find the user's live modules from inside a backend call.

The backend receives only the graph; Dynamo names modules by expressions over the compiled frame's locals
(`L['self'].encoder.layer.0`, `L['args'][0].model`). While the backend runs, the frame's translator is still
current, so its locals resolve those expressions to the real objects.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from torch import nn

from .. import compat
from ..compat import placeholder_source
from .names import eval_root, strip_root
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
    if site.module_expr is not None:
        return module_at(site.module_expr, root, f_locals)
    try:
        name = _weight_source_name(site)
        return eval_root(name, f_locals) if (name and f_locals is not None) else root
    except Exception:
        return None


def module_at(expr: str, root: nn.Module, f_locals: Optional[dict]) -> Optional[nn.Module]:
    """The module Dynamo's module expression `expr` names (resolved in the frame's locals), or None."""
    try:
        base = eval_root(expr, f_locals) if f_locals is not None else root
        path = strip_root(expr)
        return base.get_submodule(path) if path else base
    except Exception:
        return None


def path_in(model: nn.Module, module: nn.Module) -> Optional[str]:
    return next((n for n, m in model.named_modules(remove_duplicate=False) if m is module), None)


_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def compiled_callers():
    """(module, frame locals) for each call of a compiled module (`torch.compile(module)` or `module.compile()`)
    on the Python stack, innermost first; DataParallel / DDP wrappers are seen through (names and calls are the
    user's model's, not `module.…`)."""
    for f in compat.caller_frames():
        code = f.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            loc = f.f_locals
            cand = compat.compiled_original(loc.get("self"))
            while isinstance(cand, _WRAPPERS):
                cand = cand.module
            if isinstance(cand, nn.Module):
                yield cand, loc


def enclosing_model(root: Optional[nn.Module]) -> tuple[Optional[nn.Module], str]:
    """(model, prefix): the model being compiled that `root` (the module of the frame Dynamo compiles now) lies
    in, and root's path in it with a trailing dot. Dynamo compiles a submodule's forward as a frame of its own
    when it cannot trace through the caller (a graph break inside a loop over blocks skips the caller's frame):
    such sites are named from the compiled model (`blocks.0.a`, not `a`) and share its session and report. The
    compiled model is the outermost compiled module on the Python stack that contains `root`; none: root itself."""
    if root is None:
        return None, ""
    found = None
    for cand, _ in compiled_callers():
        if cand is root or any(m is root for m in cand.modules()):
            found = cand
    if found is None or found is root:
        return root, ""
    return found, path_in(found, root) + "."


def relative_names(site: Site) -> tuple:
    """(fqn, calling module's path, weight path), relative to the frame's module."""
    return site.fqn, strip_root(site.module_expr) if site.module_expr else "", site.weight_path


def prefixed(site: Site, prefix: str) -> Site:
    return dataclasses.replace(
        site,
        fqn=prefixed_name(site.fqn, prefix),
        weight_path=prefix + site.weight_path if site.weight_path else None,
    )


def prefixed_name(fqn: str, prefix: str) -> str:
    """A name relative to the frame's module, in the compiled model (`prefix`: the frame module's path + '.')."""
    return prefix + fqn if fqn else prefix[:-1]


def remapped(site: Site, vm: dict) -> Site:
    """The site with its nodes in the attention pass's copy of the graph."""
    get = lambda n: vm[n] if n is not None else None  # noqa: E731
    return dataclasses.replace(
        site,
        node=vm[site.node],
        input_node=get(site.input_node),
        weight_node=get(site.weight_node),
        bias_node=get(site.bias_node),
    )


def caller_locals(skip: int = 1):
    """The values of every caller's locals, innermost first (the Python stack has no other route to a module
    that runs a graph compiled for another instance)."""
    for f in compat.caller_frames(skip):
        yield from f.f_locals.values()
