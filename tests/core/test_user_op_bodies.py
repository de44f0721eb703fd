"""A user's fused op (a domain of its own, no catalogue entry) gets the subgraph it replaced as its
ONNX local function body, so the rewritten model runs in ONNX Runtime and `rewrite verify`
passes (`fusegraph.subgraph_functions`)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from fusegraph import Const, Rule, rewrite, tagged
from fusegraph.verify import make_inputs, run
from fusegraph.verify.testing import make_model

F = np.float32
RULES = '''
from fusegraph import Attr, Const, Rule

def linear_relu(op, x, w, b):
    return op.Relu(op.Add(op.MatMul(x, w), b))

def linear_relu_op(op, x, w, b):
    return op.LinearRelu(x, w, b, _domain="my.ops")

def half_softmax(op, x):
    return op.Softmax(op.Mul(x, Const(0.5)), axis=Attr("axis"))

def half_softmax_op(op, x, axis):
    return op.HalfSoftmax(x, axis=axis, _domain="my.ops")

def add_relu_neg(op, x, y):
    s = op.Add(x, y)
    return op.Relu(s), op.Neg(s)

def add_relu_neg_op(op, x, y):
    return op.AddReluNeg(x, y, _domain="my.ops", _outputs=2)

RULES = [Rule("mine.linear_relu", linear_relu, linear_relu_op),
         Rule("mine.half_softmax", half_softmax, half_softmax_op),
         Rule("mine.add_relu_neg", add_relu_neg, add_relu_neg_op)]
'''


def node(op, ins, outs, **attrs):
    return helper.make_node(op, ins, outs, **attrs)


def user_model() -> onnx.ModelProto:
    """Every user rule above, once each, with two Softmax axes (one function must serve both)."""
    rng = np.random.default_rng(0)
    return make_model(
        [node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["a"]), node("Relu", ["a"], ["r"]),
         node("Mul", ["r", "half"], ["h"]), node("Softmax", ["h"], ["p0"], axis=0),
         node("Mul", ["p0", "half"], ["h1"]), node("Softmax", ["h1"], ["p1"], axis=1),
         node("Add", ["p0", "p1"], ["s"]), node("Relu", ["s"], ["y"]), node("Neg", ["s"], ["z"])],
        {"x": (F, [3, 8])}, {"y": (F, [3, 4]), "z": (F, [3, 4])},
        {"w": rng.standard_normal((8, 4)).astype(F), "b": rng.standard_normal(4).astype(F),
         "half": np.array(0.5, F)})


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusegraph.cli", *args], capture_output=True, text=True)


def test_rule_file_fusions_into_user_ops_run_and_verify(tmp_path):
    src, out, rules = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "mine.py"
    onnx.save(user_model(), str(src))
    rules.write_text(RULES)
    done = cli(str(src), "-o", str(out), "--rule-file", str(rules), "--rules", "mine.*", "--verify")
    assert done.returncode == 0, done.stderr
    fused = onnx.load(str(out))
    onnx.checker.check_model(fused, full_check=True)
    assert sorted(n.op_type for n in fused.graph.node) == ["AddReluNeg", "HalfSoftmax", "HalfSoftmax", "LinearRelu"]
    bodies = {f.name: f for f in fused.functions}
    assert set(bodies) == {"AddReluNeg", "HalfSoftmax", "LinearRelu"}
    # the captured attribute is the function's: one body serves axis 0 and axis 1
    assert list(bodies["HalfSoftmax"].attribute) == ["axis"]
    softmax = next(n for n in bodies["HalfSoftmax"].node if n.op_type == "Softmax")
    assert [(a.name, a.ref_attr_name) for a in softmax.attribute] == [("axis", "axis")]
    assert (list(bodies["AddReluNeg"].input), len(bodies["AddReluNeg"].output)) == (["x", "y"], 2)
    assert [n.op_type for n in bodies["LinearRelu"].node] == ["MatMul", "Add", "Relu"]
    feeds = make_inputs(user_model())
    want, got = run(user_model(), feeds), run(fused, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)
    checked = cli("verify", str(src), str(out))
    assert checked.returncode == 0 and "ok" in checked.stdout, checked.stdout + checked.stderr


def test_bodies_that_differ_are_overloads_of_one_op():
    """A tagged alternative fused into one op name: each branch's subgraph is a body of its own,
    and each node names the one it computes."""
    rule = Rule("mark", lambda op, x: tagged("act", {"Relu": op.Relu(op.Neg(x)), "Tanh": op.Tanh(op.Neg(x))}),
                lambda op, x, act: op.Marked(x, kind=act, _domain="test"))
    model = make_model([node("Neg", ["x"], ["n"]), node("Relu", ["n"], ["r"]),
                        node("Neg", ["r"], ["n2"]), node("Tanh", ["n2"], ["y"])],
                       {"x": (F, [2, 3])}, {"y": (F, [2, 3])})
    out = rewrite(model, [rule])
    onnx.checker.check_model(out, full_check=True)
    calls = sorted(n.overload for n in out.graph.node)
    assert calls == ["", "v2"] and out.ir_version >= 10
    assert sorted((f.overload, tuple(n.op_type for n in f.node)) for f in out.functions) == [
        ("", ("Neg", "Relu")), ("v2", ("Neg", "Tanh"))]
    feeds = make_inputs(model)
    np.testing.assert_allclose(run(out, feeds)["y"], run(model, feeds)["y"], rtol=1e-6)


def test_a_replacement_that_is_not_the_op_alone_gets_no_body():
    """The op's value reshaped after it is not what the pattern computed: no body is guessed."""
    rule = Rule("flat", lambda op, x: op.Relu(x),
                lambda op, x: op.Reshape(op.Flat(x, _domain="test"), op.const(np.array([2, 3]))))
    model = make_model([node("Relu", ["x"], ["y"])], {"x": (F, [2, 3])}, {"y": (F, [2, 3])})
    out = rewrite(model, [rule])
    assert [n.op_type for n in out.graph.node] == ["Flat", "Reshape"] and not out.functions


@pytest.mark.parametrize("value", [0.25, 0.75])
def test_a_constant_inside_the_match_is_part_of_the_body(value):
    rule = Rule("scaled", lambda op, x: op.Mul(x, Const(name="c")), lambda op, x: op.Scaled(x, _domain="test"))
    model = make_model([node("Mul", ["x", "c"], ["y"])], {"x": (F, [4])}, {"y": (F, [4])},
                       {"c": np.array(value, F)})
    out = rewrite(model, [rule])
    (fn,) = out.functions
    assert [n.op_type for n in fn.node] == ["Constant", "Mul"]
    feeds = {"x": np.arange(4, dtype=F)}
    np.testing.assert_array_equal(run(out, feeds)["y"], feeds["x"] * F(value))


def test_a_model_s_own_function_stays():
    """A model that already defines the op keeps its body."""
    rule = Rule("mine", lambda op, x: op.Neg(x), lambda op, x: op.Negate(x, _domain="test"))
    model = make_model([node("Neg", ["x"], ["y"])], {"x": (F, [4])}, {"y": (F, [4])})
    theirs = helper.make_function("test", "Negate", ["X"], ["Y"], [node("Neg", ["X"], ["Y"])],
                                  [helper.make_opsetid("", 17)])
    model.functions.append(theirs)
    model.opset_import.append(helper.make_opsetid("test", 1))
    out = rewrite(model, [rule])
    assert [f.SerializeToString() for f in out.functions] == [theirs.SerializeToString()]


def test_a_user_op_fused_again_keeps_its_body_inside_the_new_one():
    """A later rule that takes a user op into its own match: the inner op's function stays, as
    the outer body calls it."""
    inner = Rule("inner", lambda op, x: op.Neg(op.Relu(x)), lambda op, x: op.NegRelu(x, _domain="test"), priority=2)
    outer = Rule("outer", lambda op, x: op.Exp(op.NegRelu(x, _domain="test")),
                 lambda op, x: op.ExpNegRelu(x, _domain="test"), priority=1)
    model = make_model([node("Relu", ["x"], ["r"]), node("Neg", ["r"], ["n"]), node("Exp", ["n"], ["y"])],
                       {"x": (F, [2, 3])}, {"y": (F, [2, 3])})
    out = rewrite(model, [inner, outer])
    onnx.checker.check_model(out, full_check=True)
    assert [n.op_type for n in out.graph.node] == ["ExpNegRelu"]
    assert sorted(f.name for f in out.functions) == ["ExpNegRelu", "NegRelu"]
    feeds = make_inputs(model)
    np.testing.assert_allclose(run(out, feeds)["y"], run(model, feeds)["y"], rtol=1e-6)
