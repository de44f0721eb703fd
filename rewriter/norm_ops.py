"""The normalization fused ops: RMSNorm, SkipRMSNorm and SkipLayerNorm (domain `fusegraph`).

Semantics are those of `fusegraph.kernels.reference` (rms_norm, skip_rms_norm,
skip_layer_norm): the statistics are computed in float32 whatever X's type, over the last
axis, and Y comes back in X's type. The Skip ops also return S = X + R (in X's type), the
residual stream the next block adds to, so one kernel reads X and R once and writes both.
LayerNorm itself needs no fused op: opset 17's `LayerNormalization` (stash_type float32) is it.
"""

from __future__ import annotations

import onnx
from onnx import helper

from .fused_ops import Body, FusedOp, register

FLOAT = onnx.TensorProto.FLOAT


def reduce_mean_last(b: Body, x: str, opset: int) -> str:
    """ReduceMean over the last axis, keepdims: axes moved from attribute to input at opset 18."""
    if opset >= 18:
        axes = b.op("Constant", value=helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [-1]))
        return b.op("ReduceMean", x, axes, keepdims=1)
    return b.op("ReduceMean", x, axes=[-1], keepdims=1)


def _rms_norm(b: Body, x: str, opset: int) -> None:
    xf = b.op("Cast", x, to=FLOAT)
    mean_sq = reduce_mean_last(b, b.op("Mul", xf, xf), opset)
    rms = b.op("Sqrt", b.op("Add", mean_sq, b.attr_const("epsilon", onnx.AttributeProto.FLOAT)))
    y = b.op("Mul", b.op("Div", xf, rms), b.op("Cast", "gamma", to=FLOAT))
    b.op("CastLike", y, x, out="Y")


def _rms_norm_body(b: Body, opset: int) -> None:
    _rms_norm(b, "X", opset)


def _skip_rms_norm_body(b: Body, opset: int) -> None:
    _rms_norm(b, b.op("Add", "X", "R", out="S"), opset)


def _skip_layer_norm_body(b: Body, opset: int) -> None:
    s = b.op("Add", "X", "R", out="S")
    node = helper.make_node("LayerNormalization", [s, "gamma", "beta"], ["Y"], axis=-1, stash_type=1)
    eps = onnx.AttributeProto()
    eps.name, eps.type, eps.ref_attr_name = "epsilon", onnx.AttributeProto.FLOAT, "epsilon"
    node.attribute.append(eps)
    b.nodes.append(node)


RMS_NORM = register(FusedOp(
    "RMSNorm", ("X", "gamma"), ("Y",), ("epsilon",), _rms_norm_body,
    "Y = X / sqrt(mean(X^2, last axis) + epsilon) * gamma, computed in float32"))
SKIP_RMS_NORM = register(FusedOp(
    "SkipRMSNorm", ("X", "R", "gamma"), ("Y", "S"), ("epsilon",), _skip_rms_norm_body,
    "S = X + R; Y = RMSNorm(S, gamma, epsilon)"))
SKIP_LAYER_NORM = register(FusedOp(
    "SkipLayerNorm", ("X", "R", "gamma", "beta"), ("Y", "S"), ("epsilon",), _skip_layer_norm_body,
    "S = X + R; Y = LayerNormalization(S, gamma, beta, axis=-1, epsilon) (opset 17 or newer)"))
