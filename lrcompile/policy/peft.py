"""A PEFT config (a `LoraConfig` object, or the fields of an `adapter_config.json`) as a policy.

PEFT's matching is kept: `target_modules` as a list matches a module whose path equals an entry or ends with
`.<entry>`, as a string it is a regex matched in full; `exclude_modules` likewise keeps modules dense;
`rank_pattern` / `alpha_pattern` keys are regexes matched at the end of a path (`(.*\\.)?(key)$`), the first key
that matches wins. Each (rank key, alpha key) pair becomes one rule with its own LoRA config, all reported as one
group. What is set and does not map (target_parameters, layers_to_transform, modules_to_save, bias, other inits,
QA-LoRA, ...) is a one-line PolicyError naming the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Optional

from ..errors import PolicyError
from ..families import FAMILIES
from .rules import KEEP, Defaults, Policy, Rule, check_method, check_regex, finish_config

# Fields that change nothing lrcompile computes: bookkeeping, and layouts lrcompile reads from the module itself
# (fan_in_fan_out: a GPT-2 Conv1D is known by its type). layers_pattern only qualifies layers_to_transform.
IGNORED = {
    "peft_version",
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "inference_mode",
    "fan_in_fan_out",
    "megatron_core",
    "qalora_group_size",
    "layers_pattern",
    "runtime_config",
}
MAPPED = {
    "LORA": {
        "peft_type",
        "target_modules",
        "exclude_modules",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "use_dora",
        "rank_pattern",
        "alpha_pattern",
        "init_lora_weights",
        "bias",
    },
    "VERA": {
        "peft_type",
        "target_modules",
        "exclude_modules",
        "r",
        "vera_dropout",
        "d_initial",
        "projection_prng_key",
        "save_projection",
        "init_weights",
        "bias",
    },
}
LORA_INITS = {True: "kaiming", False: "random", "gaussian": "gaussian", "pissa": "pissa"}


def pattern_key(patterns, path: str) -> Optional[str]:
    """PEFT's `get_pattern_key`: the first key `k` with re.match(rf"(.*\\.)?({k})$", path), else None."""
    for k in patterns:
        if re.match(rf"(.*\.)?({k})$", path):
            return k
    return None


@dataclasses.dataclass
class PeftRule(Rule):
    """One (rank key, alpha key) part of a PEFT config's targets: matches a targeted module whose first matching
    rank_pattern / alpha_pattern keys are these (None: no key matches)."""

    rank_keys: tuple = ()
    alpha_keys: tuple = ()
    rank_key: Optional[str] = None
    alpha_key: Optional[str] = None
    what: str = "target_modules"

    def reaches(self, fqn: str) -> bool:
        return super().matches(fqn)

    def matches(self, fqn: str) -> bool:
        return (
            super().matches(fqn)
            and pattern_key(self.rank_keys, fqn) == self.rank_key
            and pattern_key(self.alpha_keys, fqn) == self.alpha_key
        )

    quiet: bool = False  # exclude_modules: PEFT says nothing when it excludes nothing

    @property
    def group(self) -> object:
        return None if self.quiet else self.what

    @property
    def label(self) -> str:
        target = self.match if isinstance(self.match, list) else self.match[3:]
        keys = [f"{n} {k!r}" for n, k in (("rank_pattern", self.rank_key), ("alpha_pattern", self.alpha_key)) if k]
        return f"{self.what} {target!r}" + (f" ({', '.join(keys)})" if keys else "")


def is_lora_config(obj) -> bool:
    """A PEFT LoraConfig (known by type, without importing peft)."""
    return any(c.__name__ == "LoraConfig" and c.__module__.startswith("peft.") for c in type(obj).__mro__)


def lora_config_policy(cfg) -> Policy:
    """A policy from a `peft.LoraConfig` object (its dataclass fields, as adapter_config.json would hold them)."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    fields["peft_type"] = getattr(fields.get("peft_type"), "value", fields.get("peft_type"))
    for key in ("target_modules", "exclude_modules"):
        if isinstance(fields.get(key), (set, frozenset)):
            fields[key] = sorted(fields[key])
    return peft_policy(fields, "LoraConfig")


def _unset(value) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, tuple, set, str)) and not value)


def peft_policy(fields: dict, source: str, weights_given: bool = False) -> Policy:
    """`fields`: a PEFT config's fields (untrusted when read from a file). `weights_given`: the adapter's weights
    are loaded after install, so the init is irrelevant (any init PEFT saved with is accepted)."""

    def fail(field, msg):
        raise PolicyError(f"{source}: {field}: {msg}")

    if not isinstance(fields, dict):
        raise PolicyError(f"{source}: a PEFT config is a mapping of its fields, got {type(fields).__name__}")
    peft_type = fields.get("peft_type")
    if peft_type not in MAPPED:
        fail("peft_type", f"{peft_type!r} has no lrcompile adapter (known: {', '.join(MAPPED)})")
    for key, value in fields.items():
        if not isinstance(key, str):
            fail(repr(key), "field names are strings")
        if key not in MAPPED[peft_type] and key not in IGNORED and not _unset(value):
            fail(key, f"set to {_short(value)}, which lrcompile does not map (leave it unset)")
    if fields.get("bias", "none") != "none":
        fail("bias", f"{fields['bias']!r}: lrcompile adapters keep the base bias as it is (only 'none' maps)")
    targets = _targets(fields.get("target_modules"), "target_modules", fail)
    if targets is None:
        fail("target_modules", "not set (PEFT would pick its per-architecture defaults): name the modules")
    excluded = _targets(fields.get("exclude_modules"), "exclude_modules", fail)
    rules: list[Rule] = []
    if excluded is not None:
        rules.append(PeftRule(index=1, line=None, match=excluded, kind="linear", method=KEEP, config=None))
        rules[-1].what = "exclude_modules"
        rules[-1].quiet = True
    if peft_type == "LORA":
        rules += _lora_rules(fields, targets, len(rules), source, weights_given, fail)
    else:
        rules += _vera_rules(fields, targets, len(rules), source, fail)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Policy(rules=rules, defaults=Defaults(), budget=None, source=source, digest=digest)


def _short(value, limit: int = 60) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _targets(value, field: str, fail):
    """A PEFT target spec as a Rule match: a list of names stays a list, a regex string becomes 're:…'."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == "all-linear":
            fail(field, "'all-linear' depends on PEFT's model-type tables: list the module names")
        check_regex(value, lambda m: fail(field, m))
        return "re:" + value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    fail(field, f"must be a regex string or a non-empty list of module names, got {_short(value)}")


def _patterns(fields: dict, field: str, fail) -> dict:
    pats = fields.get(field) or {}
    if not isinstance(pats, dict):
        fail(field, f"must be a mapping of regex -> value, got {_short(pats)}")
    for k in pats:
        if not isinstance(k, str) or not k:
            fail(field, f"keys are regexes (strings), got {_short(k)}")
        check_regex(rf"(.*\.)?({k})$", lambda m: fail(field, m))
    return pats


def _lora_rules(fields, targets, start: int, source: str, weights_given: bool, fail) -> list[Rule]:
    ranks, alphas = _patterns(fields, "rank_pattern", fail), _patterns(fields, "alpha_pattern", fail)
    init = fields.get("init_lora_weights", True)
    if weights_given:
        init = "kaiming"  # the saved weights replace whatever the init made
    elif not isinstance(init, (bool, str)) or init not in LORA_INITS:
        fail(
            "init_lora_weights",
            f"{_short(init)} has no lrcompile equivalent (maps: True, False, 'gaussian', 'pissa')",
        )
    else:
        init = LORA_INITS[init]
    method = "dora" if fields.get("use_dora", False) is True else "lora"
    for key in ("use_dora", "use_rslora"):
        if not isinstance(fields.get(key, False), bool):
            fail(key, f"must be true or false, got {_short(fields[key])}")
    rules = []
    for rk in [*ranks, None]:
        for ak in [*alphas, None]:
            cfg = FAMILIES[method].Config(
                init=init,
                rank=ranks[rk] if rk is not None else fields.get("r", 8),
                alpha=alphas[ak] if ak is not None else fields.get("lora_alpha", 8),
                dropout=fields.get("lora_dropout", 0.0),
                rslora=fields.get("use_rslora", False),
            )
            rule = PeftRule(
                index=start + len(rules) + 1,
                line=None,
                match=targets,
                kind="linear",
                method=method,
                config=None,
                rank_keys=tuple(ranks),
                alpha_keys=tuple(alphas),
                rank_key=rk,
                alpha_key=ak,
            )
            rule.config = _finish(method, cfg, rule, rk, ak, source)
            rules.append(rule)
    return rules


def _finish(method, cfg, rule: Rule, rk, ak, source: str):
    """finish_config with the PEFT field named: `r` -> rank (or rank_pattern[key]), `lora_alpha` -> alpha, …"""
    peft_name = {
        "rank": f"rank_pattern[{rk!r}]" if rk is not None else "r",
        "alpha": f"alpha_pattern[{ak!r}]" if ak is not None else "lora_alpha",
        "dropout": "lora_dropout" if method != "vera" else "vera_dropout",
        "rslora": "use_rslora",
        "seed": "projection_prng_key",
    }

    def fail(key, msg):
        raise PolicyError(f"{source}: {peft_name.get(key, key) if key else rule.label}: {msg}")

    check_method(rule.kind, method, fail)
    return finish_config(method, cfg, False, fail)


def _vera_rules(fields, targets, start: int, source: str, fail) -> list[Rule]:
    if fields.get("init_weights", True) is not True:
        fail("init_weights", f"{_short(fields['init_weights'])}: lrcompile's VeRA inits as PEFT's default (True)")
    cfg = FAMILIES["vera"].Config(
        rank=fields.get("r", 256),
        dropout=fields.get("vera_dropout", 0.0),
        d_initial=fields.get("d_initial", 0.1),
        seed=fields.get("projection_prng_key", 0),
    )
    rule = PeftRule(index=start + 1, line=None, match=targets, kind="linear", method="vera", config=None)
    rule.config = _finish("vera", cfg, rule, None, None, source)
    return [rule]
