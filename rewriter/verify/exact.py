"""Exact mode: for the linear parts of a graph, compare with no tolerance at all.

MatMul chains, transposes, reshapes, bias adds and the like map small integers to small
integers, and floating point represents those exactly: on integer-valued inputs (and
integer-valued constants) every correct rewrite gives bit-identical outputs, whatever order
it sums in. A tolerance would hide a rewrite that drops a bias of 1e-4 or swaps two rows of
equal norm; equality does not. `is_exact` says whether a model (fused ops included, through
their function bodies) uses only such ops; `exact_inputs` draws the inputs.

Magnitudes stay tiny (inputs in [-2, 2], dims of a few elements), far below 2**11, the
largest integer float16 counts to exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .differential import DEFAULT_DIM, OutputDiff, compare, graph_inputs, make_inputs

#: Ops that map integer-valued tensors to integer-valued tensors exactly.
EXACT_OPS = frozenset({
    "MatMul", "Add", "Sub", "Mul", "Neg", "Abs", "Relu", "Max", "Min", "Sum",
    "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Identity",
    "Concat", "Split", "Slice", "Gather", "Cast", "CastLike", "Constant", "Shape", "Tile",
})
#: Integer-valued inputs are drawn from [-LIMIT, LIMIT].
LIMIT = 2


def is_exact(model: onnx.ModelProto) -> bool:
    """True if every op (inside fused ops' functions too) is in EXACT_OPS and every float
    constant is integer-valued."""
    functions = {(f.domain, f.name): f for f in model.functions}

    def nodes_exact(nodes) -> bool:
        for n in nodes:
            f = functions.get((n.domain, n.op_type))
            if f is not None:
                if not nodes_exact(f.node):
                    return False
            elif n.domain not in ("", "ai.onnx") or n.op_type not in EXACT_OPS:
                return False
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR and not _integral(numpy_helper.to_array(a.t)):
                    return False
                if a.type in (onnx.AttributeProto.FLOAT, onnx.AttributeProto.FLOATS) and n.op_type == "Constant":
                    if not _integral(np.asarray(helper.get_attribute_value(a))):
                        return False
        return True

    return nodes_exact(model.graph.node) and all(
        _integral(numpy_helper.to_array(t)) for t in model.graph.initializer
        if t.data_location != onnx.TensorProto.EXTERNAL)


def _integral(a: np.ndarray) -> bool:
    return a.dtype.kind not in "fc" or bool(np.all(np.isfinite(a) & (np.round(a) == a)))


def exact_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
                 seed: int = 0, default_dim: int = DEFAULT_DIM) -> dict[str, np.ndarray]:
    """Inputs of the right shapes with small integer values (as floats for float inputs)."""
    rng = np.random.default_rng(seed)
    feeds = make_inputs(model, shapes, seed, default_dim)
    types = {vi.name: vi for vi in graph_inputs(model)}
    out = {}
    for name, arr in feeds.items():
        if arr.dtype.kind in "fiu" and name in types:
            low = -LIMIT if arr.dtype.kind != "u" else 0
            arr = rng.integers(low, LIMIT + 1, size=arr.shape).astype(arr.dtype)
        out[name] = arr
    return out


def integer_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An integer-valued array for a constant of an exact-mode graph."""
    return rng.integers(-LIMIT, LIMIT + 1, size=shape).astype(dtype)


def compare_exact(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> list[OutputDiff]:
    """Every output bit for bit equal (tolerance zero)."""
    return compare(expected, actual, atol=0.0, rtol=0.0)
