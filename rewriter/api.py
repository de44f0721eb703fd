"""The Python entry points: rewrite a ModelProto or a file with a rule set."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Collection
from contextlib import contextmanager
from typing import Any, Callable

import onnx

from .canonicalize import canonicalize as canonicalize_graph
from .errors import InputError
from .interop import to_proto
from .ir import YOUNG_GENERATIONS, Graph, write_inferred_types
from .ops.lowering import lowering_rules
from .model_io import check_output, check_own_domain, load_checked, save_model, validate
from .rewrite import RewriteReport, Rewriter, finalize
from .rule import Rule, RuleSet


def default_rules() -> RuleSet:
    """Every rule in `fusegraph.patterns`, in priority order."""
    from fusegraph.patterns import all_rules
    return all_rules()


def rewrite(model: Any, rules: RuleSet | list[Rule] | None = None, *, output: str | os.PathLike | None = None) -> Any:
    """Return a rewritten copy of `model` (the argument is left unchanged), of the same kind:
    an `onnx.ModelProto`, an `onnx_graphsurgeon.Graph`, an `onnx_ir.Model` or the `ONNXProgram`
    of `torch.onnx.export(..., dynamo=True)` (`fusegraph.interop`). A path (str or PathLike) is
    rewritten into the file `output`, external data and all (`rewrite_file`), and `output` is
    returned as the same kind of path."""
    if isinstance(model, (str, os.PathLike)):
        if output is None:
            raise InputError(f"rewrite({os.fspath(model)!r}): a path is rewritten into a file: pass output=")
        rewrite_file(os.fspath(model), os.fspath(output), rules)
        return type(model)(output) if isinstance(model, os.PathLike) else os.fspath(output)
    if output is not None:
        raise InputError("output= is for a path; an in-memory model is returned, not written")
    proto, back = to_proto(model)
    return back(rewrite_with_report(proto, rules, copy=proto is model)[0])


def rewrite_with_report(model: onnx.ModelProto, rules: RuleSet | list[Rule] | None = None, *,
                        explain: str | Collection[str] | None = None, progress: bool = False,
                        base_dir: str | None = None, copy: bool = True,
                        source: str = "model", canonicalize: bool = True,
                        target: str = "portable", trace: bool = False) -> tuple[onnx.ModelProto, RewriteReport]:
    """Rewrite to a fixpoint and report what fused.

    `base_dir` is where external data lives (for reading small constants); `copy=False` edits
    `model` in place, for callers that own it; `canonicalize` runs `fusegraph.canonicalize`
    first; `target` lowers the fused ops for one runtime (`fusegraph.ops.lowering`); `explain`
    names the rules whose refusals are collected, `trace` keeps each fusion's nodes (both for
    `fusegraph.report`). `report.stages` holds the seconds of each stage.
    """
    lowering = lowering_rules(target)
    if copy:
        original, model = model, onnx.ModelProto()
        model.CopyFrom(original)
    rules = default_rules() if rules is None else rules
    clock = _Stages()
    with _gc_paused():
        graph = Graph(model, base_dir)
        validate(model, graph, source)
        check_own_domain(model, source)
        graph.reload(infer=True)  # typed apart from the IR, checked first (`Graph.reload`)
        clock.lap("load")
        canonical = canonicalize_graph(graph) if canonicalize else None
        graph = canonical.graph if canonical else graph
        clock.lap("canonicalize")
        report = Rewriter(rules, explain=explain, progress=progress, trace=trace).run(graph)
        if lowering:
            report.merge_lowering(Rewriter(lowering, trace=trace).run(graph))
        if canonical:
            canonical.amend(report)
        clock.lap("match")
        out = finalize(graph, report, target)
        untyped = _has_untyped_new_values(graph)
    # The IR is done with: freed before the model is typed and saved, so neither adds to it.
    graph = canonical = None
    gc.collect(YOUNG_GENERATIONS)
    if untyped:
        write_inferred_types(out)
    clock.lap("write")
    report.stages = clock.seconds
    return out, report


def rewrite_file(src: str, dst: str, rules: RuleSet | list[Rule] | None = None, *,
                 explain: str | Collection[str] | None = None, progress: bool = False, in_place: bool = False,
                 check: Callable[[str], bool] | None = None, target: str = "portable",
                 canonicalize: bool = True, trace: bool = False) -> RewriteReport:
    """Rewrite the model at `src` into `dst`; external data is never loaded into memory, and
    no second copy of the model is made (inference sees it without its weights, the output is
    serialized piece by piece: `fusegraph.ir`, `fusegraph.serialize`).

    The output is checked before any work (`model_io.check_output`: `dst` equal to `src` needs
    `in_place`; one of `src`'s data files, a folder or a device is refused) and written
    atomically (`model_io.save_model`); `check`, given the complete model under a temporary
    name, decides whether it replaces `dst` (the `--verify` of the CLI).
    """
    start = time.perf_counter()
    model, data = load_checked(src)
    check_output(dst, src, data, in_place=in_place)
    loaded = time.perf_counter() - start
    base_dir = os.path.dirname(os.path.abspath(src))
    out, report = rewrite_with_report(model, rules, explain=explain, progress=progress,
                                      base_dir=base_dir, copy=False, source=src, target=target,
                                      canonicalize=canonicalize, trace=trace)
    start = time.perf_counter()
    # A rewrite only adds inline tensors: an input without external data gives none to copy.
    save_model(out, dst, source_dir=base_dir if data else None, check=check)
    report.stages["load"] += loaded
    report.stages["write"] += time.perf_counter() - start  # with --verify, its comparison too
    return report


class _Stages:
    """Seconds per stage: each `lap(name)` charges the time since the previous lap to `name`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


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
