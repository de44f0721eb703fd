"""Norm rules on drawn decomposed LayerNorm / RMSNorm graphs, residual + norm, and decoys."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fusegraph.patterns import norms
from fusegraph.rule import RuleSet
from fusegraph.verify.testing import assert_rewrites, assert_unchanged, op_counts, rewrite_with_report
from graph_builder import Builder

RULES = RuleSet(norms.RULES)
SETTINGS = settings(max_examples=15, deadline=None)
DECOYS = settings(max_examples=8, deadline=None)


@st.composite
def norm_forms(draw, opsets=(17, 18, 20, 23)):
    rank = draw(st.integers(2, 4))
    shape = [draw(st.integers(1, 3)) for _ in range(rank - 1)] + [draw(st.sampled_from([8, 16, 32]))]
    last = rank - 1 if draw(st.booleans()) else -1
    return dict(
        dtype=draw(st.sampled_from([np.float32, np.float16])),
        opset=draw(st.sampled_from(opsets)),
        shape=shape,
        cast=draw(st.booleans()),
        square=draw(st.sampled_from(["pow", "mul"])),
        divide=draw(st.sampled_from(["div", "reciprocal", "one_over", "pow"])),
        eps=draw(st.sampled_from([1e-5, 1e-6, 1e-12])),
        mean_axis=last, var_axis=last, exponent=2.0,
        gamma_first=draw(st.booleans()),
        const_nodes=draw(st.booleans()),
    )


class Norm:
    """Builds one drawn norm; remembers its intermediate `var` for the escaping-value decoy."""

    def __init__(self, f: dict, rng: np.random.Generator, b: Builder | None = None):
        self.f = f
        self.rng = rng
        self.b = b or Builder(f["dtype"], const_nodes=f["const_nodes"])
        self.var = None

    def statistics_input(self, x: str):
        """x, or x cast to float32 for the statistics (HF's `.to(torch.float32)`)."""
        return (self.b.cast(x, np.float32), np.float32) if self.f["cast"] else (x, self.f["dtype"])

    def normalize(self, d: str, sd) -> str:
        """d / sqrt(mean(square(d)) + eps) in the drawn spelling."""
        b, f = self.b, self.f
        sq = b.op("Pow", d, b.const(f["exponent"], sd)) if f["square"] == "pow" else b.op("Mul", d, d)
        self.var = b.reduce_mean(sq, [f["var_axis"]], f["opset"])
        shifted = b.op("Add", self.var, b.const(f["eps"], sd))
        if f["divide"] == "pow":  # x * (var + eps)^-0.5
            return b.op("Mul", d, b.op("Pow", shifted, b.const(-0.5, sd)))
        root = b.op("Sqrt", shifted)
        if f["divide"] == "div":
            return b.op("Div", d, root)
        if f["divide"] == "reciprocal":
            return b.op("Mul", d, b.op("Reciprocal", root))
        return b.op("Mul", d, b.op("Div", b.const(1.0, sd), root))

    def scale(self, n: str) -> str:
        b, f = self.b, self.f
        if f["cast"]:
            n = b.cast(n, f["dtype"])
        gamma = b.weight(self.rng.uniform(0.5, 1.5, f["shape"][-1]))
        return b.op("Mul", gamma, n) if f["gamma_first"] else b.op("Mul", n, gamma)

    def layer_norm(self, x: str = "x") -> str:
        xs, sd = self.statistics_input(x)
        d = self.b.op("Sub", xs, self.b.reduce_mean(xs, [self.f["mean_axis"]], self.f["opset"]))
        return self.b.op("Add", self.scale(self.normalize(d, sd)), self.b.weight(self.rng.standard_normal(self.f["shape"][-1])))

    def rms_norm(self, x: str = "x") -> str:
        xs, sd = self.statistics_input(x)
        return self.scale(self.normalize(xs, sd))

    def build(self, kind: str, x: str = "x") -> str:
        return self.layer_norm(x) if kind == "layer" else self.rms_norm(x)

    def model(self, y: str, extra_outputs=()):
        shape = self.f["shape"]
        outs = {y: shape, **{o: None for o in extra_outputs}}
        return self.b.model({"x": shape}, outs, self.f["opset"])


#: Every opset the norm ops are emitted into: below 17 LayerNorm has no standard op, and below
#: 15 the fused ops' bodies are specialised to the element type (no CastLike).
ALL_OPSETS = (12, 13, 14, 16, 17, 18, 20, 23)


def rms_target(opset: int) -> str:
    return "RMSNormalization" if opset >= 23 else "fusegraph.RMSNorm"


def layer_target(opset: int) -> str:
    return "LayerNormalization" if opset >= 17 else "fusegraph.LayerNorm"


@SETTINGS
@given(f=norm_forms(opsets=ALL_OPSETS), seed=st.integers(0, 2**16))
def test_layer_norm_forms_fuse(f, seed):
    norm = Norm(f, np.random.default_rng(seed))
    target = layer_target(f["opset"])
    out = assert_rewrites(norm.model(norm.layer_norm()), RULES, expect={target: 1, "ReduceMean": 0, "Sqrt": 0})
    (ln,) = [n for n in out.graph.node if n.op_type == target.split(".")[-1]]
    eps = next(a.f for a in ln.attribute if a.name == "epsilon")
    exact_eps = float(np.asarray(f["eps"], np.float32 if f["cast"] else f["dtype"]))
    assert eps == pytest.approx(exact_eps, rel=1e-6)


@SETTINGS
@given(f=norm_forms(opsets=ALL_OPSETS), seed=st.integers(0, 2**16))
def test_rms_norm_forms_fuse(f, seed):
    norm = Norm(f, np.random.default_rng(seed))
    assert_rewrites(norm.model(norm.rms_norm()), RULES,
                    expect={rms_target(f["opset"]): 1, "ReduceMean": 0, "Sqrt": 0})


@settings(max_examples=16, deadline=None)
@given(f=norm_forms(opsets=ALL_OPSETS), seed=st.integers(0, 2**16), kind=st.sampled_from(["layer", "rms"]),
       exported_ln=st.booleans(), cast_sum=st.booleans())
def test_residual_add_and_norm_fuse_with_the_sum_reused(f, seed, kind, exported_ln, cast_sum):
    """x + r feeds the norm and the next residual Add: both outputs of the Skip op are used.
    `cast_sum`: the norm and the next Add read a Cast of the sum to its own type (TorchScript).
    Below opset 17 the norm is fused as `fusegraph.LayerNorm` first (issue 11, item 9)."""
    exported_ln = exported_ln and f["opset"] >= 17
    norm = Norm(f, np.random.default_rng(seed))
    b = norm.b
    s = b.op("Add", "x", "r")
    if cast_sum:
        s = b.cast(s, f["dtype"])
    if kind == "layer" and exported_ln:
        h = f["shape"][-1]
        y = b.op("LayerNormalization", s, b.weight(norm.rng.uniform(0.5, 1.5, h)),
                 b.weight(norm.rng.standard_normal(h)), axis=-1, epsilon=f["eps"])
    else:
        y = norm.build(kind, s)
    nxt = b.op("Add", s, b.op("Tanh", y))
    model = b.model({"x": f["shape"], "r": f["shape"]}, {nxt: f["shape"]}, f["opset"])
    skip = "fusegraph.SkipLayerNorm" if kind == "layer" else "fusegraph.SkipRMSNorm"
    assert_rewrites(model, RULES, expect={skip: 1, "Add": 1, "LayerNormalization": 0, "fusegraph.LayerNorm": 0,
                                          "RMSNormalization": 0, "fusegraph.RMSNorm": 0})


def assert_not_fused(model, rules=RULES):
    assert_unchanged(model, rules)


@DECOYS
@given(f=norm_forms(), seed=st.integers(0, 2**16), kind=st.sampled_from(["layer", "rms"]),
       which=st.sampled_from(["mean_axis", "var_axis"]))
def test_decoy_mean_over_another_axis(f, seed, kind, which):
    f = {**f, "shape": [3] + f["shape"][-1:], "var_axis": -1, "mean_axis": -1}
    f["var_axis" if kind == "rms" else which] = 0
    norm = Norm(f, np.random.default_rng(seed))
    model = norm.model(norm.build(kind))
    if which == "mean_axis" and kind == "layer":
        # x - mean(x, axis 0) is just some tensor; its RMS-normalized tail may fuse, correctly.
        assert_rewrites(model, RULES, expect={"LayerNormalization": 0, "Sub": 1})
    else:
        assert_not_fused(model)


@DECOYS
@given(f=norm_forms(), seed=st.integers(0, 2**16), kind=st.sampled_from(["layer", "rms"]))
def test_decoy_intermediate_with_a_second_consumer(f, seed, kind):
    norm = Norm(f, np.random.default_rng(seed))
    y = norm.build(kind)
    assert_not_fused(norm.model(y, extra_outputs=[norm.var]))


@DECOYS
@given(f=norm_forms(), seed=st.integers(0, 2**16), kind=st.sampled_from(["layer", "rms"]))
def test_decoy_wrong_exponent(f, seed, kind):
    norm = Norm({**f, "square": "pow", "exponent": 3.0}, np.random.default_rng(seed))
    assert_not_fused(norm.model(norm.build(kind)))


@pytest.mark.parametrize("opset", [7, 11])
def test_layer_norm_refused_below_the_oldest_body(opset):
    """fusegraph.LayerNorm's body is written for opset 12 and newer: older models keep the chain."""
    f = {"dtype": np.float32, "opset": opset, "shape": [2, 8], "cast": False, "square": "mul", "divide": "div",
         "eps": 1e-5, "mean_axis": -1, "var_axis": -1, "exponent": 2.0, "gamma_first": False, "const_nodes": False}
    norm = Norm(f, np.random.default_rng(0))
    out, report = rewrite_with_report(norm.model(norm.layer_norm()), RuleSet([r for r in RULES if r.name == "norms.layer_norm"]),
                                      explain="norms.layer_norm")
    assert not report.fusions
    assert any("fusegraph.LayerNorm's body needs opset 12" in m.reason for m in report.near_misses)


@DECOYS
@given(f=norm_forms(), seed=st.integers(0, 2**16), kind=st.sampled_from(["layer", "rms"]),
       decoy=st.sampled_from(["bias", "broadcast"]))
def test_decoy_add_that_is_not_a_residual(f, seed, kind, decoy):
    """A constant summand is a bias; a broadcast summand is not a second [rows, cols] stream."""
    norm = Norm(f, np.random.default_rng(seed))
    h = f["shape"][-1]
    r = norm.b.weight(np.ones(h)) if decoy == "bias" else "r"
    y = norm.build(kind, norm.b.op("Add", "x", r))
    inputs = {"x": f["shape"]} if decoy == "bias" else {"x": f["shape"], "r": [h]}
    model = norm.b.model(inputs, {y: f["shape"]}, f["opset"])
    out, report = rewrite_with_report(model, RULES)
    assert report.per_rule.keys() == {"norms.layer_norm" if kind == "layer" else "norms.rms_norm"}
    assert op_counts(out)["Add"] == 1


@pytest.mark.parametrize("kind", ["layer", "rms", "skip_rms"])
def test_regression_rms_norm_float64_precision(kind):
    """The fused norms compute the statistics in float32 (stash_type 1, fusegraph.RMSNorm's
    body), off by ~3e-8 from a float64 decomposition (found by the rule self-check): float64
    norms stay as they are, the same norm in float32 still fuses."""
    def model(dtype):
        f = dict(dtype=dtype, opset=23, shape=[2, 8], cast=False, square="mul", divide="div", eps=1e-6,
                 mean_axis=-1, var_axis=-1, exponent=2.0, gamma_first=False, const_nodes=False)
        norm = Norm(f, np.random.default_rng(0))
        if kind != "skip_rms":
            return norm.model(norm.build(kind))
        s = norm.b.op("Add", "x", "r")
        y = norm.b.op("RMSNormalization", s, norm.b.weight(np.ones(8)), axis=-1, epsilon=1e-6)
        return norm.b.model({"x": f["shape"], "r": f["shape"]}, {y: f["shape"], s: f["shape"]}, 23)

    fused = {"layer": "LayerNormalization", "rms": "RMSNormalization", "skip_rms": "fusegraph.SkipRMSNorm"}[kind]
    assert_rewrites(model(np.float32), RULES, expect={fused: 1})
    out, report = rewrite_with_report(model(np.float64), RULES, explain=f"norms.{kind}_norm")
    assert not report.fusions, report.per_rule
    assert op_counts(out) == op_counts(rewrite_with_report(model(np.float64), [])[0])
    assert any("float64" in m.reason for m in report.near_misses), report.near_misses
