"""The one graph builder (fusegraph.graph_builder): names that never collide, constants in both
exporter forms, models that pass the full checker and run, and the function-body builder's If
branches kept apart."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from fusegraph.graph_builder import GraphBuilder, element_type
from fusegraph.ops.fused_ops import Attribute, Body, FusedOp
from fusegraph.verify.testing import make_model, node


def _run(model: onnx.ModelProto, **feeds: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _names(graph: onnx.GraphProto) -> list[str]:
    """Every value a node of `graph` or of its subgraphs writes."""
    out = []
    for n in graph.node:
        out += list(n.output)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out += _names(a.g)
    return out


def test_fresh_names_are_unique_across_ops_constants_and_weights():
    b = GraphBuilder(const_nodes=True)
    made = [b.const(1.0), b.weight([1.0]), b.ints(1, 2), b.fresh("c"), b.fresh("c_1")]
    made += [b.op("Relu", "x"), *b.op("Split", "x", outputs=3, axis=0), b.op("Relu", "x")]
    assert len(set(made)) == len(made), made


def test_fresh_names_avoid_every_name_the_builder_has_seen():
    """A hint plus a counter is not enough: the graph's own names (an input, a value an op reads
    or writes by name) may look like generated ones."""
    b = GraphBuilder()
    b.input("relu_1", [2])
    b.op("Neg", "c_2", outputs="neg_3")
    taken = {"relu_1", "c_2", "neg_3"}
    assert b.op("Relu", "relu_1") not in taken
    assert b.const(0.5) not in taken
    assert b.op("Neg", "x") not in taken


def test_op_returns_one_name_or_the_list():
    b = GraphBuilder()
    assert isinstance(b.op("Relu", "x"), str)
    assert b.op("Relu", "x", outputs="y") == "y"
    assert len(b.op("Split", "x", outputs=2, axis=0)) == 2
    assert b.op("Identity", "x", outputs=["z"]) == ["z"]
    assert b.add("Relu", ["x"]) == [b.nodes[-1].output[0]]


@pytest.mark.parametrize("const_nodes", [False, True])
def test_constants_as_initializers_or_constant_nodes(const_nodes):
    b = GraphBuilder(np.float16, const_nodes=const_nodes)
    half, axes, w = b.const(0.5), b.ints(0, 1), b.weight(np.eye(2))
    constant_nodes = {n.output[0]: n for n in b.nodes if n.op_type == "Constant"}
    initializers = {t.name: t for t in b.initializers}
    assert set(constant_nodes) == ({half, axes} if const_nodes else set())
    assert set(initializers) == ({w} if const_nodes else {half, axes, w})  # a weight is always an initializer
    tensors = {**initializers, **{k: n.attribute[0].t for k, n in constant_nodes.items()}}
    assert tensors[half].data_type == onnx.TensorProto.FLOAT16  # the builder's type by default
    assert tensors[axes].data_type == onnx.TensorProto.INT64
    assert numpy_helper.to_array(tensors[axes]).tolist() == [0, 1]
    assert tensors[w].data_type == onnx.TensorProto.FLOAT16


@pytest.mark.parametrize("const_nodes", [False, True])
def test_a_model_passes_the_full_checker_and_runs(const_nodes):
    b = GraphBuilder(const_nodes=const_nodes)
    y = b.op("Add", b.op("MatMul", "x", b.weight(np.full((4, 3), 0.5))), b.const([1.0, 2.0, 3.0]))
    i = b.cast(y, np.int64)
    model = b.model({"x": ["batch", 4]}, {y: ["batch", 3], i: (np.int64, ["batch", 3])}, opset=18)
    onnx.checker.check_model(model, full_check=True)
    x = np.ones((5, 4), np.float32)
    got_y, got_i = _run(model, x=x)
    np.testing.assert_allclose(got_y, x @ np.full((4, 3), 0.5) + [1, 2, 3])
    assert got_i.dtype == np.int64


def test_model_specs_symbolic_dims_unknown_shapes_and_untyped_values():
    b = GraphBuilder(np.float16)
    y = b.op("Relu", "x")
    model = b.model({"x": ["batch", 8], "k": (onnx.TensorProto.INT64, [2])}, {y: None}, opset=17, ir_version=8)
    x, k = model.graph.input
    assert [d.dim_param or d.dim_value for d in x.type.tensor_type.shape.dim] == ["batch", 8]
    assert x.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16  # a bare shape: the builder's type
    assert k.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert not model.graph.output[0].HasField("type")
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]


def test_inputs_declared_on_the_way_come_first():
    b = GraphBuilder()
    b.input("a", [2])
    model = b.model({"b": [2]}, {b.op("Add", "a", "b"): [2]}, opset=18)
    assert [i.name for i in model.graph.input] == ["a", "b"]
    onnx.checker.check_model(model, full_check=True)


def test_custom_domains_are_imported():
    b = GraphBuilder()
    y = b.op("Swish", b.op("Relu", "x"), domain="my.ops", alpha=1.0)
    b.op("Gelu", y, domain="com.microsoft")
    model = b.model({"x": [2]}, {y: [2]}, opset=18, domains={"com.microsoft": 1, "extra": 2})
    assert [(o.domain, o.version) for o in model.opset_import] == [
        ("", 18), ("com.microsoft", 1), ("extra", 2), ("my.ops", 1)]
    assert model.graph.node[1].domain == "my.ops"
    onnx.checker.check_model(model)  # every node's domain is imported


def test_make_model_imports_only_the_default_domain():
    """Tests of custom-domain nodes add the import themselves; one more would be a duplicate."""
    model = make_model([node("Foo", ["x"], ["y"], domain="my.ops")], {"x": ("float32", [2])},
                       {"y": ("float32", None)}, {"w": np.ones(2, np.float32)}, opset=18)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    assert model.ir_version == 10 and [t.name for t in model.graph.initializer] == ["w"]


@pytest.mark.parametrize("opset", [17, 18])
def test_reduce_mean_writes_axes_as_the_opset_wants(opset):
    b = GraphBuilder(const_nodes=True)
    y = b.reduce_mean("x", [-1], opset)
    reduce = b.nodes[-1]
    assert (len(reduce.input) == 2) == (opset >= 18)
    model = b.model({"x": [2, 3]}, {y: [2, 1]}, opset)
    onnx.checker.check_model(model, full_check=True)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(_run(model, x=x)[0], x.mean(-1, keepdims=True))


def test_a_builder_without_an_element_type_wants_one_named():
    b = GraphBuilder(None)
    with pytest.raises(ValueError, match="give the constant's dtype"):
        b.const(1.0)
    assert b.const(1.0, np.float64)
    with pytest.raises(ValueError, match="dtype, shape"):
        b.model({"x": [2]}, {}, opset=18)


def test_element_type_reads_onnx_and_numpy_spellings():
    assert element_type(onnx.TensorProto.BFLOAT16) == onnx.TensorProto.BFLOAT16
    assert element_type(np.float16) == element_type("float16") == onnx.TensorProto.FLOAT16


def _choice_op(then_builds_nothing: bool) -> FusedOp:
    def body(b: Body, opset: int) -> None:
        # Both branches build the same ops from the same names: only fresh names keep them apart.
        then = (lambda: "X") if then_builds_nothing else (lambda: b.op("Neg", b.op("Abs", "X")))
        chosen = b.if_attr("negate", then, lambda: b.op("Abs", b.op("Neg", "X")))
        b.op("Mul", chosen, b.const_like(2.0, "X"), outputs="Y")
    return FusedOp("Choice", ("X",), ("Y",), body, "Y = 2 * (negate ? -|X| : |X|)",
                   (Attribute("negate", "int", 0),))


@pytest.mark.parametrize("then_builds_nothing", [False, True])
def test_if_attr_branch_names_never_collide(then_builds_nothing):
    function = _choice_op(then_builds_nothing).function(18)
    names = [o for n in function.node for o in n.output]
    for n in function.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names += _names(a.g)
                assert len(a.g.node) >= 1  # a branch computes its output, an Identity at least
    assert len(names) == len(set(names)), names
    assert not set(names) & {"X"}
    model = helper.make_model(
        helper.make_graph([helper.make_node("Choice", ["x"], ["y0"], domain="fusegraph", negate=0),
                           helper.make_node("Choice", ["x"], ["y1"], domain="fusegraph", negate=1)], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, [3]) for y in ("y0", "y1")]),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("fusegraph", 1)], functions=[function])
    onnx.checker.check_model(model, full_check=True)
    x = np.array([-1.5, 0.0, 2.0], np.float32)
    y0, y1 = _run(model, x=x)
    np.testing.assert_allclose(y0, 2 * np.abs(x))
    np.testing.assert_allclose(y1, 2 * (x if then_builds_nothing else -np.abs(x)))


def test_function_bodies_are_constant_nodes_of_named_types():
    """A function has no initializers: Body's constants are Constant nodes, each of its own type."""
    b = Body(onnx.TensorProto.FLOAT16)
    assert b.const_nodes and b.dtype == onnx.TensorProto.FLOAT16
    b.const_like(0.5, "X")
    b.ints(3)
    assert not b.initializers
    assert [n.op_type for n in b.nodes] == ["Constant", "Cast", "Constant"]
    assert b.nodes[0].attribute[0].t.data_type == onnx.TensorProto.DOUBLE  # rounded once, from float64
