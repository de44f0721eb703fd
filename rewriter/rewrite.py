"""The rewrite driver: rules to a fixpoint, each match checked for safety, edits in batch.

Order of work. Rules run by priority: the rules of one priority visit the live nodes of their
root op types (the IR's index) in graph order, and at each node only the rules whose first two
pattern levels fit it are tried (`rewriter.dispatch`), in list order; then the next priority.
One pass costs O(candidate nodes + attempts × pattern size), not O(rules × nodes). A rewrite
marks the nodes within the rule set's pattern depth of the new nodes (up- and downstream) as
dirty, and later passes visit only dirty nodes: the fixpoint costs what the first pass costs
plus work proportional to what changed.

Safety. A match is rewritten only if no value computed inside it escapes (to a node outside the
match or to the graph outputs) unless the pattern returns it, and, for patterns with several
outputs, only if no input of the match depends on one of its outputs (a fused node would then
sit in a cycle), and only if what the replacement returns has the element type and shape of
what it replaces (`typecheck`).

Faults. A rule's own code (a condition, a pattern predicate, the replacement) that raises, or a
replacement that returns something other than one value per pattern output, refuses that
candidate with the exception as the reason (`--explain` shows it) and never ends the run: the
replacement's nodes and initializers are built straight into the graph and rolled back, so the
graph is exactly as before the candidate. `RewriteReport.errors` names each such rule once.

Afterwards dead nodes go, the order is topological, names stay unique, graph
inputs and outputs keep their names and order, and `metadata_props["fusegraph.fusions"]` records
which rule fused which nodes.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Collection, Iterable, Iterator

import numpy as np
import onnx

from .ops import fused_ops
from .dispatch import Dispatch
from .errors import InputError
from .ir import Graph, Node, Value, nested_nodes
from .matcher import EMPTY, Bindings, Failure, Matcher, pattern_depth, raised, root_op_types
from .pattern import Pattern
from .rule import Rule, RuleRaised, RuleSet, call_with_captures
from .subgraph_functions import SubgraphFunctions, node_patterns
from .typecheck import ReplacementTypes

FUSIONS_KEY = "fusegraph.fusions"


@dataclass
class Fusion:
    rule: str
    matched: list[str]
    created: list[str]
    #: With `Rewriter(trace=True)` only: {"matched": [...], "created": [...]}, each node as it
    #: stood (`_trace_nodes`), so `fusegraph.report` can draw what became what after the graph
    #: has moved on; None otherwise (the record costs a dict per node).
    nodes: dict | None = None


@dataclass
class NearMiss:
    """A candidate that a rule tried and refused, with the deepest reason found."""

    rule: str
    root: str
    depth: int
    reason: str
    #: The candidate node's name (`root` is for reading: "Relu 'act'").
    node: str = ""


@dataclass
class RuleError:
    """A rule whose own code raised (or whose replacement returned what can't replace the
    match): `count` candidates were refused; `message` is the first reason."""

    rule: str
    message: str
    count: int = 0


@dataclass
class RewriteReport:
    fusions: list[Fusion] = field(default_factory=list)
    ops_before: Counter = field(default_factory=Counter)
    ops_after: Counter = field(default_factory=Counter)
    passes: int = 0
    seconds: float = 0.0
    near_misses: list[NearMiss] = field(default_factory=list)
    errors: dict[str, RuleError] = field(default_factory=dict)
    #: Steps of `fusegraph.canonicalize` that ran before the rules, e.g. {"fold_constants": 12}.
    canonicalized: Counter = field(default_factory=Counter)
    #: Candidate nodes visited (once per priority level and pass), and rule attempts made at
    #: them: dispatch keeps `attempts / candidates` to the rules that fit, however many are held.
    candidates: int = 0
    attempts: int = 0
    #: Seconds per stage of the whole run ("load", "canonicalize", "match", "write"), filled by
    #: `fusegraph.api` around the driver; `seconds` is the driver's own part ("match").
    stages: dict[str, float] = field(default_factory=dict)
    #: Bodies for the user ops the replacements created: the subgraphs they replaced
    #: (`fusegraph.subgraph_functions`), attached by `finalize`.
    functions: SubgraphFunctions = field(default_factory=SubgraphFunctions, repr=False)

    def fault(self, rule: str, message: str) -> str:
        """Count a candidate `rule` refused because its code failed; returns the reason."""
        err = self.errors.setdefault(rule, RuleError(rule, message))
        err.count += 1
        return message

    def merge_lowering(self, lowered: "RewriteReport") -> None:
        """Fold a lowering pass (run on the fused graph) into this report: its rewrites are
        recorded after the fusions, and the op counts after are the lowered graph's."""
        self.fusions.extend(lowered.fusions)
        self.errors.update(lowered.errors)
        self.ops_after = lowered.ops_after
        self.seconds += lowered.seconds
        self.candidates += lowered.candidates
        self.attempts += lowered.attempts

    @property
    def per_rule(self) -> Counter:
        return Counter(f.rule for f in self.fusions)

    @property
    def nodes_before(self) -> int:
        return sum(self.ops_before.values())

    @property
    def nodes_after(self) -> int:
        return sum(self.ops_after.values())


class ReplacementOps:
    """The `op` handed to replacements: builds new nodes in the graph.

    `op.Relu(x)`, `op.Split(x, _outputs=3)`, `op.MatMulBiasRelu(x, w, b, _domain="fusegraph")`,
    `op.const(np.array(...))`. Inputs are `Value`s (captures or earlier results) or numpy arrays.
    """

    def __init__(self, graph: Graph, hint: str):
        self._graph = graph
        self._hint = hint
        self.created: list[Node] = []
        self.initializers: list[Value] = []

    def const(self, array: Any) -> Value:
        v = self._graph.add_initializer(np.asarray(array), f"{self._hint}_const")
        self.initializers.append(v)
        return v

    def rollback(self) -> None:
        """Remove everything this replacement added: the graph is as before it ran."""
        for node in reversed(self.created):
            self._graph.discard_new_node(node)
        for v in reversed(self.initializers):
            self._graph.discard_new_initializer(v)
        self.created = []
        self.initializers = []

    def __getattr__(self, op_type: str):
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs: Any, _domain: str = "", _outputs: int = 1, **attrs: Any):
            if _domain == fused_ops.DOMAIN and op_type not in fused_ops.REGISTRY:
                raise InputError(f"replacement uses unknown fused op {op_type!r}")
            ins = [i if i is None or isinstance(i, Value) else self.const(i) for i in inputs]
            node = self._graph.add_node(op_type, ins, _outputs, domain=_domain, attrs=attrs,
                                        name=f"{self._hint}/{op_type}")
            self.created.append(node)
            return node.outputs[0] if _outputs == 1 else tuple(node.outputs)
        return make


class Rewriter:
    def __init__(self, rules: Iterable[Rule], *, max_passes: int = 8,
                 explain: str | Collection[str] | None = None, progress: bool = False,
                 dispatch: bool = True, trace: bool = False):
        """`explain`: one rule's name, or several (the HTML report explains them all): their
        refusals are collected in `RewriteReport.near_misses`. `trace`: each `Fusion` keeps
        the nodes it matched and created (`Fusion.nodes`)."""
        self.rules = (rules if isinstance(rules, RuleSet) else RuleSet(rules)).by_priority()
        explained = {explain} if isinstance(explain, str) else set(explain or ())
        unknown = sorted(explained - {r.name for r in self.rules})
        if unknown:
            raise InputError(f"--explain: no rule named {unknown[0]!r}")
        # The explained rule sees every candidate, so --explain lists every refusal; without
        # dispatch every rule does (the brute force that tests compare dispatch against).
        unfiltered = [r for r in self.rules if not dispatch or r.name in explained]
        self.levels = [Dispatch(list(group), unfiltered)
                       for _, group in itertools.groupby(self.rules, key=lambda r: r.priority)]
        self.max_passes = max_passes
        self.explained = explained
        self.trace = trace
        self.progress = progress
        self.reach = max((r.depth for r in self.rules), default=1)
        #: Each rule's pattern nodes by id, for the bodies of a user's ops (`SubgraphFunctions`).
        self._node_patterns: dict[int, dict[int, Any]] = {}

    def run(self, graph: Graph) -> RewriteReport:
        """Rewrite `graph` to a fixpoint, then the bodies of its If/Loop/Scan nodes (nested ones
        too), each as a graph of its own whose outer-scope values are opaque inputs."""
        start = time.perf_counter()
        report = RewriteReport()
        self._run_graph(graph, report)
        report.seconds = time.perf_counter() - start
        return report

    def _run_graph(self, graph: Graph, report: RewriteReport) -> None:
        report.ops_before.update(_op_histogram(graph))
        matcher = Matcher(graph.opset)
        types = ReplacementTypes(graph)
        dirty: set[int] | None = None
        bar = _progress_bar(graph, self.levels) if self.progress and graph.parent is None else None
        passes = 0
        for _ in range(self.max_passes):
            if graph.order_dirty:
                graph.toposort()
            passes += 1
            touched: list[Node] = []
            pass_start = len(report.fusions)
            for level in self.levels:
                for node in self._candidates(graph, level.root_ops, dirty):
                    if bar is not None and passes == 1:
                        bar.update(1)
                    if not node.alive:
                        continue
                    report.candidates += 1
                    for rule in level.rules_for(node):
                        if not node.alive:
                            break
                        explaining = rule.name in self.explained and passes == 1
                        report.attempts += 1
                        matcher.explain = explaining
                        matcher.failures = []
                        fusion = self._try(graph, matcher, types, rule, node, report, explaining)
                        if matcher.raised:
                            for message in matcher.raised:
                                report.fault(rule.name, message)
                            matcher.raised = []
                        if fusion is not None:
                            report.fusions.append(fusion[0])
                            touched.extend(fusion[1])
            if not touched:
                break
            if passes == self.max_passes:
                last = sorted({f.rule for f in report.fusions[pass_start:]})
                raise InputError(f"rules did not reach a fixpoint in {self.max_passes} passes (still fusing: "
                                 f"{', '.join(last)}); does a replacement recreate its own pattern?")
            dirty = self._neighbourhood(touched)
        if bar is not None:
            bar.close()
        report.passes = max(report.passes, passes)
        graph.remove_dead()
        for body in graph.bodies():
            self._run_graph(body, report)
            body.to_model()
        report.ops_after.update(_op_histogram(graph))

    @staticmethod
    def _candidates(graph: Graph, root_ops: Iterable[tuple[str, str]], dirty: set[int] | None) -> Iterator[Node]:
        for key in sorted(root_ops):
            # A snapshot: nodes this pass creates are roots in the next pass (they are dirty).
            for node in list(graph.by_op.get(key, ())):
                if dirty is None or id(node) in dirty:
                    yield node

    def _neighbourhood(self, nodes: list[Node]) -> set[int]:
        """Nodes within `reach` edges of the changed ones: the only roots that can newly match."""
        seen: set[int] = set()
        frontier = [n for n in nodes if n.alive]
        for _ in range(self.reach + 1):
            nxt: list[Node] = []
            for n in frontier:
                if id(n) in seen:
                    continue
                seen.add(id(n))
                for v in n.inputs:
                    if v is not None and v.producer is not None:
                        nxt.append(v.producer)
                if n.op_type != "Constant":  # a shared constant's consumers are not near
                    for v in n.outputs:
                        nxt.extend(v.consumers)
            frontier = nxt
        return seen

    def _try(self, graph: Graph, matcher: Matcher, types: ReplacementTypes, rule: Rule, node: Node,
             report: RewriteReport, explaining: bool) -> tuple[Fusion, list[Node]] | None:
        for value in node.outputs:
            for env, outputs in self._matches(graph, matcher, rule, node, value):
                captures = {**env.values, **env.attrs}
                matched = _unique(env.nodes.values())
                reason = _escape(matched, outputs) or _cycle(matched, outputs)
                if reason is None:
                    try:
                        reason = rule.check(captures)
                    except RuleRaised as e:
                        reason = report.fault(rule.name, str(e))
                if reason is None:
                    done = self._apply(graph, types, rule, env, captures, matched, outputs, report)
                    if not isinstance(done, str):
                        return done
                    reason = done
                if explaining:
                    matcher.failures.append(Failure(len(env.nodes) + 1, node.name, reason))
        if explaining:
            best = max(matcher.failures, key=lambda f: f.depth, default=None)
            if best is not None:
                report.near_misses.append(
                    NearMiss(rule.name, f"{node.op_type} {node.name!r}", best.depth,
                             f"at {best.node}: {best.reason}", node.name))
        return None

    def _matches(self, graph: Graph, matcher: Matcher, rule: Rule, node: Node,
                 value: Value) -> Iterator[tuple[Bindings, list[Value]]]:
        """Complete matches of every pattern output, the first anchored at `value`."""
        for env in matcher.match(rule.outputs[0], value, EMPTY):
            if node not in env.nodes.values():
                continue
            yield from self._match_rest(matcher, rule.outputs, 1, env, [value])

    def _match_rest(self, matcher: Matcher, outs: tuple[Pattern, ...], i: int, env: Bindings,
                    values: list[Value]) -> Iterator[tuple[Bindings, list[Value]]]:
        if i == len(outs):
            yield env, values
            return
        for cand in _nearby_outputs(outs[i], env, values):
            if cand in values:
                continue
            for e in matcher.match(outs[i], cand, env):
                yield from self._match_rest(matcher, outs, i + 1, e, values + [cand])

    def _apply(self, graph: Graph, types: ReplacementTypes, rule: Rule, env: Bindings, captures: dict[str, Any],
               matched: list[Node], outputs: list[Value],
               report: RewriteReport) -> tuple[Fusion, list[Node]] | str:
        """Replace the match, or leave the graph as it was and say why not."""
        hint = graph.fresh_node_name(rule.name)
        ops = ReplacementOps(graph, hint)
        try:
            result = call_with_captures(rule.replacement, (ops,), captures)
        except Exception as e:  # the rule's own code: refuse the candidate, name the rule
            ops.rollback()
            return report.fault(rule.name, raised("replacement", e))
        results = result if isinstance(result, tuple) else (result,)
        reason = _malformed(results, outputs, graph)
        if reason is not None:
            ops.rollback()
            return report.fault(rule.name, reason)
        reason = types.check(ops.created, results, outputs)
        if reason is not None:
            ops.rollback()
            return reason
        traced = _trace_nodes(matched) if self.trace else None
        if id(rule) not in self._node_patterns:
            self._node_patterns[id(rule)] = node_patterns(rule.outputs)
        report.functions.capture(graph, ops.created, results, outputs, matched, env.nodes,
                                 self._node_patterns[id(rule)], captures, fused_ops.DOMAIN)
        created = set(map(id, ops.created))
        lo = min(n.order for n in matched)
        hi = max(n.order for n in matched)
        for new, old in zip(results, outputs):
            if new is old:
                continue
            p = new.producer
            if p is not None and id(p) in created and not new.consumers and not new.is_graph_output:
                graph.set_producer(old, p, p.outputs.index(new))
            elif old.is_graph_output or any(old in c.implicit_inputs for c in old.consumers):
                # Keep the name: a graph output, or read by a subgraph body under that name.
                ident = graph.add_node("Identity", [new], name=f"{hint}/Identity")
                graph.set_producer(old, ident, 0)
                ops.created.append(ident)
            else:
                graph.replace_uses(old, new)
        for n in ops.created:
            n.order, n.order_lo = hi, lo
        if len(outputs) > 1:
            graph.order_dirty = True  # an exported intermediate may be read before `hi`
        for n in reversed(matched):
            if n.alive and not any(v.producer is n and (v.consumers or v.is_graph_output) for v in n.outputs):
                graph.remove_node(n)
        fusion = Fusion(rule.name, [n.name for n in matched], [n.name for n in ops.created])
        if traced is not None:
            fusion.nodes = {"matched": traced, "created": _trace_nodes(ops.created)}
        return fusion, ops.created


def _trace_nodes(nodes: list[Node]) -> list[dict]:
    """Each node as it stands now: name, op, its inputs as (name, type, is constant) and its
    outputs as (name, type, leaves: read outside `nodes` or a graph output), a type
    "float[1,16,64]" or "" when unknown. The matched nodes are traced before the rewrite
    rewires them (what leaves is what the pattern returns), the created ones after."""
    inside = set(map(id, nodes))
    return [{"name": n.name, "op": f"{n.domain}.{n.op_type}" if n.domain else n.op_type,
             "inputs": [(v.name, _type_text(v), v.is_constant) if v is not None else ("", "", False)
                        for v in n.inputs],
             "outputs": [(v.name, _type_text(v), v.is_graph_output or any(id(c) not in inside for c in v.consumers))
                         for v in n.outputs]} for n in nodes]


def _type_text(v: Value) -> str:
    dtype, shape = v.dtype, v.shape
    if dtype is None:
        return ""
    name = onnx.TensorProto.DataType.Name(dtype).lower()
    dims = "?" if shape is None else ",".join("?" if d is None else str(d) for d in shape)
    return f"{name}[{dims}]"


def _malformed(results: tuple[Any, ...], outputs: list[Value], graph: Graph) -> str | None:
    """Why what a replacement returned can't stand for the pattern's outputs, or None."""
    if len(results) != len(outputs):
        return f"replacement returned {len(results)} values for a pattern with {len(outputs)} outputs"
    for r in results:
        if not isinstance(r, Value):
            text = repr(r)
            return (f"replacement returned {type(r).__name__} {text if len(text) <= 60 else text[:57] + '...'}, "
                    "not a value (return what op.X(...) builds, or a capture)")
        if r.graph is not graph or not r.name:
            return f"replacement returned {r.name!r}, which is not a value of this graph"
    return None


def _unique(nodes: Iterable[Node]) -> list[Node]:
    out: list[Node] = []
    seen: set[int] = set()
    for n in nodes:
        if id(n) not in seen:
            seen.add(id(n))
            out.append(n)
    return sorted(out, key=lambda n: n.order)


def _escape(matched: list[Node], outputs: list[Value]) -> str | None:
    """Why an intermediate value escapes the match, or None if none does."""
    inside = set(map(id, matched))
    exported = set(map(id, outputs))
    for n in matched:
        for v in n.outputs:
            if id(v) in exported:
                continue
            if v.is_graph_output:
                return f"intermediate {v.name!r} is a graph output"
            for c in v.consumers:
                if id(c) not in inside:
                    return f"intermediate {v.name!r} is also used by {c.op_type} {c.name!r}"
    return None


def _cycle(matched: list[Node], outputs: list[Value]) -> str | None:
    """Why fusing the match would create a cycle, or None.

    Only possible with several outputs: an input of the match could then be computed from one
    of its outputs. Search backwards from the inputs; a node ordered before the whole match
    (`order` is an upper bound of its original position) cannot depend on it.
    """
    if len(outputs) < 2:
        return None
    inside = set(map(id, matched))
    lo = min(n.order_lo for n in matched)
    stack = [v.producer for n in matched for v in n.inputs
             if v is not None and v.producer is not None and id(v.producer) not in inside]
    seen: set[int] = set()
    while stack:
        p = stack.pop()
        if id(p) in seen or p.order < lo:
            continue
        seen.add(id(p))
        for v in p.inputs:
            if v is None or v.producer is None:
                continue
            if id(v.producer) in inside:
                return f"an input of the match depends on its output {v.name!r} (would create a cycle)"
            stack.append(v.producer)
    return None


@lru_cache(maxsize=None)
def _output_reach(p: Pattern) -> tuple[frozenset[tuple[str, str]], int]:
    """A further output's root op types and depth, computed once per pattern, not per attempt."""
    return frozenset(root_op_types(p)), pattern_depth(p)


def _nearby_outputs(p: Pattern, env: Bindings, anchors: list[Value]) -> Iterator[Value]:
    """Values that could be a further output of a multi-output pattern: outputs of nodes reachable
    downstream from what is already bound (the outputs share inputs or operators with it)."""
    kinds, depth = _output_reach(p)
    # Constants are left out: a weight shared by thousands of nodes would make this O(graph).
    start = [v for v in env.values.values() if not v.is_constant] + [
        v for n in env.nodes.values() for v in n.inputs if v is not None and not v.is_constant]
    seen: set[int] = set()
    frontier = start
    found: list[Value] = []
    for _ in range(depth):
        nxt: list[Value] = []
        for v in frontier:
            for c in v.consumers:
                if id(c) in seen or not c.alive:
                    continue
                seen.add(id(c))
                if (c.domain, c.op_type) in kinds:
                    found.extend(c.outputs)
                nxt.extend(c.outputs)
        frontier = nxt
    found.sort(key=lambda v: (v.producer.order, v.name))
    return iter(found)


def _op_histogram(graph: Graph) -> Counter:
    """Live nodes per op, counted per index list (no string per node)."""
    return Counter({(f"{d}." if d else "") + op: k for (d, op), lst in graph.by_op.items()
                    if (k := sum(1 for n in lst if n.alive))})


def _progress_bar(graph: Graph, levels: list[Dispatch]):
    total = sum(len(graph.by_op.get(k, ())) for level in levels for k in level.root_ops)
    if total < 20000:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="matching", unit="node", leave=False)


def finalize(graph: Graph, report: RewriteReport, target: str = "portable") -> onnx.ModelProto:
    """Write the graph back: local functions for fused ops (bodies for `target`) and for a user's
    ops (the subgraphs they replaced), opset import, fusion record."""
    model = graph.to_model()
    body_nodes = [n for body in graph.body_protos() for n in nested_nodes(body)]
    # Every domain a replacement introduced needs an opset import (fusegraph's at its version,
    # a user's custom domain at 1) for the model to be valid.
    domains = {n.domain for n in graph.live_nodes()} | {n.domain for n in body_nodes}
    for domain in sorted(domains - set(graph.opset)):
        version = fused_ops.VERSION if domain == fused_ops.DOMAIN else 1
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))
        graph.opset[domain] = version
    fused_ops.attach_functions(model, lambda n: graph.value(n.input[0]).dtype or graph.value(n.output[0]).dtype,
                               target)
    report.functions.attach(model)
    if report.fusions:
        record = [{"rule": f.rule, "matched": f.matched, "created": f.created} for f in report.fusions]
        props = {p.key: p for p in model.metadata_props}
        if FUSIONS_KEY in props:
            record = _earlier_fusions(props[FUSIONS_KEY].value) + record
            props[FUSIONS_KEY].value = json.dumps(record)
        else:
            onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                                FUSIONS_KEY: json.dumps(record)})
    return model


def _earlier_fusions(text: str) -> list:
    """The fusion record an earlier rewrite left in the model, which this one extends
    (`model_io.validate` has checked it is a JSON list of fusions)."""
    return json.loads(text)
