"""RoPE rules on drawn rotate-half / interleaved / partial rotary graphs, and decoys."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from fusegraph.patterns import rope
from fusegraph.rule import RuleSet
from fusegraph.verify.testing import assert_rewrites, assert_unchanged, op_counts, rewrite_with_report
from graph_builder import Builder

RULES = RuleSet(rope.RULES)
BIG = 2**63 - 1


@st.composite
def forms(draw):
    d = draw(st.sampled_from([8, 16, 32]))
    return dict(dtype=draw(st.sampled_from([np.float32, np.float16])), opset=draw(st.sampled_from([17, 18, 23])),
                b=draw(st.integers(1, 2)), h=draw(st.integers(1, 3)), s=draw(st.integers(1, 5)), d=d,
                rd=draw(st.sampled_from([d, d // 2])), interleaved=draw(st.booleans()),
                steps=draw(st.booleans()), big_end=draw(st.booleans()), swap=draw(st.booleans()),
                negative_start=draw(st.booleans()), positive_axis=draw(st.booleans()),
                table_batch=draw(st.booleans()), const_nodes=draw(st.booleans()))


def sl(b: Builder, f: dict, x: str, start: int, end: int, step: int = 1, axis: int = -1) -> str:
    ins = [x, b.const([start], np.int64), b.const([end], np.int64), b.const([axis], np.int64)]
    if f["steps"] or step != 1:
        ins.append(b.const([step], np.int64))
    return b.op("Slice", *ins)


def rotate(b: Builder, f: dict, x: str, width: int, split: int | None = None) -> str:
    end = BIG if f["big_end"] else width
    if f["interleaved"]:
        odd, even = sl(b, f, x, 1, end, 2), sl(b, f, x, 0, end, 2)
        last = b.const([-1], np.int64)
        pair = b.op("Concat", b.op("Unsqueeze", b.op("Neg", odd), last), b.op("Unsqueeze", even, last), axis=-1)
        return b.op("Reshape", pair, b.const([f["b"], f["h"], f["s"], width], np.int64))
    half = width // 2 if split is None else split
    # x[..., -h:] and Concat(axis=3) on rank 4 are the same rotation (issue 9 class 12)
    start = half - width if f["negative_start"] else half
    axis = 3 if f["positive_axis"] else -1
    return b.op("Concat", b.op("Neg", sl(b, f, x, start, end)), sl(b, f, x, 0, half), axis=axis)


def build(f: dict, split: int | None = None, extra_output: bool = False):
    b = Builder(f["dtype"], const_nodes=f["const_nodes"])
    x, rd = "x", f["rd"]
    xr = x if rd == f["d"] else sl(b, f, x, 0, rd)
    rot = rotate(b, f, xr, rd, split)
    pair = (b.op("Mul", "cos", xr), b.op("Mul", "sin", rot)) if f["swap"] else (b.op("Mul", xr, "cos"), b.op("Mul", rot, "sin"))
    y = b.op("Add", *pair)
    if rd != f["d"]:
        y = b.op("Concat", y, sl(b, f, x, rd, BIG if f["big_end"] else f["d"]), axis=-1)
    shape = [f["b"], f["h"], f["s"], f["d"]]
    table = [f["b"] if f["table_batch"] else 1, 1, f["s"], rd]
    outs = {y: shape, **({rot: None} if extra_output else {})}
    return b.model({"x": shape, "cos": table, "sin": table}, outs, f["opset"])


@settings(max_examples=25, deadline=None)
@given(f=forms())
def test_rope_forms_fuse(f):
    out = assert_rewrites(build(f), RULES, expect={"fusegraph.RotaryEmbedding": 1, "Neg": 0, "Slice": 0})
    (node,) = out.graph.node
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs == {"interleaved": int(f["interleaved"]), "rotary_dim": f["rd"]}


@settings(max_examples=8, deadline=None)
@given(f=forms())
def test_decoy_split_not_at_half(f):
    f = {**f, "interleaved": False}
    m = build(f, split=f["rd"] // 2 - 2)
    assert_unchanged(m, RULES)


@settings(max_examples=8, deadline=None)
@given(f=forms())
def test_decoy_rotation_with_a_second_consumer(f):
    m = build(f, extra_output=True)
    out, report = rewrite_with_report(m, RULES)
    assert not report.fusions and op_counts(out)["Neg"] == 1


@settings(max_examples=6, deadline=None)
@given(f=forms())
def test_regression_rope_float64_precision(f):
    """The fused op rotates in float32, ~1e-7 off a float64 rotation: float64 RoPE stays as it
    is (found by the rule self-check); the same graph in float32 fuses."""
    assert_rewrites(build({**f, "dtype": np.float32}), RULES, expect={"fusegraph.RotaryEmbedding": 1})
    m = build({**f, "dtype": np.float64})
    assert_unchanged(m, RULES)
