"""`lrcompile` command line: check a policy against a model, print a report, run the demo, compress a model."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys

from .errors import LrcompileError, first_line
from .policy import examples


def _module(mod: str, spec: str):
    """A module by dotted name (the working directory first on the path, as `python -m` has it) or a .py file."""
    if mod.endswith(".py") or os.sep in mod:
        if not os.path.isfile(mod):
            raise LrcompileError(f"--model {spec!r}: no such file {mod}")
        loaded = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(mod))[0], mod)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(mod)


def _factory(spec: str):
    """`module:callable` or `path/to/file.py:callable` returning a model or (model, example_inputs). Whatever
    goes wrong in the user's code is one line saying where."""
    mod, _, name = spec.rpartition(":") if spec.count(":") else (spec, "", "")
    if not name or not mod:
        raise LrcompileError(
            f"--model {spec!r}: expected module:factory or file.py:factory, e.g. lrcompile.demo.tiny:demo_model"
        )
    try:
        module = _module(mod, spec)
    except LrcompileError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module: any failure is theirs to read in one line
        raise LrcompileError(f"--model {spec!r}: importing {mod} failed ({first_line(e)})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise LrcompileError(f"--model {spec!r}: {mod} has no callable {name!r}")
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001
        raise LrcompileError(f"--model {spec!r}: the factory raised {first_line(e)}") from None
    if isinstance(out, tuple) and len(out) == 2:
        return out
    example = getattr(out, "example_inputs", None)
    if example is None:
        raise LrcompileError(f"--model {spec!r}: the factory must return (model, example_inputs)")
    return out, example() if callable(example) else example


def _list_examples() -> int:
    from tabulate import tabulate

    rows = [[n, examples.summary(n)] for n in examples.names()]
    print(tabulate(rows, headers=["example", "what it does"], maxcolwidths=[None, 90]))
    print(f"in {examples.DIR}; use one by name (`lrcompile check compress-50 --model ...`) or by its path")
    return 0


def cmd_check(args) -> int:
    import torch

    from .capture.trace import call_model, capture_sites
    from .plan.build import decide
    from .policy.load import load_policy

    if args.examples:
        return _list_examples()
    if args.policy is None:
        raise LrcompileError("check: give a POLICY file (or an example's name; see `lrcompile check --examples`)")
    if not os.path.exists(args.policy):
        if args.policy.removesuffix(".yaml") in examples.names():
            args.policy = examples.path(args.policy)
        elif "\n" not in args.policy and ":" not in args.policy:
            raise LrcompileError(f"check: no policy file or example named {args.policy!r} (see --examples)")
    policy = load_policy(args.policy)
    print(
        f"{args.policy}: valid ({len(policy.rules)} rules"
        + (f", budget {policy.budget}" if policy.budget else "")
        + ")"
    )
    if not args.model:
        return 0
    from tabulate import tabulate

    model, example = _factory(args.model)
    seen, rows = set(), []
    try:  # eagerly first: a failure inside Dynamo's trace also logs torch's own multi-line error (2.14)
        with torch.no_grad():
            call_model(model, example)
        captured = capture_sites(model, example)
    except Exception as e:  # noqa: BLE001 - the user's model on the user's inputs
        raise LrcompileError(
            f"--model {args.model!r}: the model does not run on its example inputs ({first_line(e)})"
        ) from None
    for c in captured:
        s = c.site
        if (s.kind, s.fqn) in seen:
            continue
        seen.add((s.kind, s.fqn))
        d = decide(s, policy)
        shape = f"{s.in_features}→{s.out_features}" if s.kind == "linear" else s.form
        rows.append(
            [
                s.fqn or "<root>",
                s.kind,
                shape,
                d.rule.label if d.rule else "-",
                d.method,
                d.status,
                getattr(d.config, "rank", "") or "",
                d.reason or "; ".join(d.notes),
            ]
        )
    print(tabulate(rows, headers=["site", "kind", "shape", "rule", "method", "plan", "rank", "note"]))
    unmatched = [u for k in ("linear", "attention") for u in policy.unmatched([f for kk, f in seen if kk == k], (k,))]
    for r in unmatched:
        print(f"warning: {policy.where(r)} matches no site")
    matched = sum(1 for row in rows if row[3] != "-")
    print(f"{matched} of {len(rows)} sites matched by a rule; {len(unmatched)} rules match nothing")
    return 0


def cmd_report(args) -> int:
    from .plan.report import format_table

    try:
        with open(args.report) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise LrcompileError(f"{args.report}: cannot read report ({first_line(e)})") from None
    try:
        print(format_table(data))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise LrcompileError(
            f"{args.report}: not an lrcompile report ({first_line(e)}); write one with options={{'report': path}}"
        ) from None
    return 0


def cmd_demo(args) -> int:
    from .demo.run import run_demo

    run_demo(d=args.d, layers=args.layers, batch=args.batch, seq=args.seq, reps=args.reps, report=args.report)
    return 0


def _token_counts(text: str) -> list[int]:
    """`8x128,1024` -> [1024, 1024]: batch×seq products or plain token counts."""
    out = []
    for part in filter(None, (s.strip() for s in text.split(","))):
        try:
            n = 1
            for f in part.lower().split("x"):
                n *= int(f)
        except ValueError:
            raise LrcompileError(f"--shapes {text!r}: {part!r} is not a token count or BATCHxSEQ") from None
        if n < 1:
            raise LrcompileError(f"--shapes {text!r}: {part!r} has no tokens")
        out.append(n)
    return out


def cmd_warmup(args) -> int:
    from .policy.load import load_policy
    from .tune import warmup

    tokens = _token_counts(args.shapes) if args.shapes else None
    if args.from_log:
        specs, skipped = warmup.log_specs()
        for line in skipped:
            print(f"skipped: {line}", file=sys.stderr)
        source = "the shape log"
    else:
        if not (args.policy and args.model):
            raise LrcompileError("warmup: give --policy and --model, or --from-log")
        model, example = _factory(args.model)
        policy = load_policy(args.policy)
        try:
            specs = warmup.model_specs(model, example, policy)
        except LrcompileError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's model on the user's inputs
            raise LrcompileError(
                f"--model {args.model!r}: the model does not run on its example inputs ({first_line(e)})"
            ) from None
        source = args.model
    specs = warmup.expand(specs, tokens)
    s = warmup.tune_all(specs, args.budget)
    from .tune import cache

    print(
        f"warmup: {s['shapes']} shapes from {source}: {s['measured']} measured, {s['cached']} already cached"
        + (f", {s['failed']} failed" if s["failed"] else "")
        + f" in {s['seconds']:.1f} s; cache {cache.path()}"
    )
    return 1 if s["failed"] else 0


def _cache_row(key: str, e: dict, pick) -> list:
    """One `cache list` row; fields of the wrong type (an imported or edited file) show as '?'."""
    d = lambda v: v if isinstance(v, dict) else {}  # noqa: E731
    s = lambda v: v if isinstance(v, (str, int, float)) and not isinstance(v, bool) else "?"  # noqa: E731
    sp, env = d(e.get("spec")), d(e.get("env"))
    ms = {k: v for k, v in e["ms"].items() if isinstance(v, (int, float))}
    impl, _ = pick({"ms": ms}, dense_why=None)
    times = ", ".join(f"{k} {v:.3g}" for k, v in sorted(ms.items(), key=lambda kv: kv[1]))
    return [
        s(sp.get("family", key.split("|")[0])),
        f"{s(sp.get('in_features'))}→{s(sp.get('out_features'))}",
        s(sp.get("tokens")),
        s(sp.get("dtype")),
        s(env.get("device", "")),
        s(sp.get("size", "")),
        impl,
        times,
    ]


def cmd_cache(args) -> int:
    from tabulate import tabulate

    from .cache_dir import cache_root
    from .factorize import cache as factors
    from .tune import cache, shapelog
    from .tune.select import pick

    try:
        if args.action == "list":
            rows = []
            for key, e in sorted(cache.entries().items()):
                rows.append(_cache_row(key, e, pick))
            print(tabulate(rows, headers=["family", "shape", "tokens", "dtype", "device", "size", "chosen", "ms"]))
            print(f"{len(rows)} autotune entries in {cache.path()}")
            n, size = factors.summary()
            print(f"{n} factor entries ({size / 2**20:.1f} MiB) under {os.path.join(cache_root(), 'factors')}")
            print(f"{len(shapelog.read())} shapes in the shape log {shapelog.path()}")
        elif args.action == "clear":
            n, nf = cache.clear(), factors.clear()
            shapelog.clear()
            print(f"cleared {n} autotune entries, {nf} factor entries and the shape log under {cache_root()}")
        elif args.action == "export":
            print(f"exported {cache.export(args.file)} entries to {args.file}")
        else:
            print(f"imported {cache.import_(args.file)} entries from {args.file} into {cache.path()}")
    except (OSError, ValueError) as e:
        raise LrcompileError(f"cache {args.action}: {e}") from None
    return 0


def cmd_compress(args) -> int:
    from .lifecycle.compress import compress

    compress(
        args.model_dir,
        args.text,
        args.budget,
        args.out,
        heal_minutes=args.heal_minutes,
        batch_size=args.batch_size,
        max_length=args.max_length,
        progress=not args.quiet,
    )
    return 0


def _version() -> str:
    import torch

    from . import __version__

    return f"lrcompile {__version__} (torch {torch.__version__})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="lrcompile", description="Low-rank / structured / adapter rewrites for torch.compile."
    )
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("check", help="validate a policy; with --model, list matched and unmatched sites")
    p.add_argument("policy", nargs="?", help="a policy YAML file, or the name of a shipped example")
    p.add_argument("--model", help="module:factory returning (model, example_inputs)")
    p.add_argument("--examples", action="store_true", help="list the example policies shipped with lrcompile")
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("report", help="print a report JSON written with options={'report': path}")
    p.add_argument("report")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("demo", help="compress the bundled transformer and compare it with the dense model")
    p.add_argument("--d", type=int, default=512, help="model width (default 512)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    p.add_argument("--batch", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--reps", type=int, default=10, help="timed forward passes per model (default 10)")
    p.add_argument("--report", default=None, help="also write the report JSON here")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("warmup", help="fill the autotune cache for a model/policy's site shapes, or from the shape log")
    p.add_argument("--policy", help="policy YAML (with --model)")
    p.add_argument("--model", help="module:factory returning (model, example_inputs)")
    p.add_argument("--shapes", help="token counts to tune for, e.g. 8x128,1x2048 (default: those the example shows)")
    p.add_argument("--from-log", action="store_true", help="tune every shape recorded by earlier compiles")
    p.add_argument("--budget", type=float, default=0.5, help="timing seconds per distinct shape (default 0.5)")
    p.set_defaults(fn=cmd_warmup)
    p = sub.add_parser("compress", help="compress a local Hugging Face model to a parameter budget, from a text file")
    p.add_argument("model_dir", help="local Hugging Face model directory (config.json, weights, tokenizer)")
    p.add_argument("--budget", type=float, required=True, help="fraction of the blocks' linear parameters kept")
    p.add_argument("--text", required=True, help="UTF-8 text file, one unlabelled sentence per line")
    p.add_argument("--out", required=True, help="directory to save the compressed model, tokenizer and config in")
    p.add_argument("--heal-minutes", type=float, default=0.0, help="heal for at most this long (default 0: no heal)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per batch (default 32)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sentence at most (default 128)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_compress)
    p = sub.add_parser(
        "cache", help="list or clear lrcompile's caches (autotune, factors, shape log); export or import autotune"
    )
    p.add_argument("action", choices=["list", "clear", "export", "import"])
    p.add_argument("file", nargs="?", help="JSON file for export / import")
    p.set_defaults(fn=cmd_cache)
    args = ap.parse_args(argv)
    if args.fn is cmd_cache and args.action in ("export", "import") and not args.file:
        ap.error(f"cache {args.action} needs a FILE")
    try:
        return args.fn(args)
    except LrcompileError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
