"""BMM-Softmax-BMM -> one attention op.

    softmax(Q @ K^T * scale + mask) @ V

is matched in the forms the PyTorch exporters (TorchScript and dynamo, eager and SDPA) emit:

- the scale as Mul or Div on the scores, on Q, on K (before or after its transpose) or split
  as sqrt(scale) on both; any scalar constant is the op's `scale` (an attention with another
  scale than 1/sqrt(D) is still an attention); no scale is scale 1;
- the mask as an Add (additive float mask, or a position bias), as Where(keep, scores, fill)
  (boolean mask) or Where(drop, fill, scores) (`masked_fill`), or absent; a Where becomes the
  additive mask Where(keep, 0, fill) outside the fused op;
- Casts around the Softmax (softmax in float32 for half inputs) and SDPA's NaN guard
  Where(IsNaN(p), 0, p) after it;
- K^T as Transpose(K, [0,1,3,2]) or folded into the head split, Transpose(K_bshd, [0,2,3,1]);
- grouped/multi-query KV repeated as Reshape(Expand(Unsqueeze(kv, 2))) (HF's repeat_kv): the
  fused op takes the un-repeated KV when the shapes prove the Reshape only merges the heads
  and the repeats, else the repeated KV (still correct, just not grouped).

The target is chosen per model: `attention.onnx` emits the standard opset-23 `Attention` (which
TensorRT maps to its native attention layer) when the model's default opset is at least 23;
`attention.fusegraph` emits `fusegraph.Attention`/`MaskedAttention` (see `attention_op`) for
every other model. Select `attention.fusegraph` alone to keep the fusegraph op (for its plugin)
on opset-23 models too. A mask that is a plain causal triangle becomes `is_causal=1` with no
mask input (`attention_masks`). Both targets compute in float32, so float64 attention is left
alone.
"""

from __future__ import annotations

import numpy as np
import onnx

from fusegraph.fused_ops import DOMAIN
from fusegraph.pattern import Attr, Const, Pattern, PatternOps, Var, optional
from fusegraph.rule import Rule, reject

from . import attention_masks
from .attention_op import MIN_OPSET

ONNX_ATTENTION_OPSET = 23
#: Captures holding scale constants: a product of the `_mul`s over a product of the `_div`s.
SCALE_SITES = ("q", "k_pre", "k_post", "s")


def scaled(op: PatternOps, x: Pattern, site: str) -> Pattern:
    """x times or over a constant (captured as `{site}_mul` / `{site}_div`), or x itself."""
    return op.Mul(x, Const(name=f"{site}_mul")) | op.Div(x, Const(name=f"{site}_div")) | x


def _same_dim(a, b) -> bool:
    return a is not None and a == b


def _grows_only_axis_2(expand) -> bool:
    """Expand(Unsqueeze(x, 2)) repeats each head of x in place: only the new axis grows."""
    xs, es = expand.producer.inputs[0].producer.inputs[0].shape, expand.shape
    return (xs is not None and es is not None and (len(xs), len(es)) == (4, 5)
            and all(_same_dim(es[i], xs[j]) for i, j in ((0, 0), (1, 1), (3, 2), (4, 3))))


def _repeats_heads(v) -> bool:
    """Reshape(Expand(Unsqueeze(x, 2))) is repeat_kv: the Reshape only merges the repeats with
    the heads (B, S, D are kept), as the shapes show."""
    expand = v.producer.inputs[0]
    xs, vs = expand.producer.inputs[0].producer.inputs[0].shape, v.shape
    return (_grows_only_axis_2(expand) and vs is not None and len(vs) == 4
            and all(_same_dim(vs[i], xs[i]) for i in (0, 2, 3)))


def repeated_kv(op: PatternOps, kv: Pattern, tag: str) -> Pattern:
    """HF's repeat_kv: Reshape(Expand(Unsqueeze(kv, 2), [B, Hkv, n, S, D]), [B, Hkv * n, S, D]).
    The shapes are captured as `{tag}_grown`/`{tag}_merged` (for the self-check's examples;
    `_repeats_heads` reads the shapes the values have)."""
    return op.Reshape(op.Expand(_unsqueezed_heads(op, kv), Var(f"{tag}_grown")), Var(f"{tag}_merged")).where(
        _repeats_heads, "repeats the kv heads in place")


def _unsqueezed_heads(op: PatternOps, kv: Pattern) -> Pattern:
    return op.Unsqueeze(kv, Const(where=lambda a: a.tolist() in ([2], [-3], 2, -3), why="axes = [2]"))


def _swaps_last_two(flat, v, x) -> bool:
    """Reshape(Transpose(Reshape(x, [-1, S, D]), [0, 2, 1]), [B, H, D, S]) keeps B, S and D."""
    xs, fs, vs = x.shape, flat.shape, v.shape
    return (xs is not None and fs is not None and vs is not None and len(fs) == 3 and len(vs) == 4
            and _same_dim(fs[1], xs[-2]) and _same_dim(fs[2], xs[-1]) and _same_dim(vs[0], xs[0])
            and _same_dim(vs[2], xs[-1]) and _same_dim(vs[3], xs[-2]))


def _transposes_last_two(v) -> bool:
    flat = v.producer.inputs[0].producer.inputs[0]
    x = flat.producer.inputs[0]
    return x.rank == 4 and _same_dim(v.shape and v.shape[1], x.shape[1]) and _swaps_last_two(flat, v, x)


def _repeats_and_transposes(v) -> bool:
    """The same on a repeat_kv whose merging Reshape was folded into the flattening one."""
    flat = v.producer.inputs[0].producer.inputs[0]
    expand = flat.producer.inputs[0]
    return _grows_only_axis_2(expand) and _swaps_last_two(flat, v, expand)


def key_transposed_batched(op: PatternOps, k: Pattern, k_kv: Pattern) -> Pattern:
    """k.transpose(-2, -1) as dynamo's SDPA decomposition writes it: flattened to 3-D, transposed,
    reshaped back; the reshapes' targets are constants (proved by the shapes) or Shape(k)'s dims.
    A static export may fold repeat_kv's Reshape into the flattening one."""
    def swapped(x: Pattern) -> Pattern:
        return op.Reshape(op.Transpose(op.Reshape(x, Var("kt_flat")), perm=[0, 2, 1]), Var("kt_shape"))
    static = swapped(k).where(_transposes_last_two, "transposes K's last two dims")
    folded = swapped(op.Expand(_unsqueezed_heads(op, k_kv), Var("k_grown"))).where(
        _repeats_and_transposes, "repeats the kv heads and transposes K's last two dims")
    dims = op.Shape(k, start=0)
    last = op.Slice(dims, Const(-1), Const(name="kt_end", where=lambda a: a.size == 1 and a.item() >= 2**62, why="end"))
    second = op.Slice(dims, Const(-2), Const(-1))
    lead = op.Slice(dims, Const(name="kt_start", where=lambda a: a.size == 1 and a.item() <= -(2**62), why="start"), Const(-2))
    flat = op.Reshape(k, op.Concat(Const(-1, name="kt_rows"), second, last, axis=0))
    dynamic = op.Reshape(op.Transpose(flat, perm=[0, 2, 1]), op.Concat(lead, last, second, axis=0))
    return folded | static | dynamic


def key_transposed(op: PatternOps, k: Pattern, k_kv: Pattern, k_bshd: Pattern) -> Pattern:
    """K^T [B, H, D, S]: from K [B, H, S, D] (`k`, or `k_kv` repeated to the query heads), or
    straight from the head split's [B, S, H, D] (`k_bshd`)."""
    k = repeated_kv(op, k_kv, "k") | k
    plain = op.Transpose(scaled(op, k, "k_pre"), perm=[0, 1, 3, 2])
    merged = op.Transpose(scaled(op, k_bshd, "k_pre"), perm=[0, 2, 3, 1])
    return scaled(op, plain | merged | key_transposed_batched(op, scaled(op, k, "k_pre"), k_kv), "k_post")


def attention(op, q, k, k_kv, k_bshd, v, v_kv, mask, bias, keep, drop):
    scores = scaled(op, op.MatMul(scaled(op, q, "q"), key_transposed(op, k, k_kv, k_bshd)), "s")
    scores = optional(op.Cast(scores, to=Attr("cast_scores")))
    masked = (op.Add(op.Add(scores, bias), mask) | op.Add(scores, mask) | op.Where(keep, scores, Const(name="fill"))
              | op.Where(drop, Const(name="fill"), scores) | scores)
    softmax = op.Softmax(optional(op.Cast(masked, to=Attr("cast_masked"))), axis=Attr("axis"))
    probs = optional(op.Cast(optional(op.Cast(softmax)), to=Attr("cast_probs")))
    guarded = op.Where(op.IsNaN(probs), Const(0.0), probs) | probs
    return op.MatMul(guarded, repeated_kv(op, v_kv, "v") | v)


# -- conditions ------------------------------------------------------------------------------
def _factors(captures: dict) -> list[tuple[str, object]]:
    return [(kind, c) for site in SCALE_SITES for kind in ("mul", "div")
            if (c := captures.get(f"{site}_{kind}")) is not None]


def scales_are_scalars(**captures) -> bool:
    """Only a single factor folds into the op's `scale`: a per-head tensor is no attention."""
    for kind, c in _factors(captures):
        a = c.const_value
        if a is None or a.size != 1 or not np.isfinite(a).all() or (kind == "div" and not a.any()):
            return reject(f"scale {kind} {c.name!r} is not a finite non-zero scalar constant")
    return True


def softmax_on_last_axis(axis, q) -> bool:
    return axis == -1 or (axis == 3 and q.rank == 4) or reject(f"softmax on axis {axis}, not the last")


def heads_layout(q, k, k_kv, k_bshd, v, v_kv) -> bool:
    """The op takes 4-D [B, H, S, D]: K^T's 4-D perm proves K's rank; Q's and V's must be 4
    where known (TorchScript exports carry no shapes; their Q and V are the head split's)."""
    for name, x in (("q", q), ("k", k or k_kv or k_bshd), ("v", v or v_kv)):
        if x.rank not in (None, 4):
            return reject(f"{name} has rank {x.rank}, not [B, H, S, D]")
    if (k_kv is None) != (v_kv is None):
        return reject("only one of K and V is a repeated kv")
    return True


def one_precision(q, k=None, k_kv=None, k_bshd=None, cast_scores=None, cast_masked=None, cast_probs=None,
                  **captures) -> bool:
    """The op returns Q's type, so the probabilities that meet V must have Q's type. Q's type is
    read from Q, K or a scale constant (all precede the casts)."""
    probs_type = cast_probs or cast_masked or cast_scores
    if probs_type is None:
        return True
    known = [x.dtype for x in (q, k, k_kv, k_bshd, *(c for _, c in _factors(captures)))
             if x is not None and x.dtype]
    if not known:
        return reject("Q's type is unknown and casts set the probabilities' type")
    name = onnx.TensorProto.DataType.Name
    return probs_type == known[0] or reject(f"probabilities are {name(probs_type)}, Q is {name(known[0])}")


def mask_fits(q, mask, bias, keep, drop) -> bool:
    """The mask broadcasts into the scores [B, Hq, Sq, Sk] without growing them (where known)."""
    for m in (mask, bias, keep, drop):
        if m is None or m.shape is None:
            continue
        if len(m.shape) > 4:
            return reject(f"mask has rank {len(m.shape)} > 4")
        for md, qd in zip(reversed(m.shape[:-1]), reversed(q.shape[:3] if q.shape else ())):
            if qd == 1 and md not in (1, None):
                return reject(f"mask dim {md} would grow the scores' dim 1")
    return True


# -- replacements ----------------------------------------------------------------------------
def total_scale(captures: dict) -> float:
    s = 1.0
    for kind, c in _factors(captures):
        f = float(c.const_value.reshape(-1)[0])
        s = s * f if kind == "mul" else s / f
    return s


def operands(op, k, k_kv, k_bshd, v, v_kv, mask, bias, keep, drop, fill):
    """K and V as [B, Hkv, S, D] and the additive mask (or None) the fused op takes."""
    key = k_kv or k or op.Transpose(k_bshd, perm=[0, 2, 1, 3])
    if bias is not None:
        mask = op.Add(bias, mask)
    elif keep is not None:
        mask = op.Where(keep, np.zeros((), fill.const_value.dtype), fill)
    elif drop is not None:
        mask = op.Where(drop, fill, np.zeros((), fill.const_value.dtype))
    return key, v_kv or v, mask


def to_fusegraph(op, q, k=None, k_kv=None, k_bshd=None, v=None, v_kv=None, mask=None, bias=None, keep=None, drop=None,
                 fill=None, **captures):
    """BMM-Softmax-BMM -> fusegraph.Attention / MaskedAttention"""
    key, value, mask = operands(op, k, k_kv, k_bshd, v, v_kv, mask, bias, keep, drop, fill)
    q_len = q.shape[2] if q.shape and len(q.shape) == 4 else None
    causal = attention_masks.is_causal_triangle(mask, q_len)
    attrs = dict(scale=total_scale(captures), is_causal=int(causal), _domain=DOMAIN)
    if mask is None or causal:
        return op.Attention(q, key, value, **attrs)
    return op.MaskedAttention(q, key, value, mask, **attrs)


def to_onnx(op, q, k=None, k_kv=None, k_bshd=None, v=None, v_kv=None, mask=None, bias=None, keep=None, drop=None,
            fill=None, **captures):
    """BMM-Softmax-BMM -> ONNX Attention (opset 23)"""
    key, value, mask = operands(op, k, k_kv, k_bshd, v, v_kv, mask, bias, keep, drop, fill)
    q_len = q.shape[2] if q.shape and len(q.shape) == 4 else None
    causal = attention_masks.is_causal_triangle(mask, q_len)
    if causal:
        mask = None
    elif mask is not None and mask.dtype != q.dtype:
        mask = op.CastLike(mask, q)  # a float attn_mask has Q's type
    inputs = (q, key, value) if mask is None else (q, key, value, mask)
    return op.Attention(*inputs, scale=total_scale(captures), is_causal=int(causal),
                        softmax_precision=onnx.TensorProto.FLOAT)


def opset_at_least(n: int):
    def check(q) -> bool:
        have = q.graph.opset.get("", 1)
        return have >= n or reject(f"model opset {have} < {n}")
    check.__name__ = f"opset_at_least_{n}"
    return check


def _ints(*v: int) -> np.ndarray:
    return np.array(v, np.int64)


#: For the self-check: Q, K, V [B, H, S, D] = [1, 2, 3, 4], K/V repeated from one kv head, K as
#: [B, S, H, D] for the merged transpose, masks over [.., Sq, Sk]; the Reshape and Expand
#: targets and the Slice bounds (to the end of Shape(K)) the conditions accept, which the
#: generic search can't guess.
EXAMPLE = {
    "q": ((1, 2, 3, 4), np.float32), "k": ((1, 2, 3, 4), np.float32), "v": ((1, 2, 3, 4), np.float32),
    "k_kv": ((1, 1, 3, 4), np.float32), "v_kv": ((1, 1, 3, 4), np.float32),
    "k_bshd": ((1, 3, 2, 4), np.float32),
    "k_grown": _ints(1, 1, 2, 3, 4), "v_grown": _ints(1, 1, 2, 3, 4),
    "k_merged": _ints(1, 2, 3, 4), "v_merged": _ints(1, 2, 3, 4),
    "kt_flat": _ints(-1, 3, 4), "kt_shape": _ints(1, 2, 4, 3), "kt_start": _ints(-2**63), "kt_end": _ints(2**63 - 1),
    "kt_rows": _ints(-1),
    "mask": ((1, 1, 3, 3), np.float32), "bias": ((1, 2, 3, 3), np.float32),
    "keep": ((1, 1, 3, 3), np.bool_), "drop": ((1, 1, 3, 3), np.bool_),
}

def math_fits_float32(q) -> bool:
    """Both targets compute the scores and softmax in float32 (`attention_op`, ONNX Attention's
    softmax_precision); a float64 attention would lose float64's precision."""
    return q.dtype != onnx.TensorProto.DOUBLE or reject("float64 Q: the fused attention would be computed in float32")


def positive_scale(**captures) -> bool:
    """ONNX Runtime's `Attention` refuses a scale <= 0 (a negative factor, or one that rounds
    to 0 in float16); `fusegraph.Attention` takes any."""
    scale = total_scale(captures)
    return scale > 0 or reject(f"scale {scale} is not positive, which ONNX Attention refuses")


CONDITIONS = [scales_are_scalars, softmax_on_last_axis, heads_layout, one_precision, mask_fits, math_fits_float32]

RULES = [
    Rule("attention.onnx", attention, to_onnx, [opset_at_least(ONNX_ATTENTION_OPSET)] + CONDITIONS + [positive_scale],
         priority=210,
         examples=[EXAMPLE]),
    Rule("attention.fusegraph", attention, to_fusegraph, [opset_at_least(MIN_OPSET)] + CONDITIONS, priority=200,
         examples=[EXAMPLE]),
]
