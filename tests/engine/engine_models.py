"""Small synthetic ONNX models for the engine tests, and the skip for machines without TensorRT.

Imported by the test modules beside it (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fusegraph import tensorrt_shim

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


def fused_matmul_model(path, n_in=64, n_out=32, op="MatMulBiasRelu") -> str:
    """A `fusegraph`-domain MatMulBias{Act} node whose local function is the reference body."""
    act = op.removeprefix("MatMulBias")
    body = [helper.make_node("MatMul", ["X", "W"], ["m"]), helper.make_node("Add", ["m", "B"], ["a"])]
    body.append(helper.make_node(act, ["a"], ["Y"]) if act else helper.make_node("Identity", ["a"], ["Y"]))
    fn = helper.make_function("fusegraph", op, ["X", "W", "B"], ["Y"], body,
                              opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((n_in, n_out)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32), "B")
    g = helper.make_graph(
        [helper.make_node(op, ["X", "W", "B"], ["Y"], domain="fusegraph", name="fused_mlp")],
        "fused", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", n_out])], [w, b])
    return save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("fusegraph", 1)],
                                  functions=[fn]), path)


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
