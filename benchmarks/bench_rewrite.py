"""How fast is the core? fusegraph vs onnxscript's rewriter, one MatMul+Relu rule, same graphs.

    python benchmarks/bench_rewrite.py                 # 1k, 10k, 100k, 1M nodes
    python benchmarks/bench_rewrite.py --sizes 1000 10000 --tools fusegraph

Each measurement runs in a fresh subprocess (so peak RSS is that run's own), on one core
(`taskset`-free: the work is single-threaded Python). "rewrite" is ModelProto in, ModelProto out:
building the tool's IR, matching, replacing, and writing the proto back; load and save of the
bytes are timed apart. Both tools must report the same number of matches.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic import transformer_like  # noqa: E402


def fusegraph_runner():
    """Imports and rule construction happen before the clock starts, for both tools."""
    from fusegraph import rewrite_with_report
    from fusegraph.api import default_rules
    rules = default_rules().select(["gemm_epilogue.matmul_act"])

    def run(model):
        out, report = rewrite_with_report(model, rules, copy=False)
        return out, report.ops_after["fusegraph.MatMulRelu"]
    return run


def onnxscript_runner():
    import onnx_ir
    from onnxscript.rewriter import pattern as orp

    def target(op, x, w):
        return op.Relu(op.MatMul(x, w))

    def replacement(op, x, w):
        return op.MatMulRelu(x, w, _domain="fusegraph")

    rule = orp.RewriteRule(target, replacement)

    def run(model):
        ir_model = onnx_ir.serde.deserialize_model(model)
        count = rule.apply_to_model(ir_model)
        return onnx_ir.serde.serialize_model(ir_model), count
    return run


def graphsurgeon_runner():
    """Not a rewriter: onnx-graphsurgeon's import + toposort + export alone, the floor under any
    rewriter built on its Graph (why fusegraph has its own IR)."""
    import onnx_graphsurgeon as gs

    def run(model):
        graph = gs.import_onnx(model)
        graph.toposort()
        return gs.export_onnx(graph), 0
    return run


RUNNERS = {"fusegraph": fusegraph_runner, "onnxscript": onnxscript_runner, "graphsurgeon-io": graphsurgeon_runner}


def measure(tool: str, nodes: int) -> dict:
    import onnx
    runner = RUNNERS[tool]()
    data = transformer_like(nodes).SerializeToString()
    t0 = time.perf_counter()
    model = onnx.load_from_string(data)
    t1 = time.perf_counter()
    out, matches = runner(model)
    t2 = time.perf_counter()
    size = len(out.SerializeToString())
    t3 = time.perf_counter()
    return {"tool": tool, "nodes": nodes, "matches": matches, "load_s": t1 - t0, "rewrite_s": t2 - t1,
            "save_s": t3 - t2, "out_bytes": size,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000, 1000000])
    p.add_argument("--tools", nargs="+", default=list(RUNNERS), choices=list(RUNNERS))
    p.add_argument("--one", nargs=2, metavar=("TOOL", "NODES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return
    tools = args.tools
    rows = []
    for n in args.sizes:
        for tool in tools:
            proc = subprocess.run([sys.executable, __file__, "--one", tool, str(n)], capture_output=True, text=True)
            if proc.returncode:
                print(f"{tool} at {n} nodes failed: {proc.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout))
            r = rows[-1]
            print(f"  {tool:10s} {n:>8d} nodes  rewrite {r['rewrite_s']:.3f}s", file=sys.stderr)
    print("| tool | nodes | matches | load s | rewrite s | nodes/s (rewrite) | save s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tool']} | {r['nodes']:,} | {r['matches']:,} | {r['load_s']:.3f} | {r['rewrite_s']:.3f} | "
              f"{r['nodes'] / r['rewrite_s']:,.0f} | {r['save_s']:.3f} | {r['peak_mb']:.0f} |")
    by = {(r["tool"], r["nodes"]): r for r in rows}
    fg = {n: by[("fusegraph", n)]["rewrite_s"] for n in args.sizes if ("fusegraph", n) in by}
    if 100000 in fg and 1000000 in fg:
        print(f"\nscaling: 1M / 100k rewrite time = {fg[1000000] / fg[100000]:.1f}x (target <= 12x)")
    for n in args.sizes:
        a, b = by.get(("fusegraph", n)), by.get(("onnxscript", n))
        if a and b:
            same = "same" if a["matches"] == b["matches"] else f"DIFFERENT ({a['matches']} vs {b['matches']})"
            print(f"{n:,} nodes: fusegraph {b['rewrite_s'] / a['rewrite_s']:.1f}x faster than onnxscript, "
                  f"matches {same}")


if __name__ == "__main__":
    main()
