"""The fused attention ops `fusegraph.Attention` and `fusegraph.MaskedAttention`.

    Y = softmax(softcap(Q @ K^T * scale) [+ Mask] [+ causal]) @ V

Q is [B, Hq, Sq, D], K and V are [B, Hkv, Sk, D] with Hq a multiple of Hkv (query head h reads
kv head h // (Hq / Hkv): grouped-query and multi-query attention need no repeated KV). `Mask`
is an additive float mask broadcastable to [B, Hq, Sq, Sk], of any float type, added to the
scores in its own type (the scores rounded to it first), as the graphs it replaces add it: a
float16 mask of -65504 saturates in float16 as it did there, and a float32 mask of
finfo(float32).min absorbs any score (a fully masked row stays uniform, as in the original).
`is_causal` (0/1) masks keys after the query, upper-left aligned (query i sees keys j <= i), as
ONNX opset-23 `Attention` without past keys. `softcap` (float) caps the scaled scores as
cap * tanh(s / cap) before the mask where `softcapped` (0/1) is 1 (Gemma 2; opset-23
`Attention`'s `softcap`). The flag is an int because the body branches on it (`Body.if_attr`:
TensorRT folds an If on an int attribute, not on a float one).
Softmax runs in float32; Y has Q's type.

`zero_nan_rows` (0/1) says what a row whose softmax is NaN reads as (a row with every score at
-inf, or a NaN or +inf score that Q or K brought): 1 gives zeros, as the graphs with SDPA's
guard `Where(IsNaN(p), 0, p)` after the Softmax compute (and `kernels.reference.attention`);
0 leaves the NaN, as an eager softmax without the guard does. The rewriter states it from
the matched graph: neither answer is right for both, since NaN can come from the inputs as
well as from the mask.

Why two names: a local-function body cannot test whether an optional input was given, so
"with a mask" is a distinct op (`MaskedAttention`, one more input) rather than an optional
input. Both carry the same attributes and map to the one kernel (`kernels.reference.attention(q,
k, v, mask or None, scale, is_causal, softcap, zero_nan_rows)`): a plugin registers both
names, and the attributes stay on the node instead of being baked into a mask.

The body is written for speed in ONNX Runtime, which inlines it (`benchmarks/bench_lowering.py`,
profiled with `SessionOptions.enable_profiling`): it adds to the decomposition it replaces
(MatMul, scale, mask Add, Softmax, MatMul) only work over [.., Sq, 1] or [.., Sq, Dv], never
another pass over the [B, Hq, Sq, Sk] scores (ONNX Runtime's Where costs about 8 Adds there):

* grouped KV heads: from opset 14 Q is viewed as [B, Hkv, (Hq / Hkv) * Sq, D], so each kv
  head meets the rows of its query heads in one MatMul and K and V are never repeated (a
  Reshape of contiguous data is free); opset 13 repeats them with a Gather (`_repeat_heads`);
* `is_causal`: an If on the attribute, adding a [Sq, Sk] bias of 0 and -inf (Trilu from
  opset 14); with the function inlined the condition is a constant, so ONNX Runtime's constant
  folding and TensorRT's parser keep only the chosen branch. The bias is added, as exporters'
  causal masks are: a NaN or +inf score at a masked key makes its row NaN (see `zero_nan_rows`);
* `softcapped` and `zero_nan_rows`: Ifs on the attributes, as `is_causal`. A NaN row: Softmax
  leaves it NaN throughout, so its first probability tells, and a Where over Y's row zeroes
  it. So a dead row is zeros even where V holds inf or NaN (0 * inf in the MatMul would be
  NaN); a live row's NaN from V stays NaN. For `--target tensorrt` (`Body.target`) the body
  zeroes the NaN probabilities instead (IsNaN + Where over them, as SDPA's guard does):
  TensorRT fuses that into its attention kernel, while a second reader of the probabilities
  splits it (Llama, 4 layers: 77 engine layers against 63; the original export builds 69).
  The two forms differ only where a dead row meets an inf or NaN in V;
* Cast to float32 of a float32 tensor is free: ONNX Runtime removes it when it inlines.
"""

from __future__ import annotations

import onnx

from .fused_ops import Attribute, Body, FusedOp, register

MIN_OPSET = 13
#: CastLike, which lets one body serve float32, float16 and bfloat16, exists from this opset.
TYPED_BODY_OPSET = 15
#: Reshape keeps a computed shape's rank in inference, and Trilu exists, from this opset.
GROUPED_BODY_OPSET = 14
FLOAT = onnx.TensorProto.FLOAT


def _dims(b: Body, x: str, start: int, end: int) -> str:
    """Shape(x)[start:end], valid from opset 13 (Shape's own start/end are opset 15)."""
    return b.op("Slice", b.op("Shape", x), b.ints(start), b.ints(end))


def _repeat_heads(b: Body, x: str, hq: str) -> str:
    """[B, Hkv, S, D] -> [B, Hq, S, D], each kv head repeated Hq / Hkv times in place: a Gather
    of head h // (Hq / Hkv), whose output rank shape inference knows at every opset (a Reshape
    to a computed shape loses it before opset 14). Opset 13 only (`GROUPED_BODY_OPSET`)."""
    zero, one = b.op("Constant", value_int=0), b.op("Constant", value_int=1)
    group = b.op("Squeeze", b.op("Div", hq, _dims(b, x, 1, 2)), b.ints(0))
    heads = b.op("Range", zero, b.op("Squeeze", hq, b.ints(0)), one)
    return b.op("Gather", x, b.op("Div", heads, group), axis=1)


def _causal_bias(b: Body, opset: int) -> str:
    """[Sq, Sk] float32: 0 where key j <= query i, -inf after. Trilu from opset 14 (two passes
    over Sq x Sk); a Where below, which ONNX Runtime runs about 8x slower per element."""
    sq, sk = _dims(b, "Q", 2, 3), _dims(b, "K", 2, 3)
    ninf = b.op("Constant", value_float=float("-inf"))
    if opset >= GROUPED_BODY_OPSET:
        full = b.op("Expand", ninf, b.op("Concat", sq, sk, axis=0))
        return b.op("Trilu", full, b.op("Constant", value_int=1), upper=1)
    zero, one = b.op("Constant", value_int=0), b.op("Constant", value_int=1)
    rows = b.op("Unsqueeze", b.op("Range", zero, b.op("Squeeze", sq, b.ints(0)), one), b.ints(1))
    cols = b.op("Range", zero, b.op("Squeeze", sk, b.ints(0)), one)
    return b.op("Where", b.op("LessOrEqual", cols, rows), b.op("Constant", value_float=0.0), ninf)


def _body(b: Body, opset: int, masked: bool) -> None:
    typed = opset >= TYPED_BODY_OPSET
    q, k, v = (b.op("Cast", x, to=FLOAT) for x in ("Q", "K", "V"))
    grouped = opset >= GROUPED_BODY_OPSET
    if grouped:  # the query heads that share a kv head as one [group * Sq] block of rows: no copy
        heads_rows = _dims(b, "Q", 1, 3)  # [Hq, Sq]
        hkv = _dims(b, "K", 1, 2)
        group_rows = b.op("Div", b.op("ReduceProd", heads_rows, keepdims=1), hkv)  # Hq * Sq / Hkv
        zero = b.ints(0)
        # Reshape's zeros copy the viewed tensor's own batch and last dims
        by_kv_head = b.op("Concat", zero, hkv, group_rows, zero, axis=0)  # [N, Hkv, G * Sq, last]
        by_q_head = b.op("Concat", zero, heads_rows, zero, axis=0)  # [N, Hq, Sq, last]
        q = b.op("Reshape", q, by_kv_head)
    else:
        hq = _dims(b, "Q", 1, 2)
        k, v = _repeat_heads(b, k, hq), _repeat_heads(b, v, hq)
    scores = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])),
                  b.attr_const("scale", onnx.AttributeProto.FLOAT))
    scores = b.if_attr("softcapped", lambda: _softcapped(b, scores), lambda: scores)
    if grouped:
        scores = b.op("Reshape", scores, by_q_head)
    if masked and typed:  # the sum in the Mask's type, as the replaced graph computed it
        scores = b.op("Cast", b.op("Add", b.op("CastLike", scores, "Mask"), "Mask"), to=FLOAT)
    elif masked:  # float32 attention only below opset 15 (`attention.body_fits_opset`)
        scores = b.op("Add", scores, b.op("Cast", "Mask", to=FLOAT))
    # is_causal: an If on the attribute that the loader folds (`Body.if_attr`)
    scores = b.if_attr("is_causal", lambda: b.op("Add", scores, _causal_bias(b, opset)), lambda: scores)
    probs = b.op("Softmax", scores, axis=-1)
    # zero_nan_rows: an If on the attribute, as is_causal (the branch not taken costs nothing)
    if b.target == "tensorrt":  # the guard on the probabilities, which TensorRT fuses into its attention
        probs = b.if_attr("zero_nan_rows", lambda: b.op("Where", b.op("IsNaN", probs),
                                                        b.op("Constant", value_float=0.0), probs), lambda: probs)
    y = b.op("MatMul", b.op("Reshape", probs, by_kv_head) if grouped else probs, v)
    if grouped:
        y = b.op("Reshape", y, by_q_head)
    if b.target != "tensorrt":
        y = b.if_attr("zero_nan_rows", lambda: _zero_nan_rows(b, probs, y), lambda: y)
    b.cast_like(y, "Q", outputs="Y")


def _softcapped(b: Body, scores: str) -> str:
    """cap * tanh(scores / cap) (Gemma 2's logit soft-capping), applied before the mask."""
    cap = b.attr_const("softcap", onnx.AttributeProto.FLOAT)
    return b.op("Mul", b.op("Tanh", b.op("Div", scores, cap)), cap)


def _zero_nan_rows(b: Body, probs: str, y: str) -> str:
    """Y with zeros on the rows whose softmax is NaN. A row with every score at -inf, or with a
    NaN or +inf score, is NaN throughout after Softmax (one NaN makes the sum that normalises
    the row NaN), so its first probability tells. The ReduceSum over that one column keeps an
    empty key axis (no column) a live row."""
    first = b.op("Slice", probs, b.ints(0), b.ints(1), b.ints(-1))
    dead = b.op("IsNaN", b.op("ReduceSum", first, b.ints(-1), keepdims=1))
    return b.op("Where", dead, b.op("Constant", value_float=0.0), y)


#: scale 0 stands for 1/sqrt(D) where a node omits it (the rules always state it). A node
#: written before `softcap` and `zero_nan_rows` existed computed no cap and zeroed NaN rows.
ATTRIBUTES = (Attribute("scale", "float", 0.0), Attribute("is_causal", "int", 0),
              Attribute("softcap", "float", 0.0, optional=True), Attribute("softcapped", "int", 0, optional=True),
              Attribute("zero_nan_rows", "int", 1, optional=True))

ATTENTION = register(FusedOp(
    "Attention", ("Q", "K", "V"), ("Y",), lambda b, opset: _body(b, opset, masked=False),
    "Y = softmax(softcap(Q K^T * scale) [causal]) V; fp32 softmax, grouped KV heads", ATTRIBUTES, MIN_OPSET,
    reference="attention"))

MASKED_ATTENTION = register(FusedOp(
    "MaskedAttention", ("Q", "K", "V", "Mask"), ("Y",), lambda b, opset: _body(b, opset, masked=True),
    "Y = softmax(softcap(Q K^T * scale) + Mask [causal]) V; fp32 softmax, grouped KV heads", ATTRIBUTES,
    MIN_OPSET, reference="attention"))
