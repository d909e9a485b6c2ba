"""`lrcompile` command line: check a policy against a model, print a report, run the demo."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from .errors import LrcompileError


def _factory(spec: str):
    """`module:callable` returning a model or (model, example_inputs)."""
    mod, _, name = spec.partition(":")
    if not name:
        raise LrcompileError(f"--model {spec!r}: expected module:factory, e.g. lrcompile.models.tiny:demo_model")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise LrcompileError(f"--model {spec!r}: {e}") from None
    out = fn()
    if isinstance(out, tuple) and len(out) == 2:
        return out
    example = getattr(out, "example_inputs", None)
    if example is None:
        raise LrcompileError(f"--model {spec!r}: the factory must return (model, example_inputs)")
    return out, example() if callable(example) else example


def cmd_check(args) -> int:
    from .capture import capture_sites
    from .plan import decide
    from .policy import load_policy

    policy = load_policy(args.policy)
    print(f"{args.policy}: valid ({len(policy.rules)} rules"
          + (f", budget {policy.budget}" if policy.budget else "") + ")")
    if not args.model:
        return 0
    from tabulate import tabulate

    model, example = _factory(args.model)
    seen, rows = set(), []
    for c in capture_sites(model, example):
        s = c.site
        if (s.kind, s.fqn) in seen:
            continue
        seen.add((s.kind, s.fqn))
        d = decide(s, policy)
        shape = f"{s.in_features}→{s.out_features}" if s.kind == "linear" else s.form
        rows.append([s.fqn or "<root>", s.kind, shape, d.rule.label if d.rule else "-", d.method, d.status,
                     getattr(d.config, "rank", "") or "", d.reason or "; ".join(d.notes)])
    print(tabulate(rows, headers=["site", "kind", "shape", "rule", "method", "plan", "rank", "note"]))
    unmatched = [r for r in policy.rules if not any(r.kind == k and r.matches(f) for k, f in seen)]
    for r in unmatched:
        print(f"warning: {policy.where(r)} matches no site")
    matched = sum(1 for row in rows if row[3] != "-")
    print(f"{matched} of {len(rows)} sites matched by a rule; {len(unmatched)} rules match nothing")
    return 0


def cmd_report(args) -> int:
    from .report import format_table

    try:
        with open(args.report) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LrcompileError(f"{args.report}: cannot read report ({e})") from None
    print(format_table(data))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(d=args.d, layers=args.layers, batch=args.batch, seq=args.seq, reps=args.reps, report=args.report)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lrcompile", description="Low-rank / structured / adapter rewrites for torch.compile.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("check", help="validate a policy; with --model, list matched and unmatched sites")
    p.add_argument("policy")
    p.add_argument("--model", help="module:factory returning (model, example_inputs)")
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("report", help="print a report JSON written with options={'report': path}")
    p.add_argument("report")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("demo", help="compress the bundled transformer and compare it with the dense model")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--report", default=None, help="also write the report JSON here")
    p.set_defaults(fn=cmd_demo)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except LrcompileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
