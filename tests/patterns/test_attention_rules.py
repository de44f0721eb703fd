"""Attention rules: every drawn BMM-Softmax-BMM variant fuses into one attention op and computes
what it computed; decoys stay as they are; every attention block of the real exports fuses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fusegraph.api import rewrite_with_report
from fusegraph.patterns import attention
from fusegraph.graph_builder import GraphBuilder
from fusegraph.verify.testing import assert_rewrites, manifest_feeds, op_counts
from fusegraph.verify import compare, run

from corpus import (MANIFEST, MODELS, assert_original_does_not_run,
                    atol, check_coverage, corpus_params, runs_in_ort)

RULES = attention.RULES
ATTENTION_OPS = ("Attention", "fusegraph.Attention", "fusegraph.MaskedAttention")
SCALE_FORMS = ("none", "s_mul", "s_div", "q_mul", "q_div", "k_pre", "k_post", "sqrt_both")
MASKS = ("none", "add", "keep", "masked_fill", "bias_and_mask", "causal_const", "causal_trilu")
K_FORMS = ("bhsd", "bshd", "batched")


class Graph(GraphBuilder):
    """The one graph builder, with this file's model: one output of the graph's type (and
    untyped extra outputs); `np_dtype` is that type as numpy names it."""

    def __init__(self, dtype):
        super().__init__(dtype)
        self.np_dtype = np.dtype(dtype)

    def model(self, out, out_shape, opset, extra_outputs=()):
        return super().model({}, {out: out_shape, **{o: None for o in extra_outputs}}, opset)


def repeat_kv(g, x, b, hkv, group, s, d):
    grown = g.op("Expand", g.op("Unsqueeze", x, g.const([2], np.int64)), g.const([b, hkv, group, s, d], np.int64))
    return g.op("Reshape", grown, g.const([b, hkv * group, s, d], np.int64))


def build(*, dtype, b, hkv, group, s, d, scale_form, scale, mask, softmax_fp32, nan_guard, k_form, opset,
          fill="lowest"):
    """softmax(Q K^T * scale + mask) V written the way the variant says; returns (model, causal)."""
    g = Graph(dtype)
    hq = hkv * group
    q = g.input("q", [b, hq, s, d])
    k = g.input("k", [b, s, hkv, d] if k_form == "bshd" else [b, hkv, s, d])
    v = g.input("v", [b, hkv, s, d])
    if k_form == "bshd" and group > 1:  # the head split, then the repeat, then K^T
        k, k_form = g.op("Transpose", k, perm=[0, 2, 1, 3]), "bhsd"
    if group > 1:
        k, v = repeat_kv(g, k, b, hkv, group, s, d), repeat_kv(g, v, b, hkv, group, s, d)

    def k_t(kk):
        if k_form == "bshd":  # K^T straight from [B, S, H, D]
            return g.op("Transpose", kk, perm=[0, 2, 3, 1])
        if k_form == "batched":  # dynamo's SDPA: flatten, transpose, reshape back
            flat = g.op("Reshape", kk, g.const([b * hq, s, d], np.int64))
            return g.op("Reshape", g.op("Transpose", flat, perm=[0, 2, 1]), g.const([b, hq, d, s], np.int64))
        return g.op("Transpose", kk, perm=[0, 1, 3, 2])

    if scale_form == "q_mul":
        q = g.op("Mul", q, g.const(scale))
    elif scale_form == "q_div":
        q = g.op("Div", q, g.const(1 / scale))
    elif scale_form == "sqrt_both":
        q = g.op("Mul", q, g.const(math.sqrt(scale)))
        k = g.op("Mul", k, g.const(math.sqrt(scale)))
    elif scale_form == "k_pre":
        k = g.op("Mul", k, g.const(scale))
    kt = k_t(k)
    if scale_form == "k_post":
        kt = g.op("Mul", kt, g.const(scale))
    scores = g.op("MatMul", q, kt)
    if scale_form == "s_mul":
        scores = g.op("Mul", scores, g.const(scale))
    elif scale_form == "s_div":
        scores = g.op("Div", scores, g.const(1 / scale))
    if softmax_fp32:
        scores = g.op("Cast", scores, to=onnx.TensorProto.FLOAT)
    fdt = np.float32 if softmax_fp32 else g.np_dtype
    fill = np.finfo(fdt).min if fill == "lowest" else -np.inf  # the fills that mask exactly
    tril = np.tril(np.ones((s, s), bool))
    if mask == "add":
        scores = g.op("Add", scores, g.input("mask", [b, 1, s, s], fdt))
    elif mask == "bias_and_mask":
        bias = g.const(np.random.default_rng(0).standard_normal((1, hq, s, s)), fdt)
        # T5: a mask of 0 / min after the bias (float16's min does not absorb the bias: -inf)
        hard = np.finfo(fdt).min if fdt == np.float32 else -np.inf
        padding = g.op("Where", g.input("keep", [b, 1, 1, s], np.bool_), g.const(0, fdt), g.const(hard, fdt))
        scores = g.op("Add", g.op("Add", scores, bias), padding)
    elif mask == "keep":
        scores = g.op("Where", g.input("keep", [b, 1, s, s], np.bool_), scores, g.const(fill, fdt))
    elif mask == "masked_fill":
        scores = g.op("Where", g.input("drop", [b, 1, s, s], np.bool_), g.const(fill, fdt), scores)
    elif mask == "causal_const":
        scores = g.op("Add", scores, g.const(np.where(tril, 0, fill)[None, None], fdt))
    elif mask == "causal_trilu":
        ones = g.op("ConstantOfShape", g.const([s, s], np.int64),
                    value=onnx.numpy_helper.from_array(np.array([1], np.int64)))
        keep = g.op("Cast", g.op("Trilu", ones, upper=0), to=onnx.TensorProto.BOOL)
        scores = g.op("Where", keep, scores, g.const(fill, fdt))
    probs = g.op("Softmax", scores, axis=-1)
    if softmax_fp32:
        probs = g.op("Cast", probs, to=g.dtype)
    if nan_guard:
        probs = g.op("Where", g.op("IsNaN", probs), g.const(0.0), probs)
    out = g.op("MatMul", probs, v)
    return g.model(out, [b, hq, s, d], opset), mask.startswith("causal")


def feeds_for(model, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for i in model.graph.input:
        shape = [dim.dim_value for dim in i.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        if dtype == np.bool_:
            a = rng.random(shape) < 0.7
            a[..., 0] = True  # every query keeps a key (a fully masked row differs by design)
            out[i.name] = a if i.name == "keep" else ~a
        elif i.name == "mask":
            out[i.name] = np.where(rng.random(shape) < 0.3, -1e4, 0).astype(dtype)
        else:
            out[i.name] = rng.standard_normal(shape).astype(dtype)
    return out


variants = st.fixed_dictionaries(dict(
    dtype=st.sampled_from([np.float32, np.float16]), b=st.integers(1, 2), hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]), s=st.integers(2, 6), d=st.sampled_from([4, 8]),
    scale_form=st.sampled_from(SCALE_FORMS), scale=st.sampled_from(["default", 0.3, 1.7]),
    mask=st.sampled_from(MASKS), softmax_fp32=st.booleans(), nan_guard=st.booleans(),
    k_form=st.sampled_from(K_FORMS), opset=st.sampled_from([14, 18, 23]), fill=st.sampled_from(["lowest", "-inf"])))


def _resolve(p):
    p = dict(p)
    if p["scale"] == "default" or p["scale_form"] == "none":
        p["scale"] = 1.0 if p["scale_form"] == "none" else 1 / math.sqrt(p["d"])
    if p["opset"] < 15:  # below CastLike's opset the fused body is float32 only
        p["dtype"] = np.float32
    return p


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=variants, seed=st.integers(0, 2**16))
def test_variant_fuses_and_matches(p, seed):
    p = _resolve(p)
    model, causal = build(**p)
    onnx.checker.check_model(model, full_check=True)
    tol = {} if p["dtype"] == np.float32 else {"atol": 2e-2, "rtol": 2e-2}
    out = assert_rewrites(model, RULES, feeds=feeds_for(model, seed), **tol)
    counts = op_counts(out)
    assert sum(counts[o] for o in ATTENTION_OPS) == 1, dict(counts)
    assert counts["Softmax"] == 0 and counts["MatMul"] == 0
    fused = next(n for n in out.graph.node if n.op_type.endswith("Attention"))
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in fused.attribute}
    onnx_target = (p["opset"] >= 23 and p["dtype"] == np.float32 and (p["mask"] == "none" or causal)
                   and not p["nan_guard"])
    assert fused.domain == ("" if onnx_target else "fusegraph")
    if not onnx_target:  # the guard's semantics travel on the op
        assert attrs["zero_nan_rows"] == int(p["nan_guard"]) and attrs["softcap"] == 0
    assert math.isclose(attrs["scale"], p["scale"], rel_tol=1e-3)
    assert attrs["is_causal"] == int(causal)
    has_mask = p["mask"] != "none" and not causal
    assert (len(fused.input) == 4) == has_mask
    if p["group"] > 1 and not onnx_target:  # the un-repeated KV goes in: grouped-query attention
        assert "Expand" not in counts and fused.input[2] == "v"
    if p["group"] > 1 and onnx_target:  # ONNX Runtime runs Attention with Q's heads in K and V only
        assert counts["Expand"] == 2 and fused.input[2] != "v"


def test_arbitrary_scale_is_the_ops_scale():
    """A scale other than 1/sqrt(D) is still an attention, with that scale."""
    model, _ = build(dtype=np.float32, b=1, hkv=2, group=1, s=4, d=8, scale_form="s_mul", scale=0.05,
                     mask="none", softmax_fp32=False, nan_guard=False, k_form="bhsd", opset=18)
    out = assert_rewrites(model, RULES, expect={"fusegraph.Attention": 1, "Softmax": 0})
    scale = next(a.f for n in out.graph.node for a in n.attribute if a.name == "scale")
    assert math.isclose(scale, 0.05, rel_tol=1e-6)


@pytest.mark.parametrize("scale", [-0.25, 0.0])
def test_regression_onnx_attention_needs_a_positive_scale(scale):
    """ONNX Runtime refuses opset 23's Attention with a scale <= 0 (found by the rule
    self-check): such an attention becomes fusegraph.Attention, which takes any scale."""
    model = _plain(scale=scale, mask="none", opset=23)
    out = assert_rewrites(model, RULES, expect={"fusegraph.Attention": 1, "Attention": 0, "Softmax": 0})
    assert next(a.f for n in out.graph.node for a in n.attribute if a.name == "scale") == scale
    positive = assert_rewrites(_plain(scale=0.25, mask="none", opset=23), RULES, expect={"Attention": 1})
    assert next(a.f for n in positive.graph.node for a in n.attribute if a.name == "scale") == 0.25


@pytest.mark.parametrize("opset", [18, 23])
def test_regression_attention_float64_precision(opset):
    """Both attention targets compute in float32, ~6e-8 off a float64 attention (found by the
    rule self-check): float64 attention stays as it is; the float32 one fuses."""
    assert_rewrites(_plain(opset=opset), RULES, expect={"Softmax": 0})
    model = _plain(dtype=np.float64, opset=opset)
    out, report = rewrite_with_report(model, RULES)
    assert not report.fusions and op_counts(out) == op_counts(rewrite_with_report(model, [])[0])


def _plain(**over):
    p = dict(dtype=np.float32, b=1, hkv=2, group=1, s=4, d=8, scale_form="s_mul", scale=0.25, mask="add",
             softmax_fp32=False, nan_guard=False, k_form="bhsd", opset=18)
    p.update(over)
    return build(**p)[0]


def _assert_not_fused(model):
    out, report = rewrite_with_report(model, RULES)
    assert not report.fusions
    assert op_counts(out)["Softmax"] == 1


def test_decoy_softmax_on_another_axis():
    model = _plain()
    next(n for n in model.graph.node if n.op_type == "Softmax").attribute[0].i = 2
    _assert_not_fused(model)


def test_decoy_per_head_scale():
    """A [1, H, 1, 1] factor is no single scale."""
    model = _plain()
    mul = next(n for n in model.graph.node if n.op_type == "Mul")
    init = next(t for t in model.graph.initializer if t.name == mul.input[1])
    init.CopyFrom(onnx.numpy_helper.from_array(np.array([0.1, 0.2], np.float32).reshape(1, 2, 1, 1), init.name))
    _assert_not_fused(model)


def test_decoy_scale_from_an_input():
    model = _plain()
    mul = next(n for n in model.graph.node if n.op_type == "Mul")
    mul.input[1] = "runtime_scale"
    model.graph.input.append(onnx.helper.make_tensor_value_info("runtime_scale", onnx.TensorProto.FLOAT, []))
    _assert_not_fused(model)


@pytest.mark.parametrize("op_type", ["Add", "Softmax", "Mul"])
def test_decoy_intermediate_with_a_second_consumer(op_type):
    """The masked scores, the probabilities or the scaled scores also leave the block."""
    model = _plain()
    inner = next(n for n in model.graph.node if n.op_type == op_type).output[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(inner, onnx.TensorProto.FLOAT, None))
    _assert_not_fused(model)


def test_decoy_mask_that_grows_the_scores():
    """A mask with more query rows than the queries broadcasts the scores up: no attention."""
    g = Graph(np.float32)
    q, k, v = g.input("q", [1, 2, 1, 8]), g.input("k", [1, 2, 4, 8]), g.input("v", [1, 2, 4, 8])
    scores = g.op("Add", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.input("mask", [1, 1, 4, 4]))
    out = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    _assert_not_fused(g.model(out, [1, 2, 4, 8], 18))


@pytest.mark.parametrize("mask_shape", [[1, 1, None, 4], [1, 1, "rows", 4], None],
                         ids=["unknown-dim", "symbolic-dim", "unknown-rank"])
def test_a_mask_not_proven_to_keep_the_one_query_is_refused(mask_shape):
    """One query (a decode step) against a mask whose query dim is not proven 1: fed 4 rows at
    run time it broadcasts the scores to 4 queries, which the fused op would not. The same
    graph with the mask's dim proven 1 fuses (the control)."""
    def decode(shape):
        g = Graph(np.float32)
        q, k, v = g.input("q", [1, 2, 1, 8]), g.input("k", [1, 2, 4, 8]), g.input("v", [1, 2, 4, 8])
        g.input("mask", shape)
        scores = g.op("Add", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), "mask")
        return g.model(g.op("MatMul", g.op("Softmax", scores, axis=-1), v), [1, 2, None, 8], 18)
    _assert_not_fused(decode(mask_shape))
    assert_rewrites(decode([1, 1, 1, 4]), RULES, expect={"fusegraph.MaskedAttention": 1})


def test_gqa_needs_proof_of_the_repeat():
    """An Expand that also broadcasts the batch is not a plain head repeat: the repeated KV goes
    in as is (an ordinary attention), never the un-repeated one."""
    g = Graph(np.float32)
    q, k, v = g.input("q", [2, 4, 3, 8]), g.input("k", [1, 2, 3, 8]), g.input("v", [2, 4, 3, 8])
    grown = g.op("Expand", g.op("Unsqueeze", k, g.const([2], np.int64)), g.const([2, 2, 2, 3, 8], np.int64))
    k4 = g.op("Reshape", grown, g.const([2, 4, 3, 8], np.int64))
    scores = g.op("MatMul", q, g.op("Transpose", k4, perm=[0, 1, 3, 2]))
    out = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    fused = assert_rewrites(g.model(out, [2, 4, 3, 8], 18), RULES, expect={"fusegraph.Attention": 1, "Expand": 1})
    assert next(n for n in fused.graph.node if n.op_type == "Attention").input[1] == k4


# -- the real exports ------------------------------------------------------------------------
@pytest.mark.parametrize("name", corpus_params())
def test_every_attention_block_of_a_real_export_fuses(name):
    model = onnx.load(MODELS / name)
    out, _ = rewrite_with_report(model)
    counts = op_counts(out)
    if check_coverage(name, "attention", counts):
        assert counts["Softmax"] == MANIFEST[name]["expected"].get("softmax_left", 0)
    onnx.checker.check_model(out, full_check=True)
    x = manifest_feeds(MANIFEST[name])
    if not runs_in_ort(name):
        return assert_original_does_not_run(name, run, model, x)
    diffs = compare(run(model, x), run(out, x), atol=atol(MANIFEST[name]))
    assert all(d.ok for d in diffs), diffs
