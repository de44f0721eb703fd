"""RoPE in the spellings TorchScript exports write (issue 11, item 5), fused once canonical.

- q/k cut from a per-head fused QKV by `torch.chunk(3)`: Slices whose ends are Shape arithmetic,
  `(Gather(Shape(qkv), -1) + 2) / 3`, then partial rotary (GPT-NeoX, Phi);
- GPT-J's interleaved rotation, whose pairs are flattened back by `Reshape(pairs,
  Concat(Shape(pairs)[:-2], [-1]))`: the Shape reads the intermediate the rule fuses away;
- `x` read through two separate no-op Casts of the same value.
Each beside its near miss: what the canonicalizer must not prove, and the rule must refuse.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from fusegraph.patterns import rope
from fusegraph.rule import RuleSet
from fusegraph.verify.testing import assert_rewrites, op_counts, rewrite_with_report
from graph_builder import Builder

RULES = RuleSet(rope.RULES)
I64 = np.int64
BIG = 2**63 - 1


def sl(b: Builder, x: str, start: str | int, end: str | int, step: int = 1) -> str:
    bound = [s if isinstance(s, str) else b.const([s], I64) for s in (start, end)]
    return b.op("Slice", x, *bound, b.const([-1], I64), b.const([step], I64))


def rotate_half(b: Builder, x: str, width: int) -> str:
    return b.op("Concat", b.op("Neg", sl(b, x, width // 2, BIG)), sl(b, x, 0, width // 2), axis=-1)


def chunked_q_model(head: int | str = 12, rd: int = 2):
    """q = qkv[..., :third] with `third = (Shape(qkv)[-1] + 2) / 3` (torch.chunk(3)), then RoPE on
    its first `rd` channels. `head` is qkv's last dim: 12 (three heads of 4) or symbolic."""
    b = Builder()
    third = b.op("Div", b.op("Add", b.op("Gather", b.op("Shape", "qkv"), b.const(-1, I64), axis=0), b.const(2, I64)),
                 b.const(3, I64))
    q = sl(b, "qkv", 0, b.op("Unsqueeze", third, b.const([0], I64)))
    x = sl(b, q, 0, rd)
    y = b.op("Add", b.op("Mul", x, "cos"), b.op("Mul", rotate_half(b, x, rd), "sin"))
    y = b.op("Concat", y, sl(b, q, rd, BIG), axis=-1)
    return b.model({"qkv": ["batch", 2, "seq", head], "cos": ["seq", rd], "sin": ["seq", rd]},
                   {y: ["batch", 2, "seq", 4]}, 17)


def test_chunked_q_with_shape_arithmetic_ends_fuses():
    out = assert_rewrites(chunked_q_model(), RULES, expect={"fusegraph.RotaryEmbedding": 1, "Neg": 0})
    assert op_counts(out)["Shape"] == 0  # the chunk's end is a constant now


def test_chunked_q_of_a_symbolic_width_is_refused():
    """Near miss: qkv's last dim is symbolic, so q's head dim is unknown (it could be any third):
    nothing is assumed, the rotation is left as exported."""
    out, report = rewrite_with_report(chunked_q_model(head="width"), RULES)
    assert not report.fusions and op_counts(out)["Neg"] == 1


def interleaved_model(target_from: str = "pairs"):
    """GPT-J's rotate_every_two on x [batch, seq, 2, 4]: the pairs [.., 2, 2] flattened back by
    a Reshape to `Concat(Shape(<target_from>)[:-2], [-1])`."""
    b = Builder()
    last = b.const([-1], I64)
    odd, even = sl(b, "x", 1, BIG, 2), sl(b, "x", 0, BIG, 2)
    pairs = b.op("Concat", b.op("Unsqueeze", b.op("Neg", odd), last), b.op("Unsqueeze", even, last), axis=-1)
    source = pairs if target_from == "pairs" else target_from
    leading = b.op("Slice", b.op("Shape", source), b.const([0], I64), b.const([-2], I64), b.const([0], I64))
    rotated = b.op("Reshape", pairs, b.op("Concat", leading, b.const([-1], I64), axis=0))
    y = b.op("Add", b.op("Mul", "x", "cos"), b.op("Mul", rotated, "sin"))
    return b.model({"x": ["batch", "seq", 2, 4], "other": ["seq", "batch", 2, 2, 2], "cos": ["seq", 1, 4],
                    "sin": ["seq", 1, 4]}, {y: ["batch", "seq", 2, 4]}, 17)


def test_interleaved_pairs_flattened_by_their_own_shape_fuse():
    """The target's unknown dims are the pairs' own dims at the same index: `Reshape(pairs,
    [0, 0, 2, -1])` says the same without reading the pairs' Shape."""
    out = assert_rewrites(interleaved_model(), RULES, expect={"fusegraph.RotaryEmbedding": 1, "Shape": 0})
    (node,) = [n for n in out.graph.node if n.op_type == "RotaryEmbedding"]
    assert {a.name: a.i for a in node.attribute}["interleaved"] == 1


def test_a_target_from_another_values_shape_is_not_respelled():
    """Near miss: the target's dims come from another value's Shape (its dims are named alike
    but it is not the Reshape's input), so 0 ("copy the input's dim") would not provably be the
    same: the shape stays computed and the rotation as exported."""
    out, report = rewrite_with_report(interleaved_model(target_from="other"), RULES)
    assert not report.fusions and op_counts(out)["Shape"] == 1 and op_counts(out)["Neg"] == 1


def two_casts_model(second_to: int = TensorProto.FLOAT):
    """x read through two Casts of the same value, one for x·cos, one for rotate_half(x)."""
    b = Builder()
    x1, x2 = b.op("Cast", "x", to=TensorProto.FLOAT), b.op("Cast", "x", to=second_to)
    y = b.op("Add", b.op("Mul", x1, "cos"), b.op("Mul", rotate_half(b, x2, 4), "sin"))
    return b.model({"x": ["batch", 2, 3, 4], "cos": [3, 4], "sin": [3, 4]}, {y: ["batch", 2, 3, 4]}, 17)


def test_x_read_through_two_noop_casts_fuses():
    assert_rewrites(two_casts_model(), RULES, expect={"fusegraph.RotaryEmbedding": 1, "Cast": 0})


def test_x_read_through_casts_to_other_types_is_refused():
    """Near miss: the second Cast rounds x to float16 and back is not x: two different values."""
    b = Builder()
    x1 = b.op("Cast", "x", to=TensorProto.FLOAT)
    x2 = b.op("Cast", b.op("Cast", "x", to=TensorProto.FLOAT16), to=TensorProto.FLOAT)
    y = b.op("Add", b.op("Mul", x1, "cos"), b.op("Mul", rotate_half(b, x2, 4), "sin"))
    model = b.model({"x": ["batch", 2, 3, 4], "cos": [3, 4], "sin": [3, 4]}, {y: ["batch", 2, 3, 4]}, 17)
    out, report = rewrite_with_report(model, RULES)
    assert not report.fusions and op_counts(out)["Neg"] == 1
