"""How long `rewrite --report` takes on a 128-layer Llama-like graph, and the graph it uses.

    python benchmarks/bench_report.py [--layers 128] [--out report.html]

The graph (`llama_like`) is a decoder stack written the way TorchScript exports Llama: RMSNorm
decomposed (Pow, ReduceMean, Add eps, Sqrt, Div, Mul gamma), Q/K/V projections of one input,
rotate-half RoPE on Q and K, causal attention with a constant mask, the output projection and
residual Adds, a SwiGLU MLP (SiLU as x·Sigmoid(x)). Each layer fuses into an RMSNorm or
SkipRMSNorm, one QKV MatMul, two RotaryEmbeddings, an attention, a SkipRMSNorm and a SwiGLU, so
the report has the fusions and the refusals of a real model, 128 times over. Prints the seconds of
the rewrite (traced and explained, as `--report` runs it) and of rendering the report.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "patterns"))
from graph_builder import Builder  # noqa: E402


def llama_like(layers: int, *, seq: int = 16, hidden: int = 64, heads: int = 4, opset: int = 17) -> onnx.ModelProto:
    """A `layers`-deep Llama-like decoder (batch 1, static shapes), float32."""
    b = Builder(np.float32)
    rng = np.random.default_rng(0)
    d = hidden // heads

    def weight(*shape):
        return b.weight(rng.standard_normal(shape) * 0.05)

    def rms_norm(x):
        var = b.reduce_mean(b.op("Pow", x, b.const(2.0)), [-1], opset)
        normed = b.op("Div", x, b.op("Sqrt", b.op("Add", var, b.const(1e-6))))
        return b.op("Mul", weight(hidden), normed)

    def heads_of(x):
        return b.op("Transpose", b.op("Reshape", x, b.const([1, seq, heads, d], np.int64)), perm=[0, 2, 1, 3])

    def rope(x):
        def part(start, end):
            return b.op("Slice", x, b.const([start], np.int64), b.const([end], np.int64), b.const([-1], np.int64))
        rotated = b.op("Concat", b.op("Neg", part(d // 2, d)), part(0, d // 2), axis=-1)
        return b.op("Add", b.op("Mul", x, "cos"), b.op("Mul", rotated, "sin"))

    causal = np.where(np.tril(np.ones((seq, seq), bool)), 0, np.finfo(np.float32).min)[None, None]
    x = "x"
    for _ in range(layers):
        h = rms_norm(x)
        q, k, v = (heads_of(b.op("MatMul", h, weight(hidden, hidden))) for _ in range(3))
        q, k = rope(q), rope(k)
        scores = b.op("Div", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])), b.const(float(np.sqrt(d))))
        probs = b.op("Softmax", b.op("Add", scores, b.const(causal)), axis=-1)
        attn = b.op("Transpose", b.op("MatMul", probs, v), perm=[0, 2, 1, 3])
        attn = b.op("MatMul", b.op("Reshape", attn, b.const([1, seq, hidden], np.int64)), weight(hidden, hidden))
        x = b.op("Add", x, attn)
        h = rms_norm(x)
        gate = b.op("MatMul", h, weight(hidden, 2 * hidden))
        mlp = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), b.op("MatMul", h, weight(hidden, 2 * hidden)))
        x = b.op("Add", x, b.op("MatMul", mlp, weight(2 * hidden, hidden)))
    table = [1, 1, seq, d]
    model = b.model({"x": [1, seq, hidden], "cos": table, "sin": table}, {rms_norm(x): [1, seq, hidden]}, opset)
    for n in model.graph.node:  # named like an exporter's nodes, after their output
        n.name = n.name or f"/{n.output[0]}"
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=128)
    p.add_argument("--out", default=None, help="write the report here (default: render only)")
    args = p.parse_args()
    from fusegraph.api import default_rules, rewrite_with_report
    from fusegraph.report import render_html, report_data
    model = llama_like(args.layers)
    names = [r.name for r in default_rules().by_priority()]
    start = time.perf_counter()
    _, report = rewrite_with_report(model, explain=names, trace=True)
    rewritten = time.perf_counter()
    page = render_html(report_data(report, names, source=f"llama_like({args.layers})"))
    rendered = time.perf_counter()
    if args.out:
        Path(args.out).write_text(page, encoding="utf-8")
    print(f"layers {args.layers}: nodes {report.nodes_before} -> {report.nodes_after}, "
          f"{len(report.fusions)} fusions, {len(report.near_misses)} refusals; "
          f"rewrite (traced, every rule explained) {rewritten - start:.2f} s, "
          f"report rendered {rendered - rewritten:.2f} s, {len(page) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
