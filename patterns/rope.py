"""Rotary position embedding: x * cos + rotate(x) * sin -> fusegraph.RotaryEmbedding.

HF's `apply_rotary_pos_emb` exports as two Slices, a Neg and a Concat (rotate_half), two Muls
and an Add, per q and per k: six passes over the head. The forms matched:

- rotate-half over the whole head: Concat(-x[..., h:], x[..., :h]) with h = D/2;
- interleaved (GPT-J's rotate_every_two): Reshape(Concat(Unsqueeze(-x[..., 1::2]),
  Unsqueeze(x[..., ::2]), axis=-1)) back to x's shape;
- partial rotary dims (GPT-NeoX, Phi): the rotation above on x[..., :rd], concatenated with
  x[..., rd:] untouched.

Slice bounds are constants or Shape arithmetic (dynamic exports compute D/2 from Shape(x));
they are evaluated (`static_int`) and must split the head exactly in half over the last axis,
else this is some other concatenation. cos and sin are HF's [.., S, rd] tables.

Float64 RoPE is not fused: the fused op computes in float32.

The target is `fusegraph.RotaryEmbedding` at every opset: opset 23's `RotaryEmbedding` takes
cos/sin of width rd/2, which equals HF's tables only if their halves are equal - a property of
the values, not the graph.
"""

from __future__ import annotations

import numpy as np
import onnx

from fusegraph import rope_ops  # noqa: F401  (registers the fused op)
from fusegraph.fused_ops import DOMAIN
from fusegraph.pattern import Attr, Pattern, PatternOps, Var
from fusegraph.rule import Rule, reject

PRIORITY = 80


def slice_last(op: PatternOps, x: Pattern, tag: str) -> Pattern:
    """x[start:end:step] on one axis; bounds captured as `{tag}_start` etc."""
    s, e, a, st = (Var(f"{tag}_{k}") for k in ("start", "end", "axes", "steps"))
    return op.Slice(x, s, e, a) | op.Slice(x, s, e, a, st)


def rotate_half(op: PatternOps, x: Pattern) -> Pattern:
    return op.Concat(op.Neg(slice_last(op, x, "hi")), slice_last(op, x, "lo"), axis=-1)


def strided_last(op: PatternOps, x: Pattern, tag: str) -> Pattern:
    """x[start:end:step] on one axis, steps given (even/odd channels take step 2)."""
    s, e, a, st = (Var(f"{tag}_{k}") for k in ("start", "end", "axes", "steps"))
    return op.Slice(x, s, e, a, st)


def rotate_interleaved(op: PatternOps, x: Pattern) -> Pattern:
    pair = op.Concat(op.Unsqueeze(op.Neg(strided_last(op, x, "hi")), Var("ax1")),
                     op.Unsqueeze(strided_last(op, x, "lo"), Var("ax2")), axis=-1)
    return op.Reshape(pair, Var("shape"), allowzero=Attr("allowzero"))


def rotary(op: PatternOps, x: Pattern, cos: Pattern, sin: Pattern, rotate) -> Pattern:
    return op.Add(op.Mul(x, cos), op.Mul(rotate(op, x), sin))


def full_pattern(rotate):
    def pattern(op, x, cos, sin):
        return rotary(op, x, cos, sin, rotate)
    return pattern


def partial_pattern(rotate):
    def pattern(op, x, cos, sin):
        return op.Concat(rotary(op, slice_last(op, x, "rot"), cos, sin, rotate), slice_last(op, x, "pass"),
                         axis=-1)
    return pattern


def replacement_for(interleaved: bool):
    def replacement(op, x, cos, sin):
        return op.RotaryEmbedding(x, cos, sin, _domain=DOMAIN, interleaved=int(interleaved),
                                  rotary_dim=int(cos.shape[-1]))
    replacement.__doc__ = f"{'interleaved' if interleaved else 'rotate-half'} RoPE -> fusegraph.RotaryEmbedding"
    return replacement


# -- evaluating Slice bounds ----------------------------------------------------------------
def static_int(v, depth: int = 12) -> np.ndarray | None:
    """The value of a small shape computation (constants, Shape, Gather/Unsqueeze/Squeeze/
    Concat/Cast/Identity and + - * /) as an object array whose unknown dims are None, or None."""
    if v is None or depth == 0:
        return None
    if v.is_constant:
        c = v.const_value
        return None if c is None or c.dtype.kind not in "iu" else c.astype(object)
    n = v.producer
    if n is None or n.domain:
        return None
    if n.op_type == "Shape":
        dims = n.inputs[0].shape
        if dims is None:
            return None
        part = dims[n.attr("start", 0):n.attr("end", len(dims))]
        return np.array([d if isinstance(d, int) else None for d in part], dtype=object)
    args = [static_int(i, depth - 1) for i in n.inputs if i is not None]
    if any(a is None for a in args):
        return None
    try:
        return _evaluate(n, args)
    except (TypeError, ValueError, IndexError):
        return None  # arithmetic on an unknown dim, or a malformed shape computation


def _evaluate(n, args: list[np.ndarray]) -> np.ndarray | None:
    t = n.op_type
    if t in ("Identity", "Cast"):
        return args[0]
    if t == "Gather":
        return np.take(args[0], args[1].astype(np.int64), axis=n.attr("axis", 0))
    if t == "Unsqueeze":
        axes = args[1] if len(args) > 1 else n.attr("axes")
        return np.expand_dims(args[0], tuple(int(a) for a in np.ravel(axes)))
    if t == "Squeeze":
        return args[0].reshape(()) if args[0].size == 1 else None
    if t == "Concat":
        return np.concatenate([np.atleast_1d(a) for a in args], axis=n.attr("axis", 0))
    ops = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.floor_divide}
    return ops[t](args[0], args[1]) if t in ops else None


def scalar(v) -> int | None:
    a = static_int(v)
    if a is None or a.size != 1:
        return None
    x = a.reshape(-1)[0]
    return int(x) if isinstance(x, (int, np.integer)) else None


def _last_axis(x, axes) -> bool:
    a = scalar(axes)
    return a is not None and (a == -1 or (x.rank is not None and a == x.rank - 1))


def _slice(x, caps: dict, tag: str):
    """(start, end, step) of a Slice on x's last axis, or None."""
    if not _last_axis(x, caps[f"{tag}_axes"]):
        return None
    steps = caps.get(f"{tag}_steps")
    step = 1 if steps is None else scalar(steps)
    start, end = scalar(caps[f"{tag}_start"]), scalar(caps[f"{tag}_end"])
    return None if start is None or end is None or step is None else (start, end, step)


# -- conditions -----------------------------------------------------------------------------
def _rotation_ok(x, width: int, interleaved: bool, caps: dict) -> str | None:
    """Why the rotation's slices are not a rotation of `width` channels, or None."""
    lo, hi = _slice(x, caps, "lo"), _slice(x, caps, "hi")
    if lo is None or hi is None:
        return "slice bounds are not static or not on the last axis"
    if interleaved:
        if lo[0] != 0 or hi[0] != 1 or lo[2] != 2 or hi[2] != 2 or lo[1] < width - 1 or hi[1] < width:
            return f"slices {lo}, {hi} are not even/odd channels"
        for ax in ("ax1", "ax2"):
            if not _last_axis_after_unsqueeze(x, caps[ax]):
                return "pairs are not stacked on a new last axis"
        shape = static_int(caps["shape"])
        if shape is None or shape.ndim != 1 or shape[-1] != width:
            return f"the pairs are reshaped to {shape}, not back to {width} channels"
        return None
    half = width // 2
    if width % 2 or lo[:1] + lo[2:] != (0, 1) or lo[1] != half or hi[0] != half or hi[1] < width or hi[2] != 1:
        return f"slices {lo}, {hi} do not split {width} channels in half"
    return None


def _last_axis_after_unsqueeze(x, axes) -> bool:
    a = scalar(axes)
    return a is not None and (a == -1 or (x.rank is not None and a == x.rank))


def _tables_ok(cos, sin, width: int) -> str | None:
    for t in (cos, sin):
        if t.shape is None or t.shape[-1] != width:
            return f"{t.name!r} has shape {t.shape}, not [.., {width}]"
    return None


def rotates_whole_head(interleaved: bool):
    def check(x, cos, sin, **caps) -> bool:
        width = x.shape[-1] if x.shape else None
        if not isinstance(width, int):
            return reject("head dim is not static")
        why = _rotation_ok(x, width, interleaved, caps) or _tables_ok(cos, sin, width)
        return why is None or reject(why)
    return check


def rotates_leading_channels(interleaved: bool):
    def check(x, cos, sin, **caps) -> bool:
        width = x.shape[-1] if x.shape else None
        rot, rest = _slice(x, caps, "rot"), _slice(x, caps, "pass")
        if not isinstance(width, int) or rot is None or rest is None:
            return reject("head dim or rotary slices are not static")
        rd = rot[1]
        if rot != (0, rd, 1) or rest[0] != rd or rest[1] < width or rest[2] != 1 or not 0 < rd < width:
            return reject(f"slices {rot}, {rest} do not split the head at one rotary dim")
        why = _rotation_ok(x, rd, interleaved, caps) or _tables_ok(cos, sin, rd)
        return why is None or reject(why)
    return check


def math_fits_float32(x) -> bool:
    """The fused op rotates in float32 (`rope_ops`); a float64 rotation would lose precision."""
    return x.dtype != onnx.TensorProto.DOUBLE or reject("float64 input: the fused RoPE would be computed in float32")


# -- self-check examples --------------------------------------------------------------------
def _ints(*v: int) -> np.ndarray:
    return np.array(v, np.int64)


def _bounds(tag: str, start: int, end: int, step: int = 1) -> dict:
    return {f"{tag}_start": _ints(start), f"{tag}_end": _ints(end), f"{tag}_axes": _ints(-1),
            f"{tag}_steps": _ints(step)}


def example(interleaved: bool, partial: bool) -> dict:
    """Q [B, H, S, D] = [1, 2, 3, 6] (partial: rotary dim 4) or [1, 2, 3, 4], HF's [S, rd]
    tables, and the Slice bounds, Unsqueeze axes and Reshape target the conditions accept;
    the generic search can't make the halves of a head agree with its width."""
    rd, width = 4, 6 if partial else 4
    ex = {"x": ((1, 2, 3, width), np.float32), "cos": ((3, rd), np.float32), "sin": ((3, rd), np.float32)}
    if interleaved:
        ex |= _bounds("hi", 1, rd, 2) | _bounds("lo", 0, rd, 2)
        ex |= {"ax1": _ints(-1), "ax2": _ints(-1), "shape": _ints(1, 2, 3, rd)}
    else:
        ex |= _bounds("hi", rd // 2, rd) | _bounds("lo", 0, rd // 2)
    if partial:
        ex |= _bounds("rot", 0, rd) | _bounds("pass", rd, width)
    return ex


RULES = [
    Rule(f"rope.{kind}{'_partial' if partial else ''}",
         (partial_pattern if partial else full_pattern)(rotate),
         replacement_for(kind == "interleaved"),
         [(rotates_leading_channels if partial else rotates_whole_head)(kind == "interleaved"), math_fits_float32],
         PRIORITY + partial, examples=[example(kind == "interleaved", partial)])
    for partial in (True, False)
    for kind, rotate in (("rotate_half", rotate_half), ("interleaved", rotate_interleaved))
]
