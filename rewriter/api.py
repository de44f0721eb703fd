"""The Python entry points: rewrite a ModelProto or a file with a rule set."""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from typing import Callable

import onnx

from .canonicalize import canonicalize as canonicalize_graph
from .ir import Graph
from .ops.lowering import lowering_rules
from .model_io import check_output, load_checked, save_model, validate
from .rewrite import RewriteReport, Rewriter, finalize
from .rule import Rule, RuleSet


def default_rules() -> RuleSet:
    """Every rule in `fusegraph.patterns`, in priority order."""
    from fusegraph.patterns import all_rules
    return all_rules()


def rewrite(model: onnx.ModelProto, rules: RuleSet | list[Rule] | None = None) -> onnx.ModelProto:
    """Return a rewritten copy of `model` (the argument is left unchanged)."""
    return rewrite_with_report(model, rules)[0]


def rewrite_with_report(model: onnx.ModelProto, rules: RuleSet | list[Rule] | None = None, *,
                        explain: str | None = None, progress: bool = False,
                        base_dir: str | None = None, copy: bool = True,
                        source: str = "model", canonicalize: bool = True,
                        target: str = "portable") -> tuple[onnx.ModelProto, RewriteReport]:
    """Rewrite to a fixpoint and report what fused.

    `base_dir` is where external data lives (for reading small constants); `copy=False` edits
    `model` in place, for callers that own it; `canonicalize` runs `fusegraph.canonicalize`
    first; `target` lowers the fused ops for one runtime (`fusegraph.ops.lowering`).
    """
    lowering = lowering_rules(target)
    if copy:
        original, model = model, onnx.ModelProto()
        model.CopyFrom(original)
    rules = default_rules() if rules is None else rules
    with _gc_paused():
        graph = Graph(model, base_dir)
        validate(model, graph, source)
        canonical = canonicalize_graph(graph) if canonicalize else None
        graph = canonical.graph if canonical else graph
        report = Rewriter(rules, explain=explain, progress=progress).run(graph)
        if lowering:
            report.merge_lowering(Rewriter(lowering).run(graph))
        if canonical:
            canonical.amend(report)
        out = finalize(graph, report, target)
    if _has_untyped_new_values(graph):
        out = onnx.shape_inference.infer_shapes(out)
    return out, report


def rewrite_file(src: str, dst: str, rules: RuleSet | list[Rule] | None = None, *,
                 explain: str | None = None, progress: bool = False, in_place: bool = False,
                 check: Callable[[str], bool] | None = None, target: str = "portable",
                 canonicalize: bool = True) -> RewriteReport:
    """Rewrite the model at `src` into `dst`; external data is never loaded into memory.

    The output is checked before any work (`model_io.check_output`: `dst` equal to `src` needs
    `in_place`; one of `src`'s data files, a folder or a device is refused) and written
    atomically (`model_io.save_model`); `check`, given the complete model under a temporary
    name, decides whether it replaces `dst` (the `--verify` of the CLI).
    """
    model, data = load_checked(src)
    check_output(dst, src, data, in_place=in_place)
    base_dir = os.path.dirname(os.path.abspath(src))
    out, report = rewrite_with_report(model, rules, explain=explain, progress=progress,
                                      base_dir=base_dir, copy=False, source=src, target=target,
                                      canonicalize=canonicalize)
    # A rewrite only adds inline tensors: an input without external data gives none to copy.
    save_model(out, dst, source_dir=base_dir if data else None, check=check)
    return report


@contextmanager
def _gc_paused():
    """The IR allocates an object per node and value and frees none of them while it works:
    the cyclic collector would rescan that growing heap over and over (half the build time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _has_untyped_new_values(graph: Graph) -> bool:
    """New intermediate values (inside a replacement) carry no type until inferred."""
    return any(graph.values[name].type_proto is None for name in graph.created_values if name in graph.values)
