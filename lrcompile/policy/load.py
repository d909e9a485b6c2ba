"""Policy from YAML (a path, YAML text or a dict of the same shape) -> validated rules.

A policy is untrusted input: parsed with PyYAML's safe loader, bounded in size, without aliases or duplicate keys,
and every error is one line naming the file, line and rule. A mapping of patterns to typed config objects and a
PEFT LoraConfig are accepted here too (`load_policy`), each by its own module.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from typing import Any, Optional, Union

import yaml

from ..attention.config import ATTENTION_CONFIGS
from ..errors import PolicyError
from ..families import FAMILIES, parse_config
from .budget import ALLOCATORS
from .rules import (
    DEFAULT_KEYS,
    KEEP,
    TOP_KEYS,
    Defaults,
    Policy,
    Rule,
    check_default,
    check_knob,
    check_match,
    check_method,
)

MAX_POLICY_BYTES = 1 << 20
MAX_NODES = 20_000


def _compose(text: str, source: str):
    """Parse YAML safely, keeping the node tree for line numbers. A policy is untrusted input: no aliases (a few
    hundred bytes of nested aliases expand to gigabytes), no duplicate keys (last-wins would change a rule
    unseen), and bounded size, checked on the node tree before anything is constructed."""
    if len(text) > MAX_POLICY_BYTES:
        raise PolicyError(f"{source}: policy larger than {MAX_POLICY_BYTES} bytes")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_tree(node, source)
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return data, node


def _check_tree(root, source: str) -> None:
    seen: set = set()
    stack = [root]
    while stack:
        n = stack.pop()
        if id(n) in seen:  # the composer hands the same node object to every alias of an anchor
            raise PolicyError(f"{source}:{n.start_mark.line + 1}: YAML aliases (*name) are not allowed in a policy")
        seen.add(id(n))
        if len(seen) > MAX_NODES:
            raise PolicyError(f"{source}: policy has more than {MAX_NODES} YAML nodes")
        if isinstance(n, yaml.MappingNode):
            keys: dict = {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in keys:
                        raise PolicyError(
                            f"{source}:{k.start_mark.line + 1}: duplicate key '{_short(k.value)}' "
                            f"(first at line {keys[k.value]})"
                        )
                    keys[k.value] = k.start_mark.line + 1
                stack.extend((k, v))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


def _short(value, limit: int = 60) -> str:
    s = value if isinstance(value, str) else repr(value)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _child_nodes(node) -> dict:
    """Key -> the key's own node (its line is where the key is written)."""
    if isinstance(node, yaml.MappingNode):
        return {k.value: k for k, v in node.value}
    return {}


def _value_nodes(node) -> dict:
    if isinstance(node, yaml.MappingNode):
        return {k.value: v for k, v in node.value}
    return {}


def load_policy(policy: Union[str, os.PathLike, dict, "Policy", None]) -> Optional[Policy]:
    """Accept a path, YAML text, a dict (YAML's shape, or patterns -> typed config objects), a PEFT LoraConfig or
    a Policy. None (no policy) stays None."""
    if policy is None or isinstance(policy, Policy):
        return policy
    from . import peft, typed

    if typed.is_typed_mapping(policy):
        return typed.typed_policy(policy)
    if peft.is_lora_config(policy):
        return peft.lora_config_policy(policy)
    node = None
    if isinstance(policy, dict):
        data, source = policy, "<policy>"
    else:
        text = str(policy)
        source = "<policy>"
        one_line = "\n" not in text
        if isinstance(policy, os.PathLike) or (one_line and (text.endswith((".yaml", ".yml")) or os.path.isfile(text))):
            if not os.path.isfile(text):
                raise PolicyError(f"policy file not found: {text}")
            source = os.path.basename(text)
            try:
                with open(text, "rb") as f:
                    raw = f.read(MAX_POLICY_BYTES + 1)
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PolicyError(f"{source}: not UTF-8 text (byte {e.start})") from None
            except OSError as e:
                raise PolicyError(f"{source}: cannot read the policy ({e.strerror})") from None
        try:
            data, node = _compose(text, source)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            loc = f"{source}:{mark.line + 1}" if mark else source
            what = (str(getattr(e, "problem", None) or e).strip().splitlines() or [type(e).__name__])[0]
            raise PolicyError(f"{loc}: not valid YAML: {what}") from None
    return _validate(data, node, source)


def _validate(data: Any, node, source: str) -> Policy:
    def err(line, msg):
        loc = f"{source}:{line}" if line else source
        raise PolicyError(f"{loc}: {msg}")

    def line_of(n):
        return n.start_mark.line + 1 if n is not None else None

    if not isinstance(data, dict):
        err(1, f"a policy is a mapping with keys {', '.join(TOP_KEYS)}; got {type(data).__name__}")
    top_nodes = _child_nodes(node)
    for key in data:
        if key not in TOP_KEYS:
            near = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            err(line_of(top_nodes.get(key)), f"unknown top-level key '{key}'{hint}")
    version = data.get("version", 1)
    if type(version) is not int or version != 1:  # not 1.0, not true
        err(line_of(top_nodes.get("version")), f"unsupported policy version {_short(version)} (known: 1)")

    defaults = Defaults()
    dnode = top_nodes.get("defaults")
    if not isinstance(data.get("defaults") or {}, dict):
        err(line_of(dnode), f"defaults must be a mapping of {', '.join(DEFAULT_KEYS)}, got {data['defaults']!r}")
    dnode = _value_nodes(node).get("defaults")
    for key, value in (data.get("defaults") or {}).items():
        line = line_of(_child_nodes(dnode).get(key)) or line_of(dnode)
        if key not in DEFAULT_KEYS:
            near = difflib.get_close_matches(str(key), DEFAULT_KEYS, n=1)
            err(line, f"defaults: unknown key '{key}'" + (f" (did you mean '{near[0]}'?)" if near else ""))
        check_default(key, value, lambda m, line=line: err(line, f"defaults: {m}"))
        setattr(defaults, key, value)

    budget = data.get("budget")
    if budget is not None:
        bline = line_of(top_nodes.get("budget"))
        kinds = [k for k in budget if k in ("params", "flops")] if isinstance(budget, dict) else []
        if len(kinds) != 1 or set(budget) - {kinds[0], "allocate"}:
            err(
                bline,
                "budget must be {params: F} or {flops: F} with F in (0, 1], optionally with allocate: "
                + " | ".join(ALLOCATORS),
            )
        if budget.get("allocate", ALLOCATORS[0]) not in ALLOCATORS:
            err(bline, f"budget allocate must be one of {', '.join(ALLOCATORS)}, got {budget['allocate']!r}")
        f = budget[kinds[0]]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0 < f <= 1):
            err(bline, f"budget fraction must be in (0, 1], got {f!r}")

    rules_data = data.get("rules")
    rnode = _value_nodes(node).get("rules")
    if rules_data is None:
        rules_data = []
    if not isinstance(rules_data, list):
        err(line_of(rnode), "rules must be a list of mappings")
    rule_nodes = rnode.value if isinstance(rnode, yaml.SequenceNode) else [None] * len(rules_data)
    rules = [
        _rule(i + 1, r, n, source, budget is not None, err, line_of)
        for i, (r, n) in enumerate(zip(rules_data, rule_nodes))
    ]
    digest = hashlib.sha256(
        json.dumps(
            {"rules": rules_data, "defaults": data.get("defaults"), "budget": budget}, sort_keys=True, default=str
        ).encode()
    ).hexdigest()[:16]
    return Policy(rules=rules, defaults=defaults, budget=budget, source=source, digest=digest)


def _rule(index, data, node, source, has_budget, err, line_of) -> Rule:
    line = line_of(node)
    keys = _child_nodes(node)
    if not isinstance(data, dict):
        err(line, f"rule {index}: a rule is a mapping with 'match' and 'method', got {type(data).__name__}")
    label = f"rule {index} (match {data.get('match')!r})"

    def fail(key, msg):
        err(line_of(keys.get(key)) or line, f"{label}: {msg}")

    match = data.get("match")
    check_match(match, fail)
    kind = data.get("kind", "linear")
    method = data.get("method")
    check_method(kind, method, fail)
    for key in ("max_error", "min_features"):
        if key in data:
            check_default(key, data[key], lambda m, k=key: fail(k, m))
    if "guard" in data:
        check_default("guard", data["guard"], lambda m: fail("guard", m))
    config = None
    if method == KEEP:
        extra = [k for k in data if k not in ("match", "method", "kind")]
        if extra:
            fail(extra[0], f"method 'dense' takes no options, got '{extra[0]}'")
    else:
        options = {k: v for k, v in data.items()}
        try:
            config = parse_config(FAMILIES.get(method) or ATTENTION_CONFIGS[method], options, "")
        except PolicyError as e:
            msg = str(e).lstrip(": ")
            # point at the offending key's line: the first option the message names
            named = re.search(r"unknown option '([^']+)'", msg)
            bad = (
                named.group(1)
                if named and named.group(1) in data
                else next(
                    (k for k in data if k not in ("match", "method") and re.search(rf"\b{re.escape(str(k))}\b", msg)),
                    None,
                )
            )
            fail(bad, msg)
        check_knob(method, config, has_budget, fail)
    return Rule(
        index=index,
        line=line,
        match=match,
        kind=kind,
        method=method,
        config=config,
        max_error=data.get("max_error"),
        min_features=data.get("min_features"),
        guard=data.get("guard"),
    )
