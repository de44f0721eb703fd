"""Dispatch (rewriter/dispatch.py): a candidate meets only the rules whose first two pattern
levels fit it. It changes how many attempts are made, never which fusions happen: the library
with dispatch and by brute force (every rule of the node's op type) must write the same model,
on the real exports and on fuzzed graphs; attempts are counted and reported."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings

from fusegraph import Rule
from fusegraph.api import default_rules
from fusegraph.cli import main
from fusegraph.dispatch import Dispatch
from fusegraph.verify.fuzz import graphs
from fusegraph.ir import Graph
from fusegraph.model_io import load_model
from fusegraph.rewrite import Rewriter, finalize
from fusegraph.verify.testing import make_model, node

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from synthetic_rules import RULES as CHAINS  # noqa: E402

F = np.float32
LIBRARY = default_rules()
CORPUS = sorted(Path(__file__).resolve().parents[1].joinpath("data", "models").glob("*.onnx"))
#: QDQ exports keep their quantized GEMMs and attention as they are (the policy of issue 11, item
#: 11): nothing there need fuse.
QUANTIZED = {name for name, e in json.loads(CORPUS[0].parent.joinpath("MANIFEST.json").read_text())["models"].items()
             if e.get("quantization")}


def rewrite_with(model, rules, dispatch, base_dir=None):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = Graph(copy, base_dir)
    report = Rewriter(rules, dispatch=dispatch).run(graph)
    return finalize(graph, report), report


def assert_dispatch_changes_nothing(model, rules=LIBRARY, base_dir=None):
    fast, fast_report = rewrite_with(model, rules, True, base_dir)
    brute, brute_report = rewrite_with(model, rules, False, base_dir)
    assert [(f.rule, f.matched) for f in fast_report.fusions] == [(f.rule, f.matched) for f in brute_report.fusions]
    assert fast.SerializeToString() == brute.SerializeToString()
    assert fast_report.candidates == brute_report.candidates
    assert fast_report.attempts <= brute_report.attempts
    return fast_report, brute_report


def test_corpus_has_models():
    assert len(CORPUS) >= 80


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_dispatch_fuses_what_brute_force_fuses_on_real_exports(path):
    fast, brute = assert_dispatch_changes_nothing(load_model(str(path)), base_dir=os.path.dirname(path))
    assert fast.fusions or path.name in QUANTIZED, "every float export in the corpus has something to fuse"
    assert fast.attempts < brute.attempts


@settings(max_examples=40)
@given(graphs())
def test_dispatch_fuses_what_brute_force_fuses_on_fuzzed_graphs(model):
    assert_dispatch_changes_nothing(model)


@settings(max_examples=15)
@given(graphs(max_steps=8))
def test_dispatch_fuses_what_brute_force_fuses_with_500_rules(model):
    """The library and 499 generated op chains (benchmarks/synthetic_rules.py; about one fuzzed
    graph in two has a chain that fires), all 499 at one priority: dozens of heads per op type,
    commutative roots, captures as catch-alls."""
    assert_dispatch_changes_nothing(model, list(LIBRARY) + CHAINS)


def relu_of(op_type, extra=()):
    """Relu(op(x, b)): the GEMM epilogue's root op, over some producer."""
    return make_model([node(op_type, ["x", "b"], ["a"], name="pre"), node("Relu", ["a"], ["y"], name="act"), *extra],
                      {"x": (F, [2, 3])}, {"y": (F, [2, 3])}, {"b": np.ones(3, F)})


def test_attempts_are_counted_and_dispatch_skips_rules_that_cannot_fit():
    """A Relu over a Sub: both GEMM-epilogue rules are rooted at Relu, neither can match (their
    Relu reads an Add, a MatMul, a Reshape or a Gemm), so dispatch tries none of them."""
    fast, brute = assert_dispatch_changes_nothing(relu_of("Sub"))
    assert fast.candidates >= 1 and fast.attempts == 0
    assert brute.attempts >= 2


def test_one_attempt_per_fusion_on_an_mlp():
    model = make_model([node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["a"]), node("Relu", ["a"], ["y"])],
                       {"x": (F, [2, 4])}, {"y": (F, [2, 3])}, {"w": np.ones((4, 3), F), "b": np.ones(3, F)})
    fast, brute = assert_dispatch_changes_nothing(model)
    assert [f.rule for f in fast.fusions] == ["gemm_epilogue.matmul_act"]
    # qkv.projections_bias at the Add and qkv.projections at the MatMul (their first two levels
    # fit: a MatMul of anything, plus a bias), then the one epilogue rule at the Relu.
    assert fast.attempts == 3 < brute.attempts


def test_json_summary_reports_attempts(tmp_path, capsys):
    src = str(tmp_path / "in.onnx")
    onnx.save(relu_of("Sub"), src)
    assert main([src, "-o", str(tmp_path / "out.onnx"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["attempts"] == 0  # Relu(Sub(x, b)): no rule fits


def test_index_unfolds_alternatives_commutativity_and_catch_alls():
    def mark(op, x):
        return op.Marked(x, _domain="test")
    rules = [
        Rule("silu", lambda op, x: op.Mul(op.Sigmoid(x), x), mark),  # commutative root
        Rule("add_or_sub", lambda op, x, y: op.Relu(op.Add(x, y) | op.Sub(x, y)), mark),  # alternatives
        Rule("any_relu", lambda op, x: op.Relu(x), mark),  # a Var: the catch-all
        Rule("tagged_root", lambda op, x: op.any_of("Tanh", "Relu", tag="t")(op.Neg(x)), mark),
    ]
    model = make_model([node("Sigmoid", ["x"], ["s"]), node("Mul", ["x", "s"], ["m1"]), node("Mul", ["s", "x"], ["m2"]),
                        node("Mul", ["x", "x"], ["m3"]), node("Sub", ["x", "x"], ["d"]), node("Relu", ["d"], ["r1"]),
                        node("Mul", ["x", "x"], ["q"]), node("Relu", ["q"], ["r2"]), node("Neg", ["x"], ["n"]),
                        node("Relu", ["n"], ["r3"]), node("Tanh", ["n"], ["t"]), node("Relu", ["x"], ["r4"])],
                       {"x": (F, [2])}, {k: (F, [2]) for k in ("m1", "m2", "m3", "r1", "r2", "r3", "t", "r4")})
    graph = Graph(model)
    index = Dispatch(rules)
    admitted = {n.outputs[0].name: [r.name for r in index.rules_for(n)] for n in graph.live_nodes()}
    assert admitted["m1"] == admitted["m2"] == ["silu"]
    assert admitted["m3"] == []
    assert admitted["r1"] == ["add_or_sub", "any_relu"]
    assert admitted["r2"] == ["any_relu"]
    assert admitted["r3"] == ["any_relu", "tagged_root"]
    assert admitted["t"] == ["tagged_root"]
    assert admitted["r4"] == ["any_relu"]
    assert index.root_ops == {("", "Mul"), ("", "Relu"), ("", "Tanh")}
    assert Dispatch(rules, unfiltered=rules).rules_for(graph.value("r2").producer) == tuple(rules[1:4])
