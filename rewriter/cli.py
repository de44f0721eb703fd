"""`rewrite`: the command line.

    rewrite IN.onnx -o OUT.onnx [--rules R,..] [--rule-file my_rules.py] [--verify [--shape NAME:1x128]]
            [--explain RULE] [--report report.html] [--in-place]
    rewrite --list-rules
    rewrite verify ORIGINAL.onnx REWRITTEN.onnx [--shape ..] [--inputs x.npz] [--atol A --rtol R]
    rewrite shard MODEL.onnx --tp N -o DIR/          (tensor parallelism; see `rewrite shard --help`)
    rewrite verify-shards ORIGINAL.onnx DIR [--shape ..]
    rewrite build MODEL.onnx -o MODEL.engine ...     (TensorRT; see `rewrite build --help`)
    rewrite inspect MODEL.engine

Exit codes: 0 done, 1 the rewritten model does not match the original (nothing written), 2 bad
input (one line on stderr; the input is untouched and no output file is left behind), 128 + N
on signal N (SIGINT, SIGTERM: temporary files removed, the output whole or absent).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Sequence

from .errors import ArgumentParser, InputError, tolerance

SUBCOMMANDS = """commands:
  rewrite IN.onnx -o OUT.onnx ...       rewrite a model (this help)
  rewrite verify ORIG.onnx NEW.onnx     compare two models' outputs in ONNX Runtime (see verify --help)
  rewrite shard MODEL.onnx --tp N -o DIR  tensor-parallel rank models DIR/rank0.onnx.. (see shard --help)
  rewrite verify-shards ORIG.onnx DIR   run the rank models in lock step on the CPU, compare with ORIG
  rewrite build MODEL.onnx -o X.engine  build a TensorRT engine (see build --help)
  rewrite inspect X.engine              describe a TensorRT engine (see inspect --help)

exit codes: 0 done, 1 --verify mismatch (nothing written), 2 bad input (one error line),
130 interrupted, 143 terminated"""


#: Signals that end a run the way Ctrl-C does (temporary files removed, one line, 128 + N).
TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """SIGTERM (and SIGHUP) raise this where SIGINT raises KeyboardInterrupt, so that every
    cleanup that runs on Ctrl-C runs on them too."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    handled = TERMINATING_SIGNALS if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in handled}
    try:
        if argv and argv[0] == "verify":
            code = _verify_main(argv[1:])
        elif argv and argv[0] in ("shard", "verify-shards"):
            from . import shard_cli
            code = shard_cli.main(argv[0], argv[1:])
        elif argv and argv[0] in ("build", "inspect"):
            from fusegraph.plugins import engine_cli
            code = getattr(engine_cli, f"{argv[0]}_main")(argv[1:])
        else:
            code = _rewrite_main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except InputError as e:
        print(f"rewrite: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `rewrite --list-rules | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"rewrite: {'interrupted' if signum == signal.SIGINT else 'terminated'} "
              f"({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _rule_set(spec: str | None, files: list[str] | None = None):
    from .api import default_rules
    from .rule import RuleSet
    rules = default_rules()
    if files:
        rules = RuleSet(list(rules) + [r for path in files for r in _load_rule_file(path)])
    if spec is None:
        return rules
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise InputError(f"--rules {spec!r} names no rule (omit --rules to run them all)")
    return rules.select(names)


def _load_rule_file(path: str) -> list:
    """The `RULES` list of a user's Python file: patterns written as in patterns/*.py."""
    import importlib.machinery
    import importlib.util

    from .rule import Rule
    if not os.path.isfile(path):
        raise InputError(f"--rule-file {path}: no such file")
    # Read as Python source whatever its name ends with (spec_from_file_location gives no
    # spec for `rules.txt` or a model passed by mistake): what is not Python fails below.
    name = f"fusegraph_user_rules_{abs(hash(path))}"
    spec = importlib.util.spec_from_loader(name, importlib.machinery.SourceFileLoader(name, path))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except InputError as e:
        raise InputError(f"--rule-file {path}: {e}") from None
    except SystemExit as e:  # the file is imported, not run: exiting is not its call to make
        raise InputError(f"--rule-file {path}: called sys.exit({e.code!r}) while being imported") from None
    except Exception as e:  # the user's code: any failure is bad input, reported in one line
        raise InputError(f"--rule-file {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    rules = getattr(module, "RULES", None)
    if not isinstance(rules, (list, tuple)) or not all(isinstance(r, Rule) for r in rules):
        raise InputError(f"--rule-file {path}: define RULES, a list of fusegraph.Rule")
    return list(rules)


def _rewrite_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="rewrite", description="Fuse subgraphs of an ONNX model into fused ops.",
                       epilog=SUBCOMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="input .onnx file (never modified, nor its external data files)")
    p.add_argument("-o", "--output", help="where to write the rewritten model (atomically; weights of a model "
                   "with external data go to OUT.data beside it when OUT is in another folder)")
    p.add_argument("--in-place", action="store_true", help="allow -o to be the input model itself")
    p.add_argument("--rules", help="comma-separated rule names or prefixes ending in * (default: all)")
    p.add_argument("--rule-file", action="append", metavar="RULES.py",
                   help="a Python file defining RULES (a list of fusegraph.Rule) to add; repeatable")
    p.add_argument("--list-rules", action="store_true", help="list the rules and exit")
    p.add_argument("--explain", metavar="RULE", help="show near-misses of RULE: which node failed which constraint")
    p.add_argument("--verify", action="store_true", help="run original and rewritten in ONNX Runtime and compare "
                   "before writing: a mismatch writes nothing (exit 1)")
    p.add_argument("--shape", action="append", metavar="NAME:DIMS", help="input shape for --verify, e.g. input_ids:1x128")
    p.add_argument("--atol", type=tolerance, help="absolute tolerance for --verify (default by dtype)")
    p.add_argument("--rtol", type=tolerance, help="relative tolerance for --verify (default by dtype)")
    p.add_argument("--target", default="portable", choices=("portable", "onnxruntime", "tensorrt"),
                   help="lower the fused ops for this runtime (default portable: ONNX local functions)")
    p.add_argument("--report", metavar="REPORT.html", help="write an HTML report: each fusion drawn, every rule's "
                   "refusals with their reason, time per stage (with --json, the same data under \"report\")")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-canonicalize", action="store_true",
                   help="match the graph as exported (no constant folding, CSE or no-op removal first)")
    args = p.parse_args(argv)

    rules = _rule_set(args.rules, args.rule_file)
    if args.list_rules:
        if args.model:
            raise InputError(f"--list-rules lists the rules and reads no model ({args.model!r} given)")
        for r in rules.by_priority():
            print(f"{r.name:32s} {r.priority:4d}  {r.description}")
        return 0
    if not args.model:
        raise InputError("no input model (usage: rewrite IN.onnx -o OUT.onnx)")
    if not args.output and not args.explain and not args.report:
        raise InputError("no output file (-o OUT.onnx)")
    explain = args.explain
    if args.report:  # every rule explained and every fusion traced, for the report
        try:
            from .report import check_report_path
        except ImportError as e:
            raise InputError(f"--report needs {e.name} (pip install 'fusegraph[report]')") from None
        check_report_path(args.report, args.model, args.output)
        explain = [r.name for r in rules.by_priority()]
    shapes = None
    if args.verify:
        from .verify import parse_shapes
        shapes = parse_shapes(args.shape)

    from .api import rewrite_file, rewrite_with_report
    from .model_io import load_model
    start = time.perf_counter()
    diffs, dims = [], {}

    def verified(candidate: str) -> bool:
        diffs[:] = _run_verify(args.model, candidate, shapes, atol=args.atol, rtol=args.rtol, dims_used=dims)
        return all(d.ok for d in diffs)

    if args.output:
        report = rewrite_file(args.model, args.output, rules, explain=explain, in_place=args.in_place,
                              check=verified if args.verify else None,
                              progress=not args.no_progress and sys.stderr.isatty(), target=args.target,
                              canonicalize=not args.no_canonicalize, trace=bool(args.report))
    else:
        _, report = rewrite_with_report(load_model(args.model), rules, explain=explain, copy=False,
                                        base_dir=os.path.dirname(os.path.abspath(args.model)), source=args.model,
                                        target=args.target, canonicalize=not args.no_canonicalize,
                                        trace=bool(args.report))
    elapsed = time.perf_counter() - start
    summary = _summary(report, elapsed)
    written = args.output is not None and all(d.ok for d in diffs)
    if args.verify and args.output:
        summary["verify"] = [d.__dict__ for d in diffs]
        summary["verify_dims"] = dims
    if args.explain:
        summary["explain"] = _explanation(report, args.explain)
    summary["written"] = args.output if written else None
    if args.report:
        from .report import report_data, write_report
        data = report_data(report, [r.name for r in rules.by_priority()], source=args.model,
                           output=summary["written"])
        write_report(args.report, data)
        if args.json:
            summary["report"] = data
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary, args.output)
        if args.explain:
            _print_explain(summary["explain"])
        if args.report:
            print(f"wrote report {args.report}")
    return 0 if written or not args.output else 1


def _summary(report, elapsed: float) -> dict:
    ops = sorted(set(report.ops_before) | set(report.ops_after))
    return {
        "nodes_before": report.nodes_before,
        "nodes_after": report.nodes_after,
        "ops": {op: [report.ops_before.get(op, 0), report.ops_after.get(op, 0)] for op in ops},
        "canonicalized": dict(sorted(report.canonicalized.items())),
        "fusions": dict(sorted(report.per_rule.items())),
        "passes": report.passes,
        "attempts": report.attempts,
        "rewrite_seconds": round(report.seconds, 4),
        "stages": {stage: round(seconds, 4) for stage, seconds in report.stages.items()},
        "total_seconds": round(elapsed, 4),
        "rule_errors": {e.rule: {"count": e.count, "first": e.message} for e in report.errors.values()},
    }


def _print_summary(s: dict, output: str | None) -> None:
    print(f"nodes: {s['nodes_before']} -> {s['nodes_after']}   "
          f"({s['passes']} passes, rewrite {s['rewrite_seconds']:.3f}s, total {s['total_seconds']:.3f}s)")
    changed = {op: c for op, c in s["ops"].items() if c[0] != c[1]}
    if changed:
        print("ops changed:")
        for op, (before, after) in changed.items():
            print(f"  {op:32s} {before:6d} -> {after:6d}")
    if s["canonicalized"]:
        print("canonicalized:")
        for step, n in s["canonicalized"].items():
            print(f"  {step:32s} {n:6d}")
    if s["fusions"]:
        print("fusions:")
        for rule, n in s["fusions"].items():
            print(f"  {rule:32s} {n:6d}")
    else:
        print("fusions: none")
    if s.get("verify_dims"):
        print("verify dims: " + ", ".join(f"{k}={v}" for k, v in s["verify_dims"].items()))
    for d in s.get("verify", ()):
        verdict = "ok" if d["ok"] else "MISMATCH"
        print(f"verify {d['name']}: max abs {d['max_abs']:.3g}, max rel {d['max_rel']:.3g} "
              f"(atol {d['atol']:g}, rtol {d['rtol']:g}) {verdict}")
    for rule, e in s["rule_errors"].items():
        print(f"rewrite: warning: rule {rule!r} failed on {e['count']} candidate(s), left unfused: {e['first']}",
              file=sys.stderr)
    if s["written"]:
        print(f"wrote {s['written']}")
    elif output:
        print(f"not written: {output} (the rewritten model does not match the original)")


def _explanation(report, rule: str) -> dict:
    """Why RULE refused each candidate, deepest failures first."""
    misses = sorted((m for m in report.near_misses if m.rule == rule), key=lambda m: -m.depth)
    return {"rule": rule, "matches_rewritten": report.per_rule.get(rule, 0),
            "refused": [{"root": m.root, "reason": m.reason} for m in misses]}


def _print_explain(explanation: dict) -> None:
    refused = explanation["refused"]
    print(f"explain {explanation['rule']}: {explanation['matches_rewritten']} matches rewritten, "
          f"{len(refused)} candidates refused")
    for m in refused[:50]:
        print(f"  {m['root']}: {m['reason']}")
    if len(refused) > 50:
        print(f"  ... {len(refused) - 50} more")


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
    from .verify import add_comparison_options, diff_lines

    p = ArgumentParser(prog="rewrite verify", description="Compare two models' outputs in ONNX Runtime.")
    p.add_argument("original")
    p.add_argument("rewritten")
    add_comparison_options(p)
    args = p.parse_args(argv)
    from .model_io import load_model
    from .verify import parse_shapes
    for path in (args.original, args.rewritten):
        load_model(path)
    feeds = None
    if args.inputs:
        import numpy as np
        try:
            data = np.load(args.inputs)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise InputError(f"{args.inputs}: not an .npz archive of named arrays (np.savez writes one)")
            with data:
                feeds = {k: data[k] for k in data.files}
        except InputError:
            raise
        except Exception as e:  # zipfile, zlib, pickle and numpy each raise their own on a bad file
            raise InputError(f"{args.inputs}: cannot read inputs ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'corrupt'})") from None
    dims: dict[str, int] = {}
    diffs = _run_verify(args.original, args.rewritten, parse_shapes(args.shape), feeds=feeds,
                        atol=args.atol, rtol=args.rtol, seed=args.seed, dims_used=dims)
    if args.json:
        print(json.dumps([d.__dict__ for d in diffs], indent=2))
    else:
        print("\n".join(diff_lines(diffs, dims)))
    return 0 if all(d.ok for d in diffs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
