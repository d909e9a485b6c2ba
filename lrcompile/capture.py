"""Capture a model's sites eagerly: one Dynamo trace of `model(*example_inputs)` with a recording backend.

Used by `rewrite`, `calibrate` and `lrcompile check`, so that they see exactly the sites (and names) that the
backend sees under `torch.compile`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from .compat import dynamo_reset, frame_locals
from .resolve import root_module, site_module
from .sites import Site, find_sites


@dataclasses.dataclass
class CapturedSite:
    site: Site
    module: Optional[nn.Module]  # the module whose forward makes the call


def call_model(model: nn.Module, example_inputs):
    """`example_inputs` is a tuple of positional arguments or a dict of keyword arguments."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def capture_sites(model: nn.Module, example_inputs) -> list[CapturedSite]:
    """Every site of the model in call order (a module called twice appears once per call)."""
    found: list[CapturedSite] = []

    def record(gm, inputs, **_):
        sites = find_sites(gm, inputs)
        f_locals = frame_locals()
        root = root_module(sites, f_locals) or model
        for s in sites:
            found.append(CapturedSite(s, site_module(s, root, f_locals)))
        return gm.forward

    # Capture graphs hold the model's tensors; a reset drops them so rewritten weights can be freed, and
    # keeps these throwaway graphs out of the user's later compiles.
    dynamo_reset()
    try:
        with torch.no_grad():
            call_model(torch.compile(model, backend=record, dynamic=False), example_inputs)
    finally:
        dynamo_reset()
    for c in found:  # drop graph references (nodes hold fake tensors and the graph alive)
        c.site.node = c.site.input_node = c.site.weight_node = c.site.bias_node = None
    return found
