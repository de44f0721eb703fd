"""The fused attention ops `fusegraph.Attention` and `fusegraph.MaskedAttention`.

    Y = softmax(Q @ K^T * scale [+ Mask] [+ causal]) @ V

Q is [B, Hq, Sq, D], K and V are [B, Hkv, Sk, D] with Hq a multiple of Hkv (query head h reads
kv head h // (Hq / Hkv): grouped-query and multi-query attention need no repeated KV). `Mask`
is an additive float mask broadcastable to [B, Hq, Sq, Sk], of any float type, added to the
scores in its own type (the scores rounded to it first), as the graphs it replaces add it: a
float16 mask of -65504 saturates in float16 as it did there, and a float32 mask of
finfo(float32).min absorbs any score (a fully masked row stays uniform, as in the original).
`is_causal` (0/1) masks keys after the query, upper-left aligned (query i sees keys j <= i), as
ONNX opset-23 `Attention` without past keys. Softmax runs in float32; Y has Q's type; a row
with every score at -inf yields zeros (as `kernels.reference.attention` and ONNX's errata say).

Why two names: a local-function body can neither test whether an optional input was given nor
branch, so "with a mask" is a distinct op (`MaskedAttention`, one more input) rather than an
optional input. Both carry `scale` and `is_causal` as attributes and map to the one kernel
(`kernels.reference.attention(q, k, v, mask or None, scale, is_causal)`): a plugin registers
both names. `is_causal` needs no branch either: the body always builds the triangle and keeps
every score when the flag is 0 (`Or(Not(is_causal), j <= i)`), so the attribute stays on the
node for the plugin instead of being baked into a materialised mask.

Opsets: from 15 the body is type-polymorphic (CastLike back to Q's and the Mask's types). Opsets
13 and 14 have no CastLike, and a function cannot name its input's type in a Cast: there the
body computes in its inputs' type, which is float32 semantics for float32 inputs only, so the
rules emit these ops below opset 15 for float32 attention only (`attention.body_fits_opset`).
Shapes are read with Shape + Slice (Shape's start/end are opset 15).
"""

from __future__ import annotations

import onnx
from onnx import helper

from fusegraph.fused_ops import Body, FusedOp, register

MIN_OPSET = 13
#: CastLike, which lets one body serve float32, float16 and bfloat16, exists from this opset.
TYPED_BODY_OPSET = 15
FLOAT = onnx.TensorProto.FLOAT


def _ints(b: Body, *values: int) -> str:
    return b.op("Constant", value=helper.make_tensor("v", onnx.TensorProto.INT64, [len(values)], list(values)))


def _dims(b: Body, x: str, start: int, end: int) -> str:
    """Shape(x)[start:end], valid from opset 13 (Shape's own start/end are opset 15)."""
    return b.op("Slice", b.op("Shape", x), _ints(b, start), _ints(b, end))


def _repeat_heads(b: Body, x: str, hq: str) -> str:
    """[B, Hkv, S, D] -> [B, Hq, S, D], each kv head repeated Hq / Hkv times in place: a Gather
    of head h // (Hq / Hkv), whose output rank shape inference knows at every opset (a Reshape
    to a computed shape loses it before opset 14)."""
    zero, one = b.op("Constant", value_int=0), b.op("Constant", value_int=1)
    group = b.op("Squeeze", b.op("Div", hq, _dims(b, x, 1, 2)), _ints(b, 0))
    heads = b.op("Range", zero, b.op("Squeeze", hq, _ints(b, 0)), one)
    return b.op("Gather", x, b.op("Div", heads, group), axis=1)


def _body(b: Body, opset: int, masked: bool) -> None:
    typed = opset >= TYPED_BODY_OPSET
    q = b.op("Cast", "Q", to=FLOAT)
    hq = _dims(b, "Q", 1, 2)
    k = _repeat_heads(b, b.op("Cast", "K", to=FLOAT), hq)
    v = _repeat_heads(b, b.op("Cast", "V", to=FLOAT), hq)
    scores = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])),
                  b.attr_const("scale", onnx.AttributeProto.FLOAT))
    if masked and typed:  # the sum in the Mask's type, as the replaced graph computed it
        scores = b.op("Cast", b.op("Add", b.op("CastLike", scores, "Mask"), "Mask"), to=FLOAT)
    elif masked:  # float32 attention only below opset 15 (`attention.body_fits_opset`)
        scores = b.op("Add", scores, b.op("Cast", "Mask", to=FLOAT))
    # Causal: query i keeps key j iff j <= i, or every key when is_causal is 0.
    zero, one = b.op("Constant", value_int=0), b.op("Constant", value_int=1)
    sq = b.op("Squeeze", _dims(b, "Q", 2, 3), _ints(b, 0))
    sk = b.op("Squeeze", _dims(b, "K", 2, 3), _ints(b, 0))
    rows = b.op("Unsqueeze", b.op("Range", zero, sq, one), _ints(b, 1))
    cols = b.op("Range", zero, sk, one)
    causal = b.op("Cast", b.attr_const("is_causal", onnx.AttributeProto.INT), to=onnx.TensorProto.BOOL)
    keep = b.op("Or", b.op("Not", causal), b.op("LessOrEqual", cols, rows))
    ninf = b.op("Constant", value_float=float("-inf"))
    probs = b.op("Softmax", b.op("Where", keep, scores, ninf), axis=-1)
    # A fully masked row is NaN after Softmax; it reads as zeros.
    probs = b.op("Where", b.op("IsNaN", probs), b.op("Constant", value_float=0.0), probs)
    b.cast_like(b.op("MatMul", probs, v), "Q", out="Y")


ATTENTION = register(FusedOp(
    "Attention", ("Q", "K", "V"), ("Y",), ("scale", "is_causal"),
    lambda b, opset: _body(b, opset, masked=False),
    "Y = softmax(Q K^T * scale [causal]) V; fp32 softmax, grouped KV heads", MIN_OPSET))

MASKED_ATTENTION = register(FusedOp(
    "MaskedAttention", ("Q", "K", "V", "Mask"), ("Y",), ("scale", "is_causal"),
    lambda b, opset: _body(b, opset, masked=True),
    "Y = softmax(Q K^T * scale + Mask [causal]) V; fp32 softmax, grouped KV heads", MIN_OPSET))
