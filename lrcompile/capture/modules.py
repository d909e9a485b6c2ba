"""Linear sites known without running the model: nn.Linear and HF Conv1D modules, by module path.

This is what PEFT adapts (modules by name), so a PEFT config or adapter needs no example inputs. Sites that only a
trace finds (F.linear on a bare parameter, Linear subclasses with their own forward) and attention need them.
`site_weights` is the list a budget is planned over: the calibration statistics' record of the traced sites, else
a trace, else these modules.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ..families import Structure, is_owned
from .sites import Site
from .trace import CapturedSite, model_sites


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


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """nn.Linear and HF Conv1D modules by path (a module reachable twice is one site, under its first name): the
    site list of last resort, for a budget with neither example inputs nor indexed statistics."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, Structure):
            continue  # installed by lrcompile: never a site for another rewrite
        if isinstance(m, nn.Linear) or (
            type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None and m.weight.dim() == 2
        ):
            found[name] = m
    return found


def site_weights(
    model: nn.Module, example_inputs=None, stats=None, *, nested: bool = False
) -> list[tuple[str, torch.Tensor, Optional[torch.Tensor]]]:
    """(fqn, dense weight (out, in), bias) of every linear site of `model` as the backend enumerates and names them
    (nn.Linear, Conv1D and functional sites): from the site list of `stats` (CalibrationStats: `calibrate` records
    it), else a trace of `model(example_inputs)` (`nested`: from inside a backend call). With neither, only
    nn.Linear / Conv1D modules can be listed — functional sites are then missing, and a warning says so."""
    got = stats.site_list(model) if stats is not None else None
    if got is not None:
        return got
    if example_inputs is not None:
        return [(s.fqn, s.dense_weight, s.bias) for s in model_sites(model, example_inputs, nested=nested)]
    mods = linear_modules(model)
    if any(p.dim() == 2 and not any(p is m.weight for m in mods.values()) for p in model.parameters()):
        warnings.warn(
            "lrcompile: sites listed from nn.Linear / Conv1D modules only (no example inputs or indexed "
            "calibration statistics to trace the model with): functional sites are left out",
            stacklevel=2,
        )
    return [
        (name, m.weight if isinstance(m, nn.Linear) else m.weight.T, getattr(m, "bias", None))
        for name, m in mods.items()
    ]
