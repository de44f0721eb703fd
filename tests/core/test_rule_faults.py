"""A rule's own faults never end a run: a condition, a pattern predicate or a replacement that
raises, or a replacement that returns the wrong thing (not a value, the wrong count, another
dtype or shape), refuses that candidate with the reason, leaves the graph exactly as it was,
and the rule is named in the report; the run goes on."""

import numpy as np
import onnx
import pytest

from fusegraph import Attr, Const, InputError, Rule, rewrite, rewrite_with_report
from fusegraph.cli import main
from fusegraph.verify.testing import assert_rewrites, make_model, node, op_counts
from fusegraph.verify import compare, make_inputs, run

F = np.float32


def two_mlps(bias_a, bias_b):
    """Two MatMul + Add + Relu chains of one input (two weights: no common subexpression for
    the canonicalizer to merge), with biases `bias_a` and `bias_b`."""
    nodes = []
    for i in "ab":
        nodes += [node("MatMul", ["x", f"w{i}"], [f"m{i}"], name=f"mm_{i}"),
                  node("Add", [f"m{i}", f"b{i}"], [f"s{i}"], name=f"add_{i}"),
                  node("Relu", [f"s{i}"], [f"y{i}"], name=f"relu_{i}")]
    rng = np.random.default_rng(0)
    return make_model(nodes, {"x": (F, [2, 4])}, {"ya": (F, [2, 3]), "yb": (F, [2, 3])},
                      {"wa": rng.standard_normal((4, 3)).astype(F), "wb": rng.standard_normal((4, 3)).astype(F),
                       "ba": np.asarray(bias_a, F),
                       "bb": np.asarray(bias_b, F)})


def mlp_pattern(op, x, w, b):
    return op.Relu(op.Add(op.MatMul(x, w), b))


def fused(op, x, w, b):
    return op.MatMulBiasRelu(x, w, b, _domain="fusegraph")


def bias_is_vector(w, b):
    """Written as a first rule often is: assumes b has a dim 0 (a scalar bias has none)."""
    return b.shape[0] == w.shape[1]


def test_condition_that_raises_refuses_the_candidate_and_the_run_goes_on():
    rule = Rule("user.mlp", mlp_pattern, fused, condition=bias_is_vector)
    model = two_mlps(0.5, np.ones(3))  # chain a: rank-0 bias -> IndexError in the condition
    out, report = rewrite_with_report(model, [rule], explain="user.mlp")
    assert op_counts(out)["fusegraph.MatMulBiasRelu"] == 1, "chain b still fuses"
    assert op_counts(out)["Relu"] == 1, "chain a is left as it was"
    err = report.errors["user.mlp"]
    assert err.count == 1 and err.message.startswith("condition bias_is_vector raised IndexError")
    assert any("bias_is_vector raised IndexError" in m.reason for m in report.near_misses)
    onnx.checker.check_model(out, full_check=True)
    feeds = make_inputs(model)
    assert all(d.ok for d in compare(run(model, feeds), run(out, feeds)))


@pytest.mark.parametrize("pattern,what", [
    (lambda op, x: op.Softmax(x.where(lambda v: v.shape[7] > 0, "dim 7 > 0"), axis=-1), "predicate 'dim 7 > 0'"),
    (lambda op, x: op.Softmax(op.Mul(x, Const(where=lambda a: a[3] > 0, why="c[3] > 0")), axis=-1),
     "constant test 'c[3] > 0'"),
    (lambda op, x: op.Softmax(x, axis=Attr(where=lambda a: a[0] < 0, why="axis[0] < 0")),
     "attribute test 'axis[0] < 0'"),
])
def test_pattern_predicate_that_raises_is_a_refusal_too(pattern, what):
    rule = Rule("user.pred", pattern, lambda op, x: op.Marked(x, _domain="test"))
    model = make_model([node("Mul", ["x", "c"], ["m"]), node("Softmax", ["m"], ["y"], axis=-1)],
                       {"x": (F, [2])}, {"y": (F, [2])}, {"c": np.ones(2, F)})
    out, report = rewrite_with_report(model, [rule], explain="user.pred")
    assert op_counts(out) == op_counts(model)
    assert report.errors["user.pred"].message.startswith(f"{what} raised")
    assert f"{what} raised" in report.near_misses[0].reason


def builds_then_raises(op, x, w, b):
    """Creates an initializer and two nodes, then fails."""
    y = op.Add(op.MatMul(x, w), op.const(np.zeros(3, F)))
    op.Relu(y)
    raise ValueError("half-built")


@pytest.mark.parametrize("replacement,reason", [
    (builds_then_raises, "replacement raised ValueError: half-built"),
    (lambda op, x, w, b: (op.Relu(x), np.zeros(3)), "returned 2 values for a pattern with 1 outputs"),
    (lambda op, x, w, b: np.zeros((2, 3), F), "returned ndarray"),
    (lambda op, x, w, b: None, "returned NoneType"),
    (lambda op, x, w, b: op.NoSuchOp(x, _domain="fusegraph"), "unknown fused op 'NoSuchOp'"),
])
def test_failed_replacement_leaves_the_graph_exactly_as_before(replacement, reason):
    model = two_mlps(np.ones(3), np.ones(3))
    plain, _ = rewrite_with_report(model, [])
    out, report = rewrite_with_report(model, [Rule("user.bad", mlp_pattern, replacement)], explain="user.bad")
    assert out.graph == plain.graph, "no node, value or initializer of the failed replacement is left"
    assert report.errors["user.bad"].count == 2 and reason in report.errors["user.bad"].message
    assert all(reason in m.reason for m in report.near_misses)


def test_a_later_rule_still_runs_after_one_that_fails():
    bad = Rule("user.bad", mlp_pattern, builds_then_raises, priority=10)
    good = Rule("user.good", mlp_pattern, fused)
    out = assert_rewrites(two_mlps(np.ones(3), np.ones(3)), [bad, good], expect={"fusegraph.MatMulBiasRelu": 2})
    assert not [n for n in out.graph.node if n.op_type in ("MatMul", "Relu")]


@pytest.mark.parametrize("replacement,why", [
    (lambda op, x: op.Reshape(x, np.array([-1], np.int64)), "has shape [6], not [2, 3] (rank 1, not 2)"),
    (lambda op, x: op.Cast(x, to=onnx.TensorProto.FLOAT16), "has element type FLOAT16, not FLOAT"),
    (lambda op, x: op.Transpose(x), "has shape [3, 2], not [2, 3] (dim 0)"),
])
def test_replacement_of_another_shape_or_dtype_is_refused(replacement, why):
    model = make_model([node("Relu", ["x"], ["r"]), node("Neg", ["r"], ["y"])], {"x": (F, [2, 3])},
                       {"y": (F, [2, 3])})
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [2, 3]))
    out, report = rewrite_with_report(model, [Rule("user.shape", lambda op, x: op.Relu(x), replacement)],
                                      explain="user.shape")
    assert op_counts(out) == op_counts(model)
    assert why in report.near_misses[0].reason
    assert not report.errors, "a refused shape is a refusal, not a fault of the rule's code"


def test_fused_op_output_is_checked_through_its_function_body():
    """A replacement that drops a [2, 3] bias, which broadcast the [1, 3] MatMul to [2, 3]:
    the fused op's body gives [1, 3], refused; a [3] bias is fine."""
    def drop_bias(op, x, w, b):
        return op.MatMulRelu(x, w, _domain="fusegraph")
    for bias, fires in ((np.ones((2, 3), F), False), (np.zeros(3, F), True)):
        y_shape = list(np.broadcast_shapes((1, 3), bias.shape))
        model = make_model([node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["s"]),
                            node("Relu", ["s"], ["y"])], {"x": (F, [1, 4])}, {"y": (F, y_shape)},
                           {"w": np.ones((4, 3), F), "b": bias})
        out, report = rewrite_with_report(model, [Rule("user.drop", mlp_pattern, drop_bias)], explain="user.drop")
        assert (op_counts(out)["fusegraph.MatMulRelu"] == 1) is fires
        if not fires:
            assert "has shape [1, 3], not [2, 3]" in report.near_misses[0].reason


def test_dynamic_input_dim_may_not_become_a_number():
    model = make_model([node("Relu", ["x"], ["y"])], {"x": (F, ["n", 3])}, {"y": (F, ["n", 3])})
    rule = Rule("user.fix", lambda op, x: op.Relu(x), lambda op, x: op.Expand(x, np.array([4, 3], np.int64)))
    out, report = rewrite_with_report(model, [rule], explain="user.fix")
    assert op_counts(out)["Expand"] == 0
    assert "has shape [4, 3], not [n, 3]" in report.near_misses[0].reason


def test_a_made_up_dim_name_is_an_unknown_dim():
    """torch.onnx names output dims it could not work out (`Relu_y_dim_1`): a replacement that
    knows the dim is 3 is not refused for it."""
    model = make_model([node("Relu", ["x"], ["y"])], {"x": (F, ["n", 3])}, {"y": (F, ["n", "Relu_y_dim_1"])})
    rule = Rule("user.same", lambda op, x: op.Relu(x), lambda op, x: op.Max(x, np.zeros(3, F)))
    assert_rewrites(model, [rule], expect={"Max": 1, "Relu": 0}, feeds={"x": np.ones((2, 3), F)})


def test_cli_names_each_failing_rule_in_one_warning_line(tmp_path, capsys):
    rule_file = tmp_path / "rules.py"
    rule_file.write_text(
        "from fusegraph import Rule\n"
        "def pattern(op, x, w, b):\n    return op.Relu(op.Add(op.MatMul(x, w), b))\n"
        "def replacement(op, x, w, b):\n    return op.MatMulBiasRelu(x, w, b, _domain='fusegraph')\n"
        "def bias_is_vector(w, b):\n    return b.shape[0] == w.shape[1]\n"
        "RULES = [Rule('user.mlp', pattern, replacement, condition=bias_is_vector, priority=1000)]\n")
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(two_mlps(0.5, 0.25), src)
    assert main([str(src), "-o", str(dst), "--rule-file", str(rule_file), "--rules", "user.*"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("rewrite: warning: rule 'user.mlp' failed on 2 candidate(s)")
    assert "condition bias_is_vector raised IndexError" in err[0]
    onnx.checker.check_model(onnx.load(dst), full_check=True)


@pytest.mark.parametrize("rules,what", [(["gemm_epilogue.MatMulRelu"], "str 'gemm_epilogue.MatMulRelu'"),
                                        ([None], "NoneType None"),
                                        (Rule("r", lambda op, x: op.Relu(x), lambda op, x: x), "not Rule")])
def test_rules_that_are_not_rules_are_bad_input_saying_what_was_passed(rules, what):
    model = make_model([node("Relu", ["x"], ["y"])], {"x": (F, [2])}, {"y": (F, [2])})
    with pytest.raises(InputError, match="fusegraph.Rule") as e:
        rewrite(model, rules)
    assert what in str(e.value)


@pytest.mark.parametrize("record", ["{not json", '{"rule": 1}', '[1, 2]'])
def test_malformed_fusion_record_is_bad_input(record):
    model = two_mlps(np.ones(3), np.ones(3))
    onnx.helper.set_model_props(model, {"fusegraph.fusions": record})
    with pytest.raises(InputError, match="not a JSON list of fusions"):
        rewrite(model, [Rule("user.mlp", mlp_pattern, fused)])
