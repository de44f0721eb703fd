"""Local functions for a user's fused ops: the subgraph each one replaced, as its body.

A replacement may emit an op of a domain of its own (`op.MatMulBiasRelu(x, w, b, _domain="my.ops")`)
that no runtime knows. fusegraph's own ops carry the body their catalogue entry declares
(`fusegraph.ops.fused_ops`); a user's op gets, by default, the subgraph it replaced: the matched
nodes, the op's inputs as the function's inputs and its outputs as the function's outputs, the
constants the match read (as Constant nodes), and each attribute the pattern captured
(`Attr("axis")`) and the replacement passed on, under its name or with its value, as a reference
to the function's attribute. So the rewritten model runs in ONNX Runtime, `onnx.reference` and
TensorRT's parser (each inlines local functions) and `rewrite verify` compares it with the
original; a TensorRT plugin of the op's name can still take the node over.

One op, several bodies: matches whose subgraphs differ in what the op's inputs and attributes do
not carry (a constant, another branch of a tagged alternative) get one function each, told apart
by the ONNX `overload` field (IR 10) that each node names; the first body has no overload.

A body is derived only where it is the replacement's exact meaning: the op's outputs are what the
replacement returned for the pattern's outputs, its inputs are values from outside the match, and
everything else the matched nodes read is a constant. Otherwise (the op's output reshaped after
it, an input the replacement computed, an opaque outer-scope value inside an If body) the op is
left without a body, as before, and the model runs only where the op is registered. Cost: one
copy of the matched nodes per fusion into a user op; none for fusegraph's or standard ops.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .ir import Graph, Node, Value, nested_nodes
from .pattern import Attr, NodePattern, Pattern

#: Domains whose ops a runtime implements (the standard ones, ONNX Runtime's contrib ops):
#: their nodes need no body.
RUNTIME_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
#: The IR version that has `overload` on functions and nodes.
OVERLOAD_IR_VERSION = 10


def node_patterns(outputs: tuple[Pattern, ...]) -> dict[int, NodePattern]:
    """Every NodePattern of a rule's pattern by id, as the matcher's bindings key them."""
    found: dict[int, NodePattern] = {}

    def walk(p: Any) -> None:
        if isinstance(p, NodePattern):
            if id(p) in found:
                return
            found[id(p)] = p
        if isinstance(p, (Pattern, NodePattern)):
            for slot in type(p).__slots__:
                walk(getattr(p, slot, None))
        elif isinstance(p, (list, tuple)):
            for q in p:
                walk(q)
        elif isinstance(p, dict):
            for q in p.values():
                walk(q)
    walk(outputs)
    return found


class SubgraphFunctions:
    """The bodies collected during one rewrite, attached to the model by `attach`."""

    def __init__(self) -> None:
        #: (domain, op) -> [(body key, overload name, function)]
        self.bodies: dict[tuple[str, str], list[tuple[bytes, str, onnx.FunctionProto]]] = {}
        #: created node -> the overload of the body it calls
        self.calls: dict[Node, str] = {}

    def capture(self, graph: Graph, created: list[Node], results: tuple[Value, ...], replaced: list[Value],
                matched: list[Node], bound: dict[int, Node], patterns: dict[int, NodePattern],
                captures: dict[str, Any], fused_domain: str) -> None:
        """Record the body of every user op among `created`, the replacement of `matched` whose
        values `replaced` became `results`; `bound` maps pattern node ids to matched nodes."""
        ids = {id(n) for n in created}
        for node in created:
            if node.domain in RUNTIME_DOMAINS or node.domain == fused_domain:
                continue
            fn = _body(graph, node, ids, results, replaced, matched, bound, patterns, captures, self.calls)
            if fn is None:
                continue
            key = fn.SerializeToString()
            versions = self.bodies.setdefault((node.domain, node.op_type), [])
            overload = next((ov for k, ov, _ in versions if k == key), None)
            if overload is None:
                overload = f"v{len(versions) + 1}" if versions else ""
                fn.overload = overload
                versions.append((key, overload, fn))
            self.calls[node] = overload

    def attach(self, model: onnx.ModelProto) -> None:
        """Add the collected functions the model's live nodes call (not where the model already
        has a function of that name: the user's own body stays) and point each node at its body."""
        have = {(f.domain, f.name) for f in model.functions}
        overload_of = {n.outputs[0].name: ov for n, ov in self.calls.items() if n.alive}
        self.calls = {}  # the nodes are let go: the rewrite frees its IR once the model is written
        used: set[tuple[str, str, str]] = set()
        for proto in nested_nodes(model.graph):
            ov = overload_of.get(proto.output[0]) if proto.output else None
            if ov is None or (proto.domain, proto.op_type) in have:
                continue
            proto.overload = ov
            used.add((proto.domain, proto.op_type, ov))
        # A user op fused again by a later rule lives on inside the new op's body only.
        functions = {(d, op, ov): fn for (d, op), versions in self.bodies.items() for _, ov, fn in versions}
        todo = list(used)
        while todo:
            for n in functions[todo.pop()].node:
                inner = (n.domain, n.op_type, n.overload)
                if inner in functions and inner not in used and (n.domain, n.op_type) not in have:
                    used.add(inner)
                    todo.append(inner)
        for (domain, op), versions in sorted(self.bodies.items()):
            for _, ov, fn in versions:
                if (domain, op, ov) in used:
                    model.functions.append(fn)
                    if ov:
                        model.ir_version = max(model.ir_version, OVERLOAD_IR_VERSION)


def _body(graph: Graph, node: Node, created: set[int], results: tuple[Value, ...], replaced: list[Value],
          matched: list[Node], bound: dict[int, Node], patterns: dict[int, NodePattern],
          captures: dict[str, Any], calls: dict[Node, str]) -> onnx.FunctionProto | None:
    """`node`'s function: the matched subgraph in the names of `node`'s signature, or None where
    that would not be what the replacement means (see the module's docstring)."""
    inside = {id(n) for n in matched}
    new_outputs = {id(v): old for v, old in zip(results, replaced)}
    if any(id(v) not in new_outputs for v in node.outputs):
        return None  # the op's value is not what replaces the pattern's (say, reshaped after it)
    if any(v is None or (v.producer is not None and (id(v.producer) in inside or id(v.producer) in created))
           for v in node.inputs):
        return None  # an input the replacement computed, or one from inside the match
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in matched for a in n.attrs.values()):
        return None  # a body reading the enclosing scope
    names: dict[str, str] = {}
    inputs: list[str] = []
    for i, v in enumerate(node.inputs):
        formal = next((k for k, c in captures.items() if c is v), None)
        inputs.append(formal if formal is not None and formal not in inputs else f"input{i}")
        names.setdefault(v.name, inputs[-1])
    outputs = [f"output{k}" for k in range(len(node.outputs))]
    for k, v in enumerate(node.outputs):
        names[new_outputs[id(v)].name] = outputs[k]
    body: list[onnx.NodeProto] = []
    for n in sorted(matched, key=lambda n: n.order):
        for v in n.inputs:
            if v is None or v.name in names:
                continue
            if v.producer is not None and id(v.producer) in inside:
                continue
            array = v.const_value if v.is_constant else None
            if array is None:
                return None  # neither the op's input nor a constant: the op can't compute it
            names[v.name] = f"const{len(body)}"
            body.append(helper.make_node("Constant", [], [names[v.name]],
                                         value=numpy_helper.from_array(np.asarray(array), names[v.name])))
        for v in n.outputs:
            names.setdefault(v.name, f"t{len(names)}")
    pattern_of = {id(n): patterns.get(pid) for pid, n in bound.items()}
    for n in sorted(matched, key=lambda n: n.order):
        proto = helper.make_node(n.op_type, [names[v.name] if v is not None else "" for v in n.inputs],
                                 [names[v.name] for v in n.outputs], domain=n.domain)
        if calls.get(n):
            proto.overload = calls[n]  # an earlier user op, by the body it calls
        referenced = _referenced_attributes(n, pattern_of.get(id(n)), node, captures)
        for a in n.attrs.values():
            if a.name not in referenced:
                proto.attribute.append(a)
        for attr, (formal, kind) in referenced.items():
            ref = onnx.AttributeProto()
            ref.name, ref.type, ref.ref_attr_name = attr, kind, formal
            proto.attribute.append(ref)
        body.append(proto)
    domains = {"": graph.opset.get("", graph.opset.get("ai.onnx", 1))}
    domains.update({n.domain: graph.opset.get(n.domain, 1) for n in matched if n.domain not in ("", "ai.onnx")})
    return helper.make_function(node.domain, node.op_type, inputs, outputs, body,
                                [helper.make_opsetid(d, v) for d, v in sorted(domains.items())],
                                attributes=sorted(node.attrs))


def _referenced_attributes(n: Node, np_: NodePattern | None, fused: Node,
                           captures: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """n's attributes the pattern captured (`Attr("name")`) that `fused` carries, by the same name
    or else with the same value: attribute -> (the function's attribute, its type)."""
    out: dict[str, tuple[str, int]] = {}
    if np_ is None:
        return out
    for attr, want in np_.attrs.items():
        if not isinstance(want, Attr) or want.name is None or want.name not in captures:
            continue
        value = captures[want.name]
        candidates = [want.name] + sorted(k for k in fused.attrs if k != want.name)
        for k in candidates:
            a = fused.attrs.get(k)
            if a is not None and a.type not in (onnx.AttributeProto.TENSOR, onnx.AttributeProto.GRAPH) \
                    and _same(helper.get_attribute_value(a), value):
                out[attr] = (k, a.type)
                break
    return out


def _same(stored: Any, captured: Any) -> bool:
    if isinstance(stored, bytes):
        stored = stored.decode()
    if isinstance(stored, list) and isinstance(captured, (list, tuple)):
        return [s.decode() if isinstance(s, bytes) else s for s in stored] == list(captured)
    return type(stored) is type(captured) and stored == captured
