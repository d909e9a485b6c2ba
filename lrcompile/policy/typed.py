"""Typed configs (torchao style): a policy written in Python as a mapping of patterns to config objects.

    lrcompile.rewrite(model, {"*.mlp.*": lrcompile.Monarch(blocks=4), "re:.*attn.*": lrcompile.LoRA(rank=16)}, x)

Each public class is its family's config dataclass (same fields, defaults and validation) that also names its
method, since one config class may serve two families (LoRA and DoRA share LoRAConfig). Keys are `match` patterns
as in YAML (exact path, glob, 're:REGEX'; a tuple is a PEFT-style list of names); values are config objects or
'dense'. Rules keep the mapping's order, first match wins; an attention config makes an attention rule. The key
"defaults" takes YAML's defaults mapping (min_features, max_error, strict, guard). Errors are YAML's, naming the
rule by its pattern since there is no file line.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json

from ..attention.config import ATTENTION_CONFIGS
from ..errors import PolicyError
from ..families import FAMILIES
from ..families.base import MethodConfig
from .rules import DEFAULT_KEYS, KEEP, Defaults, Policy, Rule, check_default, check_match, check_method, finish_config

SOURCE = "<policy>"


def _typed(public: str, method: str) -> type:
    base = FAMILIES[method].Config if method in FAMILIES else ATTENTION_CONFIGS[method].Config
    doc = f"`method: {method}` as a config object: the fields of {base.__name__}, with their defaults."
    return type(public, (base,), {"method": method, "__module__": "lrcompile", "__qualname__": public, "__doc__": doc})


LowRank = _typed("LowRank", "lowrank")
Monarch = _typed("Monarch", "monarch")
BTT = _typed("BTT", "btt")
BLAST = _typed("BLAST", "blast")
LoRA = _typed("LoRA", "lora")
DoRA = _typed("DoRA", "dora")
VeRA = _typed("VeRA", "vera")
NOBLE = _typed("NOBLE", "noble")
SDPA = _typed("SDPA", "sdpa")
FusedQKV = _typed("FusedQKV", "fused_qkv")
SharedKV = _typed("SharedKV", "shared_kv")
TYPED = (LowRank, Monarch, BTT, BLAST, LoRA, DoRA, VeRA, NOBLE, SDPA, FusedQKV, SharedKV)


def is_typed_mapping(policy) -> bool:
    """A dict with a config object among its values (a YAML-shaped dict has none)."""
    return isinstance(policy, dict) and any(isinstance(v, MethodConfig) for v in policy.values())


def method_of(cfg: MethodConfig) -> str:
    """The method a config object names: its public class's, else the one family or attention rewrite whose
    config class it is (a bare LoRAConfig is ambiguous: LoRA or DoRA)."""
    named = getattr(type(cfg), "method", None)
    if isinstance(named, str):
        return named
    owners = [n for n, c in FAMILIES.items() if c.Config is type(cfg)]
    owners += [n for n, c in ATTENTION_CONFIGS.items() if c.Config is type(cfg)]
    if len(owners) != 1:
        raise ValueError(
            f"a {type(cfg).__name__} is the config of {' and '.join(owners) or 'no method'}: use "
            f"{', '.join('lrcompile.' + t.__name__ for t in TYPED if t.method in owners) or 'a lrcompile config'}"
        )
    return owners[0]


def typed_policy(mapping: dict) -> Policy:
    mapping = dict(mapping)
    defaults = Defaults()
    given = mapping.pop("defaults", None) or {}
    if not isinstance(given, dict):
        raise PolicyError(f"{SOURCE}: defaults must be a mapping of {', '.join(DEFAULT_KEYS)}, got {given!r}")
    for key, value in given.items():
        if key not in DEFAULT_KEYS:
            raise PolicyError(f"{SOURCE}: defaults: unknown key {key!r} (known: {', '.join(DEFAULT_KEYS)})")
        check_default(key, value, lambda m: _raise(f"{SOURCE}: defaults: {m}"))
        setattr(defaults, key, value)
    rules = []
    for index, (match, cfg) in enumerate(mapping.items(), start=1):
        label = f"rule {index} (match {match!r})"

        def fail(key, msg, label=label):
            raise PolicyError(f"{SOURCE}: {label}: {msg}")

        if isinstance(match, tuple):
            match = list(match)
        check_match(match, fail)
        if cfg == KEEP or cfg is None:
            rules.append(Rule(index=index, line=None, match=match, kind="linear", method=KEEP, config=None))
            continue
        if not isinstance(cfg, MethodConfig):
            names = ", ".join(f"lrcompile.{t.__name__}(...)" for t in TYPED)
            fail(None, f"expected a config object ({names}) or 'dense', got {type(cfg).__name__}")
        try:
            method = method_of(cfg)
        except ValueError as e:
            fail(None, str(e))
        kind = "attention" if method in ATTENTION_CONFIGS else "linear"
        check_method(kind, method, fail)
        # the rule's own copy: `bind` gives it per-rule state (VeRA's projections), not the caller's object
        own = finish_config(method, copy.copy(cfg), False, fail)
        rules.append(Rule(index=index, line=None, match=match, kind=kind, method=method, config=own))
    described = [[m if not isinstance(m, tuple) else list(m), _describe(c)] for m, c in mapping.items()]
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]
    digest = hashlib.sha256(f"{digest}{sorted(given.items())}".encode()).hexdigest()[:16]
    return Policy(rules=rules, defaults=defaults, budget=None, source=SOURCE, digest=digest)


def _raise(msg: str):
    raise PolicyError(msg)


def _describe(cfg) -> object:
    if not isinstance(cfg, MethodConfig):
        return cfg
    return {"method": method_of(cfg), **dataclasses.asdict(cfg)}
