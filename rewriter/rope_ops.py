"""The rotary position embedding fused op `fusegraph.RotaryEmbedding(X, cos, sin)`.

Semantics of `fusegraph.kernels.reference.rotary_embedding` (HF layout): X [B, H, S, D]; cos and
sin broadcastable to [B, H, S, rotary_dim]; the first rotary_dim channels become
x * cos + rotate(x) * sin, the rest pass through; rotate is rotate-half (concat(-x2, x1)) or,
with `interleaved`, (x0, x1, ...) -> (-x1, x0, ...). Math in float32, Y in X's type.

The body takes rotary_dim from cos's last axis (the attribute states it for plugins) and writes
either rotation as one Gather by a permutation times a sign vector, both built from
`interleaved`, so one function body serves both without control flow.
"""

from __future__ import annotations

import onnx
from onnx import helper

from .fused_ops import Body, FusedOp, register

FLOAT, INT64, BOOL = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.BOOL


def _int(b: Body, value: int, shape=()) -> str:
    return b.op("Constant", value=helper.make_tensor("c", INT64, list(shape), [value]))


def _float(b: Body, value: float) -> str:
    return b.op("Constant", value=helper.make_tensor("c", FLOAT, [], [value]))


def _body(b: Body, opset: int) -> None:
    xf, cos, sin = (b.op("Cast", v, to=FLOAT) for v in ("X", "cos", "sin"))
    rd = b.last_dim("cos")
    last = _int(b, -1, [1])
    xr = b.op("Slice", xf, _int(b, 0, [1]), rd, last)
    xp = b.op("Slice", xf, rd, _int(b, 2**62, [1]), last)
    n = b.op("Squeeze", rd, _int(b, 0, [1])) if opset >= 13 else b.op("Squeeze", rd, axes=[0])
    idx = b.op("Range", _int(b, 0), n, _int(b, 1))
    half = b.op("Div", n, _int(b, 2))
    interleaved = b.op("Cast", b.attr_const("interleaved", onnx.AttributeProto.INT), to=BOOL)
    odd = b.op("Mod", idx, _int(b, 2))
    # interleaved: channel i reads i + 1 (even i, negated) or i - 1 (odd i)
    perm_il = b.op("Sub", b.op("Add", idx, _int(b, 1)), b.op("Mul", odd, _int(b, 2)))
    sign_il = b.op("Where", b.op("Equal", odd, _int(b, 0)), _float(b, -1.0), _float(b, 1.0))
    # rotate-half: channel i reads i + half (first half, negated) or i - half
    perm_rh = b.op("Mod", b.op("Add", idx, half), n)
    sign_rh = b.op("Where", b.op("Less", idx, half), _float(b, -1.0), _float(b, 1.0))
    perm = b.op("Where", interleaved, perm_il, perm_rh)
    sign = b.op("Where", interleaved, sign_il, sign_rh)
    rotated = b.op("Mul", b.op("Gather", xr, perm, axis=-1), sign)
    y = b.op("Add", b.op("Mul", xr, cos), b.op("Mul", rotated, sin))
    b.cast_like(b.op("Concat", y, xp, axis=-1), "X", out="Y")


ROTARY_EMBEDDING = register(FusedOp(
    "RotaryEmbedding", ("X", "cos", "sin"), ("Y",), ("interleaved", "rotary_dim"), _body,
    "Y[..., :rd] = X[..., :rd] * cos + rotate(X[..., :rd]) * sin, Y[..., rd:] = X[..., rd:]; "
    "rd = rotary_dim = cos.shape[-1]"))
