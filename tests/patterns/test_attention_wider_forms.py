"""The attention forms of issue 11 that the rules learned through the pattern language, each
with its near misses: soft-capped scores (Gemma 2), a bias under a Where mask (MPT's ALiBi),
K with the heads merged into the batch (nn.MultiheadAttention), and NaN rows from the inputs.

Every fused model is checked against the original in ONNX Runtime (`assert_rewrites`), on
inputs with a fully masked row and with NaN in Q; every near miss must be left alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from fusegraph.api import rewrite_with_report
from fusegraph.patterns import attention
from fusegraph.graph_builder import GraphBuilder
from fusegraph.verify.testing import assert_rewrites, assert_unchanged, op_counts
from fusegraph.verify import run

RULES = attention.RULES
B, H, S, D = 2, 4, 6, 8
F32_LOW = float(np.finfo(np.float32).min)


class Graph(GraphBuilder):
    """The one graph builder in float32, with this file's model (one output); constants whose
    `role` is `overridable` are also graph inputs, i.e. defaults a caller may feed."""

    def __init__(self, overridable=()):
        super().__init__(np.float32)
        self.overridable = overridable

    def const(self, value, dtype=np.float32, role=None):
        name = super().const(value, dtype)
        if role in self.overridable:
            array = np.asarray(value, dtype)
            self.input(name, list(array.shape), array.dtype)
        return name

    def model(self, out, shape, opset=18):
        return super().model({}, {out: shape}, opset)


def _qkv(g: Graph):
    for x in "qkv":
        g.input(x, [B, H, S, D])
    return g.op("Mul", g.op("MatMul", "q", g.op("Transpose", "k", perm=[0, 1, 3, 2])), g.const(D ** -0.5))


def _fused(model, expect_op: str) -> onnx.NodeProto:
    out = assert_rewrites(model, RULES)
    counts = op_counts(out)
    assert counts[expect_op] == 1 and counts["Softmax"] == 0, dict(counts)
    return next(n for n in out.graph.node if n.op_type.endswith("Attention"))


def _attrs(n: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}


def _feeds(model, seed=0, nan_q=False):
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in model.graph.input:
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if i.type.tensor_type.elem_type == onnx.TensorProto.BOOL:
            a = rng.random(shape) < 0.6
            a[(0,) * (a.ndim - 1)] = False  # a fully masked (or fully kept) row
            feeds[i.name] = a
        else:
            feeds[i.name] = (rng.standard_normal(shape) * 3).astype(np.float32)
    if nan_q:
        feeds["q"][(0,) * (feeds["q"].ndim - 2) + (-1, 0)] = np.nan
    return feeds


def _same_outputs(model, out, feeds):
    want, got = run(model, feeds), run(out, feeds)
    for w, g in zip(want.values(), got.values()):
        assert (np.isnan(w) == np.isnan(g)).all()
        np.testing.assert_allclose(np.nan_to_num(g), np.nan_to_num(w), rtol=1e-4, atol=1e-5)


# -- soft cap ---------------------------------------------------------------------------------
def softcapped(div=50.0, mul=50.0, mask=True, guard=False, opset=18, overridable=(), cap_shape=()):
    g = Graph(overridable)
    scores = _qkv(g)
    scores = g.op("Mul", g.op("Tanh", g.op("Div", scores, g.const(np.full(cap_shape, div), role="cap"))),
                  g.const(mul))
    if mask:
        g.input("mask", [B, 1, S, S])
        scores = g.op("Add", scores, "mask")
    probs = g.op("Softmax", scores, axis=-1)
    if guard:
        probs = g.op("Where", g.op("IsNaN", probs), g.const(0.0), probs)
    return g.model(g.op("MatMul", probs, "v"), [B, H, S, D], opset)


@pytest.mark.parametrize("cap", [50.0, 0.5, -30.0])
@pytest.mark.parametrize("guard", [False, True])
def test_soft_cap_fuses_as_the_ops_softcap(cap, guard):
    """cap * tanh(s / cap) after the scale: the op's `softcap` (|cap|: tanh is odd, so a cap of
    -30 on both sides is the cap 30), equal in ONNX Runtime on large scores and on NaN in Q."""
    model = softcapped(cap, cap, guard=guard)
    fused = _fused(model, "fusegraph.MaskedAttention")
    assert _attrs(fused)["softcap"] == pytest.approx(abs(cap)) and _attrs(fused)["zero_nan_rows"] == guard
    out, _ = rewrite_with_report(model, RULES)
    _same_outputs(model, out, _feeds(model, nan_q=True))


def test_soft_cap_at_opset_23_stays_the_fusegraph_op():
    """ONNX `Attention` has `softcap`, but TensorRT-RTX's parser refuses it: a soft-capped
    attention is never emitted as the standard op."""
    fused = _fused(softcapped(mask=False, opset=23), "fusegraph.Attention")
    assert _attrs(fused)["softcap"] == 50.0


@pytest.mark.parametrize("div, mul, kw", [
    (50.0, 30.0, {}),                            # another cap after the Tanh
    (50.0, -50.0, {}),                           # the sign flipped on one side
    (-50.0, 50.0, {}),
    (50.0, 50.0, {"overridable": ("cap",)}),    # a default the caller may feed
    (50.0, 50.0, {"cap_shape": (H, 1, 1)}),      # one cap per head: not the op's scalar
], ids=["other-cap", "neg-mul", "neg-div", "cap-is-input", "per-head-cap"])
def test_soft_cap_near_misses_are_refused(div, mul, kw):
    assert_unchanged(softcapped(div, mul, **kw), RULES)


def test_tanh_without_the_cap_is_no_soft_cap():
    """tanh(s / 50) alone (no Mul back) bounds the scores to (-1, 1): another function."""
    g = Graph()
    scores = g.op("Tanh", g.op("Div", _qkv(g), g.const(50.0)))
    assert_unchanged(g.model(g.op("MatMul", g.op("Softmax", scores, axis=-1), "v"), [B, H, S, D]), RULES)


# -- a bias under a Where mask (ALiBi) ----------------------------------------------------------
def alibi(fill=F32_LOW, kind="drop", bias_shape=(H, 1, S), bias_input=False, guard=False):
    g = Graph()
    scores = _qkv(g)
    if bias_input:
        g.input("alibi", list(bias_shape))
        bias = "alibi"
    else:
        bias = g.const(np.linspace(-4, 0, int(np.prod(bias_shape))).reshape(bias_shape))
    biased = g.op("Add", scores, bias)
    g.input("sel", [B, 1, S, S], np.bool_)
    fill_c = g.const(fill)
    masked = g.op("Where", "sel", fill_c, biased) if kind == "drop" else g.op("Where", "sel", biased, fill_c)
    probs = g.op("Softmax", masked, axis=-1)
    if guard:
        probs = g.op("Where", g.op("IsNaN", probs), g.const(0.0), probs)
    return g.model(g.op("MatMul", probs, "v"), [B, H, S, D])


@pytest.mark.parametrize("kind", ["drop", "keep"])
@pytest.mark.parametrize("fill", [F32_LOW, -np.inf])
@pytest.mark.parametrize("guard", [False, True])
def test_bias_under_a_where_mask_fuses(kind, fill, guard):
    """Where(drop, fill, scores + alibi): the op's mask holds the bias where the score is kept
    and the fill where it is dropped, so a fully masked row is what the original gives
    (uniform under the lowest fill, NaN or zeros under -inf)."""
    model = alibi(fill, kind, guard=guard)
    _fused(model, "fusegraph.MaskedAttention")
    out, _ = rewrite_with_report(model, RULES)
    for seed in range(3):
        _same_outputs(model, out, _feeds(model, seed))


def test_a_huge_run_time_bias_is_still_overwritten_by_the_fill():
    """The fill replaces the biased score in the original whatever the bias: 1e38 + lowest
    would not be the lowest value, so the fused mask must not add them."""
    model = alibi(bias_input=True, bias_shape=(B, H, 1, S))
    out = assert_rewrites(model, RULES)
    feeds = _feeds(model)
    feeds["alibi"][...] = -3e38
    feeds["sel"][...] = True  # everything dropped: uniform rows in the original
    _same_outputs(model, out, feeds)


@pytest.mark.parametrize("fill", [-1e4, 0.0, -3e38])
def test_a_fill_that_is_not_the_lowest_value_is_a_score(fill):
    assert_unchanged(alibi(fill), RULES)


def test_a_bias_that_grows_the_scores_is_refused():
    """A [2, H, S, S] bias over scores of batch 1 would add a batch: another computation."""
    g = Graph()
    for x in "qkv":
        g.input(x, [1, H, S, D])
    scores = g.op("Mul", g.op("MatMul", "q", g.op("Transpose", "k", perm=[0, 1, 3, 2])), g.const(D ** -0.5))
    biased = g.op("Add", scores, g.const(np.zeros((2, H, S, S))))
    g.input("sel", [1, 1, S, S], np.bool_)
    masked = g.op("Where", "sel", g.const(F32_LOW), biased)
    assert_unchanged(g.model(g.op("MatMul", g.op("Softmax", masked, axis=-1), "v"), [2, H, S, D]), RULES)


# -- K with the heads in the batch ---------------------------------------------------------------
def merged_heads(split=(B, H, D, S), perm=(0, 2, 1), q_batch=B, scale=D ** -0.25, overridable=()):
    """nn.MultiheadAttention as dynamo exports it at static shapes: K [B*H, S, D] transposed in
    3-D and split back into [B, H, D, S]; sqrt(scale) on Q and on K^T."""
    g = Graph(overridable)
    g.input("q", [q_batch, H, S, D]), g.input("k", [split[0] * H, S, D]), g.input("v", [q_batch, H, S, D])
    kt = g.op("Reshape", g.op("Transpose", "k", perm=list(perm)), g.const(split, np.int64, role="split"))
    scores = g.op("MatMul", g.op("Mul", "q", g.const(scale)), g.op("Mul", kt, g.const(scale)))
    model = g.model(g.op("MatMul", g.op("Softmax", scores, axis=-1), "v"), [q_batch, H, S, D])
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(model, strict_mode=True), full_check=True)
    return model


def test_key_with_heads_in_the_batch_fuses():
    fused = _fused(merged_heads(), "fusegraph.Attention")
    assert _attrs(fused)["scale"] == pytest.approx(D ** -0.5)


def test_key_with_heads_in_the_batch_fuses_as_onnx_attention_at_opset_23():
    model = merged_heads()
    model.opset_import[0].version = 23
    assert _fused(model, "Attention").domain == ""


@pytest.mark.parametrize("kw", [
    {"perm": (1, 0, 2)},                          # [S, B*H, D] split as if it were K^T
    {"split": (1, H, D, S), "q_batch": 2},        # K's one batch broadcast over Q's two
    {"overridable": ("split",)},                  # the split is a default the caller may feed
], ids=["perm", "batch-broadcast", "split-is-input"])
def test_key_with_heads_in_the_batch_near_misses_are_refused(kw):
    assert_unchanged(merged_heads(**kw), RULES)


# -- Q, K and V with the heads in the batch (3-D) ------------------------------------------------
def three_d(mask=None, sk=S, v_rank=3, perm=(0, 2, 1), scale=D ** -0.5, guard=False):
    """softmax(Q K^T * scale (+ mask)) V on [B*H, S, D], as diffusion UNets export it (self- and
    cross-attention, baddbmm's zeros as the mask) and ALiBi models before their Reshape."""
    g = Graph()
    g.input("q", [B * H, S, D]), g.input("k", [B * H, sk, D])
    g.input("v", [B * H, sk, D] if v_rank == 3 else [1, B * H, sk, D])
    scores = g.op("Mul", g.op("MatMul", "q", g.op("Transpose", "k", perm=list(perm))), g.const(scale))
    if mask == "zeros":
        scores = g.op("Add", scores, g.const(np.zeros((B * H, S, sk))))
    elif mask == "alibi":  # [B*H, 1, Sk] bias, then a boolean mask with the lowest fill
        scores = g.op("Add", scores, g.const(np.linspace(-3, 0, B * H * sk).reshape(B * H, 1, sk)))
        g.input("sel", [B * H, S, sk], np.bool_)
        scores = g.op("Where", "sel", g.const(F32_LOW), scores)
    elif mask is not None:
        g.input("mask", list(mask))
        scores = g.op("Add", scores, "mask")
    probs = g.op("Softmax", scores, axis=-1)
    if guard:
        probs = g.op("Where", g.op("IsNaN", probs), g.const(0.0), probs)
    out_shape = [B * H, S, D] if v_rank == 3 else [1, B * H, S, D]
    return g.model(g.op("MatMul", probs, "v"), out_shape)


@pytest.mark.parametrize("mask, sk, op", [
    (None, S, "fusegraph.Attention"), ("zeros", 9, "fusegraph.MaskedAttention"),
    ("alibi", S, "fusegraph.MaskedAttention"), ((B * H, 1, 9), 9, "fusegraph.MaskedAttention"),
    ((S, S), S, "fusegraph.MaskedAttention"),
], ids=["plain", "unet-cross-zeros", "alibi-where", "mask-bh1s", "mask-ss"])
def test_heads_in_the_batch_fuse_as_one_batch_of_heads(mask, sk, op):
    """[B*H, S, D] attention is the op on [1, B*H, S, D]: Q, K, V (and a 3-D mask) unsqueezed,
    Y squeezed; equal in ONNX Runtime, a fully masked row and NaN in Q included."""
    model = three_d(mask, sk)
    _fused(model, op)
    out, _ = rewrite_with_report(model, RULES)
    for seed in range(2):
        _same_outputs(model, out, _feeds(model, seed, nan_q=seed == 1))


def test_heads_in_the_batch_become_onnx_attention_at_opset_23():
    model = three_d()
    model.opset_import[0].version = 23
    assert _fused(model, "Attention").domain == ""


@pytest.mark.parametrize("kw", [
    {"v_rank": 4},                       # V [1, B*H, S, D]: the output grows a dim
    {"mask": (2, B * H, S, S)},          # a 4-D mask grows the 3-D scores
    {"perm": (1, 0, 2)},                 # [S, B*H, D]: not K^T
], ids=["v-4d", "mask-4d", "perm"])
def test_heads_in_the_batch_near_misses_are_refused(kw):
    assert_unchanged(three_d(**kw), RULES)
