"""Graph fuzzing: a hypothesis strategy for random valid ONNX DAGs with planted fusions.

`graphs()` draws models of opset 18 in float32 whose nodes mix noise (elementwise ops,
MatMul, Reshape/Transpose, Softmax, reductions, Concat/Split, Cast round trips) with planted
instances of what the library fuses (MatMul+Add+Relu, x*Sigmoid(x), erf-GELU), decoys that
almost match (a bias that is not a constant, x*Sigmoid(y), GELU with 0.6 instead of 0.5) and
shared intermediates (values read twice, and intermediates that are also graph outputs), which
exercise the driver's safety checks. Shapes are tracked, so every draw is valid ONNX; every
value is 2-D [rows, features] or the 3-D view a Reshape makes of it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

OPSET = 18
FEATURES = (4, 6, 8)


class _GraphBuilder:
    def __init__(self, rows: int, rng: np.random.Generator):
        self.rows = rows
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}{self.count}"

    def const(self, array: np.ndarray) -> str:
        n = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(array), n))
        return n

    def weight(self, shape: tuple[int, ...]) -> str:
        return self.const((self.rng.uniform(-1, 1, shape) / math.sqrt(shape[0])).astype(np.float32))

    def op(self, op_type: str, inputs: list[str], shape: tuple[int, ...], n_out: int = 1, **attrs: Any) -> list[str]:
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name("n"), **attrs))
        for o in outs:
            self.shapes[o] = shape
        return outs

    def one(self, op_type: str, inputs: list[str], shape: tuple[int, ...], **attrs: Any) -> str:
        return self.op(op_type, inputs, shape, **attrs)[0]


def _step(b: _GraphBuilder, kind: str, x: str, y: str) -> list[str]:
    """Apply one generator step to value `x` (and `y` for binary ops); returns new values."""
    sx = b.shapes[x]
    rows, f = sx[0], sx[-1]
    if kind == "unary":
        op = ["Relu", "Sigmoid", "Tanh", "Neg", "Abs"][b.rng.integers(5)]
        return [b.one(op, [x], sx)]
    if kind == "binary":
        op = ["Add", "Mul", "Sub", "Max", "Min"][b.rng.integers(5)]
        other = y if b.shapes[y] == sx else b.const(b.rng.uniform(0.5, 1.5, (f,)).astype(np.float32))
        return [b.one(op, [x, other], sx)]
    if kind == "matmul":
        m = int(b.rng.choice(FEATURES))
        return [b.one("MatMul", [x, b.weight((f, m))], (rows, m))]
    if kind == "reshape":  # [r, f] -> [r, 2, f/2] -> Transpose -> back
        r3 = b.one("Reshape", [x, b.const(np.array([rows, 2, f // 2], np.int64))], (rows, 2, f // 2))
        t = b.one("Transpose", [r3], (rows, f // 2, 2), perm=[0, 2, 1])
        return [b.one("Reshape", [t, b.const(np.array([rows, f], np.int64))], (rows, f))]
    if kind == "softmax":
        return [b.one("Softmax", [x], sx, axis=int(b.rng.choice([-1, 0])))]
    if kind == "reduce":
        op = ["ReduceMean", "ReduceSum", "ReduceMax"][b.rng.integers(3)]
        r = b.one(op, [x, b.const(np.array([-1], np.int64))], (rows, 1), keepdims=1)
        return [b.one("Sub", [x, r], sx)]
    if kind == "concat_split":
        c = b.one("Concat", [x, y if b.shapes[y] == sx else x], (rows, 2 * f), axis=1)
        return b.op("Split", [c], sx, n_out=2, axis=1, num_outputs=2)
    if kind == "cast":
        h = b.one("Cast", [x], sx, to=onnx.TensorProto.DOUBLE)
        return [b.one("Cast", [h], sx, to=onnx.TensorProto.FLOAT)]
    # planted patterns and their decoys
    if kind in ("mm_bias_relu", "mm_bias_decoy"):
        m = int(b.rng.choice(FEATURES))
        mm = b.one("MatMul", [x, b.weight((f, m))], (rows, m))
        bias = (b.const(b.rng.uniform(-1, 1, (m,)).astype(np.float32)) if kind == "mm_bias_relu"
                else b.one("Sigmoid", [b.one("MatMul", [y, b.weight((b.shapes[y][-1], m))], (rows, m))], (rows, m)))
        return [b.one("Relu", [b.one("Add", [mm, bias], (rows, m))], (rows, m))]
    if kind == "silu":
        return [b.one("Mul", [x, b.one("Sigmoid", [x], sx)], sx)]
    if kind == "silu_decoy":
        other = y if b.shapes[y] == sx else b.one("Neg", [x], sx)
        return [b.one("Mul", [x, b.one("Sigmoid", [other], sx)], sx)]
    if kind in ("gelu", "gelu_decoy"):
        half = 0.5 if kind == "gelu" else 0.6
        d = b.one("Div", [x, b.const(np.array(math.sqrt(2.0), np.float32))], sx)
        e = b.one("Add", [b.one("Erf", [d], sx), b.const(np.array(1.0, np.float32))], sx)
        return [b.one("Mul", [b.one("Mul", [x, b.const(np.array(half, np.float32))], sx), e], sx)]
    raise ValueError(kind)


STEPS = ("unary", "binary", "matmul", "reshape", "softmax", "reduce", "concat_split", "cast",
         "mm_bias_relu", "mm_bias_decoy", "silu", "silu_decoy", "gelu", "gelu_decoy")


def build_graph(rows: int, n_inputs: int, steps: list[tuple[str, int, int]], extra_outputs: list[int],
                seed: int) -> onnx.ModelProto:
    """The model a drawn recipe describes: `steps` are (kind, index of x, index of y) over the
    values so far; `extra_outputs` picks intermediates that are also graph outputs."""
    b = _GraphBuilder(rows, np.random.default_rng(seed))
    values = []
    inputs = []
    for i in range(n_inputs):
        name = f"in{i}"
        b.shapes[name] = (rows, FEATURES[i % len(FEATURES)])
        inputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [rows, b.shapes[name][1]]))
        values.append(name)
    consumed: set[str] = set()
    for kind, i, j in steps:
        x, y = values[i % len(values)], values[j % len(values)]
        if kind in ("reshape",) and b.shapes[x][-1] % 2:
            kind = "unary"
        new = _step(b, kind, x, y)
        consumed.update(n for node in b.nodes for n in node.input)
        values.extend(new)
    made = values[n_inputs:]
    outs = [v for v in made if v not in consumed] + [made[k % len(made)] for k in extra_outputs]
    outs = list(dict.fromkeys(outs))
    graph = helper.make_graph(
        b.nodes, "fuzz", inputs,
        [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, list(b.shapes[o])) for o in outs], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


def graphs(max_steps: int = 12):
    """The hypothesis strategy: random valid models with planted fusions and decoys."""
    from hypothesis import strategies as st

    step = st.tuples(st.sampled_from(STEPS), st.integers(0, 63), st.integers(0, 63))
    return st.builds(build_graph, rows=st.integers(1, 3), n_inputs=st.integers(1, 3),
                     steps=st.lists(step, min_size=1, max_size=max_steps),
                     extra_outputs=st.lists(st.integers(0, 63), max_size=2), seed=st.integers(0, 2**16))
