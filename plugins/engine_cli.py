"""`rewrite build` and `rewrite inspect`: the command-line face of `fusegraph.plugins.engine`.

Both return an exit code: 0 on success, 2 for bad input (the InputError contract of the
`rewrite` CLI: one `rewrite: error: ...` line, then, for parse errors, one line per node).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fusegraph.errors import ArgumentParser, InputError
from fusegraph.model_io import check_output

from .engine import ParseError, build_engine, inspect_engine, parse_dims
from .tensorrt_shim import PRECISIONS


def _named_dims(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:DIMS such as input_ids:1x128, got {text!r}")
    try:
        return name, parse_dims(dims)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use bytes or a K/M/G suffix, e.g. 2G") from None


def _error(message: str, details: list[str] = (), as_json: dict | None = None) -> int:
    """Report bad input: JSON on stdout when asked for, the error (and details) on stderr, exit 2."""
    if as_json is not None:
        print(json.dumps(as_json, indent=1))
    print(f"rewrite: error: {message}", file=sys.stderr)
    for line in details:
        print(f"  {line}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="rewrite build", description="Build a TensorRT engine from an ONNX model and report "
        "what TensorRT made of it (unsupported nodes, fused ops, engine layers).")
    p.add_argument("model", help="ONNX model")
    p.add_argument("-o", "--output", required=True, help="engine file to write (a .json report goes beside it)")
    for prec in PRECISIONS:
        p.add_argument(f"--{prec}", action="append_const", const=prec, dest="precisions", default=[],
                       help=f"allow {prec} kernels (full TensorRT only; TensorRT-RTX takes precision from the model)")
    p.add_argument("--strongly-typed", action="store_true",
                   help="strongly typed network: tensor types come from the model (always so in TensorRT-RTX)")
    p.add_argument("--shape", action="append", type=_named_dims, default=[], metavar="NAME:DIMS",
                   help="fixed shape for a dynamic input, e.g. input_ids:1x128 (repeatable)")
    for which in ("min", "opt", "max"):
        p.add_argument(f"--{which}", action="append", type=_named_dims, default=[], metavar="NAME:DIMS",
                       help=f"{which} shape of a dynamic input's optimization profile")
    p.add_argument("--plugins", action="store_true",
                   help="register fusegraph's TensorRT plugins and let them take over fused ops "
                   "(parser plugin override); without it fused ops build from their local functions")
    p.add_argument("--rewrite", action="store_true", help="rewrite the model with fusegraph first")
    p.add_argument("--decomposable-attention", choices=("auto", "always", "never"), default="auto",
                   help="mark native attention decomposable: auto = only when the builder has no "
                   "dedicated kernel for it (default)")
    p.add_argument("--workspace", type=_size, help="workspace memory limit, e.g. 2G")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def inspect_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="rewrite inspect", description="Describe a TensorRT engine's layers and I/O.")
    p.add_argument("engine", help="engine file")
    p.add_argument("--plugins", action="store_true", help="register fusegraph's plugins before deserializing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _layers_text(layers: list[dict[str, str]] | None, source: str) -> list[str]:
    if layers is None:
        return [f"layers: unknown ({source})"]
    lines = [f"layers: {len(layers)} (from {source})"]
    for layer in layers:
        meta = layer.get("metadata", "").replace("\x1f", " ")
        lines.append(f"  {layer['type'] or '?':<16} {layer['name']}" + (f"  {meta}" if meta else ""))
    return lines


def _build_text(r: dict[str, Any]) -> str:
    e = r["engine_info"]
    parse = r["parse"]
    lines = [f"{r['model']} -> {r['engine']} ({r['backend']['flavour']} {r['backend']['version']})"]
    if "rewritten_model" in r:
        rw = r.get("rewrite") or {}
        fusions = ", ".join(f"{k} x{v}" for k, v in rw.get("fusions", {}).items()) or "no fusions"
        lines.append(f"rewritten with fusegraph first: {rw.get('nodes_before', '?')} -> "
                     f"{rw.get('nodes_after', '?')} nodes ({fusions})")
    lines.append(f"parsed: {parse['onnx_nodes']} ONNX nodes -> {parse['network_layers']} network layers, "
                 "0 unsupported")
    for i in r["inputs"]:
        prof = f"  min {i['min']} opt {i['opt']} max {i['max']}" if "min" in i else ""
        lines.append(f"input {i['name']}: {i['dtype']} {i['shape']}{prof}")
    a = r["attention"]
    if a["layers"]:
        lines.append(f"native attention layers: {', '.join(a['layers'])}")
        if a["decomposable"]:
            lines.append(f"  marked decomposable: {', '.join(a['decomposable'])} ({a['reason']})")
    if r.get("plugins_registered") is not None:
        lines.append(f"plugins registered: {', '.join(p['name'] for p in r['plugins_registered']) or 'none'}")
    for op in r["fused_ops"]:
        lines.append(f"fused op {op['node']} ({op['op']}): {op['implementation']}"
                     + (f" -> engine layers {', '.join(op['engine_layers'])}" if op["engine_layers"] else ""))
    lines.append(f"engine: {e['size_bytes']} bytes, built in {e['build_seconds']:.2f} s, layer types "
                 + ", ".join(f"{k} x{v}" for k, v in e["layer_types"].items()))
    lines += _layers_text(e["layers"], e["layer_source"])
    return "\n".join(lines)


def _inspect_text(r: dict[str, Any]) -> str:
    lines = [f"{r['engine']}: {r['size_bytes']} bytes ({r['backend']['flavour']} {r['backend']['version']})"]
    if "deserialize_error" in r:
        lines.append(f"not deserializable here: {r['deserialize_error']}")
    for t in r.get("io") or []:
        lines.append(f"io {t['name']}: {t.get('mode', 'INPUT')} {t['dtype']} {t['shape']}")
    lines += _layers_text(r["layers"], r["layer_source"])
    return "\n".join(lines)


def _profiles(args: argparse.Namespace) -> dict[str, dict[str, tuple[int, ...]]]:
    """Each input's --min/--opt/--max; an input given a fixed --shape too, or one of them twice,
    is refused (one of the two would be dropped silently)."""
    fixed = {name for name, _ in args.shape}
    if len(fixed) != len(args.shape):
        raise InputError(f"--shape {next(n for n, _ in args.shape if [m for m, _ in args.shape].count(n) > 1)!r} "
                         "is given twice")
    ranges: dict[str, dict[str, tuple[int, ...]]] = {}
    for which in ("min", "opt", "max"):
        for name, dims in getattr(args, which):
            if name in fixed:
                raise InputError(f"input {name!r} has a fixed --shape and a --{which}: give one or the other")
            if which in ranges.get(name, {}):
                raise InputError(f"--{which} {name!r} is given twice")
            ranges.setdefault(name, {})[which] = dims
    return ranges


def build_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_output(args.output)  # one rule with `rewrite -o`: the folder must exist, no device, no folder
        report = build_engine(
            args.model, args.output, precisions=tuple(args.precisions), strongly_typed=args.strongly_typed,
            shapes=dict(args.shape), ranges=_profiles(args), plugins=args.plugins,
            decomposable_attention=args.decomposable_attention, rewrite=args.rewrite,
            workspace=args.workspace)
    except ParseError as e:
        return _error(str(e), [f"node {x['node'] or '?'} ({x['op'] or '?'}): {x['reason']}"
                               + (f" [in local function {' > '.join(x['local_functions'])}]"
                                  if x["local_functions"] else "") for x in e.errors],
                      {"error": str(e), "unsupported": e.errors} if args.json else None)
    except InputError as e:
        return _error(str(e), as_json={"error": str(e)} if args.json else None)
    print(json.dumps(report, indent=1) if args.json else _build_text(report))
    return 0


def inspect_main(argv: list[str]) -> int:
    args = inspect_parser().parse_args(argv)
    try:
        report = inspect_engine(args.engine, plugins=args.plugins)
    except InputError as e:
        return _error(str(e), as_json={"error": str(e)} if args.json else None)
    print(json.dumps(report, indent=1) if args.json else _inspect_text(report))
    return 0
