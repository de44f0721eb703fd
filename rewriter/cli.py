"""`rewrite`: the command line.

    rewrite IN.onnx -o OUT.onnx [--rules R,..] [--rule-file my_rules.py] [--verify [--shape NAME:1x128]]
            [--explain RULE]
    rewrite --list-rules
    rewrite verify ORIGINAL.onnx REWRITTEN.onnx [--shape ..] [--inputs x.npz] [--atol A --rtol R]
    rewrite build MODEL.onnx -o MODEL.engine ...     (TensorRT; see `rewrite build --help`)
    rewrite inspect MODEL.engine

Exit codes: 0 done, 1 the rewritten model does not match the original, 2 bad input (one line on
stderr; the input is untouched and no output file is left behind).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Sequence

from .errors import ArgumentParser, InputError


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "verify":
            return _verify_main(argv[1:])
        if argv and argv[0] in ("build", "inspect"):
            from . import engine_cli
            return getattr(engine_cli, f"{argv[0]}_main")(argv[1:])
        return _rewrite_main(argv)
    except InputError as e:
        print(f"rewrite: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rewrite: interrupted", file=sys.stderr)
        return 130


def _rule_set(spec: str | None, files: list[str] | None = None):
    from .api import default_rules
    from .rule import RuleSet
    rules = default_rules()
    if files:
        rules = RuleSet(list(rules) + [r for path in files for r in _load_rule_file(path)])
    return rules if not spec else rules.select(s.strip() for s in spec.split(",") if s.strip())


def _load_rule_file(path: str) -> list:
    """The `RULES` list of a user's Python file: patterns written as in patterns/*.py."""
    import importlib.util
    import os

    from .rule import Rule
    if not os.path.isfile(path):
        raise InputError(f"--rule-file {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"fusegraph_user_rules_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except InputError as e:
        raise InputError(f"--rule-file {path}: {e}") from None
    except Exception as e:  # the user's code: any failure is bad input, reported in one line
        raise InputError(f"--rule-file {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    rules = getattr(module, "RULES", None)
    if not isinstance(rules, (list, tuple)) or not all(isinstance(r, Rule) for r in rules):
        raise InputError(f"--rule-file {path}: define RULES, a list of fusegraph.Rule")
    return list(rules)


def _rewrite_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="rewrite", description="Fuse subgraphs of an ONNX model into fused ops.")
    p.add_argument("model", nargs="?", help="input .onnx file (never modified)")
    p.add_argument("-o", "--output", help="where to write the rewritten model")
    p.add_argument("--rules", help="comma-separated rule names or prefixes ending in * (default: all)")
    p.add_argument("--rule-file", action="append", metavar="RULES.py",
                   help="a Python file defining RULES (a list of fusegraph.Rule) to add; repeatable")
    p.add_argument("--list-rules", action="store_true", help="list the rules and exit")
    p.add_argument("--explain", metavar="RULE", help="show near-misses of RULE: which node failed which constraint")
    p.add_argument("--verify", action="store_true", help="run original and rewritten in ONNX Runtime and compare")
    p.add_argument("--shape", action="append", metavar="NAME:DIMS", help="input shape for --verify, e.g. input_ids:1x128")
    p.add_argument("--atol", type=float, help="absolute tolerance for --verify (default by dtype)")
    p.add_argument("--rtol", type=float, help="relative tolerance for --verify (default by dtype)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    rules = _rule_set(args.rules, args.rule_file)
    if args.list_rules:
        for r in rules.by_priority():
            print(f"{r.name:32s} {r.priority:4d}  {r.description}")
        return 0
    if not args.model:
        raise InputError("no input model (usage: rewrite IN.onnx -o OUT.onnx)")
    if not args.output and not args.explain:
        raise InputError("no output file (-o OUT.onnx)")
    shapes = None
    if args.verify:
        from .verify import parse_shapes
        shapes = parse_shapes(args.shape)

    from .api import rewrite_file, rewrite_with_report
    from .model_io import load_model
    start = time.perf_counter()
    if args.output:
        report = rewrite_file(args.model, args.output, rules, explain=args.explain,
                              progress=not args.no_progress and sys.stderr.isatty())
    else:
        _, report = rewrite_with_report(load_model(args.model), rules, explain=args.explain, copy=False,
                                        source=args.model)
    elapsed = time.perf_counter() - start
    summary = _summary(report, elapsed)
    diffs = None
    if args.verify and args.output:
        diffs = _run_verify(args.model, args.output, shapes, atol=args.atol, rtol=args.rtol)
        summary["verify"] = [d.__dict__ for d in diffs]
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary, args.output)
        if args.explain:
            _print_explain(report, args.explain)
    if diffs is not None and not all(d.ok for d in diffs):
        return 1
    return 0


def _summary(report, elapsed: float) -> dict:
    ops = sorted(set(report.ops_before) | set(report.ops_after))
    return {
        "nodes_before": report.nodes_before,
        "nodes_after": report.nodes_after,
        "ops": {op: [report.ops_before.get(op, 0), report.ops_after.get(op, 0)] for op in ops},
        "fusions": dict(sorted(report.per_rule.items())),
        "passes": report.passes,
        "attempts": report.attempts,
        "rewrite_seconds": round(report.seconds, 4),
        "total_seconds": round(elapsed, 4),
    }


def _print_summary(s: dict, output: str | None) -> None:
    print(f"nodes: {s['nodes_before']} -> {s['nodes_after']}   "
          f"({s['passes']} passes, rewrite {s['rewrite_seconds']:.3f}s, total {s['total_seconds']:.3f}s)")
    changed = {op: c for op, c in s["ops"].items() if c[0] != c[1]}
    if changed:
        print("ops changed:")
        for op, (before, after) in changed.items():
            print(f"  {op:32s} {before:6d} -> {after:6d}")
    if s["fusions"]:
        print("fusions:")
        for rule, n in s["fusions"].items():
            print(f"  {rule:32s} {n:6d}")
    else:
        print("fusions: none")
    for d in s.get("verify", ()):
        verdict = "ok" if d["ok"] else "MISMATCH"
        print(f"verify {d['name']}: max abs {d['max_abs']:.3g}, max rel {d['max_rel']:.3g} "
              f"(atol {d['atol']:g}, rtol {d['rtol']:g}) {verdict}")
    if output:
        print(f"wrote {output}")


def _print_explain(report, rule: str) -> None:
    misses = sorted(report.near_misses, key=lambda m: -m.depth)
    fired = report.per_rule.get(rule, 0)
    print(f"explain {rule}: {fired} matches rewritten, {len(misses)} candidates refused")
    for m in misses[:50]:
        print(f"  {m.root}: {m.reason}")
    if len(misses) > 50:
        print(f"  ... {len(misses) - 50} more")


def _run_verify(original: str, rewritten: str, shapes, **kw):
    """verify_models, with ONNX Runtime refusing a model or an input reported as bad input."""
    from .verify import verify_models
    try:
        return verify_models(original, rewritten, shapes, **kw)
    except InputError:
        raise
    except Exception as e:  # onnxruntime raises its own exception types for bad feeds and models
        raise InputError(f"ONNX Runtime: {str(e).splitlines()[0]}") from None


def _verify_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="rewrite verify", description="Compare two models' outputs in ONNX Runtime.")
    p.add_argument("original")
    p.add_argument("rewritten")
    p.add_argument("--shape", action="append", metavar="NAME:DIMS")
    p.add_argument("--inputs", help=".npz file with the input arrays")
    p.add_argument("--atol", type=float)
    p.add_argument("--rtol", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from .model_io import load_model
    from .verify import parse_shapes
    for path in (args.original, args.rewritten):
        load_model(path)
    feeds = None
    if args.inputs:
        import numpy as np
        try:
            with np.load(args.inputs) as data:
                feeds = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise InputError(f"{args.inputs}: cannot read inputs ({e})") from None
    diffs = _run_verify(args.original, args.rewritten, parse_shapes(args.shape), feeds=feeds,
                        atol=args.atol, rtol=args.rtol, seed=args.seed)
    if args.json:
        print(json.dumps([d.__dict__ for d in diffs], indent=2))
    else:
        for d in diffs:
            print(f"{d.name}: max abs {d.max_abs:.3g}, max rel {d.max_rel:.3g} "
                  f"(atol {d.atol:g}, rtol {d.rtol:g}) {'ok' if d.ok else 'MISMATCH'}")
    return 0 if all(d.ok for d in diffs) else 1
if __name__ == "__main__":
    raise SystemExit(main())
