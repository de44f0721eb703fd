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
    """Concat(Slice(Shape(x)) batch, Slice(Shape(x)) width) reshaping another value: only the
    batch is dynamic, and folding the width alone would only respell the computation; it is kept
    as exported."""
    nodes = [node("Shape", ["x"], ["shape"]), const("s0", [0]), const("s1", [1]), const("s2", [2]),
             node("Slice", ["shape", "s0", "s1"], ["b"]), node("Slice", ["shape", "s1", "s2"], ["w"]),
             node("Concat", ["b", "w"], ["target"], axis=0), node("Reshape", ["z", "target"], ["y"])]
    model = make_model(nodes, {"x": (F, ["batch", 8]), "z": (F, ["batch", 2, 4])}, {"y": (F, ["batch", 8])})
    out, steps = canonical(model, {"x": np.ones((2, 8), F), "z": np.ones((2, 2, 4), F)})
    assert not steps["fold_shapes"] and op_counts(out)["Slice"] == 2


def test_a_reshape_to_its_own_dims_reads_zeros_in_place():
    """The same target reshaping x itself: its batch element is x's own dim 0, which 0 copies;
    the target is [0, 8], and the Reshape then keeps x's shape: a no-op."""
    nodes = [node("Shape", ["x"], ["shape"]), const("s0", [0]), const("s1", [1]), const("s2", [2]),
             node("Slice", ["shape", "s0", "s1"], ["b"]), node("Slice", ["shape", "s1", "s2"], ["w"]),
             node("Concat", ["b", "w"], ["target"], axis=0), node("Reshape", ["x", "target"], ["t"]),
             node("Relu", ["t"], ["y"])]
    model = make_model(nodes, {"x": (F, ["batch", 8])}, {"y": (F, ["batch", 8])})
    out, steps = canonical(model, {"x": np.ones((2, 8), F)})
    assert steps["fold_shapes"] and steps["remove_noops"] == 1 and op_counts(out) == {"Relu": 1}


# -- issue 11, item 8: a partly known Expand shape proves the dims it fixes -------------------
def decode_mask_model(query_from: str = "one") -> onnx.ModelProto:
    """A KV-cache decode step's mask (TorchScript): `Expand(m, Where(Equal(C, -1), 1, C))` with
    `C = [batch, -1, <query>, past + 1]`; `query_from` "one" is the constant 1 the export
    writes for one query token, "q" the symbolic query length of `q`."""
    nodes = [node("Shape", ["past"], ["ps"]), const("zero", 0), const("two", 2), const("one", 1),
             const("axes", [0]), node("Gather", ["ps", "zero"], ["b"]), node("Gather", ["ps", "two"], ["p"]),
             node("Add", ["p", "one"], ["total"]), node("Unsqueeze", ["b", "axes"], ["b1"]),
             node("Unsqueeze", ["total", "axes"], ["t1"]), const("minus1", [-1]), const("four", [4]),
             node("ConstantOfShape", ["four"], ["ones"], value=numpy_helper.from_array(np.array([1], I64))),
             node("Mul", ["ones", "minus1"], ["neg"])]
    if query_from == "one":
        nodes.append(const("query", [1]))
    else:
        nodes += [node("Shape", ["q"], ["qs"]), node("Gather", ["qs", "two"], ["s"]),
                  node("Unsqueeze", ["s", "axes"], ["query"])]
    nodes += [node("Concat", ["b1", "minus1", "query", "t1"], ["C"], axis=0), node("Equal", ["C", "neg"], ["free"]),
              node("Where", ["free", "ones", "C"], ["shape"]), node("Expand", ["keep", "shape"], ["mask"]),
              node("Where", ["mask", "scores", "fill"], ["y"])]
    inputs = {"past": (F, ["batch", 2, "past_seq", 4]), "keep": (np.bool_, ["batch", 1, 1, "total_seq"]),
              "scores": (F, ["batch", 2, "q_len", "total_seq"]), "q": (F, ["batch", 2, "q_len", 4])}
    return make_model(nodes, inputs, {"y": (F, ["batch", 2, "q_len", "total_seq"])}, {"fill": np.array(-np.inf, F)})


def decode_feeds(query: int) -> dict:
    rng = np.random.default_rng(0)
    return {"past": np.zeros((2, 2, 3, 4), F), "keep": rng.random((2, 1, 1, 4)) > 0.3,
            "scores": rng.standard_normal((2, 2, query, 4)).astype(F), "q": np.zeros((2, 2, query, 4), F)}


def expand_dims(model: onnx.ModelProto) -> list:
    typed = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model, data_prop=True).graph.value_info}
    dims = typed["mask"].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def test_a_partly_known_expand_shape_proves_the_dims_it_fixes():
    """Inference cannot see through Where: the mask is [?, ?, ?, ?] and the attention rule must
    refuse a query dim that might grow one query's scores. The known elements -1 -> 1 and 1
    prove dims 1 and 2; batch and the total length stay unknown (never assumed)."""
    model = decode_mask_model()
    assert expand_dims(model)[1:3] == [None, None]
    out, steps = canonical(model, decode_feeds(1))
    assert steps["prove_shapes"] == 1
    assert expand_dims(out) == [None, 1, 1, None]
    graph = canonicalize(Graph(model)).graph
    assert graph.values["mask"].shape[1:3] == (1, 1)


def test_an_expand_shape_element_from_a_symbolic_dim_proves_nothing():
    """Near miss: the query element comes from `Shape(q)[2]`, a symbolic dim that may be 1 or
    not; its dim stays unproven (the graph still runs at 3 queries)."""
    model = decode_mask_model("q")
    out, steps = canonical(model, decode_feeds(3))
    assert expand_dims(out)[2] is None
    assert Graph(out).values["mask"].shape[2] != 1 and canonicalize(Graph(model)).graph.values["mask"].shape[2] != 1


@pytest.mark.parametrize("opset, typed", [(13, True), (12, False)])
def test_reshape_by_a_computed_shape_gets_its_rank_at_opset_13(opset, typed):
    """Opset 13's inference gives `Reshape(x, shape)` by a shape it does not know no rank (14's
    gives the shape's length, and Reshape-14 means the same); without it nothing downstream has
    one. Below 13 (Unsqueeze's axes an attribute) opset 14 would read the model differently:
    left as it is."""
    nodes = [node("Reshape", ["x", "shape"], ["t"]), node("Relu", ["t"], ["y"])]
    model = make_model(nodes, {"x": (F, ["batch", 8]), "shape": (I64, [3])}, {"y": (F, ["batch", 2, 4])}, opset=opset)
    out, steps = canonical(model, {"x": np.ones((3, 8), F), "shape": np.array([3, 2, -1], I64)})
    graph = canonicalize(Graph(model)).graph
    assert bool(steps["prove_shapes"]) == typed
    assert (graph.values["t"].rank == 3) == typed


@pytest.mark.parametrize("x, target, unknown, want", [
    ([None, 1, 1, None], [1, 1, 1, 1], [1, 0, 0, 1], [None, 1, 1, None]),   # 1 keeps x's dim
    ([None, 1, 1, None], [1, 5, 1, 1], [1, 0, 0, 1], [None, 5, 1, None]),   # a known dim other than 1
    ([1, 8], [1, 1], [1, 1], [None, 8]),                                    # unknown over a static 8
    ([2, 3], [4, 2, 3], [0, 0, 0], [4, 2, 3]),                               # a new leading dim
    ([7, 3], [5, 1], [0, 0], [None, 3]),                                     # 7 vs 5 fails at run time
])
def test_expanded_dims(x, target, unknown, want):
    from fusegraph.canonicalize import _expanded_dims
    assert _expanded_dims(tuple(x), np.array(target, I64), np.array(unknown, bool)) == want


def test_evaluate_shares_the_folding_with_pattern_conditions():
    """`evaluate` (what rope's Slice bounds and the attention masks read) knows constants,
    arithmetic over static dims, and moves symbolic dims by name; arithmetic on a symbolic dim
    and a graph input's default are unknown."""
    from fusegraph.canonicalize import evaluate
    nodes = [node("Shape", ["x"], ["s"]), const("last", -1), const("zero", 0), const("two", 2), const("three", 3),
             node("Gather", ["s", "last"], ["w"]), node("Add", ["w", "two"], ["w2"]), node("Div", ["w2", "three"], ["third"]),
             node("Gather", ["s", "zero"], ["b"]), const("axes", [0]), node("Unsqueeze", ["b", "axes"], ["b1"]),
             node("Unsqueeze", ["third", "axes"], ["t1"]), node("Concat", ["b1", "t1"], ["target"], axis=0),
             node("Add", ["b", "two"], ["b2"]), node("Add", ["third", "fed"], ["y"])]
    model = make_model(nodes, {"x": (F, ["batch", 4, 96]), "fed": (I64, [])}, {"y": (I64, [])}, {"fed": np.array(1, I64)})
    graph = Graph(model)
    assert evaluate(graph.values["third"]).value == 32  # the chunk(3) bound of a fused QKV
    assert evaluate(graph.values["target"]).dims().tolist() == ["batch", 32]
    assert evaluate(graph.values["b2"]).dims().item() is None and evaluate(graph.values["b2"]).value is None
    assert evaluate(graph.values["fed"]) is None and evaluate(graph.values["y"]) is None
    assert evaluate(graph.values["third"], max_nodes=2) is None  # more nodes than allowed


def test_analysis_reads_what_folding_leaves():
    """A bfloat16 causal mask `Where(triu, lowest, 0)` (a bf16 export's): folding leaves it (ml_dtypes'
    arithmetic need not be ONNX Runtime's), `evaluate(any_op=True)`, what the attention mask
    check reads, knows it."""
    import ml_dtypes
    from fusegraph.canonicalize import evaluate
    bf16 = ml_dtypes.bfloat16
    nodes = [node("Where", ["tri", "low", "zero"], ["m"]), node("Add", ["s", "m"], ["y"])]
    model = make_model(nodes, {"s": (bf16, [4, 4])}, {"y": (bf16, [4, 4])},
                       {"tri": np.triu(np.ones((4, 4), bool), 1), "low": np.array(ml_dtypes.finfo(bf16).min, bf16),
                        "zero": np.array(0, bf16)})
    graph = Graph(model)
    assert evaluate(graph.values["m"]) is None
    mask = evaluate(graph.values["m"], any_op=True).value
    assert mask.dtype == bf16 and (mask[np.triu_indices(4, 1)] == ml_dtypes.finfo(bf16).min).all()
    _, report = rewrite_with_report(model, [])
    assert not report.canonicalized["fold_constants"]


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


@pytest.mark.parametrize("target, removed", [([0, 3], True), ([-1, 3], False), ([0, -1], False)])
def test_a_reshape_keeps_a_dynamic_dim_only_by_copying_it(target, removed):
    """Over x [batch, 3], 0 copies the batch; -1 would infer it only if no dim is 0 at run time
    (an empty batch makes -1 fail), which a symbolic dim does not prove."""
    nodes = [const("shape", target), node("Reshape", ["x", "shape"], ["t"]), node("Neg", ["t"], ["y"])]
    model = make_model(nodes, {"x": (F, ["batch", 3])}, {"y": (F, ["batch", 3])})
    out, steps = canonical(model, {"x": np.ones((2, 3), F)})
    assert bool(steps["remove_noops"]) == removed and op_counts(out)["Reshape"] == (not removed)


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
