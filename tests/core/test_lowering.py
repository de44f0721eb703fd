"""Lowering per target: every lowering equals the portable fused op in ONNX Runtime, and refuses
what its target kernel does not cover."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from fusegraph.ops import fused_ops
from fusegraph.api import rewrite_with_report
from fusegraph.cli import main
from fusegraph.errors import InputError
from fusegraph.ops.lowering import TARGETS, lowering_rules
from fusegraph.rewrite import FUSIONS_KEY
from fusegraph.verify.testing import make_model, op_counts
from fusegraph.verify import compare, make_inputs, run

import fusegraph.ops.activation_ops  # noqa: F401  (registers the fused ops used below)
import fusegraph.ops.norm_ops  # noqa: F401
import fusegraph.ops.rope_ops  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_lowering  # noqa: E402  (the exported blocks the lowerings were measured on)

node = helper.make_node


def fused_model(op: str, inputs: dict, output_shape: list, inits: dict | None = None, **attrs) -> onnx.ModelProto:
    """One fused node with its local function, as a fusion rule leaves it."""
    m = make_model([node(op, list(inputs) + list(inits or {}), ["y"], domain=fused_ops.DOMAIN, **attrs)],
                   inputs, {"y": ("float32", output_shape)}, inits)
    m.opset_import.append(helper.make_opsetid(fused_ops.DOMAIN, fused_ops.VERSION))
    fused_ops.attach_functions(m)
    return m


W = np.random.default_rng(0).standard_normal((16, 24)).astype(np.float32)
CASES = {
    "RMSNorm": fused_model("RMSNorm", {"x": ("float32", [2, 5, 16])}, [2, 5, 16],
                           {"gamma": np.linspace(0.5, 2, 16, dtype=np.float32)}, epsilon=1e-5),
    "GeluTanh": fused_model("GeluTanh", {"x": ("float32", [2, 5, 16])}, [2, 5, 16]),
    "MatMulGeluTanh": fused_model("MatMulGeluTanh", {"x": ("float32", [2, 5, 16])}, [2, 5, 24], {"w": W}),
    "MatMulBiasGeluTanh": fused_model("MatMulBiasGeluTanh", {"x": ("float32", [2, 5, 16])}, [2, 5, 24],
                                      {"w": W, "b": np.linspace(-1, 1, 24, dtype=np.float32)}),
}


@pytest.mark.parametrize("op", sorted(CASES))
def test_each_onnxruntime_lowering_equals_the_portable_op(op):
    model = CASES[op]
    lowered, report = rewrite_with_report(model, lowering_rules("onnxruntime"))
    assert report.per_rule[f"lower.onnxruntime.{op}"] == 1
    assert not any(n.domain == fused_ops.DOMAIN for n in lowered.graph.node)
    assert not lowered.functions, "a lowered model keeps no fused op's function"
    feeds = make_inputs(model, seed=1)
    feeds = {k: v * 3 for k, v in feeds.items()}  # beyond [-1, 1): tanh and the norm's scale matter
    diffs = compare(run(model, feeds), run(lowered, feeds))
    assert all(d.ok for d in diffs), diffs


def split_gemm(bias: bool, sizes=(8, 4, 4), axis: int = -1, opset: int = 17) -> onnx.ModelProto:
    """The `qkv` rules' output: one MatMul (+ bias) on concatenated weights, split in three."""
    rng = np.random.default_rng(2)
    inits = {"w": rng.standard_normal((16, sum(sizes))).astype(np.float32),
             "sizes": np.array(sizes, np.int64)}
    nodes = [node("MatMul", ["x", "w"], ["y"])]
    if bias:
        inits["b"] = rng.standard_normal(sum(sizes)).astype(np.float32)
        nodes = [node("MatMulBias", ["x", "w", "b"], ["y"], domain=fused_ops.DOMAIN)]
    nodes.append(node("Split", ["y", "sizes"], ["q", "k", "v"], axis=axis))
    m = make_model(nodes, {"x": ("float32", ["b", "s", 16])}, {o: ("float32", ["b", "s", n])
                                                               for o, n in zip("qkv", sizes)}, inits, opset=opset)
    m.opset_import.append(helper.make_opsetid(fused_ops.DOMAIN, fused_ops.VERSION))
    fused_ops.attach_functions(m)
    return m


SPLIT_CASES = {"SplitMatMulBias": True, "SplitMatMul": False}


@pytest.mark.parametrize("axis", [-1, 2])
@pytest.mark.parametrize("name", sorted(SPLIT_CASES))
def test_onnxruntime_separates_a_split_gemm_into_three_equal_ones(name, axis):
    """ONNX Runtime's CPU runs the one GEMM on concatenated Q/K/V weights and its Split (a copy
    of the three outputs) slower than the three GEMMs at prefill sizes (benchmarks/RESULTS.md
    §7.3, §7.5), so `--target onnxruntime` writes the three again: equal outputs, no Split, one weight
    slice each."""
    model = split_gemm(SPLIT_CASES[name], axis=axis)
    lowered, report = rewrite_with_report(model, lowering_rules("onnxruntime"))
    assert report.per_rule[f"lower.onnxruntime.{name}"] == 1
    ops = op_counts(lowered)
    assert not ops["Split"] and ops["fusegraph.MatMulBias" if SPLIT_CASES[name] else "MatMul"] == 3, ops
    assert sorted(i.dims[1] for i in lowered.graph.initializer if len(i.dims) == 2) == [4, 4, 8]
    feeds = make_inputs(model, seed=1)
    diffs = compare(run(model, feeds), run(lowered, feeds))
    assert all(d.ok for d in diffs), diffs


def test_a_split_across_other_axes_or_of_a_weight_fed_at_run_time_stays():
    for model in (split_gemm(True, axis=1), split_gemm(False)):
        if model.graph.node[0].op_type == "MatMul":  # the weight a graph input: nothing to slice
            w = next(i for i in model.graph.initializer if i.name == "w")
            model.graph.initializer.remove(w)
            model.graph.input.append(helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [16, 16]))
        _, report = rewrite_with_report(model, lowering_rules("onnxruntime"))
        assert not report.fusions, report.per_rule


#: Lowerings with tests of their own further down.
TESTED_BELOW = {"RotaryEmbedding"}


def test_every_onnxruntime_lowering_is_covered_here():
    assert {r.name.rsplit(".", 1)[1] for r in lowering_rules("onnxruntime")} == set(CASES) | set(SPLIT_CASES) | TESTED_BELOW


def test_float16_keeps_the_portable_op():
    model = fused_model("GeluTanh", {"x": ("float16", [2, 16])}, [2, 16])
    model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    _, report = rewrite_with_report(model, lowering_rules("onnxruntime"))
    assert not report.fusions


def test_a_matrix_bias_keeps_the_portable_op():
    model = fused_model("MatMulBiasGeluTanh", {"x": ("float32", [2, 16])}, [2, 24],
                        {"w": W, "b": np.ones((1, 24), np.float32)})
    _, report = rewrite_with_report(model, lowering_rules("onnxruntime"))
    assert not report.fusions


def test_target_runs_after_fusion_and_portable_lowers_nothing():
    nodes = [node("Pow", ["x", "three"], ["c"]), node("Mul", ["c", "k"], ["ck"]), node("Add", ["x", "ck"], ["in"]),
             node("Mul", ["in", "s2p"], ["ins"]), node("Tanh", ["ins"], ["t"]), node("Add", ["t", "one"], ["t1"]),
             node("Mul", ["x", "half"], ["hx"]), node("Mul", ["hx", "t1"], ["y"])]
    consts = {"three": 3.0, "k": 0.044715, "s2p": np.sqrt(2 / np.pi), "one": 1.0, "half": 0.5}
    model = make_model(nodes, {"x": ("float32", [2, 8])}, {"y": ("float32", [2, 8])},
                       {k: np.array(v, np.float32) for k, v in consts.items()})
    portable, _ = rewrite_with_report(model)
    assert op_counts(portable)["fusegraph.GeluTanh"] == 1
    lowered, report = rewrite_with_report(model, target="onnxruntime")
    assert op_counts(lowered)["com.microsoft.FastGelu"] == 1
    assert report.per_rule["lower.onnxruntime.GeluTanh"] == 1
    assert report.ops_after == op_counts(lowered)
    feeds = make_inputs(model)
    assert all(d.ok for d in compare(run(model, feeds), run(lowered, feeds)))


def test_unknown_target_is_bad_input(tmp_path, capsys):
    with pytest.raises(InputError, match="unknown target"):
        lowering_rules("cuda")
    assert "tensorrt" in TARGETS
    src = tmp_path / "m.onnx"
    onnx.save(CASES["GeluTanh"], str(src))
    assert main([str(src), "-o", str(tmp_path / "o.onnx"), "--target", "cuda"]) == 2
    assert "invalid choice" in capsys.readouterr().err


# -- bodies written for the target's runtime --------------------------------------------------
def masked_attention(opset: int, target: str) -> onnx.ModelProto:
    m = make_model([node("MaskedAttention", ["q", "k", "v", "mask"], ["y"], domain=fused_ops.DOMAIN,
                         scale=0.25, is_causal=1)],
                   {"q": ("float32", ["b", 4, "s", 8]), "k": ("float32", ["b", 2, "t", 8]),
                    "v": ("float32", ["b", 2, "t", 8]), "mask": ("float32", ["b", 1, 1, "t"])},
                   {"y": ("float32", ["b", 4, "s", 8])}, opset=opset)
    m.opset_import.append(helper.make_opsetid(fused_ops.DOMAIN, fused_ops.VERSION))
    fused_ops.attach_functions(m, target=target)
    return m


def softmax_readers(function: onnx.FunctionProto) -> list[str]:
    """The ops that read the attention body's probabilities (besides Shape), through a Reshape,
    in the branch an If on `zero_nan_rows=1` takes."""
    probs = {n.output[0] for n in function.node if n.op_type == "Softmax"}
    nodes = [b for n in function.node
             for b in (next(a.g for a in n.attribute if a.name == "then_branch").node if n.op_type == "If" else [n])]
    return [n.op_type for n in nodes if set(n.input) & probs and n.op_type != "Shape"]


@pytest.mark.parametrize("opset", [13, 14, 15, 17, 23])
def test_tensorrt_attention_body_guards_the_probabilities_and_computes_the_same(opset):
    """`--target tensorrt` writes the attention's dead-row guard over the probabilities (which
    TensorRT fuses into its attention) instead of over Y's rows: valid, and equal in ONNX
    Runtime to the portable body and the reference, fully masked rows included."""
    from fusegraph.kernels.reference import attention
    import fusegraph.ops.attention_op  # noqa: F401
    portable, trt = masked_attention(opset, "portable"), masked_attention(opset, "tensorrt")
    onnx.checker.check_model(trt, full_check=True)
    assert sorted(softmax_readers(trt.functions[0])) == ["IsNaN", "Where"]
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 5, 8), dtype=np.float32)
    k, v = (rng.standard_normal((2, 2, 6, 8), dtype=np.float32) for _ in range(2))
    mask = np.where(rng.random((2, 1, 1, 6)) < 0.3, -np.inf, 0).astype(np.float32)
    mask[1] = -np.inf  # every row of batch 1 masked throughout: zeros
    feeds = {"q": q, "k": k, "v": v, "mask": mask}
    want = attention(q, k, v, mask, 0.25, True)
    for model in (portable, trt):
        np.testing.assert_allclose(run(model, feeds)["y"], want, rtol=1e-5, atol=1e-6)


def test_rewrite_for_tensorrt_writes_the_tensorrt_bodies():
    import fusegraph.ops.attention_op  # noqa: F401
    nodes = [node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), node("MatMul", ["q", "kt"], ["qk"]),
             node("Mul", ["qk", "scale"], ["s"]), node("Add", ["s", "mask"], ["sm"]),
             node("Softmax", ["sm"], ["p"], axis=-1), node("MatMul", ["p", "v"], ["y"])]
    shape = [1, 4, 6, 8]
    exported = make_model(nodes, {"q": ("float32", shape), "k": ("float32", shape), "v": ("float32", shape),
                                  "mask": ("float32", [1, 1, 1, 6])}, {"y": ("float32", shape)},
                          {"scale": np.array(0.25, np.float32)})
    readers = {"portable": ["MatMul", "Slice"], "tensorrt": ["IsNaN", "Where"]}
    for target, want in readers.items():
        out, report = rewrite_with_report(exported, target=target)
        assert report.per_rule["attention.fusegraph"] == 1
        [f] = [f for f in out.functions if f.name == "MaskedAttention"]
        assert sorted(softmax_readers(f)) in (want, sorted(want[1:] + ["Reshape"])), (target, softmax_readers(f))


def test_rewriting_a_rewritten_model_writes_this_targets_bodies_afresh():
    """A model rewritten before (for another target, or by an older fusegraph) carries fusegraph
    functions; rewriting it again replaces them with the bodies for the target asked now, in both
    directions, and a function of another domain stays."""
    import fusegraph.ops.attention_op  # noqa: F401
    want = {t: fused_ops.REGISTRY["MaskedAttention"].function(17, target=t) for t in ("portable", "tensorrt")}
    assert want["portable"] != want["tensorrt"]
    model = masked_attention(17, "portable")
    other = helper.make_function("user.domain", "Twice", ["x"], ["y"], [node("Add", ["x", "x"], ["y"])],
                                 [helper.make_opsetid("", 17)])
    model.functions.append(other)
    stale = model.functions[0]
    stale.doc_string = "a body from an older fusegraph"
    helper.set_model_props(model, {FUSIONS_KEY: "[]"})  # as the older rewrite left it
    for target in ("tensorrt", "portable"):
        model, _ = rewrite_with_report(model, target=target)
        [body] = [f for f in model.functions if f.domain == fused_ops.DOMAIN]
        assert body == want[target], target
        assert other in model.functions


# -- RoPE as com.microsoft.RotaryEmbedding ----------------------------------------------------
def rope_model(x_shape: list, freqs_shape: list, interleaved: int = 0, axes: int = 1, second: str = "f",
               dtype: str = "float32") -> onnx.ModelProto:
    """fusegraph.RotaryEmbedding fed the tables HF exports compute: cos and sin of
    Concat(freqs, `second`) (freqs twice: the rotate-half layout), unsqueezed at `axes`."""
    inputs = {"x": (dtype, x_shape), "f": (dtype, freqs_shape)}
    if second != "f":
        inputs[second] = (dtype, freqs_shape)
    nodes = [node("Concat", ["f", second], ["emb"], axis=-1), node("Cos", ["emb"], ["c"]), node("Sin", ["emb"], ["s"]),
             node("Unsqueeze", ["c", "axes"], ["cos"]), node("Unsqueeze", ["s", "axes"], ["sin"]),
             node("RotaryEmbedding", ["x", "cos", "sin"], ["y"], domain=fused_ops.DOMAIN, interleaved=interleaved,
                  rotary_dim=2 * freqs_shape[-1])]
    m = make_model(nodes, inputs, {"y": (dtype, x_shape)}, {"axes": np.array([axes], np.int64)})
    m.opset_import.append(helper.make_opsetid(fused_ops.DOMAIN, fused_ops.VERSION))
    fused_ops.attach_functions(m)
    return m


def rope_feeds(model: onnx.ModelProto, seed: int) -> dict:
    """Angles up to +-20 radians (positions times frequencies), X of unit scale."""
    feeds = make_inputs(model, seed=seed)
    return {k: v * 20 if k != "x" else v for k, v in feeds.items()}


@pytest.mark.parametrize("x_shape, freqs_shape", [
    ([1, 4, 7, 16], [1, 7, 8]),     # prefill, batch 1
    ([3, 4, 6, 16], [1, 6, 8]),     # one table broadcast over the batch
    (["b", 2, "s", 8], [1, "s", 4]),  # symbolic batch and sequence, as exported
    ([2, 8, 1, 64], [1, 1, 32]),    # a decode step's one position
    ([1, 4, 7, 16], [1, 1, 8]),     # one position's table for every position (broadcast)
    (["b", 2, "s", 8], [1, "t", 4]),  # a table whose length shapes do not tie to the sequence
])
def test_rope_lowers_to_the_contrib_kernel_with_equal_outputs(x_shape, freqs_shape):
    """ONNX Runtime's RotaryEmbedding kernel ran 1.4-2.2x faster than the exported
    Slice/Neg/Concat/Mul/Add chain (benchmarks/RESULTS.md §7.5); its caches are the table's first
    half, read at the rows position_ids name: equal outputs to the portable op on every shape."""
    model = rope_model(x_shape, freqs_shape)
    lowered, report = rewrite_with_report(model, lowering_rules("onnxruntime"))
    assert report.per_rule["lower.onnxruntime.RotaryEmbedding"] == 1
    assert op_counts(lowered)["com.microsoft.RotaryEmbedding"] == 1
    assert not any(n.domain == fused_ops.DOMAIN for n in lowered.graph.node)
    for seed in (1, 2):
        feeds = rope_feeds(model, seed)
        diffs = compare(run(model, feeds), run(lowered, feeds))
        assert all(d.ok for d in diffs), diffs


def refusals(model: onnx.ModelProto, rule: str) -> list[str]:
    """Why `rule` (a lowering) refused each candidate in `model`; fails if it lowered any."""
    from fusegraph.ir import Graph
    from fusegraph.rewrite import Rewriter
    report = Rewriter(lowering_rules("onnxruntime"), explain=rule).run(Graph(model))
    assert not report.fusions, report.per_rule
    return [m.reason for m in report.near_misses if m.rule == rule]


@pytest.mark.parametrize("why, model", [
    ("interleaved=1", lambda: rope_model([1, 4, 7, 16], [1, 7, 8], interleaved=1)),
    ("one Concat(freqs, freqs)", lambda: rope_model([1, 4, 7, 16], [1, 7, 8], second="g")),  # halves of two tables
    ("partial rotation", lambda: rope_model([1, 4, 7, 32], [1, 7, 8])),
    ("head axis", lambda: rope_model([1, 7, 4, 16], [1, 7, 8], axes=2)),  # X [B, S, H, D]
    ("float32 only", lambda: rope_model([1, 4, 7, 16], [1, 7, 8], dtype="float16")),  # not measured
    ("batch 1", lambda: rope_model([3, 2, 5, 8], [3, 5, 4])),  # a table per batch row
    ("a table of 3 positions", lambda: rope_model([1, 2, 5, 8], [1, 3, 4])),  # no broadcast: invalid
])
def test_rope_the_contrib_kernel_does_not_compute_stays_portable(why, model):
    [reason] = refusals(model(), "lower.onnxruntime.RotaryEmbedding")
    assert why in reason, reason


def test_an_exported_rope_rewrites_and_lowers_in_one_run():
    """From the export's decomposition: fused (rope rule), then lowered, outputs equal."""
    exported = bench_lowering.rope(9, batch=2)
    lowered, report = rewrite_with_report(exported, target="onnxruntime")
    assert report.per_rule["lower.onnxruntime.RotaryEmbedding"] == 1, report.per_rule
    feeds = rope_feeds(exported, 3)
    assert all(d.ok for d in compare(run(exported, feeds), run(lowered, feeds)))
