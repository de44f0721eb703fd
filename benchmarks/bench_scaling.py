"""Deep models, file to file: fusegraph, onnxscript and ONNX Runtime's optimizer on the same Llamas.

Why: a rewriter that fuses a 2-layer export can still miss every block of a 128-layer one (a
batch-1 static TorchScript export spells its masks and repeat_kv shapes as computations over
constants), or take minutes or many times the model's size in memory on it. This measures the
issue-11 targets on tiny-width Llamas of 8, 32 and 128 layers, exported by TorchScript (opset
17) and dynamo (opset 18), static at batch 1:

* fusegraph: `rewrite_file` with the default rules, canonicalization included;
* onnxscript's ORT fusions (`optimize_for_ort`), file loaded and saved by onnx_ir;
* ONNX Runtime's transformers optimizer (`optimize_model`, model_type "qwen3" as in
  bench_coverage.py, opt_level 0: its offline Python fusions only);
* the canonicalizer alone (`rewrite_file` with no rules): outputs equal to the original's in
  ONNX Runtime (bit for bit) and the file never more than 1% larger.

Every measurement is a fresh subprocess: seconds are file in to file out (load, rewrite,
save), wall and CPU (the process's own: on a shared machine the wall time is mostly waiting
for a core), memory is that process's peak RSS (`VmHWM`: getrusage's maxrss would carry over the
measuring parent's, inherited through fork and exec), beside the model file's size and the
interpreter's own peak with the tool imported, so the rewrite's share can be read off (the table's
multiple of the file is that share: issue 11's target is 3x). The attention
blocks fused are counted in the output (fusegraph's own ops and the peers' ORT ops).

    # the models (needs torch + transformers, e.g. /work/bench-venv/bin/python); written to /tmp
    python benchmarks/bench_scaling.py generate --out /tmp/fg_scaling --layers 8 32 128
    python benchmarks/bench_scaling.py generate --out /tmp/fg_scaling --attn eager --exporters torchscript
    # the table
    python benchmarks/bench_scaling.py measure --dir /tmp/fg_scaling [--tools fusegraph canonicalize]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: Tiny Llama width (the corpus's): the file grows with depth, not width.
CONFIG = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
              vocab_size=128, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
              use_cache=False)
SEQ = 32
EXPORTERS = {"torchscript": (False, 17), "dynamo": (True, 18)}


# -- generating (torch + transformers) -------------------------------------------------------
def generate(out: Path, layers: list[int], exporters: list[str], attn: str = "sdpa") -> None:
    import contextlib
    import io
    import warnings

    import onnx
    import torch
    import transformers

    class LastHidden(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state

    out.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, SEQ, dtype=torch.int64)
    for n in layers:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(num_hidden_layers=n, **CONFIG)
        model = LastHidden(transformers.LlamaModel._from_config(cfg, attn_implementation=attn).eval())
        for name in exporters:
            dynamo, opset = EXPORTERS[name]
            path = out / f"llama{n}-{attn}-{name}-static.onnx"
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                    warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                if dynamo:
                    torch.onnx.export(model, (ids, mask), dynamo=True, opset_version=opset,
                                      input_names=["input_ids", "attention_mask"],
                                      output_names=["last_hidden_state"]).save(str(path))
                else:
                    torch.onnx.export(model, (ids, mask), str(path), dynamo=False, opset_version=opset,
                                      input_names=["input_ids", "attention_mask"],
                                      output_names=["last_hidden_state"])
            proto = onnx.load(str(path))
            print(f"{path.name}: {len(proto.graph.node)} nodes, {path.stat().st_size / 2**20:.1f} MiB, "
                  f"exported in {time.perf_counter() - t0:.0f} s", flush=True)


# -- measuring (one tool on one file per process) --------------------------------------------
def _fusegraph(src: str, dst: str, rules=None):
    from fusegraph.api import default_rules, rewrite_file
    rule_set = default_rules() if rules is None else rules
    return lambda: rewrite_file(src, dst, rule_set)


def _canonicalize(src: str, dst: str):
    return _fusegraph(src, dst, rules=[])


def _onnxscript(src: str, dst: str):
    import onnx_ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    def run():
        model = onnx_ir.load(src)
        optimize_for_ort(model)
        onnx_ir.save(model, dst)
    return run


def _ort_transformers(src: str, dst: str):
    from onnxruntime.transformers.optimizer import optimize_model

    def run():
        optimize_model(src, model_type="qwen3", num_heads=CONFIG["num_attention_heads"],
                       hidden_size=CONFIG["hidden_size"], opt_level=0).save_model_to_file(dst)
    return run


TOOLS = {"fusegraph": _fusegraph, "canonicalize": _canonicalize, "onnxscript": _onnxscript,
         "ort-transformers": _ort_transformers}


def peak_rss_mb() -> float:
    """This process's peak resident set (its own address space's high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_one(tool: str, src: str, dst: str) -> dict:
    import logging
    logging.disable(logging.WARNING)
    run = TOOLS[tool](src, dst)  # imports before the clock starts
    baseline = peak_rss_mb()
    cpu0, t0 = time.process_time(), time.perf_counter()
    run()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"seconds": seconds, "cpu_s": cpu, "peak_mb": peak_rss_mb(), "baseline_mb": baseline}


def attention_fused(path: str) -> int:
    import onnx
    from bench_coverage import count_categories, fusegraph_categories
    model = onnx.load(path, load_external_data=False)
    return max(count_categories(model)["attention"], fusegraph_categories(model)["attention"])


def same_outputs(original: str, canonical: str) -> bool:
    """Both models' outputs in ONNX Runtime CPU, bit for bit, on one random batch."""
    import numpy as np
    import onnxruntime as ort
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, CONFIG["vocab_size"], (1, SEQ), dtype=np.int64),
             "attention_mask": np.ones((1, SEQ), np.int64)}
    outs = [ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, feeds) for p in (original, canonical)]
    return all(np.array_equal(a, b) for a, b in zip(*outs))


def measure(directory: Path, tools: list[str], timeout: float, pattern: str = "llama*-static.onnx") -> list[dict]:
    rows = []
    for src in sorted(directory.glob(pattern), key=lambda p: (int(p.name[5:].split("-")[0]), p.name)):
        for tool in tools:
            dst = str(directory / "out" / f"{src.stem}.{tool}.onnx")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            row = {"file": src.name, "tool": tool, "file_mb": src.stat().st_size / 2**20}
            try:
                proc = subprocess.run([sys.executable, __file__, "one", tool, str(src), dst],
                                      capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                row["error"] = f"over {timeout:.0f} s"
            else:
                if proc.returncode:
                    row["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1][:120]
                else:
                    row |= json.loads(proc.stdout.strip().splitlines()[-1])
                    row["attention"] = attention_fused(dst)
                    row["out_mb"] = os.path.getsize(dst) / 2**20
                    if tool == "canonicalize":
                        row["equal"] = same_outputs(str(src), dst)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| file | MiB | tool | attention | wall s | CPU s | peak RSS MB (import baseline) | "
             "peak over baseline / file | out MiB |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['file']} | {r['file_mb']:.1f} | {r['tool']} | – | {r['error']} | – | – | – | – |")
            continue
        extra = ""
        if r["tool"] == "canonicalize":
            extra = f" ({'equal' if r['equal'] else 'DIFFERENT'} outputs, {r['out_mb'] / r['file_mb'] - 1:+.2%} size)"
        cpu = f"{r['cpu_s']:.2f}" if "cpu_s" in r else "–"
        lines.append(f"| {r['file']} | {r['file_mb']:.1f} | {r['tool']} | {r['attention']} | {r['seconds']:.2f} | {cpu} | "
                     f"{r['peak_mb']:.0f} ({r['baseline_mb']:.0f}) | {(r['peak_mb'] - r['baseline_mb']) / r['file_mb']:.1f}x | "
                     f"{r['out_mb']:.1f}{extra} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--out", type=Path, default=Path("/tmp/fg_scaling"))
    g.add_argument("--layers", type=int, nargs="+", default=[8, 32, 128])
    g.add_argument("--exporters", nargs="+", default=list(EXPORTERS), choices=list(EXPORTERS))
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                   help="HF attention implementation (onnxscript's fusions match eager Llama attention only)")
    m = sub.add_parser("measure")
    m.add_argument("--dir", type=Path, default=Path("/tmp/fg_scaling"))
    m.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS))
    m.add_argument("--timeout", type=float, default=1200, help="seconds one tool may take on one file")
    m.add_argument("--glob", default="llama*-static.onnx", help="which files of --dir")
    one = sub.add_parser("one")
    one.add_argument("tool", choices=list(TOOLS))
    one.add_argument("src")
    one.add_argument("dst")
    args = p.parse_args()
    if args.cmd == "generate":
        generate(args.out, args.layers, args.exporters, args.attn)
    elif args.cmd == "one":
        print(json.dumps(measure_one(args.tool, args.src, args.dst)))
    else:
        print(table(measure(args.dir, args.tools, args.timeout, args.glob)))


if __name__ == "__main__":
    main()
