"""Gemm (+ Reshape) + activation -> the GEMM-epilogue op, as BERT's pooler (Gemm transB=1 ->
Tanh) and GPT-2's Conv1D (Reshape -> Gemm -> Reshape -> GELU) are exported; decoys stay."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from fusegraph.api import rewrite_with_report
from fusegraph.ops.fused_ops import matmul_epilogue_name
from fusegraph.patterns import all_rules, gemm_epilogue
from fusegraph.rule import RuleSet
from fusegraph.verify.testing import assert_rewrites, assert_unchanged, op_counts
from graph_builder import Builder
from test_activation_rules import gelu_tanh

RULES = RuleSet(gemm_epilogue.RULES)
SETTINGS = settings(max_examples=15, deadline=None)
DECOYS = settings(max_examples=8, deadline=None)
ACTS = ["Relu", "Tanh", "Sigmoid", "Silu", "GeluTanh"]


@st.composite
def forms(draw):
    return dict(dtype=draw(st.sampled_from([np.float32, np.float16])), opset=draw(st.sampled_from([17, 18, 23])),
                m=draw(st.sampled_from([1, 3])), k=draw(st.sampled_from([4, 8])), n=draw(st.sampled_from([4, 16])),
                trans_b=draw(st.sampled_from([0, 1])), bias=draw(st.sampled_from(["none", "vector", "identity"])),
                reshape=draw(st.booleans()), act=draw(st.sampled_from(ACTS)), seed=draw(st.integers(0, 2**16)),
                half=draw(st.sampled_from(["x", "sum", "last"])), swap=draw(st.booleans()), const_nodes=False)


def activation(b: Builder, f: dict, y: str) -> str:
    if f["act"] == "Silu":
        return b.op("Mul", y, b.op("Sigmoid", y))
    if f["act"] == "GeluTanh":
        return gelu_tanh(b, f, y, pow_cube=True)
    return b.op(f["act"], y)


def gemm(b: Builder, f: dict, **attrs):
    """Gemm of x [m*2, k] (or of x [m, 2, k] flattened), then optionally reshaped to [m, 2, n]."""
    rng = np.random.default_rng(f["seed"])
    w = rng.standard_normal((f["n"], f["k"]) if f["trans_b"] else (f["k"], f["n"])) / np.sqrt(f["k"])
    inputs = ["x", b.weight(w)]
    if f["bias"] != "none":
        c = b.weight(rng.standard_normal(attrs.pop("bias_shape", [f["n"]])))
        inputs.append(b.op("Identity", c) if f["bias"] == "identity" else c)
    if f["reshape"]:
        inputs[0] = b.op("Reshape", "x", b.const([-1, f["k"]], np.int64))
    y = b.op("Gemm", *inputs, transB=f["trans_b"], **attrs)
    if f["reshape"]:
        y = b.op("Reshape", y, b.const([f["m"], 2, f["n"]], np.int64))
    return y


def model(b: Builder, f: dict, out: str, extra=None):
    xs = [f["m"], 2, f["k"]] if f["reshape"] else [2 * f["m"], f["k"]]
    ys = [f["m"], 2, f["n"]] if f["reshape"] else [2 * f["m"], f["n"]]
    return b.model({"x": xs}, {out: ys, **(extra or {})}, f["opset"])


def target(f: dict) -> str:
    return f"fusegraph.MatMul{'' if f['bias'] == 'none' else 'Bias'}{f['act']}"


@SETTINGS
@given(f=forms())
def test_gemm_activation_fuses(f):
    b = Builder(f["dtype"])
    y = activation(b, f, gemm(b, f))
    out = assert_rewrites(model(b, f, y), RULES, expect={target(f): 1, "Gemm": 0,
                                                         "Transpose": f["trans_b"], "Reshape": 2 * f["reshape"]})
    if f["reshape"]:  # the Reshape moved after the fused op and still produces the output
        assert next(n for n in out.graph.node if y in n.output).op_type == "Reshape"


@SETTINGS
@given(f=forms())
def test_gemm_activation_fuses_with_all_rules(f):
    b = Builder(f["dtype"])
    assert_rewrites(model(b, f, activation(b, f, gemm(b, f))), all_rules(), expect={target(f): 1, "Gemm": 0})


@DECOYS
@given(f=forms(), attrs=st.sampled_from([{"alpha": 0.5}, {"transA": 1}, {"beta": 2.0}]))
def test_decoy_scaled_or_transposed_gemm(f, attrs):
    if "beta" in attrs:
        f = {**f, "bias": "vector"}
    if "transA" in attrs:
        f = {**f, "k": 2 * f["m"], "reshape": False}  # a square x, so its transpose fits too
    b = Builder(f["dtype"])
    m = model(b, f, activation(b, f, gemm(b, f, **attrs)))
    assert_unchanged(m, RULES)


@DECOYS
@given(f=forms())
def test_decoy_matrix_bias(f):
    """A [M, N] C is not a bias the epilogue can broadcast."""
    f = {**f, "bias": "vector", "reshape": False}
    b = Builder(f["dtype"])
    m = model(b, f, activation(b, f, gemm(b, f, bias_shape=[2 * f["m"], f["n"]])))
    assert_unchanged(m, RULES)


@DECOYS
@given(f=forms())
def test_decoy_gemm_output_read_elsewhere(f):
    b = Builder(f["dtype"])
    y = gemm(b, f)
    m = model(b, f, activation(b, f, y), extra={y: None})
    out, report = rewrite_with_report(m, RULES)
    assert not report.fusions and op_counts(out)["Gemm"] == 1


def test_three_rules_name_every_fused_op_from_the_activation_tag():
    """One rule per shape of chain; the activation's tag and the optional bias pick the op."""
    assert sorted(r.name for r in gemm_epilogue.RULES) == [
        "gemm_epilogue.gemm_act", "gemm_epilogue.matmul_act", "gemm_epilogue.matmul_bias"]
    for act in gemm_epilogue.ACTIVATION_PATTERNS:
        for bias in (False, True):
            b = Builder(np.float32)
            y = b.op("MatMul", "x", b.weight(np.eye(4) / 2))
            if bias:
                y = b.op("Add", y, b.weight(np.full(4, 0.25)))
            if act == "Silu":
                y = b.op("Mul", y, b.op("Sigmoid", y))
            elif act.startswith("Gelu"):
                y = b.op("Gelu", y, approximate="tanh" if act == "GeluTanh" else "none")
            else:
                y = b.op(act, y)
            name = matmul_epilogue_name(bias, act)
            out, report = rewrite_with_report(b.model({"x": [3, 4]}, {y: [3, 4]}, 20), RULES)
            assert dict(report.per_rule) == {"gemm_epilogue.matmul_act": 1}, (act, bias)
            assert op_counts(out) == {f"fusegraph.{name}": 1}, (act, bias)
