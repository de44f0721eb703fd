"""Synthetic transformer-like graphs of any size, for benchmarks and scaling tests.

Each block is a small transformer layer: Q/K/V projections, a BMM-Softmax-BMM attention core,
an output projection, residual Adds, and an MLP whose first MatMul feeds a Relu (the planted
MatMul+Relu instance) and whose second feeds a Relu that also has a second consumer (a decoy
that must not fuse). One block is 20 nodes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NODES_PER_BLOCK = 20


def transformer_like(num_nodes: int, hidden: int = 8, opset: int = 17) -> onnx.ModelProto:
    blocks = max(1, num_nodes // NODES_PER_BLOCK)
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32) * 0.3, f"w{i}")
             for i in range(6)]
    inits.append(numpy_helper.from_array(np.array([0, 2, 1], np.int64), "perm"))
    nodes = []
    x = "x"

    def add(op, ins, out, **attrs):
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    for b in range(blocks):
        p = f"b{b}_"
        q = add("MatMul", [x, "w0"], p + "q")
        k = add("MatMul", [x, "w1"], p + "k")
        v = add("MatMul", [x, "w2"], p + "v")
        kt = add("Transpose", [k], p + "kt", perm=[0, 2, 1])
        s = add("MatMul", [q, kt], p + "s")
        s = add("Div", [s, x], p + "scaled_decoy")
        a = add("Softmax", [s], p + "a", axis=-1)
        o = add("MatMul", [a, v], p + "o")
        o = add("MatMul", [o, "w3"], p + "proj")
        r1 = add("Add", [x, o], p + "res1")
        h = add("MatMul", [r1, "w4"], p + "fc1")
        h = add("Relu", [h], p + "act")                   # planted MatMul+Relu
        h2 = add("MatMul", [h, "w3"], p + "fc2")
        d = add("Relu", [h2], p + "act2")                 # decoy: fc2 has a second consumer
        e = add("Add", [d, h2], p + "mix")
        r2 = add("Add", [r1, e], p + "res2")
        t = add("Transpose", [r2], p + "t1", perm=[0, 2, 1])
        t = add("Transpose", [t], p + "t2", perm=[0, 2, 1])
        n = add("Neg", [t], p + "neg")
        x = add("Neg", [n], p + "out")
    graph = helper.make_graph(
        nodes, "transformer_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden, hidden])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", hidden, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


DECOYS = (lambda x, r, out: helper.make_node("Add", [x, r], [out], name=out),
          lambda x, r, out: helper.make_node("Tanh", [r], [out], name=out),
          lambda x, r, out: helper.make_node("Sigmoid", [r], [out], name=out),
          lambda x, r, out: helper.make_node("Mul", [r, r], [out], name=out))


def mlp_blocks(blocks: int, hidden: int = 8, opset: int = 17) -> onnx.ModelProto:
    """`blocks` MLP blocks of 4 nodes: Relu(x @ W + b), the planted MatMul+Add+Relu (it fuses),
    then a decoy of the op types many rules are rooted at, in turn: a residual Add (not a MatMul's
    bias), Tanh and Sigmoid of the Relu (activations, but not of a MatMul), Mul(r, r) (not
    x * Sigmoid(x), GELU or a gated MLP)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32) * 0.3, "w"),
             numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32) * 0.1, "b")]
    nodes = []
    x = "x"
    for i in range(blocks):
        p = f"b{i}_"
        nodes += [helper.make_node("MatMul", [x, "w"], [p + "mm"], name=p + "mm"),
                  helper.make_node("Add", [p + "mm", "b"], [p + "bias"], name=p + "bias"),
                  helper.make_node("Relu", [p + "bias"], [p + "act"], name=p + "act"),
                  DECOYS[i % len(DECOYS)](x, p + "act", p + "out")]
        x = p + "out"
    graph = helper.make_graph(
        nodes, "mlp_blocks", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model
