"""Rewriting inside If/Loop/Scan bodies: each body is rewritten as a graph of its own (nested
bodies too), values from enclosing scopes are opaque inputs there, the rewritten body goes back
into its node's attribute, and the fused ops it uses get their local functions."""

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fusegraph import Rule, rewrite, rewrite_with_report
from fusegraph.api import default_rules
from fusegraph.verify.testing import assert_rewrites, make_model, node, op_counts

F = np.float32
FLOAT = onnx.TensorProto.FLOAT
RULES = default_rules().select(["gemm_epilogue.*", "activations.*"])


def body(name, nodes, out, inits=()):
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, FLOAT, [2, 3])], list(inits))


def mlp_branch(tag, x="x"):
    """Relu(x @ w + b) with body-local weights; x comes from the enclosing scope."""
    rng = np.random.default_rng(len(tag))
    return body(tag, [node("MatMul", [x, f"{tag}_w"], [f"{tag}_m"]),
                      node("Add", [f"{tag}_m", f"{tag}_b"], [f"{tag}_s"]),
                      node("Relu", [f"{tag}_s"], [f"{tag}_y"])], f"{tag}_y",
                [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(F), f"{tag}_w"),
                 numpy_helper.from_array(rng.standard_normal(3).astype(F), f"{tag}_b")])


def gelu_branch(tag, x="x"):
    """GELU(x @ w), erf form, with scalar constants local to the body."""
    consts = {"w": np.full((4, 3), 0.25, F), "sqrt2": np.asarray(np.sqrt(2.0), F), "one": np.asarray(1.0, F),
              "half": np.asarray(0.5, F)}
    n = lambda s: f"{tag}_{s}"  # noqa: E731
    nodes = [node("MatMul", [x, n("w")], [n("m")]), node("Div", [n("m"), n("sqrt2")], [n("d")]),
             node("Erf", [n("d")], [n("e")]), node("Add", [n("e"), n("one")], [n("p")]),
             node("Mul", [n("m"), n("half")], [n("h")]), node("Mul", [n("h"), n("p")], [n("y")])]
    return body(tag, nodes, n("y"), [numpy_helper.from_array(v, n(k)) for k, v in consts.items()])


def if_model(then_branch, else_branch, opset=17):
    return make_model([node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)],
                      {"cond": (np.bool_, []), "x": (F, [2, 4])}, {"y": (F, [2, 3])}, opset=opset)


def fused_ops_in(g):
    out = []
    for n in g.node:
        if n.domain == "fusegraph":
            out.append(n.op_type)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                out += fused_ops_in(sub)
    return sorted(out)


def test_both_branches_of_an_if_are_fused_and_run_in_onnx_runtime():
    model = if_model(mlp_branch("t"), gelu_branch("e"))
    for cond in (True, False):
        feeds = {"cond": np.asarray(cond), "x": np.random.default_rng(1).standard_normal((2, 4)).astype(F)}
        out = assert_rewrites(model, RULES, feeds=feeds)
    assert fused_ops_in(out.graph) == ["MatMulBiasRelu", "MatMulGelu"]
    assert {f.name for f in out.functions} == {"MatMulBiasRelu", "MatMulGelu"}
    branches = {a.name: a.g for a in out.graph.node[0].attribute}
    assert [n.op_type for n in branches["then_branch"].node] == ["MatMulBiasRelu"]
    assert [i.name for i in branches["then_branch"].initializer] == ["t_w", "t_b"]


def test_nested_bodies_are_rewritten_and_report_counts_them():
    inner = if_model(mlp_branch("a"), mlp_branch("b")).graph.node[0]
    inner.output[0] = "y_in"
    outer_then = helper.make_graph([inner], "outer_then", [], [helper.make_tensor_value_info("y_in", FLOAT, [2, 3])])
    model = if_model(outer_then, gelu_branch("c"))
    feeds = {"cond": np.asarray(True), "x": np.ones((2, 4), F)}
    out, report = rewrite_with_report(model, RULES)
    assert fused_ops_in(out.graph) == ["MatMulBiasRelu", "MatMulBiasRelu", "MatMulGelu"]
    assert report.per_rule["gemm_epilogue.matmul_act"] == 3  # both MLPs and the GELU chain
    assert report.ops_after["fusegraph.MatMulBiasRelu"] == 2 and report.ops_before["Relu"] == 2
    assert_rewrites(model, RULES, feeds=feeds)


def test_outer_scope_values_are_opaque_in_a_body():
    """The body's bias is an initializer of the main graph: an input there, not a constant,
    so the epilogue (which needs a constant bias) leaves the body alone."""
    branch = mlp_branch("t")
    bias = [t for t in branch.initializer if t.name == "t_b"]
    keep = [t for t in branch.initializer if t.name != "t_b"]
    branch.ClearField("initializer")
    branch.initializer.extend(keep)
    model = if_model(branch, mlp_branch("e"))
    model.graph.initializer.extend(bias)
    out = rewrite(model, RULES)
    assert fused_ops_in(out.graph) == ["MatMulBiasRelu"], "only the else branch, whose bias is its own"
    then = {a.name: a.g for a in out.graph.node[0].attribute}["then_branch"]
    assert "Add" in [n.op_type for n in then.node], "the outer bias was not absorbed"
    onnx.checker.check_model(out, full_check=True)


def test_new_names_in_a_body_do_not_shadow_enclosing_ones():
    """A replacement that builds intermediate values in two sibling bodies: every name in the
    model stays unique (ONNX's scoping: a body must not redefine an outer name)."""
    rule = Rule("split_relu", lambda op, x: op.Relu(x), lambda op, x: op.Max(op.Identity(x), np.asarray(0.0, F)))
    then = body("t", [node("Relu", ["x2"], ["t_y"])], "t_y")
    other = body("e", [node("Relu", ["x2"], ["e_y"])], "e_y")
    model = make_model([node("Neg", ["x"], ["x2"]), node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
                       {"cond": (np.bool_, []), "x": (F, [2, 3])}, {"y": (F, [2, 3])})
    out = assert_rewrites(model, [rule], feeds={"cond": np.asarray(True), "x": np.ones((2, 3), F)})
    names = [o for n in out.graph.node for o in n.output]
    for a in out.graph.node[1].attribute:
        names += [o for n in a.g.node for o in n.output] + [t.name for t in a.g.initializer]
    assert len(names) == len(set(names))
    assert op_counts(out)["If"] == 1


def test_loop_body_with_a_carried_value_is_fused():
    """A Loop that applies Relu(v @ w) twice: the body's inputs are the iteration number, the
    condition and the carried v; its outputs stay the loop's."""
    w = (np.eye(3, dtype=F) * 0.5 + 0.1).astype(F)
    loop_body = helper.make_graph(
        [node("Identity", ["c_in"], ["c_out"]), node("MatMul", ["v_in", "w"], ["m"]), node("Relu", ["m"], ["v_out"])],
        "loop_body",
        [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", FLOAT, [2, 3])],
        [helper.make_tensor_value_info("c_out", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", FLOAT, [2, 3])],
        [numpy_helper.from_array(w, "w")])
    model = make_model([node("Loop", ["n", "go", "x"], ["y"], body=loop_body)],
                       {"n": (np.int64, []), "go": (np.bool_, []), "x": (F, [2, 3])}, {"y": (F, [2, 3])})
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(F)
    feeds = {"n": np.asarray(2, np.int64), "go": np.asarray(True), "x": x}
    out = assert_rewrites(model, RULES, feeds=feeds)
    assert fused_ops_in(out.graph) == ["MatMulRelu"]
    assert [o.name for o in out.graph.node[0].attribute[0].g.output] == ["c_out", "v_out"]


def test_a_value_a_body_reads_keeps_its_name_when_replaced_by_another():
    """Neg(Neg(x)) -> x in the main graph, where a branch reads the double negation by name:
    the name stays (an Identity of x), else the branch would read a value that is gone."""
    rule = Rule("double_neg", lambda op, x: op.Neg(op.Neg(x)), lambda op, x: x)
    then = body("t", [node("Relu", ["nn"], ["t_y"])], "t_y")
    other = body("e", [node("Sigmoid", ["x"], ["e_y"])], "e_y")
    model = make_model([node("Neg", ["x"], ["n"]), node("Neg", ["n"], ["nn"]),
                        node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
                       {"cond": (np.bool_, []), "x": (F, [2, 3])}, {"y": (F, [2, 3])})
    out = assert_rewrites(model, [rule], feeds={"cond": np.asarray(True), "x": np.ones((2, 3), F) * -2})
    assert [(n.op_type, list(n.output)) for n in out.graph.node] == [("Identity", ["nn"]), ("If", ["y"])]
