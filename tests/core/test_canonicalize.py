"""Canonicalization before matching: each step on small graphs, then the whole real corpus.

Every canonical model must pass the full checker, keep its graph inputs and outputs, and compute
exactly what the original computes in ONNX Runtime (no ORT graph rewrites, compared bit for bit).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fusegraph.api import rewrite_with_report
from fusegraph.canonicalize import MAX_FOLD_ELEMENTS, canonicalize
from fusegraph.cli import main
from fusegraph.ir import Graph
from fusegraph.verify.testing import make_model, manifest_feeds, node, op_counts
from fusegraph.verify import make_inputs, run

F = np.float32
I64 = np.int64
MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
MANIFEST = json.loads((MODELS / "MANIFEST.json").read_text())["models"] if (MODELS / "MANIFEST.json").exists() else {}
NAMES = sorted(n for n in MANIFEST if (MODELS / n).exists())


def canonical(model: onnx.ModelProto, feeds: dict | None = None, run=run):
    """Canonicalize alone (no rules) and assert the result is valid and exactly equal (in ONNX
    Runtime, or in `run`)."""
    out, report = rewrite_with_report(model, [])
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    feeds = make_inputs(model, None) if feeds is None else feeds
    want, got = run(model, feeds), run(out, feeds)
    for name in want:
        assert want[name].dtype == got[name].dtype and want[name].shape == got[name].shape, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    return out, report.canonicalized


def reference_run(model: onnx.ModelProto, feeds: dict) -> dict:
    from onnx.reference import ReferenceEvaluator
    names = [o.name for o in model.graph.output]
    return dict(zip(names, ReferenceEvaluator(model).run(None, feeds)))


def const(name: str, value, dtype=I64) -> onnx.NodeProto:
    return node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype)))


# -- folding ----------------------------------------------------------------------------------
def static_mask_model() -> onnx.ModelProto:
    """Issue 11, item 1: a batch-1 static export's mask Expand, whose shape is a Where over
    constants, `Where(Equal(C, Mul(ConstantOfShape([4]), -1)), ConstantOfShape(...), C)`."""
    nodes = [
        const("C", [1, -1, 4, 4]), const("four", [4]), const("minus1", -1),
        node("ConstantOfShape", ["four"], ["ones"], value=numpy_helper.from_array(np.array([1], I64))),
        node("Mul", ["ones", "minus1"], ["neg"]), node("Equal", ["C", "neg"], ["is_free"]),
        node("Where", ["is_free", "ones", "C"], ["shape"]),
        node("Expand", ["keep", "shape"], ["mask"]),
        node("Where", ["mask", "scores", "fill"], ["y"]),
    ]
    return make_model(nodes, {"scores": (F, [1, 2, 4, 4]), "keep": (np.bool_, [4, 4])}, {"y": (F, [1, 2, 4, 4])},
                      {"fill": np.array(-1e4, F)})


def test_shape_computed_from_constants_folds_and_types_the_mask_statically():
    model = static_mask_model()
    out, steps = canonical(model)
    assert steps["fold_constants"] == 4
    counts = op_counts(out)
    assert counts["ConstantOfShape"] == counts["Equal"] == counts["Mul"] == 0 and counts["Where"] == 1
    expand = next(n for n in out.graph.node if n.op_type == "Expand")
    shape = next(t for t in out.graph.initializer if t.name == expand.input[1])
    assert numpy_helper.to_array(shape).tolist() == [1, 1, 4, 4]
    # what the rules see: the mask is [1, 1, 4, 4] now, not [?, ?, 4, 4]
    assert Graph(model).value("mask").shape[:2] != (1, 1)
    assert canonicalize(Graph(model)).graph.value("mask").shape == (1, 1, 4, 4)


def test_nothing_reading_or_making_a_large_tensor_is_folded():
    big = MAX_FOLD_ELEMENTS + 1
    nodes = [node("Transpose", ["w"], ["wt"], perm=[1, 0]), node("MatMul", ["x", "wt"], ["y"]),
             const("big_shape", [big]),
             node("ConstantOfShape", ["big_shape"], ["zeros"], value=numpy_helper.from_array(np.array([0], F))),
             node("Add", ["v", "zeros"], ["z"])]
    w = np.random.default_rng(0).standard_normal((big, 2)).astype(F)
    model = make_model(nodes, {"x": (F, [3, 2]), "v": (F, [big])}, {"y": (F, [3, big]), "z": (F, [big])}, {"w": w})
    out, steps = canonical(model)
    assert not steps["fold_constants"]
    assert op_counts(out)["Transpose"] == 1 and op_counts(out)["ConstantOfShape"] == 1
    assert out.ByteSize() <= model.ByteSize()


def test_an_initializer_that_is_also_a_graph_input_is_not_a_constant():
    model = make_model([node("Add", ["c", "d"], ["y"])], {"c": (F, [2])}, {"y": (F, [2])},
                       {"c": np.ones(2, F), "d": np.full(2, 2, F)})
    out, steps = canonical(model, {"c": np.array([5, 7], F)})
    assert not steps and op_counts(out)["Add"] == 1


def test_a_folded_graph_output_is_still_produced_under_its_name():
    nodes = [const("a", [1, 2]), const("b", [3]), node("Concat", ["a", "b"], ["s"], axis=0),
             node("Add", ["x", "x"], ["y"])]
    model = make_model(nodes, {"x": (F, [2])}, {"s": (I64, [3]), "y": (F, [2])})
    out, steps = canonical(model)
    assert steps["fold_constants"] == 1
    producer = next(n for n in out.graph.node if "s" in n.output)
    assert producer.op_type == "Constant"
    assert numpy_helper.to_array(producer.attribute[0].t).tolist() == [1, 2, 3]


def test_shape_of_static_dims_folds_dynamic_dims_stay():
    """Gather(Shape(x), 1) picks a static dim: folded; Gather(Shape(x), 0) picks the batch: kept."""
    nodes = [node("Shape", ["x"], ["shape"]), const("one", 1), const("zero", 0),
             node("Gather", ["shape", "one"], ["width"]), node("Gather", ["shape", "zero"], ["batch"]),
             const("minus1", [-1]), node("Unsqueeze", ["width", "zero"], ["width1"]),
             node("Concat", ["minus1", "width1"], ["target"], axis=0), node("Reshape", ["x", "target"], ["y"]),
             node("Cast", ["batch"], ["n"], to=TensorProto.INT64)]
    model = make_model(nodes, {"x": (F, ["batch", 8])}, {"y": (F, ["batch", 8]), "n": (I64, [])})
    out, steps = canonical(model, {"x": np.ones((3, 8), F)})
    assert steps["fold_shapes"] == 1 and steps["fold_constants"] == 2
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    target = next(t for t in out.graph.initializer if t.name == reshape.input[1])
    assert numpy_helper.to_array(target).tolist() == [-1, 8]
    assert op_counts(out)["Gather"] == 1  # the batch's


def test_a_shape_that_stays_computed_keeps_its_static_pieces():
    """Concat(Slice(Shape) batch, Slice(Shape) width): only the batch is dynamic, and folding the
    width alone would only respell the computation; it is kept as exported."""
    nodes = [node("Shape", ["x"], ["shape"]), const("s0", [0]), const("s1", [1]), const("s2", [2]),
             node("Slice", ["shape", "s0", "s1"], ["b"]), node("Slice", ["shape", "s1", "s2"], ["w"]),
             node("Concat", ["b", "w"], ["target"], axis=0), node("Reshape", ["x", "target"], ["y"])]
    model = make_model(nodes, {"x": (F, ["batch", 8])}, {"y": (F, ["batch", 8])})
    out, steps = canonical(model, {"x": np.ones((2, 8), F)})
    assert not steps["fold_shapes"] and op_counts(out)["Slice"] == 2


def test_float_sums_are_not_folded():
    """ReduceSum's float rounding depends on its order: left to ONNX Runtime."""
    nodes = [node("ReduceSum", ["c"], ["s"], keepdims=0), node("Add", ["x", "s"], ["y"])]
    model = make_model(nodes, {"x": (F, [])}, {"y": (F, [])}, {"c": np.linspace(0.1, 1, 7).astype(F)})
    out, steps = canonical(model)
    assert not steps["fold_constants"] and op_counts(out)["ReduceSum"] == 1


def test_integer_division_by_zero_is_left_to_fail_at_run_time():
    nodes = [const("a", [6, 3]), const("b", [2, 0]), node("Div", ["a", "b"], ["q"]), node("Add", ["x", "q"], ["y"])]
    model = make_model(nodes, {"x": (I64, [2])}, {"y": (I64, [2])})
    out, report = rewrite_with_report(model, [])
    assert not report.canonicalized["fold_constants"] and op_counts(out)["Div"] == 1


def test_values_read_by_a_subgraph_keep_their_names():
    body = helper.make_graph([node("Identity", ["s"], ["out"])], "body", [],
                             [helper.make_tensor_value_info("out", TensorProto.INT64, [2])])
    nodes = [const("a", [1, 2]), const("b", [3, 4]), node("Add", ["a", "b"], ["s"]),
             node("If", ["cond"], ["y"], then_branch=body, else_branch=body)]
    model = make_model(nodes, {"cond": (np.bool_, [])}, {"y": (I64, [2])})
    out, steps = canonical(model, {"cond": np.array(True)})
    assert not steps["fold_constants"] and op_counts(out)["Add"] == 1


# -- no-ops -----------------------------------------------------------------------------------
@pytest.mark.parametrize("op_nodes", [
    [node("Identity", ["x"], ["t"])],
    [node("Cast", ["x"], ["t"], to=TensorProto.FLOAT)],
    [const("shape", [2, 3]), node("Reshape", ["x", "shape"], ["t"])],
    [const("shape", [0, -1]), node("Reshape", ["x", "shape"], ["t"])],
    [const("shape", [1, 3]), node("Expand", ["x", "shape"], ["t"])],
    [const("one", 1.0, F), node("Mul", ["one", "x"], ["t"])],
    [const("one", [[1.0]], F), node("Div", ["x", "one"], ["t"])],
], ids=["identity", "cast", "reshape", "reshape_0_-1", "expand", "mul_1", "div_1"])
def test_noop_is_removed(op_nodes):
    model = make_model([*op_nodes, node("Neg", ["t"], ["y"])], {"x": (F, [2, 3])}, {"y": (F, [2, 3])})
    out, steps = canonical(model)
    assert steps["remove_noops"] == 1
    assert [n.op_type for n in out.graph.node] == ["Neg"] and out.graph.node[0].input[0] == "x"


@pytest.mark.parametrize("op_nodes,y,why", [
    ([const("zero", 0.0, F), node("Add", ["x", "zero"], ["t"])], (F, [2, 3]), "x + 0 turns -0.0 into +0.0"),
    ([node("Cast", ["x"], ["t"], to=TensorProto.FLOAT16)], (np.float16, [2, 3]), "a real Cast"),
    ([const("one", [[[1.0]]], F), node("Mul", ["x", "one"], ["t"])], (F, [1, 2, 3]), "broadcasting grows x's rank"),
    ([const("shape", [2, 2, 3]), node("Expand", ["x", "shape"], ["t"])], (F, [2, 2, 3]), "Expand grows x"),
    ([const("shape", [3, 2]), node("Reshape", ["x", "shape"], ["t"])], (F, [3, 2]), "a real Reshape"),
    ([node("Mul", ["x", "gamma"], ["t"])], (F, [2, 3]), "a weight of ones is a weight"),
], ids=["add_0", "cast", "mul_broadcast", "expand_grows", "reshape", "weight_of_ones"])
def test_not_a_noop_stays(op_nodes, y, why):
    model = make_model([*op_nodes, node("Neg", ["t"], ["y"])], {"x": (F, [2, 3])}, {"y": y},
                       {"gamma": np.ones(3, F)})
    out, steps = canonical(model, {"x": np.array([[-0.0, 1, 2], [3, 4, 5]], F)})
    assert not steps["remove_noops"], why
    assert op_counts(out)[op_nodes[-1].op_type] == 1


def test_an_identity_producing_a_graph_output_stays():
    model = make_model([node("Identity", ["x"], ["y"])], {"x": (F, [2])}, {"y": (F, [2])})
    out, steps = canonical(model)
    assert not steps and [n.op_type for n in out.graph.node] == ["Identity"]


# -- common subexpressions --------------------------------------------------------------------
def test_two_casts_of_one_value_become_one():
    """Issue 11, item 5: one value read through two separate Casts (no-op Casts go as no-ops)."""
    nodes = [node("Cast", ["x"], ["a"], to=TensorProto.FLOAT16), node("Cast", ["x"], ["b"], to=TensorProto.FLOAT16),
             node("Add", ["a", "b"], ["y"])]
    model = make_model(nodes, {"x": (F, [2, 3])}, {"y": (np.float16, [2, 3])})
    out, steps = canonical(model)
    assert steps["cse"] == 1 and op_counts(out)["Cast"] == 1
    add = next(n for n in out.graph.node if n.op_type == "Add")
    assert add.input[0] == add.input[1]


def test_equal_constants_make_equal_operands():
    nodes = [const("k1", [2.0], F), const("k2", [2.0], F), node("Mul", ["x", "k1"], ["a"]),
             node("Mul", ["x", "k2"], ["b"]), node("Sub", ["a", "b"], ["y"])]
    model = make_model(nodes, {"x": (F, [3])}, {"y": (F, [3])})
    out, steps = canonical(model)
    assert steps["cse"] == 2 and op_counts(out)["Mul"] == 1 and op_counts(out)["Constant"] == 1


@pytest.mark.parametrize("first,second,dtypes", [
    (node("Softmax", ["x"], ["a"], axis=0), node("Softmax", ["x"], ["b"], axis=1), (F, F)),
    (node("Cast", ["x"], ["a"], to=TensorProto.FLOAT16), node("Cast", ["x"], ["b"], to=TensorProto.DOUBLE),
     (np.float16, np.float64)),
], ids=["different_axis", "different_to"])
def test_cse_keeps_nodes_that_differ(first, second, dtypes):
    model = make_model([first, second], {"x": (F, [2, 3])}, {"a": (dtypes[0], [2, 3]), "b": (dtypes[1], [2, 3])})
    out, steps = canonical(model)
    assert not steps and op_counts(out)[first.op_type] == 2


def test_cse_keeps_random_ops():
    nodes = [node("RandomNormalLike", ["x"], ["a"]), node("RandomNormalLike", ["x"], ["b"]),
             node("Sub", ["a", "b"], ["y"])]
    model = make_model(nodes, {"x": (F, [2, 3])}, {"y": (F, [2, 3])})
    out, report = rewrite_with_report(model, [])
    assert not report.canonicalized and op_counts(out)["RandomNormalLike"] == 2


# -- the switch -------------------------------------------------------------------------------
def test_canonicalize_false_leaves_the_graph_as_exported():
    model = static_mask_model()
    out, report = rewrite_with_report(model, [], canonicalize=False)
    assert not report.canonicalized and op_counts(out) == op_counts(model)


def test_cli_reports_the_steps_and_can_turn_them_off(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnx.save(static_mask_model(), src)
    assert main([str(src), "-o", str(tmp_path / "a.onnx"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "canonicalized:" in text and "fold_constants" in text
    assert main([str(src), "-o", str(tmp_path / "b.onnx"), "--no-progress", "--no-canonicalize", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["canonicalized"] == {}
    assert op_counts(onnx.load(tmp_path / "b.onnx")) == op_counts(static_mask_model())


# -- the real corpus --------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_real_export_canonicalized_is_equal_and_not_larger(name):
    model = onnx.load(MODELS / name)
    # An export ONNX Runtime's CPU provider can't run (bfloat16 Mul) is compared in onnx.reference.
    runs_in_ort = not str(MANIFEST[name].get("checks", {}).get("ort", "ok")).startswith("FAIL")
    out, _ = canonical(model, manifest_feeds(MANIFEST[name]), run if runs_in_ort else reference_run)
    assert out.ByteSize() <= 1.01 * model.ByteSize()


# -- issue 11, item 1: batch-1 static TorchScript exports --------------------------------------
def batch_one(model: onnx.ModelProto) -> onnx.ModelProto:
    """The batch-1 static export of a batch-2 one: TorchScript bakes the batch into shape vectors
    ([2, -1, 16, 16], the mask Expand's `C`) and batch-indexed constants ([2, 1, 1, 1])."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in [*out.graph.input, *out.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        assert dims[0].dim_value == 2
        dims[0].dim_value = 1
    for n in out.graph.node:
        if n.op_type == "Constant":
            t = n.attribute[0].t
            a = numpy_helper.to_array(t)
            if a.dtype == I64 and a.ndim == 1 and a.size >= 3 and a[0] == 2:
                a = np.concatenate([[1], a[1:]]).astype(I64)
            elif a.ndim >= 2 and a.shape[0] == 2:
                a = a[:1]
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    return out


STATIC_DECODERS = [n for n in NAMES if n.endswith("-torchscript-static.onnx")
                   and MANIFEST[n]["architecture"] in ("llama", "qwen2", "mistral", "gpt2")]


@pytest.mark.parametrize("name", STATIC_DECODERS)
def test_attention_of_batch_one_static_exports_fuses_once_canonical(name):
    """The mask's Expand shape is a Where over constants; shape inference types the mask
    [?, ?, S, S] and the attention rule refuses it, unless the shape is folded first."""
    model = onnx.load(MODELS / name)
    one = batch_one(model)
    feeds = manifest_feeds(MANIFEST[name])
    feeds_one = {k: v[:1] for k, v in feeds.items()}
    rows = {k: np.concatenate([v, v]) for k, v in feeds_one.items()}
    want = run(one, feeds_one)
    for key, value in run(model, rows).items():  # the derivation is right: row 0 of batch 2
        np.testing.assert_allclose(want[key], value[:1], atol=1e-5)
    out, report = rewrite_with_report(one)
    onnx.checker.check_model(out, full_check=True)
    assert report.canonicalized["fold_constants"] > 0
    fused = op_counts(out)["fusegraph.MaskedAttention"] + op_counts(out)["fusegraph.Attention"]
    assert fused == MANIFEST[name]["expected"]["attention"]
    got = run(out, feeds_one)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-4, rtol=1e-3)
