"""fusegraph's fused operators and their reference decompositions (ONNX local functions).

A fused op is a node in the `fusegraph` domain. The rewritten model carries, for every such op
it uses, an ONNX local function with the op's reference decomposition in standard ops, so ONNX
Runtime, `onnx.reference` and TensorRT's ONNX parser (which inlines local functions) run it
unchanged, while a TensorRT plugin registered under the same name can take the node over.

Bodies are written per opset (ReduceMean's axes moved from attribute to input at 18), and
constants are cast with CastLike so one function serves fp32, fp16 and bf16 alike. The numpy
references in `fusegraph.kernels.reference` implement the same semantics for the GPU kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import onnx
from onnx import helper

DOMAIN = "fusegraph"
VERSION = 1


@dataclass(frozen=True)
class FusedOp:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: tuple[str, ...]
    body: Callable[["Body", int], None]
    doc: str

    def function(self, opset: int) -> onnx.FunctionProto:
        b = Body()
        self.body(b, opset)
        return helper.make_function(
            DOMAIN, self.name, list(self.inputs), list(self.outputs), b.nodes,
            [helper.make_opsetid("", opset)], attributes=list(self.attributes), doc_string=self.doc)


class Body:
    """A tiny builder for function bodies: `b.op("Add", "a", "b")` returns the output name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        name = out or f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attrs))
        return name

    def const_like(self, value: float, like: str) -> str:
        """A scalar constant of the same element type as `like`."""
        c = self.op("Constant", value=helper.make_tensor("v", onnx.TensorProto.FLOAT, [], [value]))
        return self.op("CastLike", c, like)

    def attr_const(self, attr: str, attr_type: int, like: str | None = None) -> str:
        """A scalar Constant whose value is the function's attribute `attr`."""
        a = onnx.AttributeProto()
        a.name = "value_float" if attr_type == onnx.AttributeProto.FLOAT else "value_int"
        a.type = attr_type
        a.ref_attr_name = attr
        node = helper.make_node("Constant", [], [f"t{len(self.nodes)}"])
        node.attribute.append(a)
        self.nodes.append(node)
        return self.op("CastLike", node.output[0], like) if like else node.output[0]


REGISTRY: dict[str, FusedOp] = {}


def register(op: FusedOp) -> FusedOp:
    if op.name in REGISTRY and REGISTRY[op.name] != op:
        raise ValueError(f"fused op {op.name} registered twice")
    REGISTRY[op.name] = op
    return op


# -- activations, shared by every epilogue --------------------------------------------------
def _gelu_erf(b: Body, x: str, out: str) -> str:
    half = b.op("Mul", x, b.const_like(0.5, x))
    erf = b.op("Erf", b.op("Div", x, b.const_like(math.sqrt(2.0), x)))
    return b.op("Mul", half, b.op("Add", erf, b.const_like(1.0, x)), out=out)


def _gelu_tanh(b: Body, x: str, out: str) -> str:
    cube = b.op("Mul", b.op("Mul", x, x), x)
    inner = b.op("Add", x, b.op("Mul", cube, b.const_like(0.044715, x)))
    t = b.op("Tanh", b.op("Mul", inner, b.const_like(math.sqrt(2.0 / math.pi), x)))
    half = b.op("Mul", x, b.const_like(0.5, x))
    return b.op("Mul", half, b.op("Add", t, b.const_like(1.0, x)), out=out)


ACTIVATIONS: dict[str, Callable[[Body, str, str], str]] = {
    "": lambda b, x, out: b.op("Identity", x, out=out),
    "Relu": lambda b, x, out: b.op("Relu", x, out=out),
    "Gelu": _gelu_erf,
    "GeluTanh": _gelu_tanh,
    "Sigmoid": lambda b, x, out: b.op("Sigmoid", x, out=out),
    "Tanh": lambda b, x, out: b.op("Tanh", x, out=out),
    "Silu": lambda b, x, out: b.op("Mul", x, b.op("Sigmoid", x), out=out),
}


def matmul_epilogue_name(bias: bool, activation: str) -> str:
    return f"MatMul{'Bias' if bias else ''}{activation}"


def _register_matmul_epilogues() -> None:
    for bias in (False, True):
        for act in ACTIVATIONS:
            if not bias and not act:
                continue

            def body(b: Body, opset: int, bias: bool = bias, act: str = act) -> None:
                y = b.op("MatMul", "X", "W")
                if bias:
                    y = b.op("Add", y, "B")
                ACTIVATIONS[act](b, y, "Y")

            register(FusedOp(
                matmul_epilogue_name(bias, act), ("X", "W", "B") if bias else ("X", "W"), ("Y",), (),
                body, f"Y = {act or 'identity'}(X @ W{' + B' if bias else ''})"))


_register_matmul_epilogues()


def functions_for(op_names: set[str], opset: int) -> list[onnx.FunctionProto]:
    """Local functions for the fused ops a model uses, in a deterministic order."""
    return [REGISTRY[name].function(opset) for name in sorted(op_names)]
