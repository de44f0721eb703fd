"""Activation fused ops (domain `fusegraph`): GELU (erf and tanh), SiLU, QuickGELU, and the
gated MLPs SwiGLU / GeGLU, Y = act(X @ Wg) * (X @ Wu).

The elementwise ops exist for models below opset 20 (no standard `Gelu`) and for activations
ONNX has no op for; a TensorRT plugin or the builder's pointwise fusion runs them in one pass.
The gated ops are the `swiglu` reference of `fusegraph.kernels.reference`: one kernel computes
both GEMMs from the same X tile and multiplies in registers. Bodies reuse the GEMM epilogues'
activation decompositions (`fused_ops.ACTIVATIONS`).
"""

from __future__ import annotations

import onnx

from .fused_ops import ACTIVATIONS, ACTIVATIONS_OPSET, Attribute, Body, FusedOp, register


def _elementwise(act: str):
    def body(b: Body, opset: int) -> None:
        ACTIVATIONS[act](b, "X", "Y")
    return body


def _quick_gelu(b: Body, opset: int) -> None:
    alpha = b.attr_const("alpha", onnx.AttributeProto.FLOAT, like="X")
    b.op("Mul", "X", b.op("Sigmoid", b.op("Mul", "X", alpha)), outputs="Y")


def _gated(act: str):
    def body(b: Body, opset: int) -> None:
        gate = ACTIVATIONS[act](b, b.op("MatMul", "X", "Wg"), "gate")
        b.op("Mul", gate, b.op("MatMul", "X", "Wu"), outputs="Y")
    return body


for _name, _act, _doc in (("Gelu", "Gelu", "Y = 0.5 X (1 + erf(X / sqrt 2))"),
                          ("GeluTanh", "GeluTanh", "Y = 0.5 X (1 + tanh(sqrt(2/pi) (X + 0.044715 X^3)))"),
                          ("Silu", "Silu", "Y = X * Sigmoid(X)")):
    register(FusedOp(_name, ("X",), ("Y",), _elementwise(_act), _doc, min_opset=ACTIVATIONS_OPSET,
                     activation=_act, reference="activation"))

register(FusedOp("QuickGelu", ("X",), ("Y",), _quick_gelu, "Y = X * Sigmoid(alpha X)",
                 (Attribute("alpha", "float", 1.702),), reference="quick_gelu"))

#: gated op name -> the activation applied to the gate (the rules' and the plugins' map)
GATED = {"SwiGLU": "Silu", "GeGLU": "Gelu", "GeGLUTanh": "GeluTanh"}
for _name, _act in GATED.items():
    register(FusedOp(_name, ("X", "Wg", "Wu"), ("Y",), _gated(_act), f"Y = {_act}(X @ Wg) * (X @ Wu)",
                     min_opset=ACTIVATIONS_OPSET, activation=_act, reference="swiglu"))
