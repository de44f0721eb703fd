"""Small synthetic ONNX models for the engine tests, and the skip for machines without TensorRT.

Imported by the test modules beside it (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fusegraph.plugins import tensorrt_shim

# onnxruntime 1.31 reads IR <= 13 and onnx 1.23 writes 14 by default.
IR_VERSION = 10

requires_tensorrt = pytest.mark.skipif(
    not tensorrt_shim.available(),
    reason="needs tensorrt or tensorrt_rtx_bindings (pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs)")


def save(model: onnx.ModelProto, path) -> str:
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return str(path)


def mlp_model(path, n_in=64, n_out=32, batch="batch") -> str:
    """MatMul + Add + Relu over a dynamic batch."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((n_in, n_out)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32), "B")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["m"], name="mm"),
         helper.make_node("Add", ["m", "B"], ["a"], name="bias"),
         helper.make_node("Relu", ["a"], ["Y"], name="relu")],
        "mlp", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, n_in])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, n_out])], [w, b])
    return save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def decomposed_attention_model(path, heads=4, head_dim=16) -> str:
    """softmax(Q K^T * scale) V spelled in MatMul/Mul/Softmax, as exporters write it."""
    scale = numpy_helper.from_array(np.array(head_dim ** -0.5, np.float32), "scale")
    shape = ["b", heads, "s", head_dim]
    g = helper.make_graph(
        [helper.make_node("Transpose", ["K"], ["kt"], perm=[0, 1, 3, 2], name="k_t"),
         helper.make_node("MatMul", ["Q", "kt"], ["qk"], name="qk"),
         helper.make_node("Mul", ["qk", "scale"], ["s"], name="scale_mul"),
         helper.make_node("Softmax", ["s"], ["p"], axis=-1, name="softmax"),
         helper.make_node("MatMul", ["p", "V"], ["Y"], name="pv")],
        "attn", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "QKV"],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)], [scale])
    return save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def onnx_attention_model(path, dtype=TensorProto.FLOAT, heads=4, head_dim=16, causal=True) -> str:
    """One opset-23 ONNX `Attention` node (TensorRT maps it to its native attention layer)."""
    shape = ["b", heads, "s", head_dim]
    g = helper.make_graph(
        [helper.make_node("Attention", ["Q", "K", "V"], ["Y"], name="attn", is_causal=int(causal))],
        "attn23", [helper.make_tensor_value_info(n, dtype, shape) for n in "QKV"],
        [helper.make_tensor_value_info("Y", dtype, shape)])
    return save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)]), path)


def fused_matmul_model(path, n_in=64, n_out=32, op="MatMulBiasRelu", opset=17) -> str:
    """A `fusegraph`-domain MatMulBias{Act} node carrying the rewriter's own local function."""
    from fusegraph.ops.fused_ops import REGISTRY

    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((n_in, n_out)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32), "B")
    g = helper.make_graph(
        [helper.make_node(op, ["X", "W", "B"], ["Y"], domain="fusegraph", name="fused_mlp")],
        "fused", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", n_out])], [w, b])
    return save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("fusegraph", 1)],
                                  functions=[REGISTRY[op].function(opset)]), path)


def unparseable_model(path) -> str:
    """A node TensorRT has no importer, local function or plugin for."""
    g = helper.make_graph(
        [helper.make_node("Relu", ["X"], ["r"], name="ok_relu"),
         helper.make_node("FrobnicateTensor", ["r"], ["Y"], domain="acme", name="mystery_node")],
        "bad", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("acme", 1)])
    m.ir_version = IR_VERSION
    onnx.save(m, str(path))  # not check_model: the acme op has no schema, which is the point
    return str(path)


def _ref_attr(name: str, kind: int) -> onnx.AttributeProto:
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name, a.type = name, name, kind
    return a


def fused_and_onnx_attention_model(path, heads=4, seq=8, head_dim=16, scale=0.5) -> str:
    """A `fusegraph` Attention (local function: opset-23 Attention) feeding a standard ONNX
    Attention of the same op type: the plugin override must take only the first."""
    inner = helper.make_node("Attention", ["Q", "K", "V"], ["Y"])
    inner.attribute.extend([_ref_attr("scale", onnx.AttributeProto.FLOAT),
                            _ref_attr("is_causal", onnx.AttributeProto.INT)])
    fn = helper.make_function("fusegraph", "Attention", ["Q", "K", "V"], ["Y"], [inner],
                              [helper.make_opsetid("", 23)], attributes=["scale", "is_causal"])
    shape = [1, heads, seq, head_dim]
    g = helper.make_graph(
        [helper.make_node("Attention", ["Q", "K", "V"], ["A"], domain="fusegraph", name="fg_attn",
                          scale=scale, is_causal=1),
         helper.make_node("Attention", ["A", "K", "V"], ["Y"], name="onnx_attn")],
        "attn_pair", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "QKV"],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)])
    return save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("fusegraph", 1)],
                                  functions=[fn]), path)


def fused_rms_norm_model(path, hidden=32, epsilon=1e-5) -> str:
    """A `fusegraph` RMSNorm whose local function spells X / sqrt(mean(X^2) + eps) * gamma."""
    eps = helper.make_node("Constant", [], ["eps"])
    eps.attribute.append(_ref_attr("value_float", onnx.AttributeProto.FLOAT))
    eps.attribute[0].ref_attr_name = "epsilon"
    body = [helper.make_node("Mul", ["X", "X"], ["sq"]),
            helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
            eps,
            helper.make_node("Add", ["ms", "eps"], ["mse"]),
            helper.make_node("Sqrt", ["mse"], ["rms"]),
            helper.make_node("Div", ["X", "rms"], ["xn"]),
            helper.make_node("Mul", ["xn", "gamma"], ["Y"])]
    axes = helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [-1]))
    fn = helper.make_function("fusegraph", "RMSNorm", ["X", "gamma"], ["Y"], [axes, *body],
                              [helper.make_opsetid("", 18)], attributes=["epsilon"])
    gamma = numpy_helper.from_array(np.linspace(0.5, 1.5, hidden).astype(np.float32), "gamma")
    g = helper.make_graph(
        [helper.make_node("RMSNorm", ["X", "gamma"], ["Y"], domain="fusegraph", name="norm0", epsilon=epsilon)],
        "rms", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 8, hidden])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 8, hidden])], [gamma])
    return save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("fusegraph", 1)],
                                  functions=[fn]), path)


def fused_rotary_model(path, heads=4, seq=8, head_dim=16, opset=18) -> str:
    """The rewriter's `fusegraph` RotaryEmbedding, whose name ONNX-23 also uses for another op."""
    import fusegraph
    from fusegraph.ops.fused_ops import REGISTRY

    fusegraph.default_rules()  # registers the rule modules' fused ops
    ang = np.outer(np.arange(seq), np.linspace(0.1, 1.0, head_dim // 2)).astype(np.float32)
    cos = numpy_helper.from_array(np.concatenate([np.cos(ang)] * 2, axis=-1), "cos")
    sin = numpy_helper.from_array(np.concatenate([np.sin(ang)] * 2, axis=-1), "sin")
    shape = [1, heads, seq, head_dim]
    g = helper.make_graph(
        [helper.make_node("RotaryEmbedding", ["X", "cos", "sin"], ["Y"], domain="fusegraph", name="rope0",
                          interleaved=0, rotary_dim=head_dim)],
        "rope", [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)], [cos, sin])
    return save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("fusegraph", 1)],
                                  functions=[REGISTRY["RotaryEmbedding"].function(opset)]), path)
