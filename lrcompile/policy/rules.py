"""Policy: YAML (path, text or dict) -> validated rules; `match(fqn, kind)` gives the first matching rule.

Errors are one line: `policy.yaml:12: rule 3 (match '*.mlp.*'): unknown option 'rnak' (did you mean 'rank'?)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import json
import math
import os
import re
from typing import Any, Optional, Union

import yaml

from ..attention.config import ATTENTION_CONFIGS
from ..errors import PolicyError
from ..families import FAMILIES, FamilyView, parse_config
from ..families.base import MethodConfig
from .budget import ALLOCATORS

TOP_KEYS = ("version", "defaults", "rules", "budget")
DEFAULT_KEYS = ("min_features", "max_error", "strict", "guard")
KINDS = ("linear", "attention")
# Methods that keep a site as it is, per kind; attention sites also take the rewrites of attention_config.py.
KEEP = "dense"
ATTENTION_METHODS = (KEEP, *ATTENTION_CONFIGS)
ADAPTERS = FamilyView(lambda cls: True if not cls.compressing else None)  # the families that add a branch to W


# When the autotuner may lower a compressing rewrite as the original dense layer (measured faster): 'dense' —
# wherever it is faster (lossy: gives back the memory the user asked to save); None (the default) — only where the
# rewrite is exact (Structure.exact: full rank, so dense is the same function and no larger); 'off' — never.
GUARDS = (None, "dense", "off")


@dataclasses.dataclass
class Defaults:
    min_features: int = 128
    max_error: Optional[float] = None
    strict: bool = False
    guard: Optional[str] = None


@dataclasses.dataclass
class Rule:
    index: int  # 1-based position in `rules`
    line: Optional[int]
    match: Union[str, list]
    kind: str
    method: str
    config: Optional[MethodConfig]  # None for `dense`
    max_error: Optional[float] = None
    min_features: Optional[int] = None
    guard: Optional[str] = None  # see GUARDS

    def matches(self, fqn: str) -> bool:
        pats = self.match if isinstance(self.match, list) else [self.match]
        for p in pats:
            if isinstance(self.match, list):  # PEFT style: exact name or dotted suffix
                if fqn == p or fqn.endswith("." + p):
                    return True
            elif p.startswith("re:"):
                if re.fullmatch(p[3:], fqn):
                    return True
            elif any(c in p for c in "*?["):
                if fnmatch.fnmatchcase(fqn, p):
                    return True
            elif fqn == p:
                return True
        return False

    @property
    def label(self) -> str:
        return f"rule {self.index} (match {self.match!r})"

    @property
    def compressing(self) -> bool:
        return self.method in FAMILIES and FAMILIES[self.method].compressing


@dataclasses.dataclass
class Policy:
    rules: list[Rule]
    defaults: Defaults
    budget: Optional[dict]
    source: str  # file name or "<policy>"
    digest: str  # hash of the normalised policy (plans and caches refer to it)

    def match(self, fqn: str, kind: str = "linear") -> Optional[Rule]:
        for rule in self.rules:
            if rule.kind == kind and rule.matches(fqn):
                return rule
        return None

    def where(self, rule: Rule) -> str:
        loc = f"{self.source}:{rule.line}" if rule.line else self.source
        return f"{loc}: {rule.label}"

    @property
    def has_adapters(self) -> bool:
        """A rule installs an adapter that trains alone (PEFT style: `rewrite` freezes what the model had); an
        adapter whose base trains with it (`Structure.trains_base`, NOBLE) does not ask for that."""
        return any(r.method in ADAPTERS and not FAMILIES[r.method].trains_base for r in self.rules)


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
    """Accept a path, YAML text, a dict or a Policy. None (no policy) stays None."""
    if policy is None or isinstance(policy, Policy):
        return policy
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
        _check_default(key, value, lambda m, line=line: err(line, f"defaults: {m}"))
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


def _check_default(key, value, fail):
    if key == "min_features" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        fail(f"min_features must be a non-negative int, got {value!r}")
    if (
        key == "max_error"
        and value is not None
        and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0)
    ):
        fail(f"max_error must be a non-negative number, got {value!r}")
    if key == "strict" and not isinstance(value, bool):
        fail(f"strict must be true or false, got {value!r}")
    if key == "guard" and value not in GUARDS:
        fail(f"guard must be one of {', '.join(repr(g) for g in GUARDS if g)}, got {value!r}")


def _rule(index, data, node, source, has_budget, err, line_of) -> Rule:
    line = line_of(node)
    keys = _child_nodes(node)
    if not isinstance(data, dict):
        err(line, f"rule {index}: a rule is a mapping with 'match' and 'method', got {type(data).__name__}")
    label = f"rule {index} (match {data.get('match')!r})"

    def fail(key, msg):
        err(line_of(keys.get(key)) or line, f"{label}: {msg}")

    match = data.get("match")
    if match is None:
        fail("match", "missing 'match' (an exact module path, a glob, 're:REGEX', or a list of names)")
    if isinstance(match, list):
        if not match or not all(isinstance(m, str) for m in match):
            fail("match", "a 'match' list must hold module names (strings)")
    elif not isinstance(match, str):
        fail("match", f"'match' must be a string or a list of strings, got {type(match).__name__}")
    elif match.startswith("re:"):
        try:
            re.compile(match[3:])
        except re.error as e:
            fail("match", f"bad regex {match[3:]!r}: {e}")
        if nested_repeat(match[3:]):
            fail(
                "match",
                f"regex {match[3:]!r} repeats a repeated group (like (a+)+): it can backtrack without "
                "bound; write it without nesting",
            )
    kind = data.get("kind", "linear")
    if kind not in KINDS:
        fail("kind", f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    method = data.get("method")
    known = (KEEP, *sorted(FAMILIES), *ATTENTION_CONFIGS)
    if method is None:
        fail("method", f"missing 'method' (known: {', '.join(known)})")
    if method not in known:
        near = difflib.get_close_matches(str(method), known, n=1)
        fail(
            "method",
            f"unknown method {method!r}"
            + (f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(known)})"),
        )
    if kind == "attention" and method not in ATTENTION_METHODS:
        fail(
            "method",
            f"method {method!r} does not apply to attention sites "
            f"(kind: attention takes: {', '.join(ATTENTION_METHODS)})",
        )
    if kind == "linear" and method in ATTENTION_CONFIGS:
        fail("method", f"method {method!r} applies to attention sites only (add 'kind: attention')")
    for key in ("max_error", "min_features"):
        if key in data:
            _check_default(key, data[key], lambda m, k=key: fail(k, m))
    if "guard" in data:
        _check_default("guard", data["guard"], lambda m: fail("guard", m))
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
        knob = FAMILIES[method].budget_knob if method in FAMILIES else None
        if knob is not None and getattr(config, knob, 0) is None and not has_budget:
            what = " (int, or float fraction in (0, 1])" if knob == "rank" else ""
            fail("method", f"method {method!r} needs a '{knob}'{what} unless the policy sets a budget")
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


def nested_repeat(pattern: str) -> bool:
    """A repetition inside a repetition (star height > 1), the shape of pattern that backtracks exponentially in
    Python's `re`; module paths never need one."""
    try:
        import re._parser as sre_parse  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse

    repeats = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None)}

    def walk(items, inside: bool) -> bool:
        for op, av in items:
            if op in repeats:
                lo, hi, sub = av
                if inside and hi != lo:
                    return True
                if walk(sub, inside or hi > 1):
                    return True
            elif op is sre_parse.SUBPATTERN:
                if walk(av[-1], inside):
                    return True
            elif op is sre_parse.BRANCH:
                if any(walk(b, inside) for b in av[1]):
                    return True
            elif op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
                if walk(av[1], inside):
                    return True
        return False

    try:
        return walk(sre_parse.parse(pattern), False)
    except Exception:  # noqa: BLE001 - re.compile already accepted it; be conservative
        return False
