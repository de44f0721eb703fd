"""The normalization fused ops: LayerNorm, RMSNorm, SkipRMSNorm and SkipLayerNorm (domain `fusegraph`).

Semantics are those of `fusegraph.kernels.reference` (layer_norm, rms_norm, skip_rms_norm,
skip_layer_norm): the statistics are computed in float32 whatever X's type, over the last
axis, and Y comes back in X's type. The Skip ops also return S = X + R (in X's type), the
residual stream the next block adds to, so one kernel reads X and R once and writes both.

LayerNorm is opset 17's `LayerNormalization` (stash_type float32), which rules emit from 17 on;
`fusegraph.LayerNorm` is the same norm for models of opset 13-16, and SkipLayerNorm's body is
`LayerNormalization` from 17 (TensorRT imports it as a native normalization layer) and the
same float32 decomposition below.
"""

from __future__ import annotations

import onnx

from .fused_ops import Attribute, Body, FusedOp, attribute_reference, register

FLOAT = onnx.TensorProto.FLOAT
#: The opset that has `LayerNormalization`.
LAYER_NORMALIZATION_OPSET = 17


def _rms_norm(b: Body, x: str, opset: int) -> None:
    xf = b.op("Cast", x, to=FLOAT)
    # Pow(x, 2), not x * x: the form ONNX Runtime fuses into SimplifiedLayerNormalization when it
    # inlines the body (2.5x faster per op, benchmarks/bench_lowering.py); the same square
    mean_sq = b.reduce_mean(b.op("Pow", xf, b.op("Constant", value_float=2.0)), [-1], opset)
    rms = b.op("Sqrt", b.op("Add", mean_sq, b.attr_const("epsilon", onnx.AttributeProto.FLOAT)))
    y = b.op("Mul", b.op("Div", xf, rms), b.op("Cast", "gamma", to=FLOAT))
    b.cast_like(y, x, outputs="Y")


def _layer_norm(b: Body, x: str, opset: int) -> None:
    """(X - mean) / sqrt(var + epsilon) * gamma + beta over the last axis, all in float32."""
    xf = b.op("Cast", x, to=FLOAT)
    d = b.op("Sub", xf, b.reduce_mean(xf, [-1], opset))
    var = b.reduce_mean(b.op("Mul", d, d), [-1], opset)
    std = b.op("Sqrt", b.op("Add", var, b.attr_const("epsilon", onnx.AttributeProto.FLOAT)))
    y = b.op("Mul", b.op("Div", d, std), b.op("Cast", "gamma", to=FLOAT))
    b.cast_like(b.op("Add", y, b.op("Cast", "beta", to=FLOAT)), x, outputs="Y")


def _rms_norm_body(b: Body, opset: int) -> None:
    _rms_norm(b, "X", opset)


def _skip_rms_norm_body(b: Body, opset: int) -> None:
    _rms_norm(b, b.op("Add", "X", "R", outputs="S"), opset)


def _layer_norm_body(b: Body, opset: int) -> None:
    _layer_norm(b, "X", opset)


def _skip_layer_norm_body(b: Body, opset: int) -> None:
    # Sum, not Add: ONNX Runtime fuses an inlined Add -> LayerNormalization (with the bias Add
    # before it) into its SkipLayerNormalization, 2-7x slower than the ops it replaces on the
    # measured CPU (benchmarks/RESULTS.md §7.3), where the exports keep them apart.
    s = b.op("Sum", "X", "R", outputs="S")
    if opset < LAYER_NORMALIZATION_OPSET:
        _layer_norm(b, s, opset)
        return
    b.add("LayerNormalization", [s, "gamma", "beta"], "Y",
          {"axis": -1, "stash_type": 1, "epsilon": attribute_reference("epsilon", onnx.AttributeProto.FLOAT)})


#: LayerNormalization's default; RMS norms default to the value Llama's exports carry.
LAYER_EPSILON, RMS_EPSILON = Attribute("epsilon", "float", 1e-5), Attribute("epsilon", "float", 1e-6)

LAYER_NORM = register(FusedOp(
    "LayerNorm", ("X", "gamma", "beta"), ("Y",), _layer_norm_body,
    "Y = (X - mean) / sqrt(var + epsilon) * gamma + beta over the last axis, computed in float32 "
    "(LayerNormalization with stash_type 1, for opsets below 17)", (LAYER_EPSILON,), reference="layer_norm"))
RMS_NORM = register(FusedOp(
    "RMSNorm", ("X", "gamma"), ("Y",), _rms_norm_body,
    "Y = X / sqrt(mean(X^2, last axis) + epsilon) * gamma, computed in float32", (RMS_EPSILON,),
    reference="rms_norm"))
SKIP_RMS_NORM = register(FusedOp(
    "SkipRMSNorm", ("X", "R", "gamma"), ("Y", "S"), _skip_rms_norm_body,
    "S = X + R; Y = RMSNorm(S, gamma, epsilon)", (RMS_EPSILON,), reference="skip_rms_norm"))
SKIP_LAYER_NORM = register(FusedOp(
    "SkipLayerNorm", ("X", "R", "gamma", "beta"), ("Y", "S"), _skip_layer_norm_body,
    "S = X + R; Y = LayerNorm(S, gamma, beta, epsilon) over the last axis, statistics in float32",
    (LAYER_EPSILON,), reference="skip_layer_norm"))
