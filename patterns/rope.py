"""Rotary position embedding: x * cos + rotate(x) * sin -> fusegraph.RotaryEmbedding.

HF's `apply_rotary_pos_emb` exports as two Slices, a Neg and a Concat (rotate_half), two Muls
and an Add, per q and per k: six passes over the head. The forms matched:

- rotate-half over the whole head: Concat(-x[..., h:], x[..., :h]) with h = D/2;
- interleaved (GPT-J's rotate_every_two): Reshape(Concat(Unsqueeze(-x[..., 1::2]),
  Unsqueeze(x[..., ::2]), axis=-1)) back to x's shape;
- partial rotary dims (GPT-NeoX, Phi): the rotation above on x[..., :rd], concatenated with
  x[..., rd:] untouched.

Slice bounds are constants or Shape arithmetic (dynamic exports compute D/2 from Shape(x));
they are evaluated by the canonicalizer's evaluator (`static_int`), normalized as Slice does (negative bounds count from the
end, `x[..., -h:]`; ends clamp) and must split the head exactly in half over the last axis,
else this is some other concatenation. Concat axes may be spelled -1 or rank-1. The interleaved
Reshape must restore x's whole shape, not just its last dim. cos and sin are HF's [.., S, rd]
tables: they must broadcast into x's shape without growing it (the fused op concatenates the
rotated channels with the passed-through ones, which a grown batch would not fit).

Float64 RoPE is not fused: the fused op computes in float32.

The target is `fusegraph.RotaryEmbedding` at every opset: opset 23's `RotaryEmbedding` takes
cos/sin of width rd/2, which equals HF's tables only if their halves are equal - a property of
the values, not the graph.
"""

from __future__ import annotations

import numpy as np
import onnx

from fusegraph.canonicalize import evaluate
from fusegraph.ops import rope_ops  # noqa: F401  (registers the fused op)
from fusegraph.ops.fused_ops import DOMAIN
from fusegraph.pattern import Attr, Pattern, PatternOps, Var
from fusegraph.rule import Rule, reject

from .conditions import computes_in_float32, overridable
from .priorities import ROPE
ROTATED_TYPES = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT)


def slice_last(op: PatternOps, x: Pattern, tag: str) -> Pattern:
    """x[start:end:step] on one axis; bounds captured as `{tag}_start` etc."""
    s, e, a, st = (Var(f"{tag}_{k}") for k in ("start", "end", "axes", "steps"))
    return op.Slice(x, s, e, a) | op.Slice(x, s, e, a, st)


def rotate_half(op: PatternOps, x: Pattern) -> Pattern:
    return op.Concat(op.Neg(slice_last(op, x, "hi")), slice_last(op, x, "lo"), axis=Attr("halves_axis"))


def strided_last(op: PatternOps, x: Pattern, tag: str) -> Pattern:
    """x[start:end:step] on one axis, steps given (even/odd channels take step 2)."""
    s, e, a, st = (Var(f"{tag}_{k}") for k in ("start", "end", "axes", "steps"))
    return op.Slice(x, s, e, a, st)


def rotate_interleaved(op: PatternOps, x: Pattern) -> Pattern:
    pair = op.Concat(op.Unsqueeze(op.Neg(strided_last(op, x, "hi")), Var("ax1")),
                     op.Unsqueeze(strided_last(op, x, "lo"), Var("ax2")), axis=Attr("pair_axis"))
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
                         axis=Attr("parts_axis"))
    return pattern


def replacement_for(interleaved: bool):
    def replacement(op, x, cos, sin):
        return op.RotaryEmbedding(x, cos, sin, _domain=DOMAIN, interleaved=int(interleaved),
                                  rotary_dim=int(cos.shape[-1]))
    replacement.__doc__ = f"{'interleaved' if interleaved else 'rotate-half'} RoPE -> fusegraph.RotaryEmbedding"
    return replacement


# -- evaluating Slice bounds ----------------------------------------------------------------
class SymbolicDim:
    """A dim known only by its symbolic name (from `Shape`): equal to the same name only."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __eq__(self, other) -> bool:
        return isinstance(other, SymbolicDim) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return self.name


def static_int(v) -> np.ndarray | None:
    """The value of a small integer shape computation (constants, `Shape` and what the
    canonicalizer's evaluator computes from them) as an object array of ints, `SymbolicDim`s
    (a symbolic dim moved as it is) and None (unknown), or None. A graph input's default is
    not a constant: it can be fed."""
    known = evaluate(v, max_nodes=12)
    if known is None or known.elements.dtype.kind not in "iu":
        return None
    dims = known.dims()
    for i, d in enumerate(dims.reshape(-1)):
        if isinstance(d, str):
            dims.reshape(-1)[i] = SymbolicDim(d)
    return dims


def scalar(v) -> int | None:
    a = static_int(v)
    if a is None or a.size != 1:
        return None
    x = a.reshape(-1)[0]
    return int(x) if isinstance(x, (int, np.integer)) else None


def _last_axis(x, axes) -> bool:
    a = scalar(axes)
    return a is not None and (a == -1 or (x.rank is not None and a == x.rank - 1))


def _slice(x, caps: dict, tag: str, dim: int):
    """(start, end, step) of a forward Slice on x's last axis, of length `dim`, as Slice reads
    its bounds (a negative one counts from the end, both clamp to [0, dim]), or None."""
    if not _last_axis(x, caps[f"{tag}_axes"]):
        return None
    steps = caps.get(f"{tag}_steps")
    step = 1 if steps is None else scalar(steps)
    start, end = scalar(caps[f"{tag}_start"]), scalar(caps[f"{tag}_end"])
    if start is None or end is None or step is None or step <= 0:
        return None
    return tuple(min(max(b + dim if b < 0 else b, 0), dim) for b in (start, end)) + (step,)


def _concat_axis_is_last(axis, rank: int) -> bool:
    return axis == -1 or axis == rank - 1


# -- conditions -----------------------------------------------------------------------------
def _rotation_ok(x, width: int, interleaved: bool, caps: dict) -> str | None:
    """Why the rotation's slices are not a rotation of `width` channels, or None."""
    lo, hi = _slice(x, caps, "lo", width), _slice(x, caps, "hi", width)
    if lo is None or hi is None:
        return "slice bounds are not static or not on the last axis"
    if width % 2:
        return f"{width} channels do not pair up"
    if interleaved:
        if lo[0] != 0 or hi[0] != 1 or lo[2] != 2 or hi[2] != 2 or lo[1] < width - 1 or hi[1] != width:
            return f"slices {lo}, {hi} are not even/odd channels"
        for ax in ("ax1", "ax2"):
            if not _last_axis_after_unsqueeze(x, caps[ax]):
                return "pairs are not stacked on a new last axis"
        if not _concat_axis_is_last(caps["pair_axis"], x.rank + 1):
            return f"pairs are concatenated on axis {caps['pair_axis']}, not the new last axis"
        return _restores_shape(x, width, caps["shape"], caps["allowzero"])
    if not _concat_axis_is_last(caps["halves_axis"], x.rank):
        return f"halves are concatenated on axis {caps['halves_axis']}, not the last"
    half = width // 2
    if lo != (0, half, 1) or hi != (half, width, 1):
        return f"slices {lo}, {hi} do not split {width} channels in half"
    return None


def _last_axis_after_unsqueeze(x, axes) -> bool:
    a = scalar(axes)
    return a is not None and (a == -1 or a == x.rank)


def _restores_shape(x, width: int, shape, allowzero) -> str | None:
    """Why Reshape(pairs, shape) is not x's shape with `width` channels (every dim proven: an
    int or x's symbolic dim, 0 copying the pairs' dim unless `allowzero`, one -1 inferred from
    the others), or None."""
    want = x.shape[:-1] + (width,)
    target = static_int(shape)
    if target is None or target.ndim != 1 or len(target) != len(want):
        return f"the pairs are reshaped to {target}, not back to x's rank-{len(want)} shape"
    inferred = 0
    for i, (t, d) in enumerate(zip(target, want)):
        if isinstance(t, SymbolicDim):
            same = t.name == d
        elif not isinstance(t, (int, np.integer)):
            same = False
        elif t == -1:
            inferred += 1
            continue
        elif t == 0 and not allowzero:
            same = i < len(want) - 1  # copies the pairs' dim i, which is x's
        else:
            same = t == d
        if not same:
            return f"the pairs are reshaped to {list(target)}, not back to x's shape {list(want)}"
    return None if inferred <= 1 else f"the reshape target {list(target)} leaves {inferred} dims to infer"


def _table_dim_fits(td, xd) -> bool:
    """A table dim that broadcasts into x's dim `xd` without growing it: 1, the same static
    dim, or a symbolic one over a dim that isn't 1. A symbolic dim over a symbolic dim is taken
    as equal: exporters compute both from the same sequence and batch, shape inference just
    names them apart; were one to grow x at run time, the fused op's Concat fails loudly."""
    if td == 1:
        return True
    if isinstance(td, int):
        return td == xd
    return td is not None and xd is not None and xd != 1


def _tables_ok(x, cos, sin, width: int) -> str | None:
    """Why cos and sin are not [.., width] tables that broadcast into the rotated channels'
    shape (x's, with `width` channels) without growing it, or None."""
    rotated = x.shape[:-1] + (width,)
    for t in (cos, sin):
        if t.shape is None or not t.shape or t.shape[-1] != width:
            return f"{t.name!r} has shape {t.shape}, not [.., {width}]"
        if t.dtype != x.dtype:
            return f"{t.name!r} is not of x's element type"
        if len(t.shape) > len(rotated) or not all(
                _table_dim_fits(td, xd) for td, xd in zip(t.shape[::-1], rotated[::-1])):
            return f"{t.name!r} of shape {list(t.shape)} would grow x's shape {list(rotated)}"
    return None


def _head_width(x) -> str | int:
    """x's static last dim, or why there is none to rotate."""
    if not x.rank:
        return f"x has rank {x.rank}"
    width = x.shape[-1]
    return width if isinstance(width, int) else "head dim is not static"


def rotates_whole_head(interleaved: bool):
    def check(x, cos, sin, **caps) -> bool:
        width = _head_width(x)
        if isinstance(width, str):
            return reject(width)
        why = _rotation_ok(x, width, interleaved, caps) or _tables_ok(x, cos, sin, width)
        return why is None or reject(why)
    return check


def rotates_leading_channels(interleaved: bool):
    def check(x, cos, sin, **caps) -> bool:
        width = _head_width(x)
        if isinstance(width, str):
            return reject(width)
        rot, rest = _slice(x, caps, "rot", width), _slice(x, caps, "pass", width)
        if rot is None or rest is None:
            return reject("rotary slices are not static or not on the last axis")
        rd = rot[1]
        if rot != (0, rd, 1) or rest != (rd, width, 1) or not 0 < rd < width:
            return reject(f"slices {rot}, {rest} do not split the head at one rotary dim")
        if not _concat_axis_is_last(caps["parts_axis"], x.rank):
            return reject(f"rotated and passed channels are concatenated on axis {caps['parts_axis']}")
        why = _rotation_ok(x, rd, interleaved, caps) or _tables_ok(x, cos, sin, rd)
        return why is None or reject(why)
    return check


def math_fits_float32(x) -> bool:
    """The fused op rotates in float32 (`rope_ops`): x must be float16, bfloat16 or float32 (a
    float64 rotation would lose precision; an integer one would be rounded through float32)."""
    return computes_in_float32(x, "input", "RoPE") and (
        x.dtype in ROTATED_TYPES or reject(f"x's element type {x.dtype} is not float16, bfloat16 or float32"))


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
        ex |= {"ax1": _ints(-1), "ax2": _ints(-1), "shape": _ints(1, 2, 3, rd), "pair_axis": -1, "allowzero": 0}
    else:
        ex |= _bounds("hi", rd // 2, rd) | _bounds("lo", 0, rd // 2) | {"halves_axis": -1}
    if partial:
        ex |= _bounds("rot", 0, rd) | _bounds("pass", rd, width) | {"parts_axis": -1}
    return ex


RULES = [
    Rule(f"rope.{kind}{'_partial' if partial else ''}",
         (partial_pattern if partial else full_pattern)(rotate),
         replacement_for(kind == "interleaved"),
         [(rotates_leading_channels if partial else rotates_whole_head)(kind == "interleaved"), math_fits_float32],
         ROPE + partial, examples=[example(kind == "interleaved", partial)])
    for partial in (True, False)
    for kind, rotate in (("rotate_half", rotate_half), ("interleaved", rotate_interleaved))
]
