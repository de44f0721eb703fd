"""What a rule library costs: file to file through the `rewrite` CLI, the way users run it.

    python benchmarks/bench_library.py                    # 100k nodes, and 1M for the scaling row
    python benchmarks/bench_library.py --no-million --repeat 1
    python benchmarks/bench_library.py --before-python /path/to/old/checkout/.venv/bin/python

On `synthetic.mlp_blocks` (4 nodes a block: MatMul+Add+Relu, which fuses, and a decoy: a
residual Add, a Tanh or Sigmoid of the Relu, or Mul(r, r)), side by side in one run, each a
fresh process timed from start to exit (start-up, load, rewrite, save), the best of `--repeat`:

- one rule (`--rules gemm_epilogue.matmul_act`);
- the default library (every rule in `fusegraph.patterns`);
- onnxscript's rewriter with the same single rule (MatMul+Add+Relu -> MatMulBiasRelu), also
  file to file: load, `onnx_ir` conversion, `apply_to_model`, save;
- a synthetic library of 500 rules: that rule and 499 generated op chains
  (`synthetic_rules.py`, none of which fires);
- the 1M-node graph with one rule and with the library (the scaling target);
- with `--before-python`, that checkout's CLI with its one rule (`--before-rule`) and library.

Wall and CPU seconds (user + system of the child) are both reported: on a shared machine the
load inflates wall time far more than CPU time.

Then attempts: rule match attempts (`Rewriter._try` calls) per fusion and per candidate node,
with dispatch and by brute force (every rule of a node's op type, `Rewriter(dispatch=False)`),
and under `--before-python` (another checkout's interpreter: the code before dispatch) on the
10k-node graph. It prints a markdown section for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from synthetic import mlp_blocks  # noqa: E402

ONE_RULE = "gemm_epilogue.matmul_act"
SYNTHETIC_RULES = os.path.join(HERE, "synthetic_rules.py")

ONNXSCRIPT = """
import sys, onnx, onnx_ir
from onnxscript.rewriter import pattern as orp

def target(op, x, w, b):
    return op.Relu(op.Add(op.MatMul(x, w), b))

def replacement(op, x, w, b):
    return op.MatMulBiasRelu(x, w, b, _domain="fusegraph")

model = onnx_ir.serde.deserialize_model(onnx.load(sys.argv[1]))
count = orp.RewriteRule(target, replacement).apply_to_model(model)
onnx.save(onnx_ir.serde.serialize_model(model), sys.argv[2])
print(count)
"""

#: Counts rule attempts (`Rewriter._try` calls) in-process, in this checkout or an older one.
ATTEMPTS = """
import importlib, json, sys, onnx
rw = importlib.import_module("fusegraph.rewrite")
from fusegraph.ir import Graph
from fusegraph.api import default_rules
calls = [0]
original = rw.Rewriter._try
def counting(self, *a, **k):
    calls[0] += 1
    return original(self, *a, **k)
rw.Rewriter._try = counting
rules = default_rules()
if len(sys.argv) > 3:
    sys.path.insert(0, sys.argv[3])
    import synthetic_rules
    rules = rules.select(["gemm_epilogue.matmul_act"]).rules + synthetic_rules.RULES
kw = {} if sys.argv[2] == "dispatch" else {"dispatch": False}
graph = Graph(onnx.load(sys.argv[1]))
report = rw.Rewriter(rules, **kw).run(graph)
print(json.dumps({"attempts": calls[0], "fusions": len(report.fusions), "nodes": report.nodes_before,
                  "candidates": getattr(report, "candidates", None), "rules": len(rules)}))
"""


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system: what a shared machine's load does not inflate
    as much) and stdout of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return elapsed, cpu, proc.stdout


def best_of(repeat: int, cmd: list[str]) -> tuple[float, float, str]:
    """The least wall time and the least CPU time of `repeat` runs."""
    runs = [timed(cmd) for _ in range(repeat)]
    return min(r[0] for r in runs), min(r[1] for r in runs), runs[0][2]


def rewrite_cmd(python: str, src: str, dst: str, *extra: str) -> list[str]:
    return [python, "-m", "fusegraph.cli", src, "-o", dst, "--json", "--no-progress", *extra]


def cli_row(label: str, repeat: int, src: str, dst: str, *extra: str, python: str = sys.executable) -> dict:
    seconds, cpu, out = best_of(repeat, rewrite_cmd(python, src, dst, *extra))
    summary = json.loads(out)
    print(f"  {label}: {seconds:.2f}s wall, {cpu:.2f}s CPU", file=sys.stderr)
    return {"label": label, "seconds": seconds, "cpu": cpu, "fusions": sum(summary["fusions"].values()),
            "attempts": summary.get("attempts"), "rewrite_s": summary["rewrite_seconds"]}


def attempts(python: str, path: str, mode: str, synthetic: bool = False) -> dict:
    cmd = [python, "-c", ATTEMPTS, path, mode] + ([HERE] if synthetic else [])
    return json.loads(timed(cmd)[2])


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return f"`nproc` = {nproc}; `lscpu | head`:\n\n```\n" + "\n".join(lscpu) + "\n```"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=25_000, help="MLP blocks (4 nodes each)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is kept")
    p.add_argument("--no-million", action="store_true", help="skip the 1M-node rows")
    p.add_argument("--no-onnxscript", action="store_true")
    p.add_argument("--before-python", help="an older checkout's python: its CLI and attempts, before dispatch")
    p.add_argument("--before-rule", default="gemm_epilogue.MatMulBiasRelu", help="the one rule's name there")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="bench_library_")
    graph = os.path.join(work, "g100k.onnx")
    small = os.path.join(work, "g10k.onnx")
    import onnx
    onnx.save(mlp_blocks(args.blocks), graph)
    onnx.save(mlp_blocks(args.blocks // 10), small)
    out = os.path.join(work, "out.onnx")
    nodes = 4 * args.blocks

    rows = [cli_row("one rule", args.repeat, graph, out, "--rules", ONE_RULE),
            cli_row("default library", args.repeat, graph, out),
            cli_row("500 rules", args.repeat, graph, out, "--rule-file", SYNTHETIC_RULES,
                    "--rules", f"{ONE_RULE},synth.*")]
    if args.before_python:
        rows += [cli_row("before: one rule", args.repeat, graph, out, "--rules", args.before_rule,
                         python=args.before_python),
                 cli_row("before: default library", args.repeat, graph, out, python=args.before_python)]
    if not args.no_onnxscript:
        seconds, cpu, count = best_of(args.repeat, [sys.executable, "-c", ONNXSCRIPT, graph, out])
        print(f"  onnxscript: {seconds:.2f}s wall, {cpu:.2f}s CPU", file=sys.stderr)
        rows.append({"label": "onnxscript, same rule", "seconds": seconds, "cpu": cpu, "fusions": int(count),
                     "attempts": None, "rewrite_s": None})
    million = []
    if not args.no_million:
        big = os.path.join(work, "g1m.onnx")
        onnx.save(mlp_blocks(10 * args.blocks), big)
        million = [cli_row("one rule, 10x nodes", 1, big, out, "--rules", ONE_RULE),
                   cli_row("default library, 10x nodes", 1, big, out)]

    counts = [("default library, dispatch", attempts(sys.executable, small, "dispatch")),
              ("default library, brute force", attempts(sys.executable, small, "brute")),
              ("500 rules, dispatch", attempts(sys.executable, small, "dispatch", True)),
              ("500 rules, brute force", attempts(sys.executable, small, "brute", True))]
    if args.before_python:
        counts.insert(0, ("default library, before dispatch (--before-python)",
                          attempts(args.before_python, small, "dispatch")))

    by = {r["label"]: r for r in rows}
    one = by["one rule"]
    print(f"### Rule library cost ({datetime.date.today().isoformat()}, `benchmarks/bench_library.py`)\n")
    print(machine() + "\n")
    print(f"File to file through the CLI on `synthetic.mlp_blocks({args.blocks})` ({nodes:,} nodes), "
          f"best of {args.repeat} fresh processes each:\n")
    print("| run | nodes | wall s | CPU s | rewrite s | fusions | attempts | wall vs one rule | CPU vs one rule |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows + million:
        n = nodes * (10 if "10x" in r["label"] else 1)
        rewrite_s = "-" if r["rewrite_s"] is None else f"{r['rewrite_s']:.2f}"
        att = "-" if r["attempts"] is None else f"{r['attempts']:,}"
        print(f"| {r['label']} | {n:,} | {r['seconds']:.2f} | {r['cpu']:.2f} | {rewrite_s} | {r['fusions']:,} | "
              f"{att} | {r['seconds'] / one['seconds']:.2f}x | {r['cpu'] / one['cpu']:.2f}x |")
    print()

    def ratio(a: dict, b: dict) -> str:
        return f"{a['seconds'] / b['seconds']:.2f}x wall, {a['cpu'] / b['cpu']:.2f}x CPU"
    lib = by["default library"]
    print(f"- default library / one rule: {ratio(lib, one)} (target <= 1.5x)")
    print(f"- 500 rules / one rule: {ratio(by['500 rules'], one)} (target <= 3x)")
    if "before: one rule" in by:
        print(f"- before dispatch (--before-python), default library / one rule: "
              f"{ratio(by['before: default library'], by['before: one rule'])}")
    if "onnxscript, same rule" in by:
        print(f"- onnxscript / fusegraph, same rule: {ratio(by['onnxscript, same rule'], one)} (target >= 5x)")
    if million:
        print(f"- 10x nodes / 1x, one rule: {ratio(million[0], one)}; library: {ratio(million[1], lib)} "
              f"(target <= 12x)")
    print(f"\nRule attempts on `mlp_blocks({args.blocks // 10})` ({nodes // 10:,} nodes), in-process:\n")
    print("| rules | attempts | fusions | attempts / fusion | candidate visits | attempts / candidate |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, c in counts:
        visits = c["candidates"]
        per = "-" if not visits else f"{c['attempts'] / visits:.2f}"
        print(f"| {label} ({c['rules']} rules) | {c['attempts']:,} | {c['fusions']:,} | "
              f"{c['attempts'] / max(c['fusions'], 1):.1f} | {'-' if visits is None else f'{visits:,}'} | {per} |")


if __name__ == "__main__":
    main()
