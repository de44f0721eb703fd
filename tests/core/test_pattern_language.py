"""The pattern language: captures, repeated values, commutativity, alternatives, optional nodes,
constraints on attributes/dtypes/ranks/shapes/constants, several outputs, captured attributes."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fusegraph import Attr, Const, Rule, optional, reject
from fusegraph.pattern import is_op, wildcard
from fusegraph.verify.testing import assert_rewrites, make_model, node, op_counts
from fusegraph import rewrite

F = np.float32


def mark(op, x):
    """A replacement that only tags the match, for tests that count what fired."""
    return op.Marked(x, _domain="test")


def swish_model(second_input_is_x=True, swap=False):
    sig_in = "x" if second_input_is_x else "z"
    mul_ins = ["s", "x"] if swap else ["x", "s"]
    return make_model([node("Sigmoid", [sig_in], ["s"]), node("Mul", mul_ins, ["y"])],
                      {"x": (F, [2, 3]), "z": (F, [2, 3])}, {"y": (F, [2, 3])})


def test_same_value_used_twice_matches_only_when_it_is_the_same_value():
    rule = Rule("silu", lambda op, x: op.Mul(x, op.Sigmoid(x)),
                lambda op, x: op.Silu(x, _domain="test"))
    assert op_counts(rewrite(swish_model(True), [rule]))["test.Silu"] == 1
    assert op_counts(rewrite(swish_model(False), [rule]))["test.Silu"] == 0


@pytest.mark.parametrize("swap", [False, True])
def test_commutative_operands_match_in_either_order(swap):
    rule = Rule("silu", lambda op, x: op.Mul(x, op.Sigmoid(x)), lambda op, x: op.Silu(x, _domain="test"))
    assert op_counts(rewrite(swish_model(True, swap), [rule]))["test.Silu"] == 1


def test_non_commutative_operands_keep_their_order():
    rule = Rule("sub", lambda op, x: op.Sub(x, op.Sigmoid(x)), lambda op, x: op.Neg(x))
    model = make_model([node("Sigmoid", ["x"], ["s"]), node("Sub", ["s", "x"], ["y"])],
                       {"x": (F, [2])}, {"y": (F, [2])})
    assert op_counts(rewrite(model, [rule]))["Neg"] == 0


def scale_model(op_type, c):
    return make_model([node(op_type, ["x", "c"], ["y"]), node("Softmax", ["y"], ["z"], axis=-1)],
                      {"x": (F, [2, 4])}, {"z": (F, [2, 4])}, {"c": np.array(c, F)})


def scaled_softmax_rule():
    def pattern(op, x):
        return op.Softmax(op.Div(x, Const(2.0)) | op.Mul(x, Const(0.5)), axis=-1)

    def replacement(op, x):
        """x - x/2 == x/2, in a form the pattern does not match again."""
        half = op.Sub(x, op.Mul(x, op.const(np.array(0.5, F))))
        return op.Identity(op.Softmax(half, axis=-1))
    return Rule("scaled_softmax", pattern, replacement)


@pytest.mark.parametrize("op_type,c,fires", [("Div", 2.0, True), ("Mul", 0.5, True), ("Div", 3.0, False),
                                             ("Mul", 2.0, False), ("Div", [2.0, 2.0, 2.0, 2.0], True)])
def test_alternatives_and_constant_values(op_type, c, fires):
    out = rewrite(scale_model(op_type, c), [scaled_softmax_rule()])
    assert (op_counts(out)["Identity"] == 1) is fires
    if fires:
        assert_rewrites(scale_model(op_type, c), [scaled_softmax_rule()])


@pytest.mark.parametrize("with_cast", [True, False])
def test_optional_node_matches_present_or_absent(with_cast):
    nodes = [node("Cast", ["x"], ["c"], to=1)] if with_cast else []
    nodes.append(node("Relu", ["c" if with_cast else "x"], ["y"]))
    model = make_model(nodes, {"x": (F, [3])}, {"y": (F, [3])})
    rule = Rule("relu_of_optional_cast", lambda op, x: op.Relu(optional(op.Cast(x, to=1))),
                lambda op, x: op.Max(x, op.const(np.array(0.0, F))))
    out = assert_rewrites(model, [rule])
    assert op_counts(out)["Cast"] == 0 and op_counts(out)["Max"] == 1


def test_optional_add_binds_none_when_absent():
    seen = []

    def replacement(op, x, mask):
        seen.append(mask)
        return op.Exp(x if mask is None else op.Add(x, mask))
    rule = Rule("opt_mask", lambda op, x, mask: op.Softmax(optional(op.Add(x, mask)), axis=-1), replacement)
    for nodes in ([node("Softmax", ["x"], ["y"], axis=-1)],
                  [node("Add", ["x", "m"], ["a"]), node("Softmax", ["a"], ["y"], axis=-1)]):
        rewrite(make_model(nodes, {"x": (F, [2, 2]), "m": (F, [2, 2])}, {"y": (F, [2, 2])}), [rule])
    assert seen[0] is None and seen[1].name == "m"


@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_attribute_constraint_compares_the_value_literally(axis):
    """The pattern says axis=-1: axis=1 is the same axis of a rank-2 input but another value,
    and rules that accept it must say so (Attr(where=...)); only -1 fires."""
    model = make_model([node("Softmax", ["x"], ["y"], axis=axis)], {"x": (F, [2, 2])}, {"y": (F, [2, 2])})
    rule = Rule("sm", lambda op, x: op.Softmax(x, axis=-1), mark)
    assert (op_counts(rewrite(model, [rule]))["test.Marked"] == 1) is (axis == -1)


def test_attribute_default_applies_when_node_omits_it():
    model = make_model([node("Softmax", ["x"], ["y"])], {"x": (F, [2, 2])}, {"y": (F, [2, 2])}, opset=17)
    rule = Rule("sm", lambda op, x: op.Softmax(x, axis=-1), mark)
    assert op_counts(rewrite(model, [rule]))["test.Marked"] == 1


def test_captured_attribute_and_constant_reach_the_replacement():
    got = {}

    def replacement(op, x, axis, c):
        got.update(axis=axis, c=float(c.const_value))
        return op.Identity(x)
    rule = Rule("cap", lambda op, x: op.Softmax(op.Mul(x, Const(name="c")), axis=Attr("axis")), replacement)
    model = make_model([node("Mul", ["x", "c"], ["m"]), node("Softmax", ["m"], ["y"], axis=0)],
                       {"x": (F, [2, 2])}, {"y": (F, [2, 2])}, {"c": np.array(3.0, F)})
    rewrite(model, [rule])
    assert got == {"axis": 0, "c": 3.0}


@pytest.mark.parametrize("dtype,fires", [(np.float32, True), (np.float16, False)])
def test_dtype_constraint(dtype, fires):
    model = make_model([node("Relu", ["x"], ["y"])], {"x": (dtype, [2])}, {"y": (dtype, [2])})
    rule = Rule("r", lambda op, x: op.Relu(x.has_dtype(np.float32)), mark)
    assert (op_counts(rewrite(model, [rule]))["test.Marked"] == 1) is fires


@given(rank=st.integers(1, 4), want=st.integers(1, 4))
@settings(max_examples=20, deadline=None)
def test_rank_and_shape_constraints(rank, want):
    shape = [2] * rank
    model = make_model([node("Relu", ["x"], ["y"])], {"x": (F, shape)}, {"y": (F, shape)})
    by_rank = Rule("r", lambda op, x: op.Relu(x.has_rank(want)), mark)
    by_shape = Rule("s", lambda op, x: op.Relu(x.has_shape([2] * want)), mark)
    assert (op_counts(rewrite(model, [by_rank]))["test.Marked"] == 1) is (rank == want)
    assert (op_counts(rewrite(model, [by_shape]))["test.Marked"] == 1) is (rank == want)


def test_condition_rejects_with_reason():
    def cond(x):
        return reject("never") if x.rank == 2 else True
    rule = Rule("r", lambda op, x: op.Relu(x), mark, condition=cond)
    model = make_model([node("Relu", ["x"], ["y"])], {"x": (F, [2, 2])}, {"y": (F, [2, 2])})
    assert op_counts(rewrite(model, [rule]))["test.Marked"] == 0


def test_tvm_style_algebra_is_the_same_language():
    x = wildcard()
    pattern = is_op("Relu")(is_op("Add")(is_op("MatMul")(x, wildcard()), wildcard()))
    rule = Rule("tvm", pattern, lambda op: op.Identity(op.const(np.zeros((2, 3), F))))
    model = make_model([node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["a"]),
                        node("Relu", ["a"], ["y"])], {"x": (F, [2, 4])}, {"y": (F, [2, 3])},
                       {"w": np.ones((4, 3), F), "b": np.ones(3, F)})
    counts = op_counts(rewrite(model, [rule]))
    assert counts["MatMul"] == 0 and counts["Identity"] == 1


def test_multi_output_pattern_fuses_both_outputs_into_one_node():
    """Two Relus of one Add: a pattern with two outputs becomes one two-output node."""
    def pattern(op, x, y):
        s = op.Add(x, y)
        return op.Relu(s), op.Neg(s)

    def replacement(op, x, y):
        return op.AddReluNeg(x, y, _domain="test", _outputs=2)
    model = make_model([node("Add", ["x", "y"], ["s"]), node("Relu", ["s"], ["r"]), node("Neg", ["s"], ["n"])],
                       {"x": (F, [2]), "y": (F, [2])}, {"r": (F, [2]), "n": (F, [2])})
    out = rewrite(model, [Rule("two", pattern, replacement)])
    fused = [n for n in out.graph.node if n.op_type == "AddReluNeg"]
    assert len(fused) == 1 and list(fused[0].output) == ["r", "n"]
    assert op_counts(out)["Add"] == 0


def test_pattern_whose_root_is_not_an_operator_is_refused():
    from fusegraph import InputError
    with pytest.raises(InputError, match="can't be matched"):
        Rule("bad", lambda op, x: x, lambda op, x: x)
