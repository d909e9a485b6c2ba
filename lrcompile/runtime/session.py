"""Sessions: the state that every backend call made for one compiled model shares.

Dynamo may call the backend once per graph break, per recompile, and per block whose forward is compiled as
a frame of its own. Those calls share one policy, one report, one budget allocation and the factors made so
far, through a session keyed by the user's model and what makes two compiles the same (policy digest,
strictness, report path, calibration).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import weakref
from typing import Optional

import torch
from torch import nn

from ..families import Structure
from ..options import Options
from ..plan.report import Report
from ..policy.load import load_policy
from ..policy.rules import Policy


class Session:
    """State shared by every backend call made for one compiled model."""

    def __init__(self, policy: Optional[Policy], opts: Options, calibration):
        self.policy = policy
        self.report = Report()
        self.calibration = calibration  # held: its id is part of the session key
        self.orphans: dict = {}  # attention factors of sites whose module could not be found (lrcompile.attention)
        self.loose: dict = {}  # linear factors of such sites: id(weight) -> (weakref to the weight, structure)
        self.ranks: Optional[dict] = None  # the policy budget's allocation, planned once over the whole model
        self.warned: set = set()  # what this session has warned about (once each)
        self.frozen = False  # adapters installed: the model was frozen PEFT-style once (attach.freeze_for_adapters)

    def orphan(self, weight: torch.Tensor) -> Optional[Structure]:
        ref, struct = self.loose.get(id(weight), (None, None))
        return struct if ref is not None and ref() is weight else None  # an id can be reused after GC


_sessions: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
# Compiles whose root module was not found: keyed by the options dict the compile passes on every call (held by
# the session, so its id cannot be reused), a few at most.
_rootless: "collections.OrderedDict[tuple, Session]" = collections.OrderedDict()
ROOTLESS_KEEP = 8


def policy_for(opts: Options) -> Optional[Policy]:
    policy = load_policy(opts.policy)
    if policy is not None and opts.strict is not None and policy.defaults.strict != opts.strict:
        # a copy: a Policy object passed in is the user's
        policy = dataclasses.replace(policy, defaults=dataclasses.replace(policy.defaults, strict=opts.strict))
    return policy


def session_key(policy: Optional[Policy], opts: Options, calibration) -> tuple:
    """What makes two backend calls one session: the same policy (by digest), report, calibration and strictness
    — never `id(options)`, which a later dict can reuse once the first is collected."""
    calib = (
        None
        if calibration is None
        else (
            os.path.abspath(str(opts.calibration))
            if isinstance(opts.calibration, (str, os.PathLike))
            else id(calibration)
        )
    )
    return (
        policy.digest if policy is not None else None,
        policy.defaults.strict if policy is not None else None,
        os.path.abspath(opts.report) if opts.report else None,
        calib,
    )


def session_for(root: Optional[nn.Module], options: Optional[dict], opts: Options) -> Session:
    policy = policy_for(opts)
    from ..factorize.stats import as_stats

    calibration = as_stats(opts.calibration)
    key = session_key(policy, opts, calibration)
    if root is None:
        key = (id(options), *key)
        if key not in _rootless:
            _rootless[key] = Session(policy, opts, calibration)
            _rootless[key].options = options  # held: its id is in the key
            while len(_rootless) > ROOTLESS_KEEP:
                _rootless.popitem(last=False)
        return _rootless[key]
    per_root = _sessions.setdefault(root, {})
    if key not in per_root:
        per_root[key] = Session(policy, opts, calibration)
    return per_root[key]


def plan_budget(session: Session, model: Optional[nn.Module]) -> None:
    """The policy budget's ranks, planned once per session over the whole compiled model."""
    if session.policy is not None and session.policy.budget and session.ranks is None and model is not None:
        from ..capture.trace import call_inputs
        from ..policy.budget import plan_model

        # the site list: the calibration's, else a nested trace of this very call (functional sites included)
        session.ranks = plan_model(
            session.policy, model, session.calibration, example_inputs=call_inputs(model), nested=True
        )
