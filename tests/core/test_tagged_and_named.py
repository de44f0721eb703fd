"""Tagged alternatives (an op-type set or labelled branches, binding which one matched) and
named intermediates (`.named`): captured like attributes and values, read by conditions and
replacements, explained when they refuse, and covered branch by branch by the self-check."""

import numpy as np
import pytest

from fusegraph.ops import activation_ops  # noqa: F401  (registers fusegraph.Silu)
from fusegraph import InputError, Rule, reject, rewrite, rewrite_with_report
from fusegraph.verify.instantiate import branch_paths
from fusegraph.pattern import PatternOps, Tagged, any_of, tagged, wildcard
from fusegraph.verify.testing import assert_rewrites, make_model, node, op_counts
from fusegraph.verify import verify_rule

F = np.float32


def act_of_neg(act, opset=17):
    """act(Neg(x)); "Silu" is written x * Sigmoid(x)."""
    nodes = [node("Neg", ["x"], ["n"], name="neg")]
    if act == "Silu":
        nodes += [node("Sigmoid", ["n"], ["s"], name="sig"), node("Mul", ["n", "s"], ["y"], name="act")]
    else:
        nodes.append(node(act, ["n"], ["y"], name="act"))
    return make_model(nodes, {"x": (F, [2, 3])}, {"y": (F, [2, 3])}, opset=opset)


def marked(op, x, act):
    """The captured tag becomes an attribute of the replacement."""
    return op.Marked(x, kind=act, _domain="test")


def marks(model):
    return [(n.op_type, n.attribute[0].s.decode()) for n in model.graph.node]


@pytest.mark.parametrize("act", ["Relu", "Sigmoid", "Tanh"])
def test_op_type_set_captures_the_matched_op_type(act):
    rule = Rule("act", lambda op, x: op.any_of("Relu", "Sigmoid", "Tanh", tag="act")(op.Neg(x)), marked)
    assert marks(rewrite(act_of_neg(act), [rule])) == [("Marked", act)]


def test_op_type_set_tvm_style_and_untagged():
    rule = Rule("act", lambda op, x: any_of("Relu", "Tanh")(op.Neg(x)), lambda op, x: op.Marked(x, _domain="test"))
    assert op_counts(rewrite(act_of_neg("Tanh"), [rule]))["test.Marked"] == 1
    assert op_counts(rewrite(act_of_neg("Sigmoid"), [rule]))["test.Marked"] == 0


def test_op_type_set_refusal_names_the_set():
    rule = Rule("inner", lambda op, x: op.Sigmoid(op.any_of("Relu", "Tanh", tag="t")(x)),
                lambda op, x, t: op.Marked(x, kind=t, _domain="test"))
    out, report = rewrite_with_report(act_of_neg("Sigmoid"), [rule], explain="inner")
    assert op_counts(out)["test.Marked"] == 0
    assert [m.reason for m in report.near_misses] == ["at Neg 'neg': expected Relu|Tanh (t), found Neg"]


def labelled_activation(op, y):
    return tagged("act", {"relu": op.Relu(y), "silu": op.Mul(y, op.Sigmoid(y)),
                          "gelu": op.Gelu(y) | op.Gelu(y, _domain="test")})


@pytest.mark.parametrize("act, label", [("Relu", "relu"), ("Silu", "silu"), ("Gelu", "gelu")])
def test_tagged_branches_bind_their_label(act, label):
    rule = Rule("act", lambda op, x: labelled_activation(op, op.Neg(x)), marked)
    assert marks(rewrite(act_of_neg(act, opset=20), [rule])) == [("Marked", label)]


def test_tag_chooses_the_replacement():
    """The replacement builds a different op per branch: one rule for a family of fused ops."""
    def replacement(op, x, act):
        return {"Relu": op.NegRelu, "Tanh": op.NegTanh}[act](x, _domain="test")
    rule = Rule("neg_act", lambda op, x: op.any_of("Relu", "Tanh", tag="act")(op.Neg(x)), replacement)
    assert op_counts(rewrite(act_of_neg("Tanh"), [rule])) == {"test.NegTanh": 1}
    assert op_counts(rewrite(act_of_neg("Relu"), [rule])) == {"test.NegRelu": 1}


def test_tag_in_a_condition_and_its_reason_in_explain():
    def not_tanh(act):
        return act != "Tanh" or reject("Tanh has its own kernel")
    rule = Rule("act", lambda op, x: op.any_of("Relu", "Tanh", tag="act")(op.Neg(x)), marked, not_tanh)
    assert op_counts(rewrite(act_of_neg("Relu"), [rule]))["test.Marked"] == 1
    out, report = rewrite_with_report(act_of_neg("Tanh"), [rule], explain="act")
    assert op_counts(out)["test.Marked"] == 0
    assert [m.reason for m in report.near_misses] == ["at act: Tanh has its own kernel"]


def test_a_tag_used_twice_binds_one_label():
    def pattern(op, x, y):
        return op.Add(op.any_of("Relu", "Tanh", tag="act")(x), op.any_of("Relu", "Tanh", tag="act")(y))
    rule = Rule("same", pattern, lambda op, x, y, act: op.Marked(x, y, kind=act, _domain="test"))

    def model(a, b):
        return make_model([node(a, ["x"], ["p"]), node(b, ["z"], ["q"]), node("Add", ["p", "q"], ["y"])],
                          {"x": (F, [2]), "z": (F, [2])}, {"y": (F, [2])})
    assert op_counts(rewrite(model("Tanh", "Tanh"), [rule]))["test.Marked"] == 1
    assert op_counts(rewrite(model("Relu", "Tanh"), [rule]))["test.Marked"] == 0


def test_alt_tagged_needs_one_label_per_alternative():
    op, x = PatternOps(), wildcard()
    alt = (op.Relu(x) | op.Tanh(x)).tagged("act", ["r", "t"])
    assert isinstance(alt, Tagged) and alt.labels == ("r", "t")
    with pytest.raises(InputError, match="3 labels for 2 alternatives"):
        (op.Relu(x) | op.Tanh(x)).tagged("act", ["r", "t", "s"])


def test_self_check_covers_every_tagged_branch(tmp_path):
    def replacement(op, x, act):  # each branch in a form the pattern does not match again
        if act == "tanh":
            return op.Neg(op.Tanh(x))
        y = op.Neg(x)
        return op.Max(y, op.Sub(y, y)) if act == "relu" else op.Silu(y, _domain="fusegraph")
    def pattern(op, x):
        y = op.Neg(x)
        return tagged("act", {"relu": op.Relu(y), "silu": op.Mul(y, op.Sigmoid(y)), "tanh": op.Tanh(y)})
    rule = Rule("act", pattern, replacement)
    assert len(branch_paths(rule.outputs)) == 4  # three branches, and the Mul's other operand order
    result = verify_rule(rule, repro_dir=str(tmp_path), max_examples=2)
    assert len(result.covered) == result.paths == 4


# -- named intermediates --------------------------------------------------------------------
def mlp():
    nodes = [node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["a"]), node("Relu", ["a"], ["y"])]
    return make_model(nodes, {"x": (F, [2, 4])}, {"y": (F, [2, 3])},
                      {"w": np.ones((4, 3), F), "b": np.ones(3, F)})


def test_named_intermediate_is_captured_for_conditions_and_replacement():
    seen = {}

    def pattern(op, x, w, b):
        return op.Relu(op.Add(op.MatMul(x, w).named("product"), b).named("biased"))

    def product_is_from_x(product, biased, x, w):
        seen.update(product=product.name, biased=biased.name)
        return product.producer.inputs == [x, w] or reject("not x @ w")

    def replacement(op, x, w, b, product):
        assert product.name == "m"
        return op.MatMulBiasRelu(x, w, b, _domain="fusegraph")
    out = assert_rewrites(mlp(), [Rule("named", pattern, replacement, product_is_from_x)],
                          expect={"fusegraph.MatMulBiasRelu": 1})
    assert seen == {"product": "m", "biased": "a"}
    assert len(out.graph.node) == 1


def test_a_name_used_twice_must_be_the_same_value():
    def pattern(op, x):
        return op.Mul(op.Neg(x).named("n"), op.Sigmoid(op.Neg(x).named("n")))
    rule = Rule("shared", pattern, lambda op, x: op.Marked(x, _domain="test"))
    same = make_model([node("Neg", ["x"], ["n"]), node("Sigmoid", ["n"], ["s"]), node("Mul", ["n", "s"], ["y"])],
                      {"x": (F, [2])}, {"y": (F, [2])})
    two = make_model([node("Neg", ["x"], ["n"]), node("Neg", ["x"], ["n2"]), node("Sigmoid", ["n2"], ["s"]),
                      node("Mul", ["n", "s"], ["y"])], {"x": (F, [2])}, {"y": (F, [2])})
    assert op_counts(rewrite(same, [rule]))["test.Marked"] == 1
    # (canonicalization would merge the two Negs: the matcher is what is tested here)
    assert op_counts(rewrite_with_report(two, [rule], canonicalize=False)[0])["test.Marked"] == 0
