"""Every form the attention rules emit parses and builds in TensorRT(-RTX), and runs in ONNX
Runtime: `fusegraph.Attention` / `MaskedAttention` (float32, float16, causal, every mask shape
the rules pass on, float16 Q with a float32 mask, guarded and eager NaN rows (`zero_nan_rows`),
soft-capped scores, the opset-13 body) and opset-23 `Attention` (no `softmax_precision`, head
dims with and without a dedicated kernel, causal, KV repeated for it, `softcap`).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from engine_models import requires_tensorrt, save
from fusegraph.api import rewrite_with_report
from fusegraph.plugins.engine import build_engine
from fusegraph.patterns import attention
from fusegraph.graph_builder import GraphBuilder
from fusegraph.verify.testing import op_counts
from fusegraph.verify import make_inputs, run

pytestmark = [pytest.mark.tensorrt, requires_tensorrt]

TP = onnx.TensorProto
B, S, D = 2, 8, 16


def attention_graph(*, dtype=np.float32, heads=4, kv_heads=4, d=D, mask=None, guard=False, softmax_fp32=False,
                    opset=18, softcap=None):
    """softmax(Q K^T / sqrt(d) (+ mask)) V as exporters write it; `mask` is None, ("add", shape,
    dtype) for an input, ("causal", fill) for a constant triangle, or ("keep", fill); `softcap`
    caps the scores as Gemma 2 does, cap * tanh(s / cap)."""
    g = GraphBuilder(dtype)
    op, const = g.op, g.const
    g.input("q", [B, heads, S, d]), g.input("k", [B, kv_heads, S, d]), g.input("v", [B, kv_heads, S, d])
    k, v = "k", "v"
    if kv_heads != heads:  # HF's repeat_kv
        group = heads // kv_heads
        k, v = (op("Reshape", op("Expand", op("Unsqueeze", x, const([2], np.int64)),
                                 const([B, kv_heads, group, S, d], np.int64)), const([B, heads, S, d], np.int64))
                for x in (k, v))
    scores = op("Mul", op("MatMul", "q", op("Transpose", k, perm=[0, 1, 3, 2])), const(d ** -0.5, dtype))
    if softcap:
        scores = op("Mul", op("Tanh", op("Div", scores, const(softcap, dtype))), const(softcap, dtype))
    sdt = np.float32 if softmax_fp32 else dtype
    if softmax_fp32:
        scores = op("Cast", scores, to=TP.FLOAT)
    above = np.triu(np.ones((S, S), bool), k=1)
    if mask is not None and mask[0] == "add":
        g.input("mask", list(mask[1]), mask[2])
        scores = op("Add", scores, "mask")
    elif mask is not None and mask[0] == "causal":
        scores = op("Add", scores, const(np.where(above, mask[1], 0), sdt))
    elif mask is not None and mask[0] == "keep":
        g.input("keep", [B, 1, S, S], np.bool_)
        scores = op("Where", "keep", scores, const(mask[1], sdt))
    probs = op("Softmax", scores, axis=-1)
    if softmax_fp32:
        probs = op("Cast", probs, to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    if guard:
        probs = op("Where", op("IsNaN", probs), const(0.0, dtype), probs)
    out = op("MatMul", probs, v)
    return g.model({}, {out: (dtype, [B, heads, S, d])}, opset)


F32_LOW = float(np.finfo(np.float32).min)
FORMS = {
    # name: (graph, the op emitted)
    "fusegraph-fp32": (dict(), "fusegraph.Attention"),
    "fusegraph-fp16": (dict(dtype=np.float16, softmax_fp32=True), "fusegraph.Attention"),
    "fusegraph-causal": (dict(mask=("causal", -np.inf)), "fusegraph.Attention"),
    "fusegraph-gqa": (dict(kv_heads=2), "fusegraph.Attention"),
    "fusegraph-guarded": (dict(guard=True), "fusegraph.Attention"),
    "fusegraph-opset13": (dict(opset=13, mask=("add", (B, 1, S, S), np.float32)), "fusegraph.MaskedAttention"),
    "fusegraph-opset13-causal": (dict(opset=13, mask=("causal", -np.inf)), "fusegraph.Attention"),
    "masked-b11s": (dict(mask=("add", (B, 1, 1, S), np.float32)), "fusegraph.MaskedAttention"),
    "masked-s": (dict(mask=("add", (S,), np.float32), guard=True), "fusegraph.MaskedAttention"),
    "masked-s1": (dict(mask=("add", (S, 1), np.float32), guard=True), "fusegraph.MaskedAttention"),
    "masked-b1ss-opset23": (dict(mask=("add", (B, 1, S, S), np.float32), opset=23), "fusegraph.MaskedAttention"),
    "masked-finite-triangle": (dict(mask=("causal", -1e4)), "fusegraph.MaskedAttention"),
    "masked-fp16-fp32-mask": (dict(dtype=np.float16, softmax_fp32=True, mask=("add", (B, 1, S, S), np.float32)),
                              "fusegraph.MaskedAttention"),
    "masked-fp16-fp16-mask": (dict(dtype=np.float16, mask=("add", (B, 1, S, S), np.float16)),
                              "fusegraph.MaskedAttention"),
    "masked-keep-lowest-fp16": (dict(dtype=np.float16, mask=("keep", float(np.finfo(np.float16).min))),
                                "fusegraph.MaskedAttention"),
    "masked-keep-neg-inf": (dict(mask=("keep", -np.inf)), "fusegraph.MaskedAttention"),
    "masked-softcap": (dict(softcap=5.0, mask=("add", (B, 1, S, S), np.float32)), "fusegraph.MaskedAttention"),
    "fusegraph-softcap-guarded": (dict(softcap=5.0, guard=True, opset=23), "fusegraph.Attention"),
    "onnx-d16": (dict(opset=23), "Attention"),
    "onnx-d64": (dict(opset=23, d=64), "Attention"),
    "onnx-causal": (dict(opset=23, mask=("causal", F32_LOW)), "Attention"),
    "onnx-gqa": (dict(opset=23, kv_heads=2), "Attention"),
    "fusegraph-softcap-opset23": (dict(opset=23, softcap=5.0), "fusegraph.Attention"),
}


@pytest.mark.parametrize("target", ["portable", "tensorrt"])
@pytest.mark.parametrize("name", sorted(FORMS))
def test_emitted_form_runs_and_builds(tmp_path, name, target):
    spec, emitted = FORMS[name]
    model = attention_graph(**spec)
    out, report = rewrite_with_report(model, attention.RULES, target=target)
    counts = op_counts(out)
    assert counts[emitted] == 1 and counts["Softmax"] == 0, dict(counts)
    fused = next(n for n in out.graph.node if n.op_type.endswith("Attention"))
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in fused.attribute}
    assert "softmax_precision" not in attrs
    assert attrs.get("softcap", 0.0) == spec.get("softcap", 0.0)
    if fused.domain:  # the guard's answer for a NaN row travels on the op
        assert attrs["zero_nan_rows"] == int(spec.get("guard", False))
    feeds = make_inputs(model)
    want, got = run(model, feeds), run(out, feeds)  # ONNX Runtime loads and runs it
    assert all(np.allclose(w, g, atol=2e-2, rtol=2e-2, equal_nan=True) for w, g in zip(want.values(), got.values()))
    path = save(out, tmp_path / f"{name}.onnx")
    built = build_engine(path, tmp_path / f"{name}.engine")
    assert built["parse"]["unsupported"] == [] and built["engine_info"]["layer_count"] > 0
    assert all(op["implementation"] != "not found in the network" for op in built["fused_ops"])
    if emitted == "Attention":
        assert len(built["attention"]["layers"]) == 1
