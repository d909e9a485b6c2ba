"""Linear sites known without running the model: nn.Linear and HF Conv1D modules, by module path.

This is what PEFT adapts (modules by name), so a PEFT config or adapter needs no example inputs. Sites that only a
trace finds (F.linear on a bare parameter, Linear subclasses with their own forward) and attention need them.
"""

from __future__ import annotations

from torch import nn

from ..families import is_owned
from .sites import Site
from .trace import CapturedSite


def module_sites(model: nn.Module) -> list[CapturedSite]:
    out = []
    for path, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() != 2 or is_owned(w, mod, "weight"):
            continue
        if type(mod) is nn.Linear:
            form, transposed = "linear", False
        elif type(mod).__name__ == "Conv1D":  # HF GPT-2: weight stored (in, out), computed as addmm
            form, transposed = "addmm", True
        else:
            continue
        site = Site(
            fqn=path,
            kind="linear",
            node=None,
            form=form,
            module_type=type(mod),
            weight=w,
            bias=mod.bias,
            transposed=transposed,
            weight_path=path,
        )
        out.append(CapturedSite(site, mod))
    return out
