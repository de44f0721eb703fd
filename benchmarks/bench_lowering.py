"""Which form of each fused op runs fastest in ONNX Runtime? The measurements behind `--target`.

For each fused op, one block as exporters write it (HF Llama's RMSNorm and residual, BERT's
erf GELU and residual LayerNorm, alone and after its Linear with symbolic batch and sequence
dims, attention's Q/K/V projections, GPT-2's tanh GELU, a Linear + GELU, Llama's SwiGLU MLP and
rotate-half RoPE, eager attention with a padding mask and with a causal one) at a realistic
size (hidden 512, 8 heads of 64, batch 1, sequence `--seq`; 1 is a decode step's), timed in
ONNX Runtime's CPU provider (1 thread, default graph optimizations) as

* `original`: the decomposition as exported;
* `portable`: fusegraph's rewrite (the fused op with its local function, which ONNX Runtime
  inlines);
* `onnxruntime`: the same rewrite lowered with `--target onnxruntime` (contrib ops, and the
  Q/K/V projections as three GEMMs again);
* `A/A`: the original in a second session, the noise floor of every ratio in its row;
* contrib forms not lowered to (`CANDIDATES`): ONNX Runtime's kernels for the op written by
  hand as a lowering would write them, so an op that stays portable has the number that kept
  it there.

Each cell is the median of `--runs` runs, the forms taking turns run by run; x is the median
over those rounds of original / form (above 1 is faster), steadier on a shared machine than a
ratio of medians. Every form's output is checked against the original's. `fusegraph.ops.lowering`
lowers an op for a target only where that form is measured faster here.

    python benchmarks/bench_lowering.py [--seq 1 128 512] [--runs 80] [--only RMSNorm "QKV projections"]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from fusegraph.api import rewrite_with_report
from fusegraph.verify.testing import make_model

node = helper.make_node
HIDDEN, HEADS, HEAD_DIM, FFN = 512, 8, 64, 1376


def _c(name: str, value) -> onnx.NodeProto:
    return node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(value, np.float32), name))


def _rms_body(x: str, prefix: str) -> list[onnx.NodeProto]:
    return [_c(f"{prefix}two", 2.0), node("Pow", [x, f"{prefix}two"], [f"{prefix}sq"]),
            node("ReduceMean", [f"{prefix}sq"], [f"{prefix}var"], axes=[-1], keepdims=1),
            _c(f"{prefix}eps", 1e-6), node("Add", [f"{prefix}var", f"{prefix}eps"], [f"{prefix}ve"]),
            node("Sqrt", [f"{prefix}ve"], [f"{prefix}rt"]), node("Reciprocal", [f"{prefix}rt"], [f"{prefix}inv"]),
            node("Mul", [x, f"{prefix}inv"], [f"{prefix}n"]), node("Mul", ["gamma", f"{prefix}n"], ["y"])]


def rms_norm(seq):
    return make_model(_rms_body("x", "r_"), {"x": ("float32", [1, seq, HIDDEN])}, {"y": ("float32", [1, seq, HIDDEN])},
                      {"gamma": np.random.rand(HIDDEN).astype(np.float32)})


def skip_rms_norm(seq):
    nodes = [node("Add", ["x", "r"], ["s"])] + _rms_body("s", "r_")
    return make_model(nodes, {"x": ("float32", [1, seq, HIDDEN]), "r": ("float32", [1, seq, HIDDEN])},
                      {"y": ("float32", [1, seq, HIDDEN]), "s": ("float32", [1, seq, HIDDEN])},
                      {"gamma": np.random.rand(HIDDEN).astype(np.float32)})


def skip_layer_norm(seq):
    nodes = [node("Add", ["x", "r"], ["s"]),
             node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]
    return make_model(nodes, {"x": ("float32", [1, seq, HIDDEN]), "r": ("float32", [1, seq, HIDDEN])},
                      {"y": ("float32", [1, seq, HIDDEN]), "s": ("float32", [1, seq, HIDDEN])},
                      {"gamma": np.random.rand(HIDDEN).astype(np.float32), "beta": np.random.rand(HIDDEN).astype(np.float32)})


def linear_skip_layer_norm(seq):
    """BERT's attention output: Linear (+ bias), residual Add, LayerNormalization, with the
    batch and sequence dims symbolic as in an export (ONNX Runtime's own fusions depend on them)."""
    nodes = [node("MatMul", ["x", "w"], ["mm"]), node("Add", ["mm", "b"], ["xb"]), node("Add", ["xb", "r"], ["s"]),
             node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]
    shape = ["batch", "seq", HIDDEN]
    return make_model(nodes, {"x": ("float32", shape), "r": ("float32", shape)}, {"y": ("float32", shape)},
                      {"w": np.random.randn(HIDDEN, HIDDEN).astype(np.float32) * 0.05,
                       "b": np.random.randn(HIDDEN).astype(np.float32),
                       "gamma": np.random.rand(HIDDEN).astype(np.float32),
                       "beta": np.random.rand(HIDDEN).astype(np.float32)})


def qkv_projections(seq):
    """Attention's Q, K and V projections (+ bias) of one input (the `qkv` rules)."""
    nodes, inits = [], {}
    for p in "qkv":
        inits[f"w{p}"] = np.random.randn(HIDDEN, HIDDEN).astype(np.float32) * 0.05
        inits[f"b{p}"] = np.random.randn(HIDDEN).astype(np.float32)
        nodes += [node("MatMul", ["x", f"w{p}"], [f"m{p}"]), node("Add", [f"m{p}", f"b{p}"], [p])]
    return make_model(nodes, {"x": ("float32", [1, seq, HIDDEN])}, {p: ("float32", [1, seq, HIDDEN]) for p in "qkv"},
                      inits)


def _gelu_erf(x: str, y: str) -> list[onnx.NodeProto]:
    return [_c("sqrt2", math.sqrt(2.0)), node("Div", [x, "sqrt2"], ["g_d"]), node("Erf", ["g_d"], ["g_e"]),
            _c("one", 1.0), node("Add", ["g_e", "one"], ["g_a"]), node("Mul", [x, "g_a"], ["g_m"]),
            _c("half", 0.5), node("Mul", ["g_m", "half"], [y])]


def gelu_erf(seq):
    return make_model(_gelu_erf("x", "y"), {"x": ("float32", [1, seq, 4 * HIDDEN])}, {"y": ("float32", [1, seq, 4 * HIDDEN])})


def _gelu_tanh(x: str, y: str) -> list[onnx.NodeProto]:
    return [_c("three", 3.0), node("Pow", [x, "three"], ["c"]), _c("k", 0.044715), node("Mul", ["c", "k"], ["ck"]),
            node("Add", [x, "ck"], ["in"]), _c("s2p", math.sqrt(2 / math.pi)), node("Mul", ["in", "s2p"], ["ins"]),
            node("Tanh", ["ins"], ["t"]), _c("one", 1.0), node("Add", ["t", "one"], ["t1"]),
            _c("half", 0.5), node("Mul", [x, "half"], ["hx"]), node("Mul", ["hx", "t1"], [y])]


def gelu_tanh(seq):
    return make_model(_gelu_tanh("x", "y"), {"x": ("float32", [1, seq, 4 * HIDDEN])},
                      {"y": ("float32", [1, seq, 4 * HIDDEN])})


def silu(seq):
    nodes = [node("Sigmoid", ["x"], ["s"]), node("Mul", ["x", "s"], ["y"])]
    return make_model(nodes, {"x": ("float32", [1, seq, FFN])}, {"y": ("float32", [1, seq, FFN])})


def quick_gelu(seq):
    nodes = [_c("alpha", 1.702), node("Mul", ["x", "alpha"], ["xa"]), node("Sigmoid", ["xa"], ["s"]),
             node("Mul", ["x", "s"], ["y"])]
    return make_model(nodes, {"x": ("float32", [1, seq, 4 * HIDDEN])}, {"y": ("float32", [1, seq, 4 * HIDDEN])})


def linear_gelu(seq, gelu=_gelu_erf):
    nodes = [node("MatMul", ["x", "w"], ["mm"]), node("Add", ["mm", "b"], ["xb"])] + gelu("xb", "y")
    return make_model(nodes, {"x": ("float32", [1, seq, HIDDEN])}, {"y": ("float32", [1, seq, 4 * HIDDEN])},
                      {"w": np.random.randn(HIDDEN, 4 * HIDDEN).astype(np.float32) * 0.05,
                       "b": np.random.randn(4 * HIDDEN).astype(np.float32)})


def linear_gelu_tanh(seq):
    return linear_gelu(seq, _gelu_tanh)


def swiglu(seq):
    nodes = [node("MatMul", ["x", "wg"], ["g"]), node("Sigmoid", ["g"], ["sg"]), node("Mul", ["g", "sg"], ["act"]),
             node("MatMul", ["x", "wu"], ["u"]), node("Mul", ["act", "u"], ["y"])]
    w = {n: np.random.randn(HIDDEN, FFN).astype(np.float32) * 0.05 for n in ("wg", "wu")}
    return make_model(nodes, {"x": ("float32", [1, seq, HIDDEN])}, {"y": ("float32", [1, seq, FFN])}, w)


def _ints(name: str, *v: int) -> onnx.NodeProto:
    return node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.array(v, np.int64), name))


def rope(seq, batch=1, symbolic=False):
    """Llama's rotate-half RoPE as HF exports it: the tables cos and sin of Concat(freqs, freqs),
    unsqueezed over the heads (computed once per model and read by every layer's Q and K; here
    by one Q). `symbolic`: the sequence dims as an export's shape inference leaves them, X's
    and the table's not tied to one another (the onnxruntime lowering broadcasts the table)."""
    h = HEAD_DIM // 2
    nodes = [_ints("s0", 0), _ints("sh", h), _ints("se", 2**62), _ints("ax", -1), _ints("hd", 1),
             node("Concat", ["f", "f"], ["emb"], axis=-1), node("Cos", ["emb"], ["c"]), node("Sin", ["emb"], ["s"]),
             node("Unsqueeze", ["c", "hd"], ["cos"]), node("Unsqueeze", ["s", "hd"], ["sin"]),
             node("Slice", ["x", "s0", "sh", "ax"], ["x1"]), node("Slice", ["x", "sh", "se", "ax"], ["x2"]),
             node("Neg", ["x2"], ["nx2"]), node("Concat", ["nx2", "x1"], ["rot"], axis=-1),
             node("Mul", ["x", "cos"], ["xc"]), node("Mul", ["rot", "sin"], ["rs"]), node("Add", ["xc", "rs"], ["y"])]
    shape = [batch, HEADS, "seq" if symbolic else seq, HEAD_DIM]
    return make_model(nodes, {"x": ("float32", shape), "f": ("float32", [1, "positions" if symbolic else seq, h])},
                      {"y": ("float32", shape)})


def rope_symbolic(seq):
    return rope(seq, symbolic=True)


def _attention(seq, causal: bool):
    shape = [1, HEADS, seq, HEAD_DIM]
    nodes = [node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), node("MatMul", ["q", "kt"], ["qk"]),
             _c("scale", math.sqrt(HEAD_DIM)), node("Div", ["qk", "scale"], ["s"]),
             node("Add", ["s", "mask"], ["sm"]), node("Softmax", ["sm"], ["p"], axis=-1),
             node("MatMul", ["p", "v"], ["y"])]
    inits = {}
    inputs = {n: ("float32", shape) for n in ("q", "k", "v")}
    if causal:
        inits["mask"] = np.triu(np.full((seq, seq), -np.inf, np.float32), 1)[None, None]
    else:
        inputs["mask"] = ("float32", [1, 1, 1, seq])
    return make_model(nodes, inputs, {"y": ("float32", shape)}, inits)


def attention_padding(seq):
    return _attention(seq, causal=False)


def attention_causal(seq):
    return _attention(seq, causal=True)


# -- contrib forms measured by hand (what a lowering would write), for the ops left portable ------
def _with(original: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """The block's inputs, outputs and weights around other nodes (ONNX Runtime's contrib
    domain imported): the same feeds and, where the block draws random weights, the same ones."""
    m = onnx.ModelProto()
    m.CopyFrom(original)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return m


def skip_simplified_layer_norm(original, seq):
    """SkipRMSNorm as com.microsoft.SkipSimplifiedLayerNormalization (its 4th output the sum)."""
    return _with(original, [node("SkipSimplifiedLayerNormalization", ["x", "r", "gamma"], ["y", "", "", "s"],
                                 domain="com.microsoft", epsilon=1e-6)])


def _to_bsd(x: str) -> list[onnx.NodeProto]:
    return [node("Transpose", [x], [f"{x}_t"], perm=[0, 2, 1, 3]), node("Reshape", [f"{x}_t", "bsd"], [f"{x}3"])]


def _contrib_attention(original, seq, op_type: str) -> onnx.ModelProto:
    """The attention block (Q, K, V [1, H, S, D] in, Y [1, H, S, D] out) as an ONNX Runtime
    contrib op: Q (and K, V for GroupQueryAttention) transposed to [B, S, H * D], the padding
    mask expanded to the op's attention_bias, the causal block by the op's own flag; Y back to
    [B, H, S, D]. The Transposes are the lowering's price where the graph around does not
    cancel them."""
    causal = not any(i.name == "mask" for i in original.graph.input)
    nodes = [_ints("bsd", 0, 0, -1), _ints("bsnh", 0, 0, HEADS, HEAD_DIM)] + _to_bsd("q")
    bias = []
    if not causal:
        nodes += [_ints("bias_shape", 1, 1, seq, seq), node("Expand", ["mask", "bias_shape"], ["bias"])]
        bias = ["bias"]
    if op_type == "MultiHeadAttention":
        nodes.append(node(op_type, ["q3", "k", "v", "", "", *bias], ["o"], domain="com.microsoft",
                          num_heads=HEADS, scale=1 / math.sqrt(HEAD_DIM), unidirectional=int(causal)))
    else:
        nodes += _to_bsd("k") + _to_bsd("v") + [
            node("Constant", [], ["seqlens_k"], value=onnx.numpy_helper.from_array(np.array([seq - 1], np.int32))),
            node("Constant", [], ["total"], value=onnx.numpy_helper.from_array(np.array(seq, np.int32))),
            node(op_type, ["q3", "k3", "v3", "", "", "seqlens_k", "total", "", "", "", *bias], ["o"],
                 domain="com.microsoft", num_heads=HEADS, kv_num_heads=HEADS, scale=1 / math.sqrt(HEAD_DIM),
                 causal=int(causal))]
    nodes += [node("Reshape", ["o", "bsnh"], ["o4"]), node("Transpose", ["o4"], ["y"], perm=[0, 2, 1, 3])]
    m = _with(original, nodes)
    del m.graph.initializer[:]
    return m


def multi_head_attention(original, seq):
    return _contrib_attention(original, seq, "MultiHeadAttention")


def group_query_attention(original, seq):
    return _contrib_attention(original, seq, "GroupQueryAttention")


#: Contrib forms timed next to a block's: the measurements that keep an op portable.
CANDIDATES = {"SkipRMSNorm": {"SkipSimplifiedLayerNormalization": skip_simplified_layer_norm},
              "MaskedAttention": {"MultiHeadAttention": multi_head_attention,
                                  "GroupQueryAttention": group_query_attention},
              "Attention (causal)": {"MultiHeadAttention": multi_head_attention,
                                     "GroupQueryAttention": group_query_attention}}


BLOCKS = {"RMSNorm": rms_norm, "SkipRMSNorm": skip_rms_norm, "SkipLayerNorm": skip_layer_norm,
          "MatMulBias + SkipLayerNorm": linear_skip_layer_norm, "QKV projections": qkv_projections, "Gelu": gelu_erf,
          "GeluTanh": gelu_tanh, "Silu": silu, "QuickGelu": quick_gelu,
          "MatMulBiasGelu": linear_gelu, "MatMulBiasGeluTanh": linear_gelu_tanh, "SwiGLU": swiglu, "RotaryEmbedding": rope,
          "RotaryEmbedding (symbolic dims)": rope_symbolic,
          "MaskedAttention": attention_padding, "Attention (causal)": attention_causal}


def feeds(model: onnx.ModelProto, seq: int) -> dict[str, np.ndarray]:
    """Random inputs; a symbolic dim is the batch (1) or else the sequence (`seq`)."""
    rng = np.random.default_rng(0)
    out = {}
    for i in model.graph.input:
        shape = [d.dim_value if d.HasField("dim_value") else 1 if d.dim_param == "batch" else seq
                 for d in i.type.tensor_type.shape.dim]
        out[i.name] = rng.standard_normal(shape).astype(np.float32)
    if "mask" in out:
        out["mask"] = np.where(rng.random(out["mask"].shape) < 0.1, -np.inf, 0).astype(np.float32)
    return out


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def timed(models: list[onnx.ModelProto], f: dict, runs: int) -> tuple[list[list[float]], list[list[np.ndarray]]]:
    """Seconds of every run and the outputs of each model. The models take turns run by run (the
    first to go rotating), so the runs of one round are close in time and a load that comes and
    goes on a shared machine falls on all of them alike."""
    sessions = [session(m) for m in models]
    outs = [s.run(None, f) for s in sessions]
    for _ in range(3):
        for s in sessions:
            s.run(None, f)
    times = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for r in range(runs):
        for i in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            sessions[i].run(None, f)
            times[i].append(time.perf_counter() - t0)
    return times, outs


def max_abs(outs: list[np.ndarray], want: list[np.ndarray]) -> float:
    return max(float(np.nanmax(np.abs(g - w))) for g, w in zip(outs, want))


def paired_ratio(base: list[float], form: list[float]) -> float:
    """The median over rounds of original / form, each round's two runs side by side in time: on
    a shared machine steadier than the ratio of the medians, which a burst of load in one
    form's runs moves."""
    return float(np.median(np.asarray(base) / np.asarray(form)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", nargs="*", type=int, default=[128, 512])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--only", nargs="*", default=list(BLOCKS), help="blocks to measure")
    args = p.parse_args(argv)
    lines = ["## Fused-op forms in ONNX Runtime (CPU): the measurements behind `--target`", "",
             f"Date: {datetime.date.today().isoformat()}. Machine: {platform.machine()}, {os.cpu_count()} cores; "
             f"onnxruntime {ort.__version__}, 1 thread; median of {args.runs} interleaved runs. Command: "
             f"`python benchmarks/bench_lowering.py --seq {' '.join(map(str, args.seq))} --runs {args.runs}`. "
             "Cells: median microseconds; x: median over the rounds of original / form (above 1 is faster). "
             "Blocks at hidden 512, 8 heads of 64, batch 1. A/A: the original in a second session "
             "(the noise floor of a ratio).", "",
             "| block | seq | original | A/A | portable | onnxruntime | max abs (portable, onnxruntime) "
             "| contrib forms not lowered to (max abs) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in args.only:
        make = BLOCKS[name]
        for seq in args.seq:
            original = make(seq)
            f = feeds(original, seq)
            rewrites = [rewrite_with_report(original, target=target) for target in ("portable", "onnxruntime")]
            candidates = {label: build(original, seq) for label, build in CANDIDATES.get(name, {}).items()}
            models = [original, original] + [m for m, _ in rewrites] + list(candidates.values())
            (base, again, *forms), (want, _, *got) = timed(models, f, args.runs)
            cells, errs = [], []
            for t, out, (_, report) in zip(forms, got, rewrites):
                fusions = ",".join(sorted(report.per_rule)) or "nothing fused"
                cells.append(f"{np.median(t) * 1e6:.0f} ({paired_ratio(base, t):.2f}x)"
                             + ("" if report.fusions else f" [{fusions}]"))
                errs.append(max_abs(out, want))
            contrib = "; ".join(f"{label} {np.median(t) * 1e6:.0f} ({paired_ratio(base, t):.2f}x, {max_abs(out, want):.1e})"
                                for label, t, out in zip(candidates, forms[2:], got[2:])) or "-"
            lines.append(f"| {name} | {seq} | {np.median(base) * 1e6:.0f} | {paired_ratio(base, again):.2f}x | "
                         f"{cells[0]} | {cells[1]} | {errs[0]:.1e}, {errs[1]:.1e} | {contrib} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
