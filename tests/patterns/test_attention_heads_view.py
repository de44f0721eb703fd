"""Attention with the heads in the batch whose mask and Softmax see a 4-D view of the scores
(Bloom's ALiBi, `patterns/attention_views.py`):

    Reshape(Q·Kᵀ·s + alibi [B*H, 1, S], [B, H, S, S]) + mask (or Where) -> Softmax
      -> Reshape([B*H, S, S]) -> ·V      (or left 4-D, ·V [B, H, S, D])

The instances fuse into one MaskedAttention and compute what they computed in ONNX Runtime
(fully masked rows included); the near misses (a view that regroups the rows, a merge to
another shape, a V of one batch broadcast over two, a mask that grows the view, a fill that is
a score, an opset below the fused op's) stay as they are."""

from __future__ import annotations

import numpy as np
import pytest

from fusegraph.patterns import attention, attention_views
from fusegraph.verify.testing import assert_rewrites, assert_unchanged, make_inputs

from graph_builder import Builder

RULES = attention.RULES
B, H, S, D = 2, 2, 4, 8
LOWEST = np.finfo(np.float32).min


def bloom(*, b=B, mask="add", view=(B, H, S, -1), merge=(B * H, S, -1), v_shape=None, fill=LOWEST,
          mask_batch=None, sel_shape=None, bias="alibi", bias_shape=None, axis=-1, merge_perm=None, opset=18):
    """The attention as Bloom exports it; `merge=None` leaves the probabilities 4-D for a 4-D V;
    `bias="position"` adds a run-time [B*H, S, S] term instead of the ALiBi constant, as
    DeBERTa adds its c2p + p2c position scores."""
    g = Builder()
    n = b * H
    kt = g.op("Transpose", "k", perm=[0, 2, 1])
    scores = g.op("Mul", g.op("MatMul", "q", kt), g.const(D ** -0.5))
    shape = bias_shape or (n, 1, S)
    alibi = g.const(np.linspace(-1, 0, int(np.prod(shape))).reshape(shape)) if bias == "alibi" else "pos"
    viewed = g.op("Reshape", g.op("Add", scores, alibi), g.const(view, np.int64))
    sel_shape = sel_shape or [mask_batch or b, 1, S, S]
    if mask == "add":  # the padding mask as Bloom adds it: 0 where kept, the lowest value where not
        masked = g.op("Add", viewed, g.op("Where", "sel", g.const(0.0), g.const(fill)))
    else:  # masked_fill
        masked = g.op("Where", "sel", g.const(fill), viewed)
    probs = g.op("Softmax", masked, axis=axis)
    if merge_perm is not None:  # the heads permuted before the merge
        probs = g.op("Transpose", probs, perm=list(merge_perm))
    v_dims = v_shape or ([n, S, D] if merge is not None else [b, H, S, D])
    if merge is not None:
        probs = g.op("Reshape", probs, g.const(merge, np.int64))
    out = g.op("MatMul", probs, "v")
    inputs = {"q": [n, S, D], "k": [n, S, D], "v": v_dims, "sel": (np.bool_, sel_shape),
              **({"pos": [n, S, S]} if bias == "position" else {})}
    out_shape = [v_dims[0] if merge is not None else b, *([] if merge is not None else [H]), S, D]
    return g.model(inputs, {out: [None] * len(out_shape)}, opset)


def _feeds(model, seed):
    feeds = make_inputs(model, seed=seed)
    feeds["sel"] = np.random.default_rng(seed).random(feeds["sel"].shape) < 0.3
    feeds["sel"][0, 0, 1] = True  # a fully masked row: uniform in the original, as in the fused op
    return feeds


@pytest.mark.parametrize("kw", [{}, {"mask": "where"}, {"merge": None}, {"view": (B, H, S, S)},
                                {"mask": "where", "merge": None}, {"mask": "where", "bias": "position"}],
                         ids=["add", "masked_fill", "v-4d", "static-view", "masked_fill-v-4d", "deberta-position"])
def test_a_mask_on_the_heads_view_fuses(kw):
    model = bloom(**kw)
    for seed in range(2):
        assert_rewrites(model, RULES, expect={"fusegraph.MaskedAttention": 1, "Softmax": 0},
                        feeds=_feeds(model, seed))


@pytest.mark.parametrize("kw", [
    {"view": (B, H, 2 * S, -1), "sel_shape": [B, 1, 1, 1]},  # the rows regrouped: Softmax over half rows
    {"merge": (B * H * 2, S // 2, -1), "v_shape": [B * H * 2, S, D]},  # merged to another shape
    {"merge": None, "v_shape": [1, H, S, D]},  # V of one batch broadcast over the view's two
    {"b": 1, "view": (1, H, S, -1), "mask_batch": 2},  # a mask that grows the view's batch of 1
    {"fill": -1e4},                            # a fill that is a score, not a mask
    {"opset": 12},                             # below the fused op's opset
    {"axis": 2},                               # the Softmax over the queries
    {"merge_perm": (1, 0, 2, 3)},              # the heads permuted before the merge
    {"bias_shape": (2, B * H, 1, S), "view": (2 * B, H, S, -1), "merge": (2 * B * H, S, -1),
     "v_shape": [2 * B * H, S, D], "mask_batch": 1},  # a bias of rank 4 that grows the 3-D scores
], ids=["rows-regrouped", "merged-elsewhere", "v-batch-broadcast", "mask-grows", "fill-score", "opset-12",
        "softmax-axis", "heads-permuted", "bias-grows"])
def test_near_misses_of_the_heads_view_are_refused(kw):
    assert_unchanged(bloom(**kw), RULES)


def dynamic_bloom(*, q_batch=f"{H}*batch"):
    """The dynamo export's form with dynamic axes: Q, K, V typed [2*batch, seq, 8], the view's
    target [batch, 2, seq, -1] and the merge's [-1, seq, seq] read from Shape(input_ids)."""
    g = Builder()
    dims = g.op("Shape", "ids")
    batch = g.op("Slice", dims, g.const([0], np.int64), g.const([1], np.int64))
    seq = g.op("Slice", dims, g.const([1], np.int64), g.const([2], np.int64))
    view = g.op("Concat", batch, g.const([H], np.int64), seq, g.const([-1], np.int64), axis=0)
    merge = g.op("Concat", g.const([-1], np.int64), seq, seq, axis=0)
    scores = g.op("Mul", g.op("MatMul", "q", g.op("Transpose", "k", perm=[0, 2, 1])), g.const(D ** -0.5))
    viewed = g.op("Reshape", g.op("Add", scores, "alibi"), view)
    probs = g.op("Softmax", g.op("Where", "sel", g.const(LOWEST), viewed), axis=-1)
    out = g.op("MatMul", g.op("Reshape", probs, merge), "v")
    bh = [q_batch, "seq", D]
    return g.model({"ids": (np.int64, ["batch", "seq"]), "q": bh, "k": bh, "v": bh, "alibi": [q_batch, 1, "seq"],
                    "sel": (np.bool_, ["batch", 1, "seq", "seq"])}, {out: bh}, 18)


def test_symbolic_dims_prove_the_view():
    """'2*batch' is batch times the view's 2 heads: the view is proven from the dim names."""
    model = dynamic_bloom()
    shapes = {"ids": (2, S), "q": (2 * H, S, D), "k": (2 * H, S, D), "v": (2 * H, S, D), "alibi": (2 * H, 1, S),
              "sel": (2, 1, S, S)}
    assert_rewrites(model, RULES, expect={"fusegraph.MaskedAttention": 1, "Softmax": 0}, shapes=shapes)


def test_symbolic_dims_that_do_not_prove_the_view_are_refused():
    """Q's batch named 4*batch against a view of batch x 2 heads: no proof the rows are kept."""
    assert_unchanged(dynamic_bloom(q_batch=f"{2 * H}*batch"), RULES)


@pytest.mark.parametrize("dim, product", [
    (8, (8, ())), ("batch", (1, ("batch",))), ("4*batch", (4, ("batch",))), ("seq*2*batch", (2, ("batch", "seq"))),
    (-1, None), (0, None), (None, None), ("unk__3", None), ("((seq**2)//seq)", None), ("seq+1", None),
])
def test_a_dim_reads_as_a_product_or_as_nothing(dim, product):
    """Only plain products prove anything: -1, 0 (a Reshape's rest and copy), TorchScript's
    fresh names and expressions other than products read as unknown."""
    assert attention_views.as_product(dim) == product


def test_a_bias_that_grows_the_queries_does_not_prove_the_view():
    """Q [n, sq, 8] with a bias [n, sb, sk]: fed sq = 1 and sb = 4, the bias grows the scores to
    4 query rows and the view and merge (read from the bias' shape) keep them; the fused op
    would answer 1 row. Sq is read from Q, never from the biased scores: refused."""
    g = Builder()
    rows = g.op("Slice", g.op("Shape", "bias"), g.const([1], np.int64), g.const([3], np.int64))
    view = g.op("Concat", g.const([-1, H], np.int64), rows, axis=0)
    merge = g.op("Concat", g.const([-1], np.int64), rows, axis=0)
    scores = g.op("MatMul", "q", g.op("Transpose", "k", perm=[0, 2, 1]))
    viewed = g.op("Reshape", g.op("Add", scores, "bias"), view)
    probs = g.op("Softmax", g.op("Where", "sel", g.const(LOWEST), viewed), axis=-1)
    out = g.op("MatMul", g.op("Reshape", probs, merge), "v")
    model = g.model({"q": ["n", "sq", D], "k": ["n", "sk", D], "v": ["n", "sk", D], "bias": ["n", "sb", "sk"],
                     "sel": (np.bool_, [1, 1, 1, 1])}, {out: ["n", "sb", D]}, 18)
    assert_unchanged(model, RULES)
