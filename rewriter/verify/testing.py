"""Helpers for testing rules: build small models, rewrite them, and prove nothing changed.

    model = make_model([node("MatMul", ["x", "w"], ["y"])], inputs={"x": ("float32", [2, 4])},
                       outputs={"y": ("float32", [2, 8])}, initializers={"w": w})
    out = assert_rewrites(model, rules, expect={"fusegraph.MatMulRelu": 1})

`assert_rewrites` checks what every rewrite in the test suite must satisfy: the full ONNX
checker passes, graph inputs and outputs keep their names and order, the outputs match the
original in ONNX Runtime within the dtype's tolerance, and the rules, run again, change nothing.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fusegraph.api import rewrite_with_report
from fusegraph.graph_builder import GraphBuilder
from fusegraph.rule import Rule, RuleSet

from .differential import compare, make_inputs, run

node = helper.make_node


def make_model(nodes: Iterable[onnx.NodeProto], inputs: Mapping[str, tuple[Any, list]],
               outputs: Mapping[str, tuple[Any, list | None]],
               initializers: Mapping[str, np.ndarray] | None = None, opset: int = 17,
               ir_version: int = 10) -> onnx.ModelProto:
    """A model from nodes; inputs/outputs map names to (dtype, shape) with str dims symbolic.
    Only the default domain is imported: a test of a custom-domain node adds its opset import."""
    b = GraphBuilder()
    b.nodes.extend(nodes)
    b.initializers.extend(numpy_helper.from_array(np.asarray(a), n) for n, a in (initializers or {}).items())
    return b.model({n: tuple(s) for n, s in inputs.items()}, {n: tuple(s) for n, s in outputs.items()}, opset,
                   ir_version=ir_version, name="test")


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter((f"{n.domain}." if n.domain else "") + n.op_type for n in model.graph.node)


def assert_rewrites(model: onnx.ModelProto, rules: RuleSet | list[Rule] | None = None, *,
                    expect: Mapping[str, int] | None = None, shapes: dict | None = None,
                    feeds: dict[str, np.ndarray] | None = None, atol: float | None = None,
                    rtol: float | None = None) -> onnx.ModelProto:
    """Rewrite `model` and assert it stayed valid and equivalent; return the rewritten model.

    `expect` maps op names (`"fusegraph.MatMulRelu"`, `"Softmax"`) to their count afterwards.
    """
    out, report = rewrite_with_report(model, rules)
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    counts = op_counts(out)
    for op, n in (expect or {}).items():
        assert counts.get(op, 0) == n, f"expected {n} x {op}, got {counts.get(op, 0)}: {dict(counts)}"
    feeds = make_inputs(model, shapes) if feeds is None else feeds
    diffs = compare(run(model, feeds), run(out, feeds), atol, rtol)
    bad = [d for d in diffs if not d.ok]
    assert not bad, f"rewritten model differs: {bad}"
    # The rules' fixpoint: canonicalization may still fold what a replacement computes from
    # static shapes (that is its job), the rules must find nothing more.
    again, second = rewrite_with_report(out, rules, canonicalize=False)
    assert not second.fusions, f"second rewrite fused again: {second.per_rule}"
    assert op_counts(again) == counts
    return out


def assert_unchanged(model: onnx.ModelProto, rules: RuleSet | list[Rule] | None = None) -> None:
    """Assert the rules leave `model` alone: no fusion, the same ops as canonicalization alone
    leaves (for decoys)."""
    out, report = rewrite_with_report(model, rules)
    assert not report.fusions, f"a decoy fused: {dict(report.per_rule)}"
    assert op_counts(out) == op_counts(rewrite_with_report(model, [])[0])


def manifest_feeds(meta: Mapping[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a model of the real-export corpus (tests/data/models/MANIFEST.json entry).

    Token ids stay inside the vocabulary, masks are ones, token types zeros. Exports whose
    example shapes fail in ONNX Runtime (the dynamo exporter bakes a batch-1 RoPE cache into
    opset-23 RotaryEmbedding) run at batch 1, the shape they were traced for.
    """
    rng = np.random.default_rng(seed)
    vocab = meta.get("config", {}).get("vocab_size", 2)
    batch_one = not meta.get("checks_ok", True)
    out = {}
    for i in meta["inputs"]:
        shape = list(i["example_shape"])
        if batch_one and shape:
            shape[0] = 1
        dtype = np.dtype(i["dtype"])
        if dtype.kind == "f":
            out[i["name"]] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in i["name"]:
            out[i["name"]] = np.ones(shape, dtype)
        elif "token_type" in i["name"]:
            out[i["name"]] = np.zeros(shape, dtype)
        else:
            out[i["name"]] = rng.integers(0, vocab, shape).astype(dtype)
    return out


def manifest_profile(meta: Mapping[str, Any]) -> dict[str, dict[str, tuple[int, ...]]]:
    """A TensorRT optimization profile for a corpus model: min 1 on every dynamic axis, opt the
    manifest's example shape, max twice it."""
    ranges = {}
    for i in meta["inputs"]:
        opt = tuple(i["example_shape"])
        dynamic = [isinstance(d, str) for d in i["dims"]]
        ranges[i["name"]] = {"min": tuple(1 if dyn else d for d, dyn in zip(opt, dynamic)), "opt": opt,
                             "max": tuple(2 * d if dyn else d for d, dyn in zip(opt, dynamic))}
    return ranges
