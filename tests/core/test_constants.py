"""What counts as a constant, and when a pattern may absorb one.

- `Const(v)` matches v exactly as the constant's dtype stores it (1 ulp), not within 0.1%:
  a replacement writes v, so a looser match changes the result.
- An absorbed constant must be shape-neutral: broadcasting it must not grow the output.
- An initializer that is also a graph input is an overridable default, not a constant.
- Valid but unusual forms load: omitted optional outputs (''), weights in sparse_initializer.
"""

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from fusegraph import Const, Rule, rewrite, rewrite_with_report
from fusegraph.api import default_rules
from fusegraph.ir import Graph
from fusegraph.verify.testing import assert_rewrites, assert_unchanged, make_model, node, op_counts
from fusegraph.verify import compare, make_inputs, run

F = np.float32
GELU = default_rules().select(["activations.gelu_erf"])
EPILOGUES = default_rules().select(["gemm_epilogue.*"])


def gelu_model(half=0.5, x_shape=(2, 3), dtype=F):
    """0.5 * x * (1 + erf(x / sqrt 2)) with the 0.5 given (value, shape, dtype)."""
    nodes = [node("Div", ["x", "sqrt2"], ["d"]), node("Erf", ["d"], ["e"]), node("Add", ["e", "one"], ["p"]),
             node("Mul", ["x", "half"], ["h"]), node("Mul", ["h", "p"], ["y"])]
    half = np.asarray(half, dtype)
    out_shape = list(np.broadcast_shapes(x_shape, half.shape))
    return make_model(nodes, {"x": (dtype, list(x_shape))}, {"y": (dtype, out_shape)},
                      {"sqrt2": np.asarray(np.sqrt(2.0), dtype), "one": np.asarray(1.0, dtype), "half": half})


# -- exact constants ------------------------------------------------------------------------
@pytest.mark.parametrize("value,dtype,matches", [
    (0.5, F, True), (0.5004, F, False), (0.4996, F, False),
    (np.nextafter(F(0.5), F(1)), F, False),  # not even one ulp: Pow(x, 2 + ulp) is NaN on x < 0
    (np.nextafter(F(0.5), F(0)), F, False),
    (0.5, np.float16, True), (0.5005, np.float16, False), (0.501, np.float16, False),  # fp16 ulp at 0.5: 4.9e-4
    (0.5, ml_dtypes.bfloat16, True), (0.51, ml_dtypes.bfloat16, False),
    ([0.5, 0.5, 0.5], F, True), ([0.5, 0.5, 0.5004], F, False),
])
def test_const_matches_within_the_dtype_rounding_only(value, dtype, matches):
    assert Const(0.5).accepts(np.asarray(value, dtype)) is matches


@pytest.mark.parametrize("dtype", [F, np.float16, ml_dtypes.bfloat16])
def test_an_irrational_constant_matches_as_its_dtype_rounds_it(dtype):
    """sqrt(2) stored from float64, or from float32 (an exporter casting its float32 constant
    down), matches; the next value up does not."""
    root2 = Const(np.sqrt(2.0))
    assert root2.accepts(np.asarray(np.sqrt(2.0), dtype))
    assert root2.accepts(np.asarray(np.float32(np.sqrt(2.0)), dtype))
    assert not root2.accepts(np.nextafter(np.asarray(np.sqrt(2.0), dtype).astype(F), F(2)).astype(dtype)
                             if dtype is F else np.asarray(1.42, dtype))


def test_square_is_not_pow_2_001():
    """Pow(x, 2.001) is NaN for negative x; a square is not: no match, nothing replaced."""
    rule = Rule("square", lambda op, x: op.Pow(x, Const(2.0)), lambda op, x: op.Mul(x, x))
    def model(exponent):
        return make_model([node("Pow", ["x", "e"], ["y"])], {"x": (F, [4])}, {"y": (F, [4])},
                          {"e": np.asarray(exponent, F)})
    assert_unchanged(model(2.001), [rule])
    assert_rewrites(model(2.0), [rule], expect={"Mul": 1, "Pow": 0})


def test_gelu_with_a_wrong_half_is_not_gelu():
    assert_unchanged(gelu_model(0.5004), GELU)
    assert_rewrites(gelu_model(0.5), GELU, expect={"fusegraph.Gelu": 1})


def test_rtol_is_an_explicit_opt_in():
    loose = Const(2.0, rtol=1e-3)
    assert loose.accepts(np.asarray(2.001, F)) and not loose.accepts(np.asarray(2.01, F))
    assert not Const(2.0).accepts(np.asarray(2.001, F))


def test_integer_constants_match_exactly():
    assert Const(-1).accepts(np.asarray([-1], np.int64))
    assert not Const(-1).accepts(np.asarray([-2], np.int64))


# -- shape-neutral constants ----------------------------------------------------------------
@pytest.mark.parametrize("half_shape,x_shape,fuses", [
    ((), (2, 3), True),
    ((1,), (2, 3), True),
    ((1, 1), (2, 3), True),
    ((3,), (2, 3), False),           # no growth, but the GELU rule absorbs only size-1 constants
    ((1, 1, 1, 1, 1), (2, 3), False),  # raises the rank to 5
    ((2, 1, 1, 1), (1, 4, 2, 3), False),  # broadcasts the batch 1 -> 2
    ((1, 1, 1, 1), (1, 4, 2, 3), True),
    ((1,), (), False),               # a [1] constant makes a scalar x rank 1
])
def test_gelu_absorbs_only_a_shape_neutral_half(half_shape, x_shape, fuses):
    model = gelu_model(np.full(half_shape, 0.5, F), x_shape)
    if fuses:
        assert_rewrites(model, GELU, expect={"fusegraph.Gelu": 1})
    else:
        assert_unchanged(model, GELU)


def test_unknown_rank_accepts_only_a_size_one_constant_of_rank_at_most_one():
    rule = Rule("half", lambda op, x: op.Mul(x, Const(0.5)), lambda op, x: op.Div(x, np.asarray(2.0, F)))
    for shape, fuses in (((), True), ((1,), True), ((1, 1), False)):
        model = make_model([node("Mul", ["x", "c"], ["y"])], {"x": (F, None)}, {"y": (F, None)},
                           {"c": np.full(shape, 0.5, F)})
        out, report = rewrite_with_report(model, [rule], explain="half")
        assert (op_counts(out)["Div"] == 1) is fuses
        if not fuses:
            assert "rank is unknown" in report.near_misses[0].reason


def test_shape_refusal_says_why():
    rule = Rule("half", lambda op, x: op.Mul(x, Const(0.5)), lambda op, x: op.Div(x, np.asarray(2.0, F)))
    model = make_model([node("Mul", ["x", "c"], ["y"])], {"x": (F, [2, 3])}, {"y": (F, [1, 1, 1, 2, 3])},
                       {"c": np.full((1, 1, 1, 1, 1), 0.5, F)})
    _, report = rewrite_with_report(model, [rule], explain="half")
    assert "would raise the output's rank to 5" in report.near_misses[0].reason


# -- initializers that are graph inputs -----------------------------------------------------
def test_initializer_that_is_a_graph_input_is_not_a_constant():
    model = gelu_model(0.5)
    model.graph.input.append(helper.make_tensor_value_info("half", onnx.TensorProto.FLOAT, []))
    g = Graph(model)
    assert not g.value("half").is_constant and g.value("half").const_value is None
    assert g.value("one").is_constant
    out, _ = rewrite_with_report(model, GELU)
    assert op_counts(out)["fusegraph.Gelu"] == 0, "the 0.5 may be overridden: no GELU to prove"
    feeds = {**make_inputs(model), "half": np.asarray(0.7, F)}
    assert all(d.ok for d in compare(run(model, feeds), run(out, feeds))), "fed another value, still equal"
    assert "half" in {t.name for t in out.graph.initializer}, "the input's default stays"


def test_overridable_weight_keeps_its_default_when_unused():
    """A rule that stops reading an overridable initializer must not drop it: the graph input
    would become required."""
    rule = Rule("drop", lambda op, x, c: op.Mul(op.Relu(x), op.Mul(c, 0.0) ),
                lambda op, x, c: op.Mul(op.Relu(x), np.asarray(0.0, F)))
    model = make_model([node("Relu", ["x"], ["r"]), node("Mul", ["c", "z"], ["cz"]), node("Mul", ["r", "cz"], ["y"])],
                       {"x": (F, [2]), "c": (F, [2])}, {"y": (F, [2])},
                       {"c": np.ones(2, F), "z": np.asarray(0.0, F)})
    out = rewrite(model, [rule])
    assert op_counts(out)["Mul"] == 1
    assert [t.name for t in out.graph.initializer if t.name == "c"] == ["c"]
    onnx.checker.check_model(out, full_check=True)


# -- valid but unusual forms ----------------------------------------------------------------
def test_two_nodes_with_omitted_optional_outputs_load_and_fuse():
    nodes = [node("Dropout", ["x"], ["d", ""]), node("Dropout", ["d"], ["x2", ""]),
             node("MatMul", ["x2", "w"], ["m"]), node("Relu", ["m"], ["y"])]
    model = make_model(nodes, {"x": (F, [2, 4])}, {"y": (F, [2, 3])}, {"w": np.ones((4, 3), F)})
    out = assert_rewrites(model, EPILOGUES, expect={"fusegraph.MatMulRelu": 1, "Dropout": 2})
    assert [list(n.output) for n in out.graph.node if n.op_type == "Dropout"] == [["d", ""], ["x2", ""]]


def test_weight_in_sparse_initializer_is_a_constant():
    w = np.zeros((4, 3), F)
    w[1, 2], w[3, 0] = 2.0, -1.0
    nodes = [node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["s"]), node("Relu", ["s"], ["y"])]
    model = make_model(nodes, {"x": (F, [2, 4])}, {"y": (F, [2, 3])}, {"b": np.ones(3, F)})
    values = numpy_helper.from_array(np.array([2.0, -1.0], F), "w")
    indices = numpy_helper.from_array(np.array([1 * 3 + 2, 3 * 3 + 0], np.int64), "w_indices")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4, 3]))
    g = Graph(model)
    assert g.value("w").is_constant and np.array_equal(g.value("w").const_value, w)
    out = rewrite(model, EPILOGUES)
    assert op_counts(out) == {"fusegraph.MatMulBiasRelu": 1}
    assert out.graph.sparse_initializer[0] == model.graph.sparse_initializer[0], "kept as it was"
    # onnx's full check mistypes sparse initializers (the original fails it too): the plain
    # checker and ONNX Runtime, which densifies them, are the judges here.
    onnx.checker.check_model(out)
    feeds = make_inputs(model)
    assert all(d.ok for d in compare(run(model, feeds), run(out, feeds)))
