"""The rewrite driver: safety refusals, fixpoint, priority, bookkeeping after the rewrite."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fusegraph import InputError, Rule, rewrite, rewrite_with_report
from fusegraph.api import default_rules
from fusegraph.verify.testing import assert_rewrites, make_model, node, op_counts

F = np.float32
EPILOGUES = default_rules().select(["gemm_epilogue.*"])


def mlp(extra_nodes=(), extra_outputs=None, bias=None, k=4, n=3, dtype=F):
    nodes = [node("MatMul", ["x", "w"], ["m"], name="mm"), node("Add", ["m", "b"], ["a"], name="add"),
             node("Relu", ["a"], ["y"], name="relu"), *extra_nodes]
    outputs = {"y": (dtype, [2, n]), **(extra_outputs or {})}
    rng = np.random.default_rng(0)
    return make_model(nodes, {"x": (dtype, [2, k])}, outputs,
                      {"w": rng.standard_normal((k, n)).astype(dtype),
                       "b": (rng.standard_normal(n) if bias is None else bias).astype(dtype)})


def test_chain_fuses_into_one_op():
    out = assert_rewrites(mlp(), EPILOGUES, expect={"fusegraph.MatMulBiasRelu": 1, "MatMul": 0, "Relu": 0})
    assert len(out.graph.node) == 1


def test_intermediate_with_second_consumer_is_not_fused_through():
    """`a` also feeds a Neg, so MatMul+Add+Relu would lose it: the chain stops at MatMul+Add,
    whose output `a` is the match's own output, and Relu stays."""
    model = mlp([node("Neg", ["a"], ["z"])], {"z": (F, [2, 3])})
    assert_rewrites(model, EPILOGUES, expect={"fusegraph.MatMulBiasRelu": 0, "Relu": 1, "Neg": 1,
                                       "fusegraph.MatMulBias": 1})


def test_intermediate_that_is_a_graph_output_is_not_fused_through():
    model = mlp(extra_outputs={"a": (F, [2, 3])})
    assert_rewrites(model, EPILOGUES, expect={"fusegraph.MatMulBiasRelu": 0, "fusegraph.MatMulBias": 1})


def test_wrong_bias_shape_is_not_fused():
    model = make_model([node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["a"]), node("Relu", ["a"], ["y"])],
                       {"x": (F, [2, 4])}, {"y": (F, [2, 3])},
                       {"w": np.ones((4, 3), F), "b": np.ones((2, 3), F)})
    out = assert_rewrites(model, EPILOGUES, expect={"fusegraph.MatMulBiasRelu": 0, "fusegraph.MatMulRelu": 0})
    assert op_counts(out)["MatMul"] == 1


def test_priority_prefers_the_longest_chain():
    out, report = rewrite_with_report(mlp(), EPILOGUES)
    assert dict(report.per_rule) == {"gemm_epilogue.matmul_act": 1}
    assert op_counts(out) == {"fusegraph.MatMulBiasRelu": 1}


def test_names_order_and_bookkeeping_after_rewrite():
    model = mlp()
    model.graph.node.append(node("Identity", ["x"], ["dead"], name="dead_node"))  # dead code
    out, report = rewrite_with_report(model, EPILOGUES)
    assert [n.name for n in out.graph.node] == ["gemm_epilogue.matmul_act/MatMulBiasRelu"]
    assert list(out.graph.node[0].output) == ["y"]
    record = json.loads({p.key: p.value for p in out.metadata_props}["fusegraph.fusions"])
    assert record == [{"rule": "gemm_epilogue.matmul_act", "matched": ["mm", "add", "relu"],
                       "created": ["gemm_epilogue.matmul_act/MatMulBiasRelu"]}]
    assert any(f.domain == "fusegraph" and f.name == "MatMulBiasRelu" for f in out.functions)
    assert {o.domain: o.version for o in out.opset_import}["fusegraph"] == 1
    assert model.graph.node[0].op_type == "MatMul", "the caller's model must not change"


def test_rewrite_is_deterministic():
    a = rewrite(mlp(), EPILOGUES).SerializeToString()
    b = rewrite(mlp(), EPILOGUES).SerializeToString()
    assert a == b


def test_unique_names_when_many_fusions():
    nodes, prev = [], "x"
    for i in range(5):
        nodes += [node("MatMul", [prev, "w"], [f"m{i}"]), node("Relu", [f"m{i}"], [f"r{i}"])]
        prev = f"r{i}"
    model = make_model(nodes, {"x": (F, [2, 4])}, {prev: (F, [2, 4])}, {"w": np.eye(4, dtype=F)})
    out = assert_rewrites(model, EPILOGUES, expect={"fusegraph.MatMulRelu": 5})
    names = [n.name for n in out.graph.node]
    assert len(set(names)) == len(names)


def test_graph_output_replaced_by_existing_value_keeps_its_name():
    """A replacement that returns an input: consumers move to it, graph outputs get an Identity."""
    model = make_model([node("Neg", ["x"], ["n"]), node("Neg", ["n"], ["y"]), node("Add", ["y", "y"], ["z"])],
                       {"x": (F, [3])}, {"y": (F, [3]), "z": (F, [3])})
    rule = Rule("double_neg", lambda op, x: op.Neg(op.Neg(x)), lambda op, x: x)
    out = assert_rewrites(model, [rule], expect={"Neg": 0, "Identity": 1})
    assert [o.name for o in out.graph.output] == ["y", "z"]


def test_multi_output_match_that_would_create_a_cycle_is_refused():
    """Outputs Relu(s) and Sub(s, z): fine when z is independent, refused when z is computed
    from the Relu (one node producing both outputs would feed itself)."""
    def pattern(op, x, y):
        s = op.Add(x, y)
        return op.Relu(s), op.Sub(s, y)
    model = make_model([node("Add", ["x", "q"], ["s"]), node("Relu", ["s"], ["r"]), node("Exp", ["r"], ["q2"]),
                        node("Sub", ["s", "q"], ["d"])],
                       {"x": (F, [2]), "q": (F, [2])}, {"r": (F, [2]), "d": (F, [2]), "q2": (F, [2])})
    safe = Rule("two", pattern, lambda op, x, y: op.AddReluSub(x, y, _domain="test", _outputs=2))
    assert op_counts(rewrite(model, [safe]))["test.AddReluSub"] == 1
    cyclic = make_model([node("Add", ["x", "y"], ["s"]), node("Relu", ["s"], ["r"]), node("Exp", ["r"], ["y2"]),
                         node("Sub", ["s", "y2"], ["d"])],
                        {"x": (F, [2]), "y": (F, [2])}, {"d": (F, [2])})

    def pattern2(op, x, y, z):
        s = op.Add(x, y)
        return op.Relu(s), op.Sub(s, z)
    rule = Rule("two", pattern2, lambda op, x, y, z: op.AddReluSub(x, y, z, _domain="test", _outputs=2))
    assert op_counts(rewrite(cyclic, [rule]))["test.AddReluSub"] == 0


def test_non_terminating_rule_is_an_error_not_a_hang():
    rule = Rule("loop", lambda op, x: op.Relu(x), lambda op, x: op.Relu(op.Identity(x)))
    model = make_model([node("Relu", ["x"], ["y"])], {"x": (F, [2])}, {"y": (F, [2])})
    with pytest.raises(InputError, match="fixpoint"):
        rewrite(model, [rule])


@given(k=st.integers(1, 9), n=st.integers(1, 9), batch=st.lists(st.integers(1, 3), max_size=2),
       dtype=st.sampled_from([np.float32, np.float16]), bias=st.booleans(),
       act=st.sampled_from(["Relu", "Sigmoid", "Tanh", None]))
@settings(max_examples=25, deadline=None)
def test_epilogue_fuses_over_shapes_and_dtypes(k, n, batch, dtype, bias, act):
    rng = np.random.default_rng(k * 10 + n)
    nodes, y = [node("MatMul", ["x", "w"], ["m"])], "m"
    if bias:
        nodes.append(node("Add", ["b", y], ["a"]))  # bias first: commuted order
        y = "a"
    if act:
        nodes.append(node(act, [y], ["y"]))
        y = "y"
    model = make_model(nodes, {"x": (dtype, [*batch, 3, k])}, {y: (dtype, [*batch, 3, n])},
                       {"w": rng.standard_normal((k, n)).astype(dtype), "b": rng.standard_normal(n).astype(dtype)})
    name = f"fusegraph.MatMul{'Bias' if bias else ''}{act or ''}"
    fuses = bias or act is not None
    assert_rewrites(model, EPILOGUES, expect={name: 1 if fuses else 0})
