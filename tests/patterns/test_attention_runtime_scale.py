"""Multi-query attention with a run-time scale, as SDPA exports it with dynamic axes (issue 11
item 2): K and V [B, 1, S, D] broadcast over the query heads by the MatMuls (no Expand), and
the scale computed from Q's shape, sqrt(1 / sqrt(D)) applied to Q and to Kᵀ:

    s = Sqrt(Cast(Div(1, Sqrt(Cast(Slice(Shape(q), -1, max))))))

The scale is a constant exactly when D is known statically: the canonicalizer folds Shape of
a static dim and the exactly rounded Cast/Sqrt/Div after it, and the rule then reads one
constant. With D symbolic, or the scale read from a dynamic axis (the sequence length), it
stays a run-time value and the rule refuses (a scale must be a constant)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from fusegraph.api import rewrite_with_report
from fusegraph.patterns import attention
from fusegraph.verify.testing import assert_rewrites, assert_unchanged

from graph_builder import Builder

RULES = attention.RULES
H, D = 4, 8
FLOAT = onnx.TensorProto.FLOAT


def mqa(*, d=D, axis=-1, q_heads=H, kv_heads=1, batch="batch", seq="seq", opset=18):
    g = Builder()
    end = g.const([np.iinfo(np.int64).max] if axis == -1 else [axis + 1], np.int64)
    dim = g.op("Slice", g.op("Shape", "q"), g.const([axis], np.int64), end)
    root = g.op("Sqrt", g.op("Cast", dim, to=FLOAT))
    scale = g.op("Sqrt", g.op("Cast", g.op("Div", g.const(1.0), root), to=FLOAT))
    kt = g.op("Mul", g.op("Transpose", "k", perm=[0, 1, 3, 2]), scale)
    probs = g.op("Softmax", g.op("MatMul", g.op("Mul", "q", scale), kt), axis=-1)
    out = g.op("MatMul", probs, "v")
    return g.model({"q": [batch, q_heads, seq, d], "k": [batch, kv_heads, seq, d], "v": [batch, kv_heads, seq, d]},
                   {out: [batch, max(q_heads, kv_heads), seq, d]}, opset)


@pytest.mark.parametrize("batch, seq", [("batch", "seq"), (2, 5)], ids=["dynamic", "static"])
def test_multi_query_attention_with_a_run_time_scale_fuses(batch, seq):
    model = mqa(batch=batch, seq=seq)
    fused = assert_rewrites(model, RULES, expect={"fusegraph.Attention": 1, "Softmax": 0, "Sqrt": 0},
                            shapes={"q": (2, H, 5, D), "k": (2, 1, 5, D), "v": (2, 1, 5, D)})
    op = next(n for n in fused.graph.node if n.op_type == "Attention")
    assert list(op.input[1:3]) == ["k", "v"]  # the one kv head, not a repeated copy
    scale = next(a.f for a in op.attribute if a.name == "scale")
    assert scale == pytest.approx(D ** -0.5, rel=1e-6)


@pytest.mark.parametrize("kw", [
    {"d": "d"},            # the head dim symbolic: the scale is a run-time value
    {"axis": -2},          # read from the sequence length, dynamic: another run-time value
    {"q_heads": 1, "kv_heads": H},  # one query head broadcast over 4 kv heads: another product
    {"opset": 12},         # below the fused op's opset
], ids=["symbolic-d", "seq-axis", "q-broadcast", "opset-12"])
def test_run_time_scales_not_proven_constant_are_refused(kw):
    assert_unchanged(mqa(**kw), RULES)


def test_without_canonicalization_the_run_time_scale_is_refused():
    """The rule reads constants only: the scale folds in the canonicalizer, not in the rule."""
    _, report = rewrite_with_report(mqa(), RULES, canonicalize=False)
    assert not report.fusions
