"""What ONNX Runtime runs for the attention and RoPE bodies once it has inlined and optimized
them: the work of the decomposition they replace, not more (the speed `benchmarks/bench_lowering.py`
measures, held here by structure so that a slower body fails a test, not only a benchmark).

Each model has dynamic batch and sequence dims, so nothing but the attributes folds; the graph
ONNX Runtime optimized (`SessionOptions.optimized_model_filepath`) must hold no If (an attribute's
branch is chosen at load), no copy of K or V for grouped heads, and, for attention, exactly the
decomposition's passes over the [B, H, Sq, Sk] scores (a MatMul, the mask Add, with `is_causal`
the bias Add, Softmax, the MatMul with V) with the dead-row guard over Y's rows only.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from fusegraph.ops import fused_ops
from fusegraph.kernels import reference
from fusegraph.verify.testing import make_model

import fusegraph.ops.attention_op  # noqa: F401  (registers the fused ops used below)
import fusegraph.ops.rope_ops  # noqa: F401


def optimized(model: onnx.ModelProto, tmp_path) -> onnx.ModelProto:
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx"))


def fused_model(op: str, inputs: dict, output: tuple, opset: int = 17, **attrs) -> onnx.ModelProto:
    m = make_model([helper.make_node(op, list(inputs), ["y"], domain=fused_ops.DOMAIN, **attrs)],
                   inputs, {"y": output}, opset=opset)
    m.opset_import.append(helper.make_opsetid(fused_ops.DOMAIN, fused_ops.VERSION))
    fused_ops.attach_functions(m)
    return m


def attention(hkv: int, causal: int, opset: int = 17) -> onnx.ModelProto:
    return fused_model("MaskedAttention", {"q": ("float32", ["b", 8, "s", 16]), "k": ("float32", ["b", hkv, "t", 16]),
                                           "v": ("float32", ["b", hkv, "t", 16]),
                                           "mask": ("float32", ["b", 1, 1, "t"])},
                       ("float32", ["b", 8, "s", 16]), opset, scale=0.25, is_causal=causal)


@pytest.mark.parametrize("hkv", [8, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [0, 1])
def test_attention_body_adds_no_pass_over_the_scores(tmp_path, hkv, causal):
    graph = optimized(attention(hkv, causal), tmp_path).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    assert not ops["If"], "is_causal's branch is chosen when ONNX Runtime loads the model"
    copies = [n for n in graph.node if n.op_type in ("Gather", "Expand", "Tile") and {"k", "v"} & set(n.input)]
    assert not copies, "K and V are never repeated for grouped heads"
    assert ops["FusedMatMul"] + ops["MatMul"] == 2 and ops["Softmax"] == 1 and ops["IsNaN"] == 1
    producer = {o: n for n in graph.node for o in n.output}
    [softmax] = [n for n in graph.node if n.op_type == "Softmax"]
    chain, value = [], softmax.input[0]  # back from Softmax to the Q K^T MatMul
    while producer[value].op_type not in ("FusedMatMul", "MatMul"):
        chain.append(producer[value].op_type)
        value = producer[value].input[0]
    assert sorted(chain) == sorted(["Add"] * (1 + causal) + ["Reshape"] * (hkv != 8 or len(chain) > 1 + causal)), \
        "scores pass only the mask Add (and with is_causal the bias Add) and a free Reshape"
    readers = [n.op_type for n in graph.node if softmax.output[0] in n.input and n.op_type != "Shape"]
    # the probabilities feed (besides Shape) the MatMul, through a free Reshape for grouped heads, and a
    # one-column Slice for the dead-row guard: never a Where or IsNaN over every probability
    assert sorted(readers) in (["MatMul", "Slice"], ["Reshape", "Slice"]), readers


@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("hkv", [4, 1])
def test_attention_body_computes_the_reference_at_dynamic_shapes(hkv, causal):
    """The view of Q by kv head and the folded causal branch, across batch and sequence sizes,
    with a fully masked row (zeros) and Sq != Sk."""
    model = attention(hkv, causal)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for b, s, t in ((1, 1, 1), (2, 5, 7), (3, 9, 4)):
        q = rng.standard_normal((b, 8, s, 16), dtype=np.float32)
        k, v = (rng.standard_normal((b, hkv, t, 16), dtype=np.float32) for _ in range(2))
        mask = np.where(rng.random((b, 1, 1, t)) < 0.3, -np.inf, 0).astype(np.float32)
        mask[0] = -np.inf  # batch 0: every row masked throughout
        got = session.run(None, {"q": q, "k": k, "v": v, "mask": mask})[0]
        want = reference.attention(q, k, v, mask, 0.25, bool(causal))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert not got[0].any()


@pytest.mark.parametrize("interleaved", [0, 1])
def test_rope_body_is_one_layout_and_rotate_half_one_concat(tmp_path, interleaved):
    model = fused_model("RotaryEmbedding", {"x": ("float32", ["b", 8, "s", 64]), "cos": ("float32", [1, 1, "s", 32]),
                                            "sin": ("float32", [1, 1, "s", 32])},
                        ("float32", ["b", 8, "s", 64]), interleaved=interleaved, rotary_dim=32)
    ops = collections.Counter(n.op_type for n in optimized(model, tmp_path).graph.node)
    assert not ops["If"] and not ops["Gather"] and not ops["Where"], ops
    assert not ops["Cast"], "float32 in, float32 out: no cast (and no copy of Y) is left"
    # rotate-half: y1, y2 and the pass-through channels in one Concat; interleaved: one Concat of
    # the two [.., rd/2, 1] views and one with the pass-through channels (and two of shapes)
    assert ops["Concat"] == (4 if interleaved else 1), ops


def test_skip_layer_norm_body_stays_apart_from_ort_skip_layer_normalization(tmp_path):
    """ONNX Runtime fuses an Add feeding LayerNormalization into com.microsoft.SkipLayerNormalization
    (taking a bias Add before it too), 2-7x slower than the ops it replaces on the measured CPU,
    where the exports keep them apart (benchmarks/RESULTS.md §7.3): the body's residual sum is a
    Sum, which that fusion does not take; outputs are the reference's."""
    import fusegraph.ops.norm_ops  # noqa: F401
    shape = ["b", "s", 64]
    m = make_model([helper.make_node("SkipLayerNorm", ["x", "r", "gamma", "beta"], ["y", "s"],
                                     domain=fused_ops.DOMAIN, epsilon=1e-5)],
                   {"x": ("float32", shape), "r": ("float32", shape), "gamma": ("float32", [64]),
                    "beta": ("float32", [64])}, {"y": ("float32", shape), "s": ("float32", shape)})
    m.opset_import.append(helper.make_opsetid(fused_ops.DOMAIN, fused_ops.VERSION))
    fused_ops.attach_functions(m)
    ops = collections.Counter(n.op_type for n in optimized(m, tmp_path).graph.node)
    assert not ops["SkipLayerNormalization"] and ops["LayerNormalization"] == 1, ops
    rng = np.random.default_rng(0)
    x, r = (rng.standard_normal((2, 3, 64), dtype=np.float32) for _ in range(2))
    gamma, beta = (rng.standard_normal(64, dtype=np.float32) for _ in range(2))
    y, s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "r": r, "gamma": gamma, "beta": beta})
    want_y, want_s = reference.skip_layer_norm(x, r, gamma, beta, 1e-5)
    np.testing.assert_allclose(s, want_s, rtol=0, atol=0)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
