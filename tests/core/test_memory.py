"""A rewrite never holds a second copy of the model: not for shape inference, not for saving.

Weights make up most of a model file, so a whole-model copy shows up as a Python `bytes` the
size of the file: `onnx.shape_inference.infer_shapes` serializes what it is given and returns
an inferred copy, `SerializeToString` builds the file before writing it. The model and the
IR's protos live in upb's memory (tracemalloc does not see them); what tracemalloc sees is
those copies and the IR's own objects. Counted in bytes against the model's weights, never in
seconds (benchmarks/RESULTS.md §1.1 has the process's resident peak on deep Llamas).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
from google.protobuf import unknown_fields
from onnx import TensorProto, helper, numpy_helper

import fusegraph.api as api
from fusegraph.ir import Graph, infer_types, write_inferred_types
from fusegraph.model_io import _write
from fusegraph.serialize import serialized
from fusegraph.verify.testing import op_counts

LAYERS = 32
WIDTH = 256  # 32 weights of 256 x 256 floats: 8 MiB, far more than the graph


def deep_model(layers: int = LAYERS, width: int = WIDTH) -> onnx.ModelProto:
    """Layers of MatMul + Add + Relu (each fused), read through a no-op Cast and a computed
    no-op Reshape (canonicalized away, so the graph is typed again), no value_info (the types
    come from inference)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], [numpy_helper.from_array(np.array([0], np.int64), "zero"),
                        numpy_helper.from_array(np.array([1], np.int64), "one")]
    x = "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) * 0.05, f"w{i}"))
        inits.append(numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), f"b{i}"))
        nodes += [helper.make_node("Cast", [x], [f"c{i}"], to=TensorProto.FLOAT),
                  helper.make_node("Shape", [f"c{i}"], [f"s{i}"]),
                  helper.make_node("Slice", [f"s{i}", "zero", "one"], [f"rows{i}"]),
                  helper.make_node("Gather", [f"s{i}", "one"], [f"cols{i}"], axis=0),
                  helper.make_node("Concat", [f"rows{i}", f"cols{i}"], [f"shape{i}"], axis=0),
                  helper.make_node("Reshape", [f"c{i}", f"shape{i}"], [f"r{i}"]),
                  helper.make_node("MatMul", [f"r{i}", f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"y{i}"])]
        x = f"y{i}"
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [4, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_rewrite_file_never_copies_the_model(tmp_path, monkeypatch):
    """From the model loaded to the output written, nothing the size of the model is made:
    the Python peak (the IR, inference's reduced model, one serialized piece at a time) stays
    under half the weights, where one inference on the whole model (its bytes in, an inferred
    copy out) or one `SerializeToString` for saving would by itself pass the whole of them."""
    src, dst = str(tmp_path / "deep.onnx"), str(tmp_path / "out.onnx")
    onnx.save(deep_model(), src)
    api.rewrite_file(src, str(tmp_path / "warm.onnx"))  # imports and per-process caches first
    weights = LAYERS * WIDTH * WIDTH * 4
    inferred_sizes = []
    infer = onnx.shape_inference.infer_shapes

    def counting(model, *args, **kwargs):
        inferred_sizes.append(len(model) if isinstance(model, bytes) else model.ByteSize())
        return infer(model, *args, **kwargs)
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", counting)
    load = api.load_checked

    def loaded_then_counted(path):
        result = load(path)
        tracemalloc.reset_peak()  # onnx.load reads the file into one bytes: the input, not a copy
        return result
    monkeypatch.setattr(api, "load_checked", loaded_then_counted)
    tracemalloc.start()
    try:
        report = api.rewrite_file(src, dst)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.per_rule["gemm_epilogue.matmul_act"] == LAYERS
    assert report.canonicalized["remove_noops"] >= LAYERS  # the graph was rebuilt and typed again
    assert len(inferred_sizes) >= 2  # as loaded, and canonical
    assert max(inferred_sizes) < weights / 8, inferred_sizes  # inference never sees a weight
    assert peak < weights / 2, f"Python peak {peak / 2**20:.1f} MiB for {weights / 2**20:.0f} MiB of weights"
    out = onnx.load(dst)
    onnx.checker.check_model(out, full_check=True)
    assert op_counts(out)["fusegraph.MatMulBiasRelu"] == LAYERS
    kept = {t.name: t.raw_data for t in out.graph.initializer}
    assert all(kept[t.name] == t.raw_data for t in onnx.load(src).graph.initializer if t.name in kept and t.dims)


def model_of_every_kind() -> onnx.ModelProto:
    """Fields a writer could drop or reorder: an If with bodies, a local function, a sparse
    initializer, a Constant weight, metadata, doc strings, value_info."""
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    fn = helper.make_function("local", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.5], np.float32), "sp"),
                                       numpy_helper.from_array(np.array([3], np.int64)), [2, 4])
    nodes = [helper.make_node("Constant", [], ["cw"], value=numpy_helper.from_array(np.ones((8, 4), np.float32))),
             helper.make_node("Add", ["x", "sp"], ["xs"]),
             helper.make_node("MatMul", ["xs", "cw"], ["mm"], doc_string="a weight in a Constant"),
             helper.make_node("ReduceSum", ["mm"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=other),
             helper.make_node("Twice", ["z"], ["y"], domain="local")]
    graph = helper.make_graph(nodes, "every", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                               numpy_helper.from_array(np.ones((4, 4), np.float32), "unused_weight")],
                              doc_string="graph doc", sparse_initializer=[sparse],
                              value_info=[helper.make_tensor_value_info("mm", TensorProto.FLOAT, [2, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[fn], ir_version=9, producer_name="test", doc_string="model doc")
    helper.set_model_props(model, {"k": "v", "fusegraph.fusions": "[]"})
    return model


@pytest.mark.parametrize("model", [model_of_every_kind(), deep_model(layers=2, width=8)], ids=["every-kind", "deep"])
def test_the_pieces_are_the_serialized_model(model, tmp_path):
    assert b"".join(serialized(model)) == model.SerializeToString()
    _write(str(tmp_path / "m.onnx"), model)
    assert open(tmp_path / "m.onnx", "rb").read() == model.SerializeToString()


def test_a_model_with_fields_onnx_does_not_know_keeps_them():
    """A field of a newer onnx (unknown here) at the model's or the graph's level is written
    back as read."""
    model = model_of_every_kind()
    raw = model.SerializeToString() + b"\xf8\x07\x01"  # field 127, a varint
    read = onnx.ModelProto()
    read.ParseFromString(raw)
    assert unknown_fields.UnknownFieldSet(read)
    assert b"".join(serialized(read)) == read.SerializeToString() == raw


def test_inference_without_the_weights_types_as_inference_with_them():
    """The reduced model (weights as their types) infers what the whole one does: in place
    byte for byte (bodies of the If included), and with data propagation through shapes."""
    model = model_of_every_kind()
    expected = onnx.shape_inference.infer_shapes(model)
    typed = onnx.ModelProto()
    typed.CopyFrom(model)
    write_inferred_types(typed)
    assert typed.SerializeToString() == expected.SerializeToString()
    deep = deep_model(layers=3, width=8)
    full = onnx.shape_inference.infer_shapes(deep, data_prop=True).graph.value_info
    assert list(infer_types(deep).graph.value_info) == list(full)
    assert Graph(deep).values["r2"].shape == (4, 8)  # through Shape/Slice/Concat into the Reshape


def test_inference_at_opset_14_leaves_the_model_at_13():
    """Opset 13's Reshape typing infers at 14 (canonicalize), on the reduced copy: the model
    keeps its own opset import."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["t"]), helper.make_node("Relu", ["t"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
                                           helper.make_tensor_value_info("shape", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    out, report = api.rewrite_with_report(model)
    assert report.canonicalized["prove_shapes"] == 1
    assert [(o.domain, o.version) for o in out.opset_import] == [("", 13)]
    onnx.checker.check_model(out, full_check=True)


def test_export_moves_the_protos_it_keeps():
    """`to_model` keeps the NodeProtos of the nodes that stay unchanged (the same objects,
    reordered and cut in place, not copied), and the IR's protos are the model's after it."""
    model = deep_model(layers=2, width=8)
    graph = Graph(model)
    for node in list(graph.by_op[("", "Cast")]):
        graph.replace_uses(node.outputs[0], node.inputs[0])  # touches the readers: rebuilt
    graph.remove_dead()
    unchanged = {id(n.proto) for n in graph.live_nodes() if n.proto is not None}
    out = graph.to_model()
    assert unchanged and unchanged < {id(p) for p in out.graph.node}
    assert [n.op_type for n in out.graph.node].count("Cast") == 0
    assert all(n.proto is p for n, p in zip(graph.live_nodes(), out.graph.node))
    onnx.checker.check_model(out, full_check=True)
