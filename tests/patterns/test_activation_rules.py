"""Activation rules on drawn GELU / SiLU / QuickGELU / gated-MLP graphs, and decoys."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings, strategies as st

from fusegraph.patterns import activations, all_rules
from fusegraph.rule import RuleSet
from fusegraph.verify.testing import assert_rewrites, assert_unchanged, op_counts, rewrite_with_report
from graph_builder import Builder

RULES = RuleSet(activations.RULES)
SETTINGS = settings(max_examples=15, deadline=None)
DECOYS = settings(max_examples=8, deadline=None)


@st.composite
def forms(draw):
    return dict(dtype=draw(st.sampled_from([np.float32, np.float16])), opset=draw(st.sampled_from([17, 18, 20, 23])),
                shape=[draw(st.integers(1, 3)), draw(st.sampled_from([4, 8, 16]))],
                half=draw(st.sampled_from(["x", "sum", "last"])), swap=draw(st.booleans()),
                const_nodes=draw(st.booleans()))


def mul(b: Builder, a: str, c: str, swap: bool) -> str:
    return b.op("Mul", c, a) if swap else b.op("Mul", a, c)


def half_x_times(b: Builder, f: dict, x: str, one_plus: str, half: float = 0.5) -> str:
    h = b.const(half)
    if f["half"] == "x":
        return mul(b, mul(b, x, h, f["swap"]), one_plus, f["swap"])
    if f["half"] == "sum":
        return mul(b, x, mul(b, one_plus, h, f["swap"]), f["swap"])
    return mul(b, mul(b, x, one_plus, f["swap"]), h, f["swap"])


def gelu_erf(b: Builder, f: dict, x: str, div: bool, half: float = 0.5):
    scaled = b.op("Div", x, b.const(math.sqrt(2))) if div else mul(b, x, b.const(1 / math.sqrt(2)), f["swap"])
    erf = b.op("Erf", scaled)
    return half_x_times(b, f, x, b.op("Add", erf, b.const(1.0)), half), erf


def gelu_tanh(b: Builder, f: dict, x: str, pow_cube: bool, factored: bool = False):
    """Expanded, tanh(c (x + a x^3)), or factored, tanh((x c)(1 + (x a) x)) (issue 11 item 10)."""
    if factored:
        poly = b.op("Add", b.const(1.0), mul(b, mul(b, x, b.const(0.044715), f["swap"]), x, f["swap"]))
        t = b.op("Tanh", mul(b, mul(b, x, b.const(math.sqrt(2 / math.pi)), f["swap"]), poly, f["swap"]))
        return half_x_times(b, f, x, b.op("Add", t, b.const(1.0)))
    cube = b.op("Pow", x, b.const(3.0)) if pow_cube else b.op("Mul", b.op("Mul", x, x), x)
    inner = b.op("Add", x, mul(b, cube, b.const(0.044715), f["swap"]))
    t = b.op("Tanh", mul(b, inner, b.const(math.sqrt(2 / math.pi)), f["swap"]))
    return half_x_times(b, f, x, b.op("Add", t, b.const(1.0)))


def model(b: Builder, f: dict, y: str, extra=()):
    return b.model({"x": f["shape"]}, {y: f["shape"], **{e: None for e in extra}}, f["opset"])


@SETTINGS
@given(f=forms(), div=st.booleans())
def test_gelu_erf_forms_fuse(f, div):
    b = Builder(f["dtype"], const_nodes=f["const_nodes"])
    y, _ = gelu_erf(b, f, "x", div)
    target = "Gelu" if f["opset"] >= 20 else "fusegraph.Gelu"
    out = assert_rewrites(model(b, f, y), RULES, expect={target: 1, "Erf": 0, "Mul": 0})
    if f["opset"] >= 20:
        (g,) = out.graph.node
        assert all(a.s in (b"none",) for a in g.attribute if a.name == "approximate")


@SETTINGS
@given(f=forms(), pow_cube=st.booleans(), factored=st.booleans())
def test_gelu_tanh_forms_fuse(f, pow_cube, factored):
    b = Builder(f["dtype"], const_nodes=f["const_nodes"])
    y = gelu_tanh(b, f, "x", pow_cube, factored)
    target = "Gelu" if f["opset"] >= 20 else "fusegraph.GeluTanh"
    out = assert_rewrites(model(b, f, y), RULES, expect={target: 1, "Tanh": 0, "Mul": 0})
    if f["opset"] >= 20:
        (g,) = out.graph.node
        assert [a.s for a in g.attribute if a.name == "approximate"] == [b"tanh"]


@SETTINGS
@given(f=forms(), quick=st.booleans())
def test_silu_and_quick_gelu_fuse(f, quick):
    b = Builder(f["dtype"], const_nodes=f["const_nodes"])
    gate = mul(b, "x", b.const(1.702), f["swap"]) if quick else "x"
    y = mul(b, "x", b.op("Sigmoid", gate), f["swap"])
    assert_rewrites(model(b, f, y), RULES,
                    expect={"fusegraph.QuickGelu" if quick else "fusegraph.Silu": 1, "Sigmoid": 0})


@DECOYS
@given(f=forms(), div=st.booleans())
def test_decoy_wrong_gelu_constant(f, div):
    b = Builder(f["dtype"], const_nodes=f["const_nodes"])
    y, _ = gelu_erf(b, f, "x", div, half=0.6)
    m = model(b, f, y)
    assert_unchanged(m, RULES)


@DECOYS
@given(f=forms(), div=st.booleans())
def test_decoy_intermediate_with_a_second_consumer(f, div):
    b = Builder(f["dtype"], const_nodes=f["const_nodes"])
    y, erf = gelu_erf(b, f, "x", div)
    m = model(b, f, y, extra=[erf])
    out, report = rewrite_with_report(m, RULES)
    assert not report.fusions and op_counts(out)["Erf"] == 1


@DECOYS
@given(f=forms())
def test_decoy_other_sigmoid_scale(f):
    b = Builder(f["dtype"], const_nodes=f["const_nodes"])
    y = b.op("Mul", "x", b.op("Sigmoid", b.op("Mul", "x", b.const(1.5))))
    out, report = rewrite_with_report(model(b, f, y), RULES)
    assert not report.fusions and op_counts(out)["Sigmoid"] == 1


def _mlp_input(b: Builder, rng, k: int, n: int):
    return b.weight(rng.standard_normal((k, n)) / math.sqrt(k))


@SETTINGS
@given(f=forms(), seed=st.integers(0, 2**16), bias=st.booleans(), pow_cube=st.booleans())
def test_activation_after_matmul_is_a_gemm_epilogue(f, seed, bias, pow_cube):
    """The GEMM epilogue outranks the standalone GELU rule: MatMul (+ bias) + GELU is one op."""
    rng = np.random.default_rng(seed)
    b = Builder(f["dtype"], const_nodes=f["const_nodes"])
    h = b.op("MatMul", "x", _mlp_input(b, rng, f["shape"][-1], 8))
    if bias:
        h = b.op("Add", h, b.weight(rng.standard_normal(8)))
    y = gelu_tanh(b, f, h, pow_cube)
    m = b.model({"x": f["shape"]}, {y: [f["shape"][0], 8]}, f["opset"])
    assert_rewrites(m, all_rules(), expect={f"fusegraph.MatMul{'Bias' if bias else ''}GeluTanh": 1, "Gelu": 0})


@SETTINGS
@given(f=forms(), seed=st.integers(0, 2**16), kind=st.sampled_from(["SwiGLU", "GeGLU", "GeGLUTanh"]))
def test_gated_mlp_fuses(f, seed, kind):
    rng = np.random.default_rng(seed)
    b = Builder(f["dtype"], const_nodes=f["const_nodes"])
    k = f["shape"][-1]
    gate = b.op("MatMul", "x", _mlp_input(b, rng, k, 8))
    up = b.op("MatMul", "x", _mlp_input(b, rng, k, 8))
    if kind == "SwiGLU":
        act = b.op("Mul", gate, b.op("Sigmoid", gate))
    elif kind == "GeGLU":
        act = gelu_erf(b, f, gate, True)[0]
    else:
        act = gelu_tanh(b, f, gate, True)
    y = mul(b, act, up, f["swap"])
    m = b.model({"x": f["shape"]}, {y: [f["shape"][0], 8]}, f["opset"])
    assert_rewrites(m, all_rules(), expect={f"fusegraph.{kind}": 1, "MatMul": 0})
