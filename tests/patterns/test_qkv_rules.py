"""The Q/K/V projection trio: three MatMuls (+ bias) of one input fuse into one MatMul on the
concatenated weights and a Split that keeps the three output names; decoys stay as they are."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings, strategies as st
from onnx import numpy_helper

from fusegraph.api import rewrite_with_report
from fusegraph.patterns import all_rules, qkv
from fusegraph.rule import RuleSet
from fusegraph.verify.testing import assert_rewrites, assert_unchanged, op_counts
from fusegraph.verify import compare, make_inputs, run
from graph_builder import Builder

RULES = RuleSet(qkv.RULES)
SETTINGS = settings(max_examples=15, deadline=None)
DECOYS = settings(max_examples=8, deadline=None)


@st.composite
def forms(draw):
    return dict(dtype=draw(st.sampled_from([np.float32, np.float16])), opset=draw(st.sampled_from([17, 18, 23])),
                lead=draw(st.sampled_from([[2], [2, 3], [1, 2, 3]])), k=draw(st.sampled_from([4, 8, 16])),
                ns=draw(st.lists(st.sampled_from([4, 8, 12]), min_size=3, max_size=3)),
                bias=draw(st.booleans()), swap=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def projections(b: Builder, f: dict, x: str = "x", weights=None, bias=None):
    """Three X @ W_i (+ b_i); returns the three output names."""
    rng = np.random.default_rng(f["seed"])
    outs = []
    for i, n in enumerate(f["ns"]):
        w = weights[i] if weights else b.weight(rng.standard_normal((f["k"], n)) / np.sqrt(f["k"]))
        y = b.op("MatMul", x, w)
        if (f["bias"] if bias is None else bias[i]):
            c = b.weight(rng.standard_normal(n))
            y = b.op("Add", c, y) if f["swap"] else b.op("Add", y, c)
        outs.append(y)
    return outs


def build(b: Builder, f: dict, outs, extra_inputs=None):
    shape = lambda n: f["lead"] + [n]  # noqa: E731
    return b.model({"x": shape(f["k"]), **(extra_inputs or {})},
                   {o: shape(n) for o, n in zip(outs, f["ns"])}, f["opset"])


@SETTINGS
@given(f=forms())
def test_trio_fuses_and_keeps_names(f):
    b = Builder(f["dtype"])
    outs = projections(b, f)
    m = build(b, f, outs)
    out = assert_rewrites(m, RULES, expect={"MatMul": 1, "Split": 1, "Add": 1 if f["bias"] else 0})
    (split,) = [n for n in out.graph.node if n.op_type == "Split"]
    assert sorted(split.output) == sorted(outs)
    # the weights were in memory: folded into one initializer, no Concat node
    (mm,) = [n for n in out.graph.node if n.op_type == "MatMul"]
    w = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}[mm.input[1]]
    assert w.shape == (f["k"], sum(f["ns"])) and op_counts(out)["Concat"] == 0


@SETTINGS
@given(f=forms())
def test_trio_then_gemm_epilogue_with_all_rules(f):
    """With the whole library the fused projection's bias Add goes into the GEMM epilogue."""
    b = Builder(f["dtype"])
    m = build(b, f, projections(b, f))
    target = "fusegraph.MatMulBias" if f["bias"] else "MatMul"
    assert_rewrites(m, all_rules(), expect={target: 1, "Split": 1, "Add": 0})


@DECOYS
@given(f=forms())
def test_trio_whose_output_is_also_read_elsewhere(f):
    """Q is a graph output and feeds another node too: it is an output of the match, so fine."""
    b = Builder(f["dtype"])
    outs = projections(b, f)
    r = b.op("Relu", outs[0])
    m = b.model({"x": f["lead"] + [f["k"]]}, {**{o: f["lead"] + [n] for o, n in zip(outs, f["ns"])},
                                              r: f["lead"] + [f["ns"][0]]}, f["opset"])
    assert_rewrites(m, RULES, expect={"MatMul": 1, "Split": 1, "Relu": 1})


@DECOYS
@given(f=forms())
def test_decoy_different_inputs(f):
    b = Builder(f["dtype"])
    outs = projections(b, {**f, "ns": f["ns"][:2]}) + projections(b, {**f, "ns": f["ns"][2:]}, x="x2")
    assert_unchanged(build(b, f, outs, {"x2": f["lead"] + [f["k"]]}), RULES)


@DECOYS
@given(f=forms())
def test_decoy_non_constant_weight(f):
    b = Builder(f["dtype"])
    rng = np.random.default_rng(f["seed"])
    ws = [b.weight(rng.standard_normal((f["k"], n))) for n in f["ns"][:2]] + ["wv"]
    outs = projections(b, f, weights=ws)
    assert_unchanged(build(b, f, outs, {"wv": [f["k"], f["ns"][2]]}), RULES)


@DECOYS
@given(f=forms())
def test_decoy_batched_weight(f):
    """A 3-D weight is a batched MatMul, not a projection."""
    b = Builder(f["dtype"])
    rng = np.random.default_rng(f["seed"])
    lead = f["lead"][-1:]
    ws = [b.weight(rng.standard_normal((lead[0], f["k"], n))) for n in f["ns"]]
    assert_unchanged(build(b, {**f, "lead": [lead[0], 5]}, projections(b, f, weights=ws)), RULES)


@DECOYS
@given(f=forms())
def test_bias_on_only_some_leaves_the_adds(f):
    """A partial bias can't be one Add: the bare MatMuls fuse, the bias Adds stay after the Split."""
    b = Builder(f["dtype"])
    outs = projections(b, f, bias=[True, False, True])
    assert_rewrites(build(b, f, outs), RULES, expect={"Add": 2, "Split": 1, "MatMul": 1})


@DECOYS
@given(f=forms())
def test_decoy_fourth_projection(f):
    """X feeds four MatMuls (a cross-attention's K, V of two layers): no single trio to pick."""
    b = Builder(f["dtype"])
    outs = projections(b, {**f, "ns": f["ns"] + [4]})
    assert_unchanged(b.model({"x": f["lead"] + [f["k"]]},
                             {o: f["lead"] + [n] for o, n in zip(outs, f["ns"] + [4])}, f["opset"]), RULES)


@DECOYS
@given(f=forms())
def test_regression_fourth_projection_fused_into_epilogue(f):
    """Four bare projections, one followed by a Sigmoid: the GEMM epilogue fuses that one in the
    first pass; in the second the other three must not pass for a trio (found by the fuzzer)."""
    b = Builder(f["dtype"])
    outs = projections(b, {**f, "ns": f["ns"] + [4], "bias": False})
    outs[3] = b.op("Sigmoid", outs[3])
    m = b.model({"x": f["lead"] + [f["k"]]},
                {o: f["lead"] + [n] for o, n in zip(outs, f["ns"] + [4])}, f["opset"])
    assert_rewrites(m, all_rules(), expect={"MatMul": 3, "fusegraph.MatMulSigmoid": 1, "Split": 0})


def test_weights_on_disk_are_concatenated_in_the_graph(tmp_path):
    """Weights left in external data are never read: a Concat node joins them (folded by the builder)."""
    f = dict(dtype=np.float32, opset=18, lead=[2, 3], k=8, ns=[8, 8, 4], bias=True, swap=False, seed=1)
    b = Builder(f["dtype"])
    m = build(b, f, projections(b, f))
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(m)
    onnx.save(on_disk, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    lazy = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    out, report = rewrite_with_report(lazy, RULES)
    assert report.per_rule["qkv.projections_bias"] == 1 and op_counts(out)["Concat"] == 2
    onnx.save(out, tmp_path / "out.onnx")
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
    full = onnx.load(tmp_path / "out.onnx")
    feeds = make_inputs(m)
    assert all(d.ok for d in compare(run(m, feeds), run(full, feeds)))
