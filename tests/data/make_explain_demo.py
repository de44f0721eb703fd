"""Write `tests/data/explain_demo.onnx`, the model the README's `rewrite --explain` example runs on.

Two MatMul -> bias -> Relu chains (of two weights, so no common subexpression) that
`gemm_epilogue.matmul_act` refuses, each for another reason: the first adds a [2, 3] matrix
where the rule wants a bias vector [N]; the second subtracts its bias. Run `python tests/data/make_explain_demo.py` to regenerate it (onnx and
numpy only); `tests/core/test_cli.py` checks the README's output against it.
"""

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def explain_demo() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.eye(3, dtype=np.float32), "w")
    b = numpy_helper.from_array(np.ones((2, 3), np.float32), "b")
    c = numpy_helper.from_array(np.ones(3, np.float32), "c")
    w2 = numpy_helper.from_array(2 * np.eye(3, dtype=np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["y"], name="act"),
             helper.make_node("MatMul", ["x", "w2"], ["m2"], name="mm2"),
             helper.make_node("Sub", ["m2", "c"], ["s"], name="sub"),
             helper.make_node("Relu", ["s"], ["y2"], name="act2")]
    graph = helper.make_graph(nodes, "explain_demo", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 3])], [w, b, c, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


if __name__ == "__main__":
    onnx.save(explain_demo(), os.path.join(os.path.dirname(os.path.abspath(__file__)), "explain_demo.onnx"))
