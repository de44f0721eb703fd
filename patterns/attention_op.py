"""The fused attention ops `fusegraph.Attention` and `fusegraph.MaskedAttention`.

    Y = softmax(Q @ K^T * scale [+ Mask] [+ causal]) @ V

Q is [B, Hq, Sq, D], K and V are [B, Hkv, Sk, D] with Hq a multiple of Hkv (query head h reads
kv head h // (Hq / Hkv): grouped-query and multi-query attention need no repeated KV). `Mask`
is an additive float mask broadcastable to [B, Hq, Sq, Sk], of any float type. `is_causal`
(0/1) masks keys after the query, upper-left aligned (query i sees keys j <= i), as ONNX
opset-23 `Attention` without past keys. Softmax runs in float32; Y has Q's type; a row with
every score at -inf yields zeros (as `kernels.reference.attention` and ONNX's errata say).

Why two names: a local-function body can neither test whether an optional input was given nor
branch, so "with a mask" is a distinct op (`MaskedAttention`, one more input) rather than an
optional input. Both carry `scale` and `is_causal` as attributes and map to the one kernel
(`kernels.reference.attention(q, k, v, mask or None, scale, is_causal)`): a plugin registers
both names. `is_causal` needs no branch either: the body always builds the triangle and keeps
every score when the flag is 0 (`Or(Not(is_causal), j <= i)`), so the attribute stays on the
node for the plugin instead of being baked into a materialised mask.

Bodies need Shape's start/end (opset 15) and are otherwise the same for every opset.
"""

from __future__ import annotations

import onnx
from onnx import helper

from fusegraph.fused_ops import Body, FusedOp, register

MIN_OPSET = 15
FLOAT = onnx.TensorProto.FLOAT


def _ints(b: Body, *values: int) -> str:
    return b.op("Constant", value=helper.make_tensor("v", onnx.TensorProto.INT64, [len(values)], list(values)))


def _repeat_heads(b: Body, x: str, hq: str) -> str:
    """[B, Hkv, S, D] -> [B, Hq, S, D], each kv head repeated Hq / Hkv times in place."""
    hkv = b.op("Shape", x, start=1, end=2)
    lead = b.op("Shape", x, start=0, end=1)
    tail = b.op("Shape", x, start=2, end=4)
    wide = b.op("Concat", lead, hkv, b.op("Div", hq, hkv), tail, axis=0)
    grown = b.op("Expand", b.op("Unsqueeze", x, _ints(b, 2)), wide)
    return b.op("Reshape", grown, b.op("Concat", lead, hq, tail, axis=0))


def _body(b: Body, opset: int, masked: bool) -> None:
    q = b.op("Cast", "Q", to=FLOAT)
    hq = b.op("Shape", "Q", start=1, end=2)
    k = _repeat_heads(b, b.op("Cast", "K", to=FLOAT), hq)
    v = _repeat_heads(b, b.op("Cast", "V", to=FLOAT), hq)
    scores = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])),
                  b.attr_const("scale", onnx.AttributeProto.FLOAT))
    if masked:
        scores = b.op("Add", scores, b.op("Cast", "Mask", to=FLOAT))
    # Causal: query i keeps key j iff j <= i, or every key when is_causal is 0.
    zero, one = b.op("Constant", value_int=0), b.op("Constant", value_int=1)
    sq = b.op("Squeeze", b.op("Shape", "Q", start=2, end=3))
    sk = b.op("Squeeze", b.op("Shape", "K", start=2, end=3))
    rows = b.op("Unsqueeze", b.op("Range", zero, sq, one), _ints(b, 1))
    cols = b.op("Range", zero, sk, one)
    causal = b.op("Cast", b.attr_const("is_causal", onnx.AttributeProto.INT), to=onnx.TensorProto.BOOL)
    keep = b.op("Or", b.op("Not", causal), b.op("LessOrEqual", cols, rows))
    ninf = b.op("Constant", value_float=float("-inf"))
    probs = b.op("Softmax", b.op("Where", keep, scores, ninf), axis=-1)
    # A fully masked row is NaN after Softmax; it reads as zeros.
    probs = b.op("Where", b.op("IsNaN", probs), b.op("Constant", value_float=0.0), probs)
    b.op("CastLike", b.op("MatMul", probs, v), "Q", out="Y")


ATTENTION = register(FusedOp(
    "Attention", ("Q", "K", "V"), ("Y",), ("scale", "is_causal"),
    lambda b, opset: _body(b, opset, masked=False),
    "Y = softmax(Q K^T * scale [causal]) V; fp32 softmax, grouped KV heads"))

MASKED_ATTENTION = register(FusedOp(
    "MaskedAttention", ("Q", "K", "V", "Mask"), ("Y",), ("scale", "is_causal"),
    lambda b, opset: _body(b, opset, masked=True),
    "Y = softmax(Q K^T * scale + Mask [causal]) V; fp32 softmax, grouped KV heads"))
