"""Building ONNX graphs from code: the one builder behind every graph fusegraph writes by hand.

Fused-op bodies (`fusegraph.ops.fused_ops.Body`), the self-check's instances of a pattern
(`fusegraph.verify.instantiate`), the fuzzer's random models (`fusegraph.verify.fuzz`) and the
tests' models (`fusegraph.verify.testing.make_model`, tests/patterns/graph_builder.py) all need
the same few things, and each of those users adds only what is its own on top:

    b = GraphBuilder(np.float16)
    y = b.op("Mul", "x", b.const(0.5))             # one output: its fresh name
    lo, hi = b.op("Split", y, outputs=2, axis=-1)   # several: their names
    model = b.model({"x": ["batch", 8]}, {lo: ["batch", 4]}, opset=18)

The contract:
- `fresh` never hands out a name the builder has seen: one it handed out before, or one an op
  read or wrote, a constant or a graph input took. Two values of one graph never share a name,
  whatever the hints and however builders' nodes are cut into subgraphs (`Body.if_attr`).
- Constants have the builder's element type unless they name theirs, and are initializers or
  `Constant` nodes (`const_nodes`): the two forms an exporter writes, which a rule must match
  alike. `weight` is always an initializer (a parameter the model loads).
- `model` assembles what was built: graph inputs and outputs map names to `(dtype, shape)`
  (str dims symbolic, shape None for unknown), a bare shape in the builder's type, or None for
  a value without a declared type; the opset imports are the default domain's and, at version
  1, every custom domain an op was built in.

Cost: every method is O(its own inputs and outputs); `model` copies the nodes once.
Dependencies: onnx and numpy only; every layer of fusegraph may import this module.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: The version of a custom domain's opset import where the builder is not told one.
CUSTOM_DOMAIN_VERSION = 1


def element_type(dtype: Any) -> int:
    """The ONNX element type (`onnx.TensorProto.FLOAT`, ...) of `dtype`: one already, or
    anything numpy reads as a dtype (np.float16, "float32")."""
    if isinstance(dtype, int):
        return dtype
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class GraphBuilder:
    """Nodes, initializers, graph inputs and custom domains of one graph under construction.

    `dtype` is the element type of the graph's floats (what `const` and a bare shape in `model`
    default to), or None where it is not fixed (a polymorphic function body: every constant
    names its type). `const_nodes` writes constants as `Constant` nodes instead of
    initializers.
    """

    def __init__(self, dtype: Any = np.float32, *, const_nodes: bool = False) -> None:
        self.dtype: int | None = None if dtype is None else element_type(dtype)
        self.const_nodes = const_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        #: Graph inputs declared with `input`: name -> (dtype, shape).
        self.inputs: dict[str, tuple[Any, Sequence[int | str] | None]] = {}
        #: Custom domains of the ops built, and the version of their opset import.
        self.domains: dict[str, int] = {}
        self._seen: set[str] = set()
        self._count = 0

    def fresh(self, hint: str) -> str:
        """A name no value of this graph has: `hint_N`, N counting up across the builder."""
        while True:
            self._count += 1
            name = f"{hint}_{self._count}"
            if name not in self._seen:
                self._seen.add(name)
                return name

    def op(self, op_type: str, *inputs: str, outputs: int | str | Sequence[str] = 1, domain: str = "",
           name: str | None = None, **attrs: Any) -> str | list[str]:
        """A node of `op_type` reading `inputs` ("" for an omitted optional one); `outputs` is how
        many fresh outputs it writes, or their names. Returns the output's name where there is one
        (`outputs` 1 or a name), else the list. `attrs` as `helper.make_node` takes them (None
        leaves one out); an attribute named like a parameter here goes through `add`."""
        outs = self.add(op_type, inputs, outputs, attrs, domain=domain, name=name)
        return outs[0] if outputs == 1 or isinstance(outputs, str) else outs

    def add(self, op_type: str, inputs: Sequence[str], outputs: int | str | Sequence[str] = 1,
            attributes: Mapping[str, Any] | None = None, *, domain: str = "",
            name: str | None = None) -> list[str]:
        """`op` with the attributes as a mapping, always returning the list of outputs. A value
        may be an `onnx.AttributeProto`, taken as it is (a reference to a function's attribute)."""
        if isinstance(outputs, int):
            outs = [self.fresh(op_type.lower()) for _ in range(outputs)]
        else:
            outs = [outputs] if isinstance(outputs, str) else list(outputs)
        self._seen.update(inputs)
        self._seen.update(outs)
        node = helper.make_node(op_type, list(inputs), outs, name=name, domain=domain or None)
        node.attribute.extend(value if isinstance(value, onnx.AttributeProto) else helper.make_attribute(key, value)
                              for key, value in (attributes or {}).items() if value is not None)
        if domain and domain != "ai.onnx":
            self.domains.setdefault(domain, CUSTOM_DOMAIN_VERSION)
        self.nodes.append(node)
        return outs

    def const(self, value: Any, dtype: Any = None, hint: str = "c") -> str:
        """A constant of element type `dtype` (default the builder's), as an initializer or a
        `Constant` node according to `const_nodes`."""
        array = self._array(value, dtype)
        name = self.fresh(hint)
        if self.const_nodes:
            self.add("Constant", [], name, {"value": numpy_helper.from_array(array, name)})
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, value: Any, dtype: Any = None, hint: str = "w") -> str:
        """A constant that is an initializer whatever `const_nodes` says: a parameter of the model."""
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(self._array(value, dtype), name))
        return name

    def ints(self, *values: int) -> str:
        """A 1-D int64 constant (axes, starts, shapes)."""
        return self.const(list(values), onnx.TensorProto.INT64)

    def cast(self, x: str, dtype: Any) -> str:
        return self.op("Cast", x, to=element_type(dtype))

    def reduce_mean(self, x: str, axes: Sequence[int], opset: int, keepdims: int = 1) -> str:
        """ReduceMean over `axes`, which moved from an attribute to an input at opset 18."""
        if opset >= 18:
            return self.op("ReduceMean", x, self.ints(*axes), keepdims=keepdims)
        return self.op("ReduceMean", x, axes=list(axes), keepdims=keepdims)

    def input(self, name: str, shape: Sequence[int | str] | None, dtype: Any = None) -> str:
        """Declare graph input `name` (of the builder's element type unless `dtype` says)."""
        self._seen.add(name)
        self.inputs[name] = (self.dtype if dtype is None else dtype, None if shape is None else list(shape))
        return name

    def model(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], opset: int, *,
              ir_version: int = 10, domains: Mapping[str, int] | None = None,
              name: str = "graph") -> onnx.ModelProto:
        """The model of what was built. `inputs` (after those declared with `input`) and
        `outputs` map names to `(dtype, shape)`, a bare shape list in the builder's type, or
        None (no declared type); `domains` adds or overrides custom opset imports."""
        graph = helper.make_graph(
            self.nodes, name, [self._value_info(n, s) for n, s in {**self.inputs, **inputs}.items()],
            [self._value_info(n, s) for n, s in outputs.items()], self.initializers)
        custom = {**self.domains, **(domains or {})}
        opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in sorted(custom.items())]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = ir_version
        return model

    def _array(self, value: Any, dtype: Any) -> np.ndarray:
        elem = self.dtype if dtype is None else element_type(dtype)
        if elem is None:
            raise ValueError("this builder has no default element type: give the constant's dtype")
        return np.asarray(value, helper.tensor_dtype_to_np_dtype(elem))

    def _value_info(self, name: str, spec: Any) -> onnx.ValueInfoProto:
        if spec is None:
            return onnx.ValueInfoProto(name=name)
        dtype, shape = spec if isinstance(spec, tuple) else (self.dtype, spec)
        if dtype is None:
            raise ValueError(f"{name}: this builder has no default element type: give (dtype, shape)")
        return helper.make_tensor_value_info(name, element_type(dtype), None if shape is None else list(shape))
