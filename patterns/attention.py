"""BMM-Softmax-BMM -> one attention op.

    softmax(Q @ K^T * scale + mask) @ V

is matched in the forms the PyTorch exporters (TorchScript and dynamo, eager and SDPA) emit:

- the scale as Mul or Div on the scores, on Q, on K (before or after its transpose) or split
  as sqrt(scale) on both; any scalar constant is the op's `scale` (an attention with another
  scale than 1/sqrt(D) is still an attention); no scale is scale 1;
- the mask as an Add (additive float mask, or a position bias then a mask whose values the
  bias adds to exactly, as T5's 0 / finfo.min), as Where(keep, scores, fill)
  (boolean mask) or Where(drop, fill, scores) (`masked_fill`), either of them over scores
  plus a bias (ALiBi's), or absent. A Where replaces the
  masked scores by `fill`, which equals adding a mask only when the fill zeroes the weight
  whatever the score (-inf, or the lowest value of its type; `attention_masks`): those become
  the float32 mask Where(keep, 0, fill) outside the fused op (the lowest value as float32's, so
  that a fully masked row stays uniform as in the original); any other fill is refused;
- Casts around the Softmax, each to a type the fused op's float32 math covers losslessly (the
  scores widened to float32, the probabilities back to Q's type), and SDPA's NaN guard
  Where(IsNaN(p), 0, p) after it. The guard is the fused op's `zero_nan_rows=1`: a row whose
  softmax is NaN (masked by -inf throughout, or given NaN or inf by Q or K) reads as zeros;
  without it `zero_nan_rows=0` leaves the NaN, as the eager original does;
- soft-capped scores, cap * tanh(scores / cap) after the scale (Gemma 2): `fusegraph`'s
  `softcap` (TensorRT's parser refuses ONNX `Attention`'s);
- K^T as Transpose(K, [0,1,3,2]) or folded into the head split, Transpose(K_bshd, [0,2,3,1]);
- grouped/multi-query KV repeated as Reshape(Expand(Unsqueeze(kv, 2))) (HF's repeat_kv): the
  fused op takes the un-repeated KV when the shapes prove the Reshape only merges the heads
  and the repeats, else the repeated KV (still correct, just not grouped); a single KV head
  broadcast by the MatMuls ([B, 1, S, D]) is taken as it is;
- with the heads in the batch ([B*H, S, D] throughout), the mask and the Softmax applied to a
  4-D view of the scores, Reshape(scores + bias, [B, H, S, -1]), merged back to [B*H, S, S] or
  meeting a V [B, H, S, D] (Bloom's ALiBi, DeBERTa's position terms as the bias): the fused op
  takes the mask seen through the graph's own view (`heads_split`, proven by `attention_views`).
  A scale computed at run time from Q's shape (SDPA's sqrt(1/sqrt(D)) on Q and K^T) is a
  constant once the canonicalizer folds it (D static); otherwise it is refused.

The target is chosen per match: `attention.onnx` emits the standard opset-23 `Attention` (which
TensorRT maps to its native attention layer) in models of opset 23 or newer, where that op
provably computes the same: float32, the same heads and batch in Q, K and V, and no mask input
(no mask, or a proven causal one); its pattern has no NaN guard and no soft cap
(`onnx_attention`: ONNX `Attention` leaves a NaN row NaN where the guard zeroes it, and
TensorRT-RTX 1.7's parser refuses `softcap`). ONNX Runtime
1.32 refuses masks that broadcast over the query or key axis and grouped KV at run time, and
returns 0 for a row masked with finfo.min where the original is uniform, and TensorRT
refuses `softmax_precision`; so every
other attention becomes `fusegraph.Attention`/`MaskedAttention` (`attention_op`, opset 13 and
newer; below 15 float32 only) through `attention.fusegraph`. Select `attention.fusegraph`
alone to keep the fusegraph op (for its plugin) on opset-23 models too. A mask that is a
proven causal triangle becomes `is_causal=1` with no mask input (`attention_masks`). Both
targets compute in float32, so float64 attention is left alone.
"""

from __future__ import annotations

import numpy as np
import onnx

from fusegraph.ops.attention_op import MIN_OPSET, TYPED_BODY_OPSET
from fusegraph.ops.fused_ops import DOMAIN
from fusegraph.pattern import Attr, Const, Pattern, PatternOps, Var, optional
from fusegraph.rule import Rule, reject

from . import attention_masks, attention_views
from .conditions import computes_in_float32, opset
from .priorities import ATTENTION, ATTENTION_ONNX

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


def key_transposed_batched(op: PatternOps, k: Pattern, k_kv: Pattern, k_bh: Pattern) -> Pattern:
    """k.transpose(-2, -1) as dynamo's SDPA decomposition writes it: flattened to 3-D, transposed,
    reshaped back; the reshapes' targets are constants (proved by the shapes) or Shape(k)'s dims.
    A static export may fold repeat_kv's Reshape into the flattening one, or start from K
    already flattened (`k_bh`)."""
    def swapped(x: Pattern) -> Pattern:
        return op.Reshape(op.Transpose(op.Reshape(x, Var("kt_flat")), perm=[0, 2, 1]), Var("kt_shape"))
    static = swapped(k).where(_transposes_last_two, "transposes K's last two dims")
    folded = swapped(op.Expand(_unsqueezed_heads(op, k_kv), Var("k_grown"))).where(
        _repeats_and_transposes, "repeats the kv heads and transposes K's last two dims")
    merged = op.Reshape(op.Transpose(k_bh, perm=[0, 2, 1]), Var("kt_shape")).where(
        _splits_merged_heads, "splits the batch of K^T [B*H, D, S] into [B, H, D, S]")
    dims = op.Shape(k, start=0)
    last = op.Slice(dims, Const(-1), Const(name="kt_end", where=lambda a: a.size == 1 and a.item() >= 2**62, why="end"))
    second = op.Slice(dims, Const(-2), Const(-1))
    lead = op.Slice(dims, Const(name="kt_start", where=lambda a: a.size == 1 and a.item() <= -(2**62), why="start"), Const(-2))
    flat = op.Reshape(k, op.Concat(Const(-1, name="kt_rows"), second, last, axis=0))
    dynamic = op.Reshape(op.Transpose(flat, perm=[0, 2, 1]), op.Concat(lead, last, second, axis=0))
    return folded | static | merged | dynamic


def _merged_heads_target(v) -> np.ndarray | None:
    """The constant [B, H, D, S] a Reshape splits K^T [B*H, D, S] into, where its dims are
    positive and agree with the 3-D K's [B*H, S, D]."""
    split, k_bh = v.producer.inputs[1], v.producer.inputs[0].producer.inputs[0]
    target = split.const_value if attention_masks.is_fixed(split) else None
    if target is None or target.shape != (4,) or (target <= 0).any() or k_bh.rank != 3:
        return None
    b, h, d, s = (int(x) for x in target)
    return target if tuple(k_bh.shape) == (b * h, s, d) else None


def _splits_merged_heads(v) -> bool:
    return _merged_heads_target(v) is not None


def key_transposed(op: PatternOps, k: Pattern, k_kv: Pattern, k_bshd: Pattern, k_bh: Pattern) -> Pattern:
    """K^T [B, H, D, S]: from K [B, H, S, D] (`k`, or `k_kv` repeated to the query heads),
    straight from the head split's [B, S, H, D] (`k_bshd`), or from K with the heads merged
    into the batch, [B*H, S, D] (`k_bh`: nn.MultiheadAttention's, split back by a Reshape; or
    a 3-D attention throughout, Q and V [B*H, S, D] too, as diffusion UNets and ALiBi models
    export it: `heads_in_batch`)."""
    k = repeated_kv(op, k_kv, "k") | k
    plain = op.Transpose(scaled(op, k, "k_pre"), perm=[0, 1, 3, 2])
    merged = op.Transpose(scaled(op, k_bshd, "k_pre"), perm=[0, 2, 3, 1])
    in_batch = op.Transpose(scaled(op, k_bh, "k_pre"), perm=[0, 2, 1])  # all of Q, K, V [B*H, S, D]
    return scaled(op, plain | merged | key_transposed_batched(op, scaled(op, k, "k_pre"), k_kv, k_bh) | in_batch,
                  "k_post")


def key_in_batch(op: PatternOps, k_bh: Pattern) -> Pattern:
    """K^T [B*H, D, S] of a 3-D attention alone (`key_transposed`'s last form)."""
    return scaled(op, op.Transpose(scaled(op, k_bh, "k_pre"), perm=[0, 2, 1]), "k_post")


def _is_scalar_zero(a: np.ndarray) -> bool:
    return a.size == 1 and a.ndim <= 4 and a.item() == 0


def soft_capped(op: PatternOps, scores: Pattern) -> Pattern:
    """Gemma 2's logit soft-capping, cap * tanh(scores / cap), or the scores themselves; the
    two constants are captured as `cap_div` / `cap_mul` (`caps_agree` holds them equal)."""
    return op.Mul(op.Tanh(op.Div(scores, Const(name="cap_div"))), Const(name="cap_mul")) | scores


def _scores(op: PatternOps, q: Pattern, key_t: Pattern, capped: bool) -> Pattern:
    """Q·K^T scaled, soft-capped or not, cast or not."""
    scores = scaled(op, op.MatMul(scaled(op, q, "q"), key_t), "s")
    return optional(op.Cast(soft_capped(op, scores) if capped else scores, to=Attr("cast_scores")))


def _softmax(op: PatternOps, scores: Pattern, mask, bias, keep, drop, view=None) -> Pattern:
    """Softmax of the scores masked by an additive mask, a position bias (ALiBi's) then a mask,
    a Where over either, or nothing; `view(x)` is what the mask and the Softmax see of x."""
    view = view or (lambda x: x)
    biased = view(op.Add(scores, bias) | scores)
    masked = (op.Add(biased, mask) | op.Where(keep, biased, Const(name="fill"))
              | op.Where(drop, Const(name="fill"), biased) | view(scores))
    return _probabilities(op, op.Softmax(optional(op.Cast(masked, to=Attr("cast_masked"))), axis=Attr("axis")))


def heads_split(op: PatternOps, scores: Pattern) -> Pattern:
    """The 3-D scores [B*H, Sq, Sk] viewed as [B, H, Sq, Sk] by a Reshape (captured as `viewed`,
    its target as `scores_4d`) for the mask and the Softmax, as Bloom exports its ALiBi
    attention (`attention_views`)."""
    return op.Reshape(scores, Var("scores_4d")).named("viewed")


def _eager(op, q, k, k_kv, k_bshd, k_bh, v, v_kv, mask, bias, keep, drop, capped: bool, views: bool):
    """The probabilities of the scores, or (`views`) of their 4-D view (heads in the batch only)
    merged back to [B*H, Sq, Sk] (`merged`, by `probs_3d`) or left 4-D for a 4-D V, times V."""
    probs = _softmax(op, _scores(op, q, key_transposed(op, k, k_kv, k_bshd, k_bh), capped), mask, bias, keep, drop)
    if views:
        in_view = _softmax(op, _scores(op, q, key_in_batch(op, k_bh), capped), mask, bias, keep, drop,
                           lambda x: heads_split(op, x))
        probs = probs | op.Reshape(in_view, Var("probs_3d")).named("merged") | in_view
    return op.MatMul(probs, repeated_kv(op, v_kv, "v") | v)


def _probabilities(op: PatternOps, softmax: Pattern) -> Pattern:
    return optional(op.Cast(optional(op.Cast(softmax, to=Attr("cast_softmax"))), to=Attr("cast_probs")))


def onnx_attention(op, q, k, k_kv, k_bshd, k_bh, v, v_kv, mask, bias, keep, drop):
    """What opset-23 `Attention` computes in both runtimes: no NaN guard (it leaves a NaN row
    NaN) and no soft cap (TensorRT's parser refuses `softcap`); no 4-D view of 3-D scores (its
    mask, a bias and a mask on two shapes, is no `Attention` mask input)."""
    return _eager(op, q, k, k_kv, k_bshd, k_bh, v, v_kv, mask, bias, keep, drop, capped=False, views=False)


def attention(op, q, k, k_kv, k_bshd, k_bh, v, v_kv, mask, bias, keep, drop):
    """The eager form, or SDPA's with the NaN guard after the Softmax (captured as `nan_fill`),
    the scores soft-capped or not."""
    eager = _eager(op, q, k, k_kv, k_bshd, k_bh, v, v_kv, mask, bias, keep, drop, capped=True, views=True)
    probs, value = eager.node.inputs
    guarded = op.Where(op.IsNaN(probs), Const(name="nan_fill", where=_is_scalar_zero, why="0"), probs) | probs
    return op.MatMul(guarded, value)


# -- what the captures say -------------------------------------------------------------------
FLOAT = onnx.TensorProto.FLOAT
_type_name = onnx.TensorProto.DataType.Name
#: An added value at or below this absorbs any score: x + v rounds to v (or to -inf) for |x| < 1e22.
ABSORBING = -1e30


def _factors(captures: dict) -> list[tuple[str, object]]:
    return [(kind, c) for site in SCALE_SITES for kind in ("mul", "div")
            if (c := captures.get(f"{site}_{kind}")) is not None]


def q_type(q, k=None, k_kv=None, k_bshd=None, **captures) -> int | None:
    """Q's element type, read from Q, K or a scale constant (all of Q's type), or None."""
    known = [x.dtype for x in (q, k, k_kv, k_bshd, *(c for _, c in _factors(captures)))
             if x is not None and x.dtype]
    return known[0] if known else None


def _dim(x, axis: int):
    return x.shape[axis] if x is not None and x.rank == 4 else None


def key_len(k=None, k_kv=None, k_bshd=None, k_bh=None):
    """Sk where the shapes say it: axis 2 of [B, H, S, D] K, axis 1 of [B, S, H, D] or of
    [B*H, S, D]."""
    if k_bh is not None:
        return k_bh.shape[1] if k_bh.rank == 3 else None
    return _dim(k_kv or k, 2) if k_bshd is None else _dim(k_bshd, 1)


def heads_in_batch(k_bh=None, kt_shape=None) -> bool:
    """Q, K and V all [B*H, S, D]: 3-D K^T, no Reshape back to heads. The fused op sees one
    batch of B*H heads (`to_four_dims`)."""
    return k_bh is not None and kt_shape is None


def key_heads(k=None, k_kv=None, k_bshd=None, k_bh=None, kt_shape=None):
    if heads_in_batch(k_bh, kt_shape):
        return k_bh.shape[0] if k_bh.rank == 3 else None
    if k_bh is not None:  # the Reshape's constant [B, H, D, S] (`_merged_heads_target`)
        return int(kt_shape.const_value[1])
    return _dim(k_kv or k, 1) if k_bshd is None else _dim(k_bshd, 2)


def constant_mask(mask=None, bias=None, keep=None, drop=None, fill=None) -> np.ndarray | None:
    """The additive mask the fused op takes, when constants decide it (else None)."""
    if keep is not None or drop is not None:
        chosen = attention_masks.constant_value(keep if keep is not None else drop)
        kept = np.float32(0) if bias is None else attention_masks.constant_value(bias)
        if chosen is None or kept is None:
            return None
        masked = ~chosen.astype(bool) if keep is not None else chosen.astype(bool)
        return np.where(masked, _hard_fill(fill), kept.astype(np.float32))
    if mask is None:
        return None
    m = attention_masks.constant_value(mask)
    if m is None or bias is None:
        return m
    b = attention_masks.constant_value(bias)
    return None if b is None else b + m


def _hard_fill(fill) -> np.ndarray:
    """A hard Where fill as a float32 additive value: -inf stays -inf; the lowest value of any
    type becomes float32's, which absorbs every score (so a fully masked row stays uniform)."""
    if np.isneginf(fill.const_value.astype(np.float64)).all():
        return np.array(-np.inf, np.float32)
    return np.array(np.finfo(np.float32).min, np.float32)


def is_causal(q, k=None, k_kv=None, k_bshd=None, mask=None, bias=None, keep=None, drop=None, fill=None,
              k_bh=None, viewed=None) -> bool:
    """Whether the mask is a proven causal triangle (`attention_masks.is_causal_triangle`). A
    bias on the 3-D scores and a mask on their 4-D view (`heads_split`) do not add up as
    arrays: that mask is never taken for causal."""
    if viewed is not None and bias is not None:
        return False
    q_len = q.shape[-2] if q.rank in (3, 4) else None
    return attention_masks.is_causal_triangle(constant_mask(mask, bias, keep, drop, fill), q_len,
                                              key_len(k, k_kv, k_bshd, k_bh))


# -- conditions ------------------------------------------------------------------------------
def scales_are_scalars(**captures) -> bool:
    """Only a single factor folds into the op's `scale`: a per-head tensor is no attention, and
    a [1, 1, 1, 1, 1] factor would have grown the scores' rank."""
    for kind, c in _factors(captures):
        if not attention_masks.is_fixed(c):
            return reject(f"scale {kind} {c.name!r} is also a graph input: a default, not a constant")
        a = c.const_value
        if a is None or a.size != 1 or not np.isfinite(a.astype(np.float64)).all() or (kind == "div" and not a.any()):
            return reject(f"scale {kind} {c.name!r} is not a finite non-zero scalar constant")
        if a.ndim > 4:
            return reject(f"scale {kind} {c.name!r} has rank {a.ndim}, which grows the scores' rank 4")
    return True


#: The widest factor (or its inverse) a scale site may apply in float32: the original rounds
#: each scaled intermediate in turn (K/1e-5 is rounded at 1e9 times K's scale), so a factor far
#: from 1 moves the scores by more than the one folded scale rounds them, and on inputs with
#: tied scores picks another key (a mutation run: K/1e-5 then ×1e-5 at ±1e4 inputs); far enough
#: it overflows or flushes to zero where one folded scale does not. Exported scales (1/sqrt(D),
#: its square root on both Q and K, 1/(sqrt(D)·layer index), a pre-attention scalar) sit well inside.
FLOAT_FACTOR_RANGE = (1e-4, 1e4)
#: In float16/bfloat16 a factor beyond 16 risks overflowing Q, K or Q·Kᵀ (float16 tops out at
#: 65504), and one below 1/256 pushes typical values into subnormals, where they lose their
#: precision: the fused op, in float32, would not.
HALF_FACTOR_RANGE = (1 / 256, 16)
HALF_TYPES = frozenset({onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})


def scales_keep_range(q, k=None, k_kv=None, k_bshd=None, **captures) -> bool:
    """The fused op multiplies Q·Kᵀ by the product of the factors once, in float32; the original
    applies each factor in its own type, rounding (or overflowing) in between: q·1e-5 · (k/1e-5)
    is inf in float16. Each factor stays within `FLOAT_FACTOR_RANGE`, and in float16/bfloat16
    within `HALF_FACTOR_RANGE`."""
    half = q_type(q, k, k_kv, k_bshd, **captures) in HALF_TYPES
    low, high = HALF_FACTOR_RANGE if half else FLOAT_FACTOR_RANGE
    for kind, c in _factors(captures):  # `scales_are_scalars` has refused non-finite and / 0
        f = abs(float(c.const_value.astype(np.float64).reshape(-1)[0]))
        f = f if kind == "mul" else 1 / f
        if f == 0:  # zero scores either way (a zero factor is exact in any order)
            continue
        if not low <= f <= high:
            return reject(f"scale {kind} {c.name!r} multiplies by {f:.3g}, beyond {low:.3g}..{high:.3g} in "
                          f"{'a 16-bit float type' if half else 'float32'}: the original rounds or overflows "
                          "between its factors where one folded scale does not")
    return True


def scales_exact_under_softcap(cap_div=None, **captures) -> bool:
    """Under a soft cap, a factor on Q or K is a power of two. The fused op scales Q·Kᵀ once;
    the original rounds Q·f (or K·f) before the product, which moves a score by an ulp of its
    terms, not of its sum: where the terms cancel, that is no longer small next to the cap, and
    the tanh spreads it over the whole cap (a mutation run: Q×1.001 then ×2 on the scores, at
    ±1e4 inputs, 2e4 off). A power of two scales exactly; the factor on the scores is applied
    where the fused op applies its scale. Without a cap, softmax keeps such a difference small."""
    if cap_div is None:
        return True
    for site in ("q", "k_pre", "k_post"):
        for kind in ("mul", "div"):
            c = captures.get(f"{site}_{kind}")
            if c is not None and np.frexp(abs(float(c.const_value.astype(np.float64).reshape(-1)[0])))[0] != 0.5:
                return reject(f"scale {kind} {c.name!r} on {site.split('_')[0].upper()} is no power of two: before "
                              "a soft cap, the original's rounding there differs from one folded scale")
    return True


def softmax_on_last_axis(axis, q, viewed=None) -> bool:
    return axis == -1 or (axis == 3 and (q.rank == 4 or viewed is not None)) or reject(
        f"softmax on axis {axis}, not the last")


def repeated_heads(kv, grown, merged):
    """How many heads repeat_kv makes of `kv` where its constants say it: the Reshape's target
    dim 1 (0 copies the expanded tensor's dim 1, the kv heads), else the Expand's Hkv * n."""
    target = None if merged is None else merged.const_value
    if target is not None and target.shape == (4,) and target[1] > 0:
        return int(target[1])
    size = None if grown is None else grown.const_value
    if size is not None and size.shape == (5,) and size[2] > 0:
        hkv = int(size[1]) if size[1] > 1 else _dim(kv, 1)
        return hkv * int(size[2]) if isinstance(hkv, int) else None
    return None


def heads_layout(q, k, k_kv, k_bshd, v, v_kv, k_grown=None, k_merged=None, v_grown=None, v_merged=None,
                 k_bh=None, kt_shape=None, viewed=None, merged=None) -> bool:
    """The op takes 4-D [B, H, S, D]: K^T's 4-D perm proves K's rank; Q's and V's must be 4
    where known (TorchScript exports carry no shapes; their Q and V are the head split's).
    Query head h reads kv head h // (Hq / Hkv), so the query heads must be a multiple of K's
    and V's: Q with one head broadcast against K with four is another computation. Symbolic
    head counts (TorchScript's unk__ dims) are taken as the exporter's head split wrote them."""
    if heads_in_batch(k_bh, kt_shape):
        # probabilities left in their 4-D view meet a 4-D V (`heads_view_exact` proves it)
        return _three_dims_agree(q, k_bh, None if viewed is not None and merged is None else v)
    if k_bh is not None and _dim(q, 0) not in (None, int(kt_shape.const_value[0])):
        return reject(f"K^T is split into batch {int(kt_shape.const_value[0])}, Q has batch {_dim(q, 0)}")
    for name, x in (("q", q), ("k", k or k_kv or k_bshd), ("v", v or v_kv)):
        if x is not None and x.rank not in (None, 4):
            return reject(f"{name} has rank {x.rank}, not [B, H, S, D]")
    if (k_kv is None) != (v_kv is None):
        return reject("only one of K and V is a repeated kv")
    hq = _dim(q, 1)
    hk, hv = key_heads(k, k_kv, k_bshd, k_bh, kt_shape), _dim(v_kv or v, 1)
    if isinstance(hk, int) and isinstance(hv, int) and hk != hv:
        return reject(f"K has {hk} heads and V {hv}: the op reads one kv head for both")
    for name, h in (("K", hk), ("V", hv)):
        known = isinstance(hq, int) and isinstance(h, int)
        if (known and (h > hq or hq % h)) or (hq == 1 and h not in (1, None)):
            return reject(f"{name} has {h} heads and Q {hq}: the query heads are no multiple of them")
    # A repeat_kv to more heads than Q has broadcasts Q over them: another computation.
    for name, kv, grown, merged in (("K", k_kv, k_grown, k_merged), ("V", v_kv, v_grown, v_merged)):
        if kv is None:
            continue
        h = repeated_heads(kv, grown, merged)
        if isinstance(hq, int) and isinstance(h, int) and h != hq:
            return reject(f"{name} is repeated to {h} heads and Q has {hq}")
        if hq == 1 and h != 1:
            return reject(f"{name} is repeated to {h or 'an unknown number of'} heads and Q has 1")
    return True


def _three_dims_agree(q, k_bh, v) -> bool:
    """Q, K and V [B*H, S, D] with the same B*H and D (where known): a broadcast batch or a
    4-D Q against the 3-D K^T would be another computation. (V None: Q and K alone.)"""
    for name, x in (("q", q), ("k", k_bh), ("v", v)):
        if name == "v" and v is None:
            continue
        if x is None or x.rank != 3:
            return reject(f"{name} is not [B*H, S, D] (rank {x.rank if x is not None else None})")
    for axis, what in ((0, "B*H"), (2, "D")):
        dims = {x.shape[axis] for x in (q, k_bh)} | ({v.shape[0]} if axis == 0 and v is not None else set())
        if len(dims) != 1:
            return reject(f"Q, K and V differ in {what}: {sorted(map(str, dims))}")
    return True


def casts_widen_losslessly(q, k=None, k_kv=None, k_bshd=None, cast_scores=None, cast_masked=None,
                           cast_softmax=None, cast_probs=None, **captures) -> bool:
    """Every Cast in the pattern is one the fused op's math covers: the scores and the masked
    scores widened to float32 (or cast to their own type), the probabilities kept, widened to
    float32 or cast to Q's type, ending in Q's type (they meet V). Anything else (the
    probabilities through bool, int64 or float16 in a float32 attention, the scores through
    int32) rounds or truncates in the original and would not in the fused op."""
    casts = (cast_scores, cast_masked, cast_softmax, cast_probs)
    if all(c is None for c in casts):
        return True
    t = q_type(q, k, k_kv, k_bshd, **captures)
    if t is None:
        return reject("Q's type is unknown and the pattern casts")
    current = t
    for where, to in (("scores", cast_scores), ("masked scores", cast_masked)):
        if to is not None and to not in (FLOAT, current):
            return reject(f"the {where} are cast from {_type_name(current)} to {_type_name(to)}, not widened to FLOAT")
        current = to or current
    softmax_type = current
    chain = [c for c in (cast_softmax, cast_probs) if c is not None]
    for to in chain[:-1]:
        if to not in (softmax_type, t, FLOAT):
            return reject(f"the probabilities pass through {_type_name(to)}, which rounds them")
    end = chain[-1] if chain else softmax_type
    return end == t or reject(f"probabilities are {_type_name(end)}, Q is {_type_name(t)}")


def fills_mask_hard(fill, nan_fill) -> bool:
    """Where(keep, scores, fill) replaces the masked scores by `fill`: an additive mask equals
    that only if the fill zeroes the weight whatever the score, -inf or the lowest value of its
    type. A fill of 0 or -10 is a real score, and -1e4 lets a key through at scores of 1e4.
    Neither it nor the NaN guard's 0 may be a default a caller can feed."""
    for c in (fill, nan_fill):
        if c is not None and not attention_masks.is_fixed(c):
            return reject(f"{c.name!r} is also a graph input: a default, not a constant")
    if fill is None:
        return True
    a = fill.const_value
    if a is None or a.size != 1 or a.ndim > 4:
        return reject("the Where fill is not a scalar constant")
    return bool(attention_masks.masks_hard(a).all()) or reject(
        f"the Where fill {a.item()} is a score, not a mask (only -inf or the lowest {a.dtype} masks exactly)")


def mask_fits(q, k, k_kv, k_bshd, mask, bias, keep, drop, k_bh=None, kt_shape=None, viewed=None) -> bool:
    """The mask broadcasts into the scores [B, Hq, Sq, Sk] ([B*H, Sq, Sk] with the heads in the
    batch; the mask after a `heads_split` into their 4-D view, the bias before it into the 3-D
    scores) without growing them. Where a scores' dim is 1 (a decode step's one query, a batch
    of 1), the mask's dim there must be proven 1: an unknown or symbolic one may be 8 at run
    time and broadcast the scores up, and so may a mask of unknown rank; elsewhere a dim the
    scores hold is the mask's too or a broadcast error in the original, never a growth."""
    rank = 3 if heads_in_batch(k_bh, kt_shape) else 4
    scores = (*(q.shape[:-1] if q.rank == rank else (None,) * (rank - 1)), key_len(k, k_kv, k_bshd, k_bh))
    view = None if viewed is None else attention_views.static_dims(attention_views.dims_of(viewed) or [[None]] * 4)
    for m in (mask, bias, keep, drop):
        if m is not None:
            _fits(m, *((view, 4) if view is not None and m is not bias else (scores, rank)))
    return True


def _fits(m, scores: tuple, rank: int) -> bool:
    """`mask_fits` for one mask against scores of `rank` dims `scores` (None where unknown)."""
    if m.rank is None:
        if rank == 3 or 1 in scores:
            return reject(f"the mask's rank is unknown: it may grow the {rank}-D scores {_dims(scores)}")
        return True
    if m.rank > rank:
        return reject(f"mask has rank {m.rank} > {rank}")
    for md, sd in zip(reversed(m.shape), reversed(scores)):
        if sd == 1 and md != 1:
            return reject(f"mask dim {md if md is not None else '?'} may grow the scores' dim 1")
    return True


def _dims(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def heads_view_exact(q, v=None, mask=None, bias=None, k_bh=None, viewed=None, merged=None) -> bool:
    """A 4-D view of 3-D scores for the mask and the Softmax (`heads_split`) is the 3-D
    attention only where the shapes prove it regroups B*H alone, and the view is merged back to
    [B*H, Sq, Sk] before meeting V [B*H, Sk, D], or meets a V [B, H, Sk, D] split as the view
    is (a static export whose Reshapes around the second MatMul were folded away)
    (`attention_views`): a Reshape to [B, H, 2*Sq, Sk/2], or one that mixes the heads' rows, is
    another Softmax, and a V of one batch broadcast over the view's B another product."""
    if viewed is None:  # (the pattern views 3-D scores alone: `key_in_batch`)
        return True
    flat = viewed.producer.inputs[0]
    product = attention_views.as_product
    # [B*H, Sq, Sk] as Q and K say it (the biased scores' own type would take in a bias that grew them)
    scores = [[product(q.shape[0]), product(k_bh.shape[0])], [product(q.shape[1])], [product(k_bh.shape[1])]]
    view = attention_views.dims_of(viewed)
    if not attention_views.splits_heads(scores, view):
        return reject(f"the Reshape of the scores {_dims(flat.shape or ())} to {_dims(viewed.shape or ())} "
                      "is not proven to split B*H alone (keeping Sq and Sk)")
    if merged is None:
        if v is None:
            return reject("V is repeated from fewer kv heads: the view takes a V [B, H, Sk, D] as it is")
        values = attention_views.dims_of(v)
        if not (values is not None and len(values) == 4 and all(
                attention_views.proven_equal(values[i], view[i]) for i in (0, 1))
                and attention_views.proven_equal(values[2], scores[2])):
            return reject(f"V {_dims(v.shape or ())} is not proven split as the scores' view "
                          f"{_dims(viewed.shape or ())}")
    elif not attention_views.merges_heads(scores, view, attention_views.dims_of(merged)):
        return reject(f"the Reshape of the probabilities to {_dims(merged.shape or ())} is not proven to "
                      "merge them back to [B*H, Sq, Sk]")
    if bias is None and mask is not None and not mask.dtype:
        return reject("the mask's type is unknown: no zeros of it to view in its place")
    return True


def bias_joins_mask_exactly(mask, bias) -> bool:
    """The fused op adds one mask, so (scores + bias) + mask becomes scores + (bias + mask):
    the same numbers only where the mask's values leave the sum unrounded, 0 and values that
    absorb any addend (-inf, or finfo(float32).min: T5's Where(keep, 0, min)). A mask that can
    hold -1e9 (rounded to multiples of 64 either way, in a different order) is refused. A bias
    under a Where mask needs no such care (`additive_mask`)."""
    if bias is None or mask is None:
        return True
    values = attention_masks.value_set(mask)
    if values is None:
        return reject("the mask after the position bias has values unknown here; adding it to the bias "
                      "first rounds differently")
    exact = (values == 0) | (values <= ABSORBING)
    return bool(exact.all()) or reject(f"the mask after the position bias holds {values[~exact][0]:g}: "
                                       "adding it to the bias first rounds differently")


def caps_agree(cap_div=None, cap_mul=None) -> bool:
    """cap * tanh(s / cap) is the soft cap only with one cap, a finite non-zero scalar constant
    on both sides: tanh(s / 50) * 30 or * -50 is another function. (Both negative is the same
    cap: tanh is odd.)"""
    if cap_div is None:
        return True
    values = []
    for c in (cap_div, cap_mul):
        if not attention_masks.is_fixed(c):
            return reject(f"soft cap {c.name!r} is also a graph input: a default, not a constant")
        a = c.const_value
        if a is None or a.size != 1 or a.ndim > 4 or not np.isfinite(a.astype(np.float64)).all() or not a.any():
            return reject(f"soft cap {c.name!r} is not a finite non-zero scalar constant")
        values.append(float(a.astype(np.float64).reshape(-1)[0]))
    return values[0] == values[1] or reject(f"soft cap divides by {values[0]:g} and multiplies by {values[1]:g}")


def softcap(captures: dict) -> float:
    """The soft cap the pattern matched (`caps_agree`), 0.0 for none."""
    c = captures.get("cap_div")
    return 0.0 if c is None else abs(float(c.const_value.astype(np.float64).reshape(-1)[0]))


def math_fits_float32(q) -> bool:
    """Both targets compute the scores and softmax in float32 (`attention_op`, ONNX Attention's
    float32 inputs); a float64 attention would lose float64's precision."""
    return computes_in_float32(q, "Q", "attention")


def opset_at_least(n: int):
    def check(q) -> bool:
        have = opset(q)
        return have >= n or reject(f"model opset {have} < {n}")
    check.__name__ = f"opset_at_least_{n}"
    return check


def body_fits_opset(q, k=None, k_kv=None, k_bshd=None, **captures) -> bool:
    """Below opset 15 the fused op's body has no CastLike and computes in its inputs' type,
    which is the op's float32 semantics for float32 attention only (`attention_op`)."""
    if opset(q) >= TYPED_BODY_OPSET:
        return True
    t = q_type(q, k, k_kv, k_bshd, **captures)
    return t == FLOAT or reject(f"opset {opset(q)} < {TYPED_BODY_OPSET}: the fused body is float32 only, "
                                f"Q is {_type_name(t) if t else 'of unknown type'}")


def onnx_attention_is_exact(q, k=None, k_kv=None, k_bshd=None, v=None, v_kv=None, mask=None, bias=None,
                            keep=None, drop=None, fill=None, k_bh=None, kt_shape=None, **captures) -> bool:
    """Opset-23 `Attention` is emitted only where it runs in ONNX Runtime and TensorRT and
    computes what the graph did: float32 (its softmax then is float32 with no
    `softmax_precision`, which TensorRT's parser refuses), Q's heads in K and V (ONNX Runtime
    refuses grouped KV at run time: a repeat_kv is kept, `repeated_for_onnx`), no broadcast
    batch, and no mask input (ONNX Runtime refuses masks
    broadcast over the query or key axis and answers 0 for a row masked with finfo.min, where
    Softmax gives the mean of V). A proven causal triangle needs no mask input."""
    if q.dtype != FLOAT:
        return reject(f"ONNX Attention without softmax_precision runs softmax in Q's type, "
                      f"{_type_name(q.dtype) if q.dtype else 'unknown'}")
    key = k_kv or k
    for axis in ((0,) if k_kv is not None or heads_in_batch(k_bh, kt_shape) else (0, 1)):  # repeats give Q's heads
        if heads_in_batch(k_bh, kt_shape):  # `heads_layout` has held them 3-D
            dims = {q.shape[0], v.shape[0], k_bh.shape[0]}
        else:
            key_dim = (_dim(key, axis) if k_bshd is None and k_bh is None else _dim(k_bshd, 2 * axis)
                       if k_bh is None else int(kt_shape.const_value[axis]))
            dims = {_dim(q, axis), _dim(v_kv or v, axis), key_dim}
        if len(dims) != 1 or not all(isinstance(d, int) for d in dims):
            return reject(f"Q, K and V are not known to agree on axis {axis}")
    if mask is None and keep is None and drop is None:
        return True
    return is_causal(q, k, k_kv, k_bshd, mask, bias, keep, drop, fill, k_bh) or reject(
        "a mask input: ONNX Runtime's Attention reads masked rows and broadcast masks differently")


def positive_scale(**captures) -> bool:
    """ONNX Runtime's `Attention` refuses a scale <= 0 (a negative factor, or one that rounds
    to 0 in float16); `fusegraph.Attention` takes any."""
    scale = total_scale(captures)
    return scale > 0 or reject(f"scale {scale} is not positive, which ONNX Attention refuses")


# -- replacements ----------------------------------------------------------------------------
def total_scale(captures: dict) -> float:
    s = 1.0
    for kind, c in _factors(captures):
        f = float(c.const_value.astype(np.float64).reshape(-1)[0])
        s = s * f if kind == "mul" else s / f
    return s


def kv_operands(op, k, k_kv, k_bshd, v, v_kv, k_bh=None, kt_shape=None):
    """K and V as [B, Hkv, S, D], the un-repeated ones where the pattern proved the repeat."""
    if heads_in_batch(k_bh, kt_shape):
        return k_bh, v
    if k_bh is not None:  # [B*H, S, D] split as K^T's Reshape split it (`_merged_heads_target`)
        return op.Reshape(k_bh, kt_shape.const_value[[0, 1, 3, 2]]), v
    return k_kv or k or op.Transpose(k_bshd, perm=[0, 2, 1, 3]), v_kv or v


def additive_mask(op, mask, bias, keep, drop, fill):
    """The additive mask the fused op takes (or None): a position bias joins the mask; a hard
    Where fill becomes a float32 mask (`_hard_fill`) that holds the bias where it keeps the
    score, so a masked score is the fill alone, as in the original, whatever the bias."""
    if keep is None and drop is None:
        return mask if bias is None else op.Add(bias, mask)
    kept = np.zeros((), np.float32) if bias is None else bias if bias.dtype == FLOAT else op.Cast(bias, to=FLOAT)
    if keep is not None:
        return op.Where(keep, kept, _hard_fill(fill))
    return op.Where(drop, _hard_fill(fill), kept)


def _dims_of(op, x, start: int, end: int):
    return op.Slice(op.Shape(x), _ints(start), _ints(end))


def heads_view_mask(op, q, k_bh, mask, bias, keep, drop, fill, scores_4d):
    """The [B*H, Sq, Sk] mask the 3-D fused op takes where the graph masked a 4-D view of the
    scores (`heads_split`): the bias (or zeros of the mask's type) broadcast to the scores'
    [B*H, Sq, Sk], viewed by the graph's own target, masked as the graph masks the view
    (`additive_mask`'s float32 Where for a hard fill), and merged back to [B*H, Sq, Sk].
    Built full size: the view's B and H exist only as that target says them."""
    rows = op.Concat(_dims_of(op, q, 0, 2), _dims_of(op, k_bh, 1, 2), axis=0)
    if keep is None and drop is None:
        base = bias if bias is not None else np.zeros((), onnx.helper.tensor_dtype_to_np_dtype(mask.dtype))
        return op.Reshape(op.Add(op.Reshape(op.Expand(base, rows), scores_4d), mask), rows)
    kept = np.zeros((), np.float32) if bias is None else bias if bias.dtype == FLOAT else op.Cast(bias, to=FLOAT)
    view = op.Reshape(op.Expand(kept, rows), scores_4d)
    hard = _hard_fill(fill)
    return op.Reshape(op.Where(keep, view, hard) if keep is not None else op.Where(drop, hard, view), rows)


def _values_in_batch(op, v, viewed, merged):
    """V as [B*H, Sk, D]: a 4-D V [B, H, Sk, D] met by the probabilities' view (`heads_view_exact`)
    merges its heads into the batch."""
    if viewed is None or merged is not None:
        return v
    return op.Reshape(v, op.Concat(_ints(-1), _dims_of(op, v, 2, 4), axis=0))


def _output_from_batch(op, y, q, v, viewed, merged):
    """The fused op's [1, B*H, Sq, D] as the graph's output: [B*H, Sq, D], or [B, H, Sq, D] split
    as V is where the probabilities stayed in their 4-D view."""
    if viewed is None or merged is not None:
        return op.Squeeze(y, _ints(0))
    return op.Reshape(y, op.Concat(_dims_of(op, v, 0, 2), _dims_of(op, q, 1, 2), _dims_of(op, v, 3, 4), axis=0))


def to_four_dims(op, x, rank: int):
    """A [B*H, ...] tensor of the 3-D form as one batch of B*H heads: [1, B*H, ...] (a mask of
    rank 2 or less broadcasts as it is)."""
    return op.Unsqueeze(x, np.array([0], np.int64)) if rank == 3 else x


def _mask_rank(mask=None, bias=None, keep=None, drop=None) -> int:
    """The additive mask's rank (`mask_fits` has held every rank known in the 3-D form)."""
    return max(m.rank for m in (mask, bias, keep, drop) if m is not None)


def to_fusegraph(op, q, k=None, k_kv=None, k_bshd=None, v=None, v_kv=None, mask=None, bias=None, keep=None, drop=None,
                 fill=None, nan_fill=None, k_bh=None, kt_shape=None, viewed=None, merged=None, scores_4d=None,
                 **captures):
    """BMM-Softmax-BMM -> fusegraph.Attention / MaskedAttention"""
    key, value = kv_operands(op, k, k_kv, k_bshd, _values_in_batch(op, v, viewed, merged), v_kv, k_bh, kt_shape)
    causal = is_causal(q, k, k_kv, k_bshd, mask, bias, keep, drop, fill, k_bh, viewed)
    cap = softcap(captures)
    attrs = dict(scale=total_scale(captures), is_causal=int(causal), softcap=cap, softcapped=int(cap != 0),
                 zero_nan_rows=int(nan_fill is not None), _domain=DOMAIN)
    three = heads_in_batch(k_bh, kt_shape)
    qkv = [to_four_dims(op, x, 3) for x in (q, key, value)] if three else [q, key, value]
    if causal or (mask is None and keep is None and drop is None):
        y = op.Attention(*qkv, **attrs)
    else:
        if viewed is not None:
            additive = to_four_dims(op, heads_view_mask(op, q, k_bh, mask, bias, keep, drop, fill, scores_4d), 3)
        else:
            additive = additive_mask(op, mask, bias, keep, drop, fill)
            if three:
                additive = to_four_dims(op, additive, _mask_rank(mask, bias, keep, drop))
        y = op.MaskedAttention(*qkv, additive, **attrs)
    return _output_from_batch(op, y, q, v, viewed, merged) if three else y


def repeated_for_onnx(op, kv, grown, merged, kt_shape=None):
    """The repeat_kv the pattern matched, rebuilt on the un-repeated KV (ONNX Runtime runs
    opset-23 Attention only with Q's heads in K and V). K's merging Reshape may have been
    folded into K^T's: its target is then K^T's [B, H, D, S] with the last two swapped."""
    if merged is None:
        merged = op.Gather(kt_shape, np.array([0, 1, 3, 2], np.int64), axis=0)
    return op.Reshape(op.Expand(op.Unsqueeze(kv, np.array([2], np.int64)), grown), merged)


def to_onnx(op, q, k=None, k_kv=None, k_bshd=None, v=None, v_kv=None, mask=None, bias=None, keep=None, drop=None,
            fill=None, k_grown=None, k_merged=None, v_grown=None, v_merged=None, kt_shape=None, k_bh=None,
            **captures):
    """BMM-Softmax-BMM -> ONNX Attention (opset 23)"""
    key, value = kv_operands(op, k, k_kv, k_bshd, v, v_kv, k_bh, kt_shape)
    if k_kv is not None:
        key = repeated_for_onnx(op, k_kv, k_grown, k_merged, kt_shape)
        value = repeated_for_onnx(op, v_kv, v_grown, v_merged)
    causal = is_causal(q, k, k_kv, k_bshd, mask, bias, keep, drop, fill, k_bh)
    if not heads_in_batch(k_bh, kt_shape):
        return op.Attention(q, key, value, scale=total_scale(captures), is_causal=int(causal))
    y = op.Attention(*(to_four_dims(op, x, 3) for x in (q, key, value)), scale=total_scale(captures),
                     is_causal=int(causal))
    return op.Squeeze(y, np.array([0], np.int64))


def _ints(*v: int) -> np.ndarray:
    return np.array(v, np.int64)


#: For the self-check: Q, K, V [B, H, S, D] = [1, 2, 3, 4], K/V repeated from one kv head, K as
#: [B, S, H, D] for the merged transpose, masks over [.., Sq, Sk]; the Reshape and Expand
#: targets and the Slice bounds (to the end of Shape(K)) the conditions accept, a hard Where
#: fill, the NaN guard's 0, one soft cap on both sides and Casts to the instance's own type,
#: which the generic search can't guess. The masks are inputs in one example and the causal
#: triangle in the other (the only mask the ONNX target takes).
EXAMPLE = {
    "q": ((1, 2, 3, 4), np.float32), "k": ((1, 2, 3, 4), np.float32), "v": ((1, 2, 3, 4), np.float32),
    "k_kv": ((1, 1, 3, 4), np.float32), "v_kv": ((1, 1, 3, 4), np.float32),
    "k_bshd": ((1, 3, 2, 4), np.float32), "k_bh": ((2, 3, 4), np.float32),
    "k_grown": _ints(1, 1, 2, 3, 4), "v_grown": _ints(1, 1, 2, 3, 4),
    "k_merged": _ints(1, 2, 3, 4), "v_merged": _ints(1, 2, 3, 4),
    "kt_flat": _ints(-1, 3, 4), "kt_shape": _ints(1, 2, 4, 3), "kt_start": _ints(-2**63), "kt_end": _ints(2**63 - 1),
    "kt_rows": _ints(-1),
    "mask": ((1, 1, 3, 3), np.float32), "bias": ((1, 2, 3, 3), np.float32),
    "keep": ((1, 1, 3, 3), np.bool_), "drop": ((1, 1, 3, 3), np.bool_),
    "fill": np.array(-np.inf, np.float32), "nan_fill": np.array(0.0, np.float32),
    "cast_scores": None, "cast_masked": None, "cast_softmax": None, "cast_probs": None,
    "cap_div": np.array(5.0, np.float32), "cap_mul": np.array(5.0, np.float32),
}
#: The same with Q, K and V [B*H, S, D] (`heads_in_batch`), masks over [B*H, Sq, Sk]; a branch
#: that builds V by repeat_kv builds it 3-D (which no repeat_kv is, so V is taken whole); a branch
#: that views the scores 4-D for the mask (`heads_split`) splits B*H = 2 into [1, 2].
IN_BATCH_EXAMPLE = {**EXAMPLE, "q": ((2, 3, 4), np.float32), "v": ((2, 3, 4), np.float32),
                    "v_merged": _ints(2, 3, 4), "scores_4d": _ints(1, 2, 3, 3), "probs_3d": _ints(2, 3, 3),
                    "mask": ((2, 3, 3), np.float32), "bias": ((2, 1, 3), np.float32),
                    "keep": ((1, 3, 3), np.bool_), "drop": ((2, 3, 3), np.bool_)}
_ABOVE = np.triu(np.ones((1, 1, 3, 3), bool), k=1)
CAUSAL_EXAMPLE = {**EXAMPLE, "mask": np.where(_ABOVE, -np.inf, 0).astype(np.float32),
                  "bias": np.zeros((1, 2, 3, 3), np.float32), "keep": ~_ABOVE, "drop": _ABOVE}
#: The same with the probabilities left in the scores' 4-D view [1, 2, 3, 3] (`heads_split`)
#: meeting V [1, 2, 3, 4] (which a branch that builds V by repeat_kv builds by an Expand that also
#: grows the heads: no repeat_kv, so V is taken whole).
IN_VIEW_EXAMPLE = {**IN_BATCH_EXAMPLE, "v": ((1, 2, 3, 4), np.float32), "v_merged": _ints(1, 2, 3, 4),
                   "v_grown": _ints(1, 2, 1, 3, 4)}
IN_BATCH_CAUSAL_EXAMPLE = {**IN_BATCH_EXAMPLE, "mask": CAUSAL_EXAMPLE["mask"][0],
                           "bias": np.zeros((2, 3, 3), np.float32), "keep": ~_ABOVE[0], "drop": _ABOVE[0]}
IN_VIEW_CAUSAL_EXAMPLE = {**IN_BATCH_CAUSAL_EXAMPLE, **{k: IN_VIEW_EXAMPLE[k] for k in ("v", "v_merged", "v_grown")}}

CONDITIONS = [scales_are_scalars, scales_keep_range, caps_agree, scales_exact_under_softcap, softmax_on_last_axis,
              heads_layout, heads_view_exact,
              casts_widen_losslessly, fills_mask_hard, mask_fits, bias_joins_mask_exactly, math_fits_float32]

RULES = [
    Rule("attention.onnx", onnx_attention, to_onnx,
         [opset_at_least(ONNX_ATTENTION_OPSET)] + CONDITIONS + [onnx_attention_is_exact, positive_scale],
         priority=ATTENTION_ONNX, examples=[EXAMPLE, CAUSAL_EXAMPLE, IN_BATCH_EXAMPLE, IN_BATCH_CAUSAL_EXAMPLE]),
    Rule("attention.fusegraph", attention, to_fusegraph, [opset_at_least(MIN_OPSET)] + CONDITIONS + [body_fits_opset],
         priority=ATTENTION, examples=[EXAMPLE, CAUSAL_EXAMPLE, IN_BATCH_EXAMPLE, IN_BATCH_CAUSAL_EXAMPLE,
                                       IN_VIEW_EXAMPLE, IN_VIEW_CAUSAL_EXAMPLE]),
]
