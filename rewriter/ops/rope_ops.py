"""The rotary position embedding fused op `fusegraph.RotaryEmbedding(X, cos, sin)`.

Semantics of `fusegraph.kernels.reference.rotary_embedding` (HF layout): X [B, H, S, D]; cos and
sin broadcastable to [B, H, S, rotary_dim]; the first rotary_dim channels become
x * cos + rotate(x) * sin, the rest pass through; rotate is rotate-half (concat(-x2, x1)) or,
with `interleaved`, (x0, x1, ...) -> (-x1, x0, ...). Math in float32, Y in X's type.

The body takes rotary_dim from cos's last axis (the attribute states it for plugins). It is
written for speed in ONNX Runtime, which inlines it: the rotation is never materialised. With
x1, x2 the channels a rotation pairs and c1, s1, c2, s2 the tables at the same channels,

    y1 = x1 * c1 - x2 * s1,   y2 = x2 * c2 + x1 * s2.

The layout is an If on `interleaved` (`Body.if_attr`), which the loader folds: rotate-half
slices the halves and writes y1, y2 and the pass-through channels with one Concat; interleaved
takes the even and odd channels by strided Slices and interleaves y1, y2 by one Concat of
[.., rd/2, 1] views. That is as many passes over X as the exported Slice/Neg/Concat/Mul/Add
chain (a Gather by a permutation, the obvious single-body form, ran 3-5x slower:
benchmarks/bench_lowering.py, and stays the body below opset 14, where shape inference could
not follow the Reshapes).
"""

from __future__ import annotations

import onnx

from .fused_ops import Attribute, Body, FusedOp, register

FLOAT, INT64, BOOL = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.BOOL
#: From this opset Reshape's shape inference keeps the rank of a computed shape.
FAST_BODY_OPSET = 14
#: From this opset an If may return any tensor type (bfloat16 included).
IF_ANY_TYPE_OPSET = 16


def _gather_body(b: Body, opset: int) -> None:
    """Below opset 14 (whose Reshape shape inference loses the rank of a computed shape): the
    rotation as one Gather by a permutation times a sign vector, both built from `interleaved`."""
    xf, cos, sin = (b.op("Cast", v, to=FLOAT) for v in ("X", "cos", "sin"))
    rd = b.last_dim("cos")
    last = b.ints(-1)
    xr = b.op("Slice", xf, b.ints(0), rd, last)
    xp = b.op("Slice", xf, rd, b.ints(2**62), last)
    n = b.op("Squeeze", rd, b.ints(0)) if opset >= 13 else b.op("Squeeze", rd, axes=[0])
    idx = b.op("Range", b.const(0, INT64), n, b.const(1, INT64))
    half = b.op("Div", n, b.const(2, INT64))
    interleaved = b.op("Cast", b.attr_const("interleaved", onnx.AttributeProto.INT), to=BOOL)
    odd = b.op("Mod", idx, b.const(2, INT64))
    # interleaved: channel i reads i + 1 (even i, negated) or i - 1 (odd i)
    perm_il = b.op("Sub", b.op("Add", idx, b.const(1, INT64)), b.op("Mul", odd, b.const(2, INT64)))
    sign_il = b.op("Where", b.op("Equal", odd, b.const(0, INT64)), b.const(-1.0, FLOAT), b.const(1.0, FLOAT))
    # rotate-half: channel i reads i + half (first half, negated) or i - half
    perm_rh = b.op("Mod", b.op("Add", idx, half), n)
    sign_rh = b.op("Where", b.op("Less", idx, half), b.const(-1.0, FLOAT), b.const(1.0, FLOAT))
    perm = b.op("Where", interleaved, perm_il, perm_rh)
    sign = b.op("Where", interleaved, sign_il, sign_rh)
    rotated = b.op("Mul", b.op("Gather", xr, perm, axis=-1), sign)
    y = b.op("Add", b.op("Mul", xr, cos), b.op("Mul", rotated, sin))
    b.cast_like(b.op("Concat", y, xp, axis=-1), "X", outputs="Y")


def _body(b: Body, opset: int) -> None:
    if opset < FAST_BODY_OPSET:
        return _gather_body(b, opset)
    x, cos, sin = (b.op("Cast", v, to=FLOAT) for v in ("X", "cos", "sin"))
    rd = b.last_dim("cos")
    one, two, last = b.ints(1), b.ints(2), b.ints(-1)
    half = b.op("Div", rd, two)
    rest = b.op("Slice", x, rd, b.ints(2**62), last)

    def rotated(x1: str, x2: str, c1: str, c2: str, s1: str, s2: str) -> tuple[str, str]:
        return (b.op("Sub", b.op("Mul", x1, c1), b.op("Mul", x2, s1)),
                b.op("Add", b.op("Mul", x2, c2), b.op("Mul", x1, s2)))

    def halves() -> str:  # y1, y2 and the pass-through channels side by side: one Concat
        (x1, x2), (c1, c2), (s1, s2) = ((b.op("Slice", v, b.ints(0), half, last), b.op("Slice", v, half, rd, last))
                                        for v in (x, cos, sin))
        return b.op("Concat", *rotated(x1, x2, c1, c2, s1, s2), rest, axis=-1)

    def interleaved() -> str:  # even and odd channels by strided Slices, put back by [.., rd/2, 1] views
        (x1, x2), (c1, c2), (s1, s2) = ((b.op("Slice", v, b.ints(0), rd, last, two),
                                         b.op("Slice", v, one, rd, last, two)) for v in (x, cos, sin))
        y1, y2 = rotated(x1, x2, c1, c2, s1, s2)
        lead = b.op("Slice", b.op("Shape", y1), b.ints(0), last)
        split = b.op("Concat", lead, half, one, axis=0)
        joined = b.op("Concat", b.op("Reshape", y1, split), b.op("Reshape", y2, split), axis=-1)
        return b.op("Concat", b.op("Reshape", joined, b.op("Concat", lead, rd, axis=0)), rest, axis=-1)

    if opset < IF_ANY_TYPE_OPSET:  # an If of bfloat16 (the cast's type) is invalid here
        y = b.if_attr("interleaved", interleaved, halves)
        # X's shape again (a free view), which ONNX shape inference does not carry out of an If
        b.cast_like(b.op("Reshape", y, b.op("Shape", "X")), "X", outputs="Y")
        return
    # Each branch casts back to X's type: there the value's type is known when ONNX Runtime
    # inlines the body, so it drops the cast for float32 (after the If, a copy of Y it kept)
    y = b.if_attr("interleaved", lambda: b.cast_like(interleaved(), "X"), lambda: b.cast_like(halves(), "X"))
    b.op("Reshape", y, b.op("Shape", "X"), outputs="Y")


ROTARY_EMBEDDING = register(FusedOp(
    "RotaryEmbedding", ("X", "cos", "sin"), ("Y",), _body,
    "Y[..., :rd] = X[..., :rd] * cos + rotate(X[..., :rd]) * sin, Y[..., rd:] = X[..., rd:]; "
    "rd = rotary_dim = cos.shape[-1]",
    # rotary_dim 0: every channel (a plugin reads the attribute; the body reads cos)
    (Attribute("interleaved", "int", 0), Attribute("rotary_dim", "int", 0)), reference="rotary_embedding"))
