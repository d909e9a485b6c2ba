"""Policy rules: what a rule is, how it matches a site, and the checks every way of writing one shares.

A policy comes from YAML (policy/load.py), from a mapping of patterns to typed config objects (policy/typed.py)
or from a PEFT LoraConfig (policy/peft.py); all three build these Rule objects through `check_match`,
`check_method` and `finish_config`, so the same mistake gives the same one-line message. Errors name where:
`policy.yaml:12: rule 3 (match '*.mlp.*'): unknown option 'rnak' (did you mean 'rank'?)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import re
from typing import Callable, Optional, Union

from ..attention.config import ATTENTION_CONFIGS
from ..families import FAMILIES, FamilyView
from ..families.base import MethodConfig

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

    def reaches(self, fqn: str) -> bool:
        """Whether the rule is about this site at all (for 'matches no site'); a rule split in several by
        per-site options (PEFT's rank_pattern) reaches more sites than each part matches."""
        return self.matches(fqn)

    @property
    def group(self) -> object:
        """Rules of one group are reported together when none of them reaches a site."""
        return self.index

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

    def unmatched(self, names, kinds: tuple = ("linear",)) -> list[Rule]:
        """One rule per group of rules (of these kinds) that reaches none of `names`."""
        names = list(names)
        first: dict = {}
        hit: set = set()
        for r in self.rules:
            if r.kind in kinds and r.group is not None:  # None: never reported (PEFT's exclude_modules)
                first.setdefault(r.group, r)
                if r.group not in hit and any(r.reaches(n) for n in names):
                    hit.add(r.group)
        return [r for g, r in first.items() if g not in hit]

    @property
    def has_adapters(self) -> bool:
        """A rule installs an adapter that trains alone (PEFT style: `rewrite` freezes what the model had); an
        adapter whose base trains with it (`Structure.trains_base`, NOBLE) does not ask for that."""
        return any(r.method in ADAPTERS and not FAMILIES[r.method].trains_base for r in self.rules)


Fail = Callable[[Optional[str], str], None]  # (the key at fault or None, message) -> raises PolicyError


def check_default(key, value, fail: Callable[[str], None]) -> None:
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


def check_match(match, fail: Fail) -> None:
    """An exact module path, a glob, 're:REGEX' (full match, no nested repeats) or a list of names."""
    if match is None:
        fail("match", "missing 'match' (an exact module path, a glob, 're:REGEX', or a list of names)")
    if isinstance(match, list):
        if not match or not all(isinstance(m, str) for m in match):
            fail("match", "a 'match' list must hold module names (strings)")
    elif not isinstance(match, str):
        fail("match", f"'match' must be a string or a list of strings, got {type(match).__name__}")
    elif match.startswith("re:"):
        check_regex(match[3:], lambda msg: fail("match", msg))


def check_regex(pattern: str, fail: Callable[[str], None]) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        fail(f"bad regex {pattern!r}: {e}")
    if nested_repeat(pattern):
        fail(
            f"regex {pattern!r} repeats a repeated group (like (a+)+): it can backtrack without bound; write it "
            "without nesting"
        )


def check_method(kind, method, fail: Fail) -> None:
    if kind not in KINDS:
        fail("kind", f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
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


def finish_config(method: str, cfg: MethodConfig, has_budget: bool, fail: Fail) -> MethodConfig:
    """Validate and bind a config object made outside YAML (YAML's options go through `parse_config`, which does
    the same with the same message), then `check_knob`."""
    try:
        cfg.validate()
        cfg.bind()  # per-rule state, e.g. VeRA's projection scope
    except (TypeError, ValueError) as e:
        named = next((f.name for f in dataclasses.fields(cfg) if re.search(rf"\b{f.name}\b", str(e))), None)
        fail(named, f"method '{method}': {e}")
    check_knob(method, cfg, has_budget, fail)
    return cfg


def check_knob(method: str, cfg: MethodConfig, has_budget: bool, fail: Fail) -> None:
    """A family with a budget knob (rank) needs it set unless the policy has a budget."""
    knob = FAMILIES[method].budget_knob if method in FAMILIES else None
    if knob is not None and getattr(cfg, knob, 0) is None and not has_budget:
        what = " (int, or float fraction in (0, 1])" if knob == "rank" else ""
        fail("method", f"method {method!r} needs a '{knob}'{what} unless the policy sets a budget")


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
