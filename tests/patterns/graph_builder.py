"""A small builder for the decomposed subgraphs the rule tests draw: ops by name, constants as
initializers or Constant nodes, one model out (through fusegraph.verify.testing.make_model)."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from fusegraph.verify.testing import make_model, node


class Builder:
    def __init__(self, dtype=np.float32, *, const_nodes: bool = False):
        self.dtype = np.dtype(dtype)
        self.const_nodes = const_nodes
        self.nodes = []
        self.inits = {}
        self.count = 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, dtype=None) -> str:
        """A constant in `dtype` (default the graph's float type), as an initializer or a
        Constant node according to `const_nodes`."""
        arr = np.asarray(value, dtype=dtype or self.dtype)
        name = self.fresh("c")
        if self.const_nodes:
            self.nodes.append(node("Constant", [], [name], value=numpy_helper.from_array(arr, name)))
        else:
            self.inits[name] = arr
        return name

    def weight(self, array, dtype=None) -> str:
        name = self.fresh("w")
        self.inits[name] = np.asarray(array, dtype=dtype or self.dtype)
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(node(op_type, list(inputs), outs, **attrs))
        return outs[0] if outputs == 1 else outs

    def cast(self, x: str, dtype) -> str:
        return self.op("Cast", x, to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))

    def reduce_mean(self, x: str, axes: list[int], opset: int) -> str:
        if opset >= 18:
            return self.op("ReduceMean", x, self.const(axes, np.int64), keepdims=1)
        return self.op("ReduceMean", x, axes=axes, keepdims=1)

    def model(self, inputs: dict, outputs: dict, opset: int):
        """inputs/outputs: name -> shape list (in the graph's dtype) or a (dtype, shape) tuple."""
        def spec(s):
            return s if isinstance(s, tuple) else (self.dtype, s)
        return make_model(self.nodes, {k: spec(v) for k, v in inputs.items()},
                          {k: spec(v) for k, v in outputs.items()}, self.inits, opset=opset)
