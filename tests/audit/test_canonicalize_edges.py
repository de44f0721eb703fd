"""The canonicalizer's promises at their edges: nothing over the fold cap is ever computed (not
just kept), and semantics stay bit for bit where a step looks applicable but is not.

Before the fix, `_output_fits` sized only ConstantOfShape/Expand/Tile/Range: a Where or Max over
three 1024-element constants ([1024,1,1], [1,1024,1], [1,1,1024]) was evaluated in full — 2^30
elements, 4 GB — before the result was found too big to keep.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from fusegraph.api import rewrite_with_report
from fusegraph.canonicalize import evaluate
from fusegraph.ir import Graph
from fusegraph.verify import run
from fusegraph.verify.testing import make_model, node, op_counts

F = np.float32
I32 = np.int32
N = 256  # each input 256 elements, under the cap; broadcast together 2^24


def _canonical(model, feeds):
    out, report = rewrite_with_report(model, [])
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    want, got = run(model, feeds), run(out, feeds)
    for name in want:
        assert want[name].dtype == got[name].dtype and want[name].shape == got[name].shape
        np.testing.assert_array_equal(got[name], want[name])
    return out, report.canonicalized


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("op", ["Where", "Max", "Min", "Add"])
def test_a_broadcast_over_the_cap_is_never_computed(op):
    inits = {"a": np.arange(N, dtype=I32).reshape(N, 1, 1), "b": np.arange(N, dtype=I32).reshape(1, N, 1),
             "c": np.arange(N, dtype=I32).reshape(1, 1, N), "keep": (np.arange(N) % 2 == 0).reshape(N, 1, 1)}
    ins = {"Where": ["keep", "b", "c"], "Max": ["a", "b", "c"], "Min": ["a", "b", "c"], "Add": ["b", "c"]}[op]
    nodes = [node(op, ins, ["big"]), node("ReduceMax", ["big"], ["m"], keepdims=0), node("Add", ["x", "m"], ["y"])]
    model = make_model(nodes, {"x": (I32, [])}, {"y": (I32, [])}, inits)
    peak = _peak_bytes(lambda: rewrite_with_report(model, []))
    limit = 8 << 20
    assert peak < limit, f"{op}: {peak / 2**20:.0f} MB allocated: the broadcast was computed"
    _, steps = _canonical(model, {"x": np.array(1, I32)})
    assert not steps["fold_constants"]


def test_a_gather_over_the_cap_is_never_computed():
    nodes = [node("Gather", ["table", "idx"], ["rows"], axis=0), node("ReduceMax", ["rows"], ["m"], keepdims=0),
             node("Add", ["x", "m"], ["y"])]
    model = make_model(nodes, {"x": (I32, [])}, {"y": (I32, [])},
                       {"table": np.arange(1024, dtype=I32).reshape(1, 1024), "idx": np.zeros(1024, np.int64)})
    assert _peak_bytes(lambda: rewrite_with_report(model, [])) < 2 << 20
    _canonical(model, {"x": np.array(1, I32)})


def test_analysis_sizes_ops_outside_the_folding_before_running_them():
    """`evaluate(any_op=True)` (the attention masks' analysis) runs any op, OneHot included: a
    depth of 2^24 is refused by the inferred output shape, not computed."""
    nodes = [node("OneHot", ["idx", "depth", "values"], ["hot"], axis=-1), node("ReduceMax", ["hot"], ["m"], keepdims=0),
             node("Add", ["x", "m"], ["y"])]
    model = make_model(nodes, {"x": (F, [])}, {"y": (F, [])},
                       {"idx": np.arange(64, dtype=np.int64), "depth": np.array(1 << 24, np.int64),
                        "values": np.array([0, 1], F)})
    graph = Graph(model)
    peak = _peak_bytes(lambda: evaluate(graph.value("hot"), any_op=True, read_weights=True, max_elements=1 << 20))
    assert peak < 16 << 20
    small = make_model(nodes, {"x": (F, [])}, {"y": (F, [])},
                       {"idx": np.arange(4, dtype=np.int64), "depth": np.array(3, np.int64), "values": np.array([0, 1], F)})
    known = evaluate(Graph(small).value("hot"), any_op=True, read_weights=True)
    assert known is not None and known.value.shape == (4, 3)  # what fits is still evaluated


# -- looks like a step, is not one -------------------------------------------------------------
def test_a_noop_whose_output_is_also_a_graph_output_and_an_edge_stays():
    model = make_model([node("Identity", ["x"], ["t"]), node("Neg", ["t"], ["y"])],
                       {"x": (F, [4])}, {"t": (F, [4]), "y": (F, [4])})
    out, steps = _canonical(model, {"x": np.array([-0.0, 1.5, np.nan, 2], F)})
    assert not steps["remove_noops"] and op_counts(out)["Identity"] == 1


def test_duplicates_that_are_both_graph_outputs_stay_two():
    model = make_model([node("Neg", ["x"], ["a"]), node("Neg", ["x"], ["b"])], {"x": (F, [4])},
                       {"a": (F, [4]), "b": (F, [4])})
    out, steps = _canonical(model, {"x": np.ones(4, F)})
    assert not steps["cse"] and [o.name for o in out.graph.output] == ["a", "b"]


def test_training_dropouts_are_never_merged():
    """Dropout with training_mode=True draws a mask per node: two of them are two draws."""
    nodes = [node("Dropout", ["x", "ratio", "training"], ["a"]), node("Dropout", ["x", "ratio", "training"], ["b"]),
             node("Sub", ["a", "b"], ["y"])]
    model = make_model(nodes, {"x": (F, [64])}, {"y": (F, [64])},
                       {"ratio": np.array(0.5, F), "training": np.array(True)})
    out, report = rewrite_with_report(model, [])
    assert op_counts(out)["Dropout"] == 2 and not report.canonicalized["cse"]


def test_a_lossy_cast_round_trip_is_kept():
    nodes = [node("Cast", ["x"], ["i"], to=TensorProto.INT32), node("Cast", ["i"], ["y"], to=TensorProto.FLOAT)]
    model = make_model(nodes, {"x": (F, [4])}, {"y": (F, [4])})
    out, steps = _canonical(model, {"x": np.array([0.5, 1.5, -2.5, 3], F)})
    assert op_counts(out)["Cast"] == 2


def test_an_allowzero_reshape_to_a_dynamic_dim_stays():
    """Reshape(x [n, 3], [0, 3], allowzero=1) makes a [0, 3] tensor whatever n is."""
    const = node("Constant", [], ["s"], value=numpy_helper.from_array(np.array([0, 3], np.int64)))
    model = make_model([const, node("Reshape", ["x", "s"], ["t"], allowzero=1), node("Neg", ["t"], ["y"])],
                       {"x": (F, ["n", 3])}, {"y": (F, [None, 3])}, opset=18)
    out, steps = _canonical(model, {"x": np.zeros((0, 3), F)})
    assert op_counts(out)["Reshape"] == 1


def test_constants_of_opposite_zeros_are_not_merged():
    """-0.0 and 0.0 compare equal but 1/x tells them apart: constants merge by their bytes."""
    const = [node("Constant", [], [n], value=numpy_helper.from_array(np.array([v], F))) for n, v in (("a", -0.0), ("b", 0.0))]
    nodes = [*const, node("Div", ["x", "a"], ["p"]), node("Div", ["x", "b"], ["q"]), node("Sub", ["p", "q"], ["y"])]
    model = make_model(nodes, {"x": (F, [1])}, {"y": (F, [1])})
    out, steps = _canonical(model, {"x": np.ones(1, F)})
    assert op_counts(out)["Div"] == 2
