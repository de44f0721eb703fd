"""fusegraph's graph IR: a thin, indexed view over an ONNX ModelProto.

Why not onnx-graphsurgeon's Graph (the card's choice)? Importing, sorting and exporting a 100k-node
graph takes it about 8 s on the project's machine before any matching (benchmarks/RESULTS.md, §1),
while the goal is the whole rewrite in under 2 s. This IR keeps only what matching needs:

- one `Node` per NodeProto and one `Value` per tensor name, with producer and consumer links, so a
  pattern walks the graph in O(1) per edge;
- an index of live nodes by (domain, op_type), so a rule visits only the nodes of its root op;
- the original NodeProto for every untouched node, so exporting copies protos instead of
  rebuilding them, and initializers never leave their TensorProto (external data stays on disk).

Memory: the graph is never copied whole. Export (`to_model`) reorders and cuts the model's own
repeated fields in place, copying in only new and changed nodes; shape inference is handed the
model with its weights reduced to their types (`infer_types`), and `reload(infer=True)` runs it
between the old index freed and the new one built, so ONNX's C++ inference (about twice the
graph's size, without the weights) never comes on top of the IR.

Constants follow the ONNX IR: an initializer (dense or in `sparse_initializer`) or a `Constant`
node's output, except an initializer that is also a graph input, which is only a default the
caller may override. The body of an If/Loop/Scan is a `Graph` of its own (`subgraph`); the values
it reads from enclosing scopes are opaque there, like graph inputs.
"""

from __future__ import annotations

import ctypes
import gc
from collections import defaultdict
from typing import Any, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import external_data
from .errors import InputError
from .serialize import serialized

#: Constants bigger than this are never read from external data just to test a pattern's
#: constraint: weights stay on disk, scales and epsilons (a few elements) are read.
MAX_EXTERNAL_CONST_ELEMENTS = 4096
#: The collector generations that hold an IR built while `gc` is paused (`fusegraph.api`):
#: freeing one collects these only, since a full collection would rescan the caller's whole
#: heap (0.5 s a rewrite in a long-lived process such as a test run).
YOUNG_GENERATIONS = 1

_SUBGRAPH_ATTR_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


class Value:
    """A tensor: a graph input, an initializer, or a node output."""

    __slots__ = ("name", "producer", "consumers", "graph", "_const", "_type")

    def __init__(self, name: str, graph: "Graph"):
        self.name = name
        self.producer: Node | None = None
        # A dict used as an ordered set: O(1) removal even for a weight shared by 50k MatMuls.
        self.consumers: dict[Node, None] = {}
        self.graph = graph
        self._const: Any = _UNREAD
        self._type: onnx.TypeProto | None | object = _UNREAD

    def __repr__(self) -> str:
        return f"Value({self.name!r})"

    # -- type information ---------------------------------------------------------------
    @property
    def type_proto(self) -> onnx.TypeProto | None:
        if self._type is _UNREAD:
            self._type = self.graph._type_of(self.name)
        return self._type  # type: ignore[return-value]

    @type_proto.setter
    def type_proto(self, tp: onnx.TypeProto | None) -> None:
        self._type = tp

    @property
    def known_type(self) -> onnx.TypeProto | None:
        """The type if already known (declared, a constant's, or inferred before), without
        running whole-graph inference to find it: for checks that must stay cheap."""
        if self._type is _UNREAD:
            tp = self.graph._type_of(self.name, infer=False)
            if tp is not None:
                self._type = tp
            return tp
        return self._type  # type: ignore[return-value]

    @property
    def dtype(self) -> int | None:
        """The ONNX element type (onnx.TensorProto.FLOAT, ...) or None when unknown."""
        tp = self.type_proto
        if tp is None or not tp.HasField("tensor_type"):
            return None
        return tp.tensor_type.elem_type or None

    @property
    def shape(self) -> tuple[int | str | None, ...] | None:
        """Dims as ints (static), strings (symbolic) or None (unknown); None if rank unknown."""
        tp = self.type_proto
        if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
            return None
        return tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tp.tensor_type.shape.dim
        )

    @property
    def rank(self) -> int | None:
        s = self.shape
        return None if s is None else len(s)

    # -- constants ----------------------------------------------------------------------
    @property
    def is_constant(self) -> bool:
        return self.name in self.graph.constants or (
            self.producer is not None and self.producer.op_type == "Constant" and not self.producer.domain
        )

    @property
    def const_value(self) -> np.ndarray | None:
        """The constant's value, or None if it is not a constant (or a weight left on disk)."""
        if self._const is _UNREAD:
            self._const = self.graph._read_constant(self)
        return self._const

    @property
    def is_graph_output(self) -> bool:
        return self.name in self.graph.output_names


class _Unread:
    __slots__ = ()


_UNREAD = _Unread()


class Node:
    """An operator application. `proto` is the original NodeProto while the node is unchanged."""

    __slots__ = ("op_type", "domain", "name", "inputs", "outputs", "proto", "_attrs", "alive", "order",
                 "order_lo", "implicit_inputs")

    def __init__(self, op_type: str, domain: str, name: str, inputs: list[Value | None],
                 outputs: list[Value], attrs: dict[str, onnx.AttributeProto] | None = None,
                 proto: onnx.NodeProto | None = None):
        self.op_type = op_type
        self.domain = domain
        self.name = name
        self.inputs = inputs
        self.outputs = outputs
        self.proto = proto
        self._attrs = attrs
        self.alive = True
        # Position in topological order; a fused node spans [order_lo, order] of what it replaced.
        self.order = 0
        self.order_lo = 0
        self.implicit_inputs: list[Value] = []

    def __repr__(self) -> str:
        return f"Node({self.op_type}, {self.name!r})"

    @property
    def attrs(self) -> dict[str, onnx.AttributeProto]:
        if self._attrs is None:
            self._attrs = {a.name: a for a in self.proto.attribute} if self.proto is not None else {}
        return self._attrs

    def attr(self, name: str, default: Any = None) -> Any:
        """The attribute as a Python value (ints, floats, strings, lists, TensorProto)."""
        a = self.attrs.get(name)
        if a is None:
            return default
        value = helper.get_attribute_value(a)
        return value.decode() if isinstance(value, bytes) else value

    def touch(self) -> None:
        """Mark the node changed: export rebuilds its NodeProto from the fields."""
        if self.proto is not None:
            _ = self.attrs
            self.proto = None

    def to_proto(self) -> onnx.NodeProto:
        if self.proto is not None:
            return self.proto
        p = onnx.NodeProto()
        p.op_type = self.op_type
        p.domain = self.domain
        p.name = self.name
        p.input.extend(v.name if v is not None else "" for v in self.inputs)
        p.output.extend(v.name for v in self.outputs)
        p.attribute.extend(self.attrs.values())
        return p


class Graph:
    """A graph of a model, indexed for matching and edited in batches: the main graph, or (with
    `proto` and `parent`) the body of an If/Loop/Scan node, edited in place in its attribute."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | None = None, *,
                 proto: onnx.GraphProto | None = None, parent: "Graph | None" = None):
        self.model = model
        self.base_dir = base_dir
        self.proto = model.graph if proto is None else proto
        self.parent = parent
        self.root: Graph = self if parent is None else parent.root
        self._index()

    def _index(self) -> None:
        """Read the graph from its proto: nodes, values, constants, the op index."""
        g = self.proto
        self.opset = {o.domain or "": o.version for o in self.model.opset_import}
        self.values: dict[str, Value] = {}
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        input_names = {i.name for i in g.input}
        #: Initializers that are constants: dense or sparse, and not also a graph input (those
        #: are defaults a caller may override). Sparse ones stay SparseTensorProtos, untouched.
        self.constants: dict[str, onnx.TensorProto | onnx.SparseTensorProto] = {
            name: t for name, t in self.initializers.items() if name not in input_names}
        self.constants.update((t.values.name, t) for t in g.sparse_initializer if t.values.name not in input_names)
        self._value_info: dict[str, onnx.ValueInfoProto] | None = None
        self._inferred = False
        self.nodes: list[Node] = []
        self.by_op: dict[tuple[str, str], list[Node]] = defaultdict(list)
        self._used_node_names: set[str] | None = None  # built on the first new node
        self._counter = 0
        #: Nodes that hold subgraph bodies (If, Loop, Scan, ...), in graph order.
        self.with_bodies: list[Node] = []
        self._body_names: set[str] | None = None  # every name defined in a body; root only
        #: Names of values created by edits (their types are unknown until inferred).
        self.created_values: set[str] = set()
        #: True when an edit may have broken the order invariant; see `toposort`.
        self.order_dirty = True
        #: self.nodes[:_sorted_len] is the last topological order; nodes added since follow it.
        self._sorted_len = 0

        values = self.values
        nodes = self.nodes
        by_op = self.by_op
        for p in g.node:
            op_type = p.op_type
            domain = p.domain
            ins: list[Value | None] = []
            node = Node(op_type, domain, p.name, ins, [], None, p)
            for name in p.input:
                if not name:
                    ins.append(None)
                    continue
                v = values.get(name)
                if v is None:
                    v = values[name] = Value(name, self)
                v.consumers[node] = None
                ins.append(v)
            outs = node.outputs
            for name in p.output:
                if not name:  # an omitted optional output: not a tensor, just a position
                    outs.append(_omitted_output(node, self))
                    continue
                v = values.get(name)
                if v is None:
                    v = values[name] = Value(name, self)
                elif v.producer is not None:
                    raise InputError(f"tensor {name!r} is produced by two nodes ({v.producer.name!r}, {p.name!r})")
                v.producer = node
                outs.append(v)
            node.order = node.order_lo = len(nodes)
            nodes.append(node)
            by_op[(domain, op_type)].append(node)
            if op_type in ("If", "Loop", "Scan") or (domain and _has_subgraph(p)):
                self._link_outer_scope(node)
                self.with_bodies.append(node)
        self.inputs = [self.value(i.name) for i in g.input]
        self.outputs = [self.value(o.name) for o in g.output]
        self.output_names = {v.name for v in self.outputs}
        for name in self.initializers:
            self.value(name)
        for t in g.sparse_initializer:
            self.value(t.values.name)

    def reload(self, *, infer: bool = False) -> None:
        """Index the graph anew from its proto, as `to_model` wrote it: fresh nodes and values
        (those held before are stale), types inferred again when asked for, or now (`infer`).

        Memory: the old nodes and values are collected before the new ones are made (they
        reference each other: while `fusegraph.api` pauses the cyclic collector they would
        stay), and inference with `infer` runs in between, on the model alone: ONNX's
        inference takes about twice the graph's size (its C++ copy of the nodes and what it
        infers), which would otherwise come on top of the IR's."""
        self.nodes, self.values, self.by_op, self.with_bodies = [], {}, defaultdict(list), []
        self.inputs, self.outputs, self._value_info = [], [], None
        gc.collect(YOUNG_GENERATIONS)
        inferred = self._inferred_types() if infer else None
        self._index()
        if infer:
            self._inferred = True
            self._value_info = self._declared_types()
            for vi in inferred.value_info if inferred is not None else ():
                self._value_info.setdefault(vi.name, vi)

    # -- lookup -------------------------------------------------------------------------
    def value(self, name: str) -> Value:
        v = self.values.get(name)
        if v is None:
            v = self.values[name] = Value(name, self)
        return v

    def live_nodes(self) -> Iterator[Node]:
        return (n for n in self.nodes if n.alive)

    def _type_of(self, name: str, infer: bool = True) -> onnx.TypeProto | None:
        if self._value_info is None:
            self._value_info = self._declared_types()
        init = self.constants.get(name)
        if init is not None:
            dense = init.values if isinstance(init, onnx.SparseTensorProto) else init
            return helper.make_tensor_type_proto(dense.data_type, list(init.dims))
        v = self.values.get(name)
        if v is not None and v.producer is not None and v.producer.op_type == "Constant":
            t = v.producer.attr("value")
            if isinstance(t, onnx.TensorProto):
                return helper.make_tensor_type_proto(t.data_type, list(t.dims))
        vi = self._value_info.get(name)
        if vi is None and infer and not self._inferred:
            self._infer_types()
            vi = self._value_info.get(name)
        if vi is not None and vi.type.HasField("tensor_type"):
            return vi.type
        return None

    def _declared_types(self) -> dict[str, onnx.ValueInfoProto]:
        g = self.proto
        declared = {vi.name: vi for vi in g.value_info}
        for vi in list(g.input) + list(g.output):
            declared[vi.name] = vi
        return declared

    def _infer_types(self) -> None:
        """Run ONNX shape inference once, the first time a rule asks for a type nobody wrote
        (unless `reload(infer=True)` ran it already).

        Exporters that write no value_info (torch.onnx's TorchScript path) leave rules blind to
        shapes; inference with data propagation keeps symbolic dims through Shape/Gather/Concat
        chains. It runs on the model as loaded, without its weights (`infer_types`), and only
        on demand, so rules that never ask about intermediate types never pay for it. A
        subgraph body keeps the types its own value_info declares.
        """
        self._inferred = True
        inferred = self._inferred_types()
        for vi in inferred.value_info if inferred is not None else ():
            self._value_info.setdefault(vi.name, vi)

    def _inferred_types(self) -> onnx.GraphProto | None:
        """What inference adds (value_info), or None for a subgraph body or where it fails."""
        if self.parent is not None:
            return None
        try:
            inferred = infer_types(self.model)
        except (onnx.shape_inference.InferenceError, ValueError):
            return None
        # Kept apart from the inferred model, whose copy of the nodes would otherwise stay
        # alive as long as one of its value_info is referenced.
        types = onnx.GraphProto()
        types.value_info.extend(inferred.graph.value_info)
        return types

    def _read_constant(self, v: Value) -> np.ndarray | None:
        t = self.constants.get(v.name)
        if isinstance(t, onnx.SparseTensorProto):
            return _densify(t)
        if t is None:
            p = v.producer
            if p is None or p.op_type != "Constant" or p.domain:
                return None
            t = p.attr("value")
            if t is None:
                for key, make in (("value_float", np.float32), ("value_int", np.int64),
                                  ("value_floats", np.float32), ("value_ints", np.int64)):
                    raw = p.attr(key)
                    if raw is not None:
                        return np.asarray(raw, dtype=make)
                return None
        if t.data_location == onnx.TensorProto.EXTERNAL:
            if int(np.prod(t.dims)) > MAX_EXTERNAL_CONST_ELEMENTS or self.base_dir is None:
                return None
            return _read_external(t, self.base_dir)
        return numpy_helper.to_array(t)

    # -- editing ------------------------------------------------------------------------
    def fresh_value_name(self, hint: str) -> str:
        """A name no value of this graph or of an enclosing one has (names are global in ONNX);
        one counter for the whole model keeps the bodies of sibling branches apart too."""
        root = self.root
        while True:
            root._counter += 1
            name = f"{hint}__{root._counter}"
            if not self._defines_in_scope(name):
                return name

    def _defines_in_scope(self, name: str) -> bool:
        g: Graph | None = self
        while g is not None:
            if name in g.values:
                return True
            g = g.parent
        root = self.root
        if root._body_names is None:
            root._body_names = {name for node in root.with_bodies for a in node.attrs.values()
                                for body in _attr_graphs(a) for name in _defined_names(body)}
        return name in root._body_names

    def fresh_node_name(self, hint: str) -> str:
        if self._used_node_names is None:
            self._used_node_names = {n.name for n in self.nodes}
        name = hint
        while name in self._used_node_names:
            self._counter += 1
            name = f"{hint}_{self._counter}"
        self._used_node_names.add(name)
        return name

    def add_node(self, op_type: str, inputs: list[Value | None], num_outputs: int = 1, *,
                 domain: str = "", attrs: dict[str, Any] | None = None, name: str | None = None,
                 output_hint: str | None = None) -> Node:
        """Append a new node with fresh output values; order is restored by `toposort`."""
        protos = {k: helper.make_attribute(k, a) for k, a in (attrs or {}).items() if a is not None}
        node_name = self.fresh_node_name(name or op_type)
        hint = output_hint or node_name
        outs = [Value(self.fresh_value_name(hint), self) for _ in range(num_outputs)]
        for v in outs:
            self.values[v.name] = v
        node = Node(op_type, domain, node_name, list(inputs), outs, protos)
        for v in inputs:
            if v is not None:
                v.consumers[node] = None
        for v in outs:
            v.producer = node
            v._type = None
        node.order = node.order_lo = len(self.nodes)
        self.nodes.append(node)
        self.by_op[(domain, op_type)].append(node)
        self.created_values.update(v.name for v in outs)
        return node

    def add_initializer(self, array: np.ndarray, hint: str = "const") -> Value:
        name = self.fresh_value_name(hint)
        t = numpy_helper.from_array(np.asarray(array), name)
        self.initializers[name] = self.constants[name] = t
        self.proto.initializer.append(t)
        return self.value(name)

    def discard_new_node(self, node: Node) -> None:
        """Undo `add_node` (newest first): the node, its outputs and its index entries go."""
        self.remove_node(node)
        _pop_last(self.nodes, node)
        _pop_last(self.by_op[(node.domain, node.op_type)], node)
        for v in node.outputs:
            self.values.pop(v.name, None)
            self.created_values.discard(v.name)

    def discard_new_initializer(self, v: Value) -> None:
        """Undo `add_initializer` (newest first)."""
        t = self.initializers.pop(v.name)
        self.constants.pop(v.name, None)
        self.values.pop(v.name, None)
        inits = self.proto.initializer
        for i in range(len(inits) - 1, -1, -1):  # the last one, when undoing newest first
            if inits[i].name == t.name:
                del inits[i]
                break

    def remove_node(self, node: Node) -> None:
        """Disconnect a node; its outputs must already have no consumers that stay alive."""
        node.alive = False
        for v in node.inputs:
            if v is not None:
                v.consumers.pop(node, None)
        for v in node.implicit_inputs:
            v.consumers.pop(node, None)
        for v in node.outputs:
            if v.producer is node:
                v.producer = None

    def set_producer(self, value: Value, node: Node, index: int) -> None:
        """Make `value` (an existing tensor, name kept) the `index`-th output of `node`."""
        old = node.outputs[index]
        if old is value:
            return
        old.producer = None
        self.values.pop(old.name, None)
        self.created_values.discard(old.name)
        node.outputs[index] = value
        value.producer = node
        node.touch()

    def replace_uses(self, old: Value, new: Value) -> None:
        """Point every consumer of `old` at `new` (graph outputs are handled by the caller)."""
        for c in old.consumers:
            c.inputs = [new if v is old else v for v in c.inputs]
            new.consumers[c] = None
            c.touch()
        old.consumers = {}

    # -- order and export ---------------------------------------------------------------
    def toposort(self) -> list[Node]:
        """Live nodes in topological order; raises InputError on a cycle.

        Rewrites keep an invariant that makes this linear: a fused node takes the position of the
        last node it replaced (`order`), where all its inputs are already computed and all its
        consumers still follow, so the new nodes are spliced in after that position, in creation
        order. Edits that may break the invariant (`order_dirty`) get a full depth-first sort.
        """
        if self.order_dirty:
            live = [n for n in self.nodes if n.alive]
            if not _is_topological(live):
                live = _depth_first_order(live)
            self.order_dirty = False
        else:
            live = _splice(self.nodes[:self._sorted_len], self.nodes[self._sorted_len:])
        for i, n in enumerate(live):
            n.order = n.order_lo = i
        self.nodes = live
        self._sorted_len = len(live)
        return live

    def remove_dead(self) -> int:
        """Remove nodes none of whose outputs is used (ONNX ops have no side effects)."""
        outputs = self.output_names

        def unused(n: Node) -> bool:
            for v in n.outputs:
                if v.consumers or v.name in outputs:
                    return False
            return True
        work = [n for n in self.nodes if n.alive and unused(n)]
        removed = 0
        while work:
            n = work.pop()
            if not n.alive:
                continue
            self.remove_node(n)
            removed += 1
            for v in _node_deps(n):
                p = v.producer
                if p is not None and p.alive and unused(p):
                    work.append(p)
        return removed

    def to_model(self) -> onnx.ModelProto:
        """Write the graph back into the model (nodes, initializers, value_info); a subgraph
        body is written back into its GraphProto, which its node's attribute holds."""
        order = self.toposort()
        g = self.proto
        # The protos stay where they are and are reordered in place; only new and changed
        # nodes are copied in. (Clearing and refilling the field would copy every node, and
        # every kept weight below, into the model's memory, which frees nothing until the
        # model goes: three copies of the graph for a rewrite with canonicalization.)
        position: dict[int, int] = {}
        for i, n in enumerate(order):
            if n.proto is None:
                g.node.append(n.to_proto())
                n.proto = g.node[-1]
            position[id(n.proto)] = i
        _keep_in_place(g.node, lambda p: position.get(id(p)))
        values = self.values
        input_names = {v.name for v in self.inputs}

        def used(name: str) -> bool:
            """An unused initializer goes, but not the default of a graph input (the input stays)."""
            v = values.get(name)
            return v is not None and (bool(v.consumers) or name in self.output_names or name in input_names)
        if not all(used(name) for name in self.initializers):
            _keep_in_place(g.initializer, lambda t: 0 if used(t.name) else None)
            self.initializers = {t.name: t for t in g.initializer}
            self.constants = {name: t for name, t in self.constants.items()
                              if name in self.initializers or isinstance(t, onnx.SparseTensorProto)}

        def produced(name: str) -> bool:
            v = values.get(name)
            return v is not None and v.producer is not None and v.producer.alive
        if not all(produced(vi.name) for vi in g.value_info):
            _keep_in_place(g.value_info, lambda vi: 0 if produced(vi.name) else None)
        return self.model

    def body_protos(self) -> Iterator[onnx.GraphProto]:
        """The subgraph bodies the live nodes hold (in their attributes)."""
        for node in self.with_bodies:
            if node.alive:
                for a in node.attrs.values():
                    yield from _attr_graphs(a)

    def bodies(self) -> Iterator["Graph"]:
        """The subgraph bodies of the live nodes, each a Graph that edits its GraphProto in
        place (in the node's attribute, so export needs nothing more)."""
        for proto in self.body_protos():
            yield Graph(self.model, self.base_dir, proto=proto, parent=self)

    def _link_outer_scope(self, node: Node) -> None:
        """Count values a subgraph reads from the outer scope as uses by the node that owns it."""
        names: set[str] = set()
        for a in node.proto.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names |= _outer_names(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    names |= _outer_names(sub)
        for name in sorted(names):
            v = self.value(name)
            v.consumers[node] = None
            node.implicit_inputs.append(v)


def _keep_in_place(field, rank) -> None:
    """Keep the elements of a repeated message field that `rank` gives a number, ordered by it
    (stably), and drop those it gives None, without copying any: the field is sorted in place
    and cut."""
    items = list(field)  # held, so that the sort sees these same objects (ids stay theirs)
    ranks = {id(item): rank(item) for item in items}
    kept = [r for r in ranks.values() if r is not None]
    if len(kept) == len(items) and all(a <= b for a, b in zip(kept, kept[1:])):
        return
    last = len(items)
    field.sort(key=lambda item: last if ranks[id(item)] is None else ranks[id(item)])
    del field[len(kept):]


def _splice(ordered: list[Node], added: list[Node]) -> list[Node]:
    """The live nodes of `ordered` (node i has order i) with each added node placed right after
    the position its `order` names, added nodes in the order they were created."""
    after: dict[int, list[Node]] = {}
    for n in added:
        if n.alive:
            after.setdefault(n.order, []).append(n)
    live: list[Node] = []
    for n in ordered:
        if n.alive:
            live.append(n)
        more = after.get(n.order)
        if more:
            live.extend(more)
    return live


def _is_topological(nodes: list[Node]) -> bool:
    """One linear pass: does every node come after the producers of its inputs?"""
    for i, n in enumerate(nodes):
        n.order = i
    pos = -1
    for n in nodes:
        pos += 1
        for v in n.inputs:
            if v is not None:
                p = v.producer
                if p is not None and p.alive and p.order >= pos:
                    return False
        for v in n.implicit_inputs:
            p = v.producer
            if p is not None and p.alive and p.order >= pos:
                return False
    return True


def _depth_first_order(nodes: list[Node]) -> list[Node]:
    """Each node after its producers, keeping the given order where it is already valid."""
    state: dict[int, int] = {}  # id(node) -> 1 visiting, 2 done
    order: list[Node] = []
    for root in nodes:
        if state.get(id(root)) == 2:
            continue
        stack: list[tuple[Node, list[Value], int]] = [(root, list(_node_deps(root)), 0)]
        state[id(root)] = 1
        while stack:
            node, deps, i = stack[-1]
            while i < len(deps):
                p = deps[i].producer
                i += 1
                if p is None or not p.alive:
                    continue
                s = state.get(id(p))
                if s == 2:
                    continue
                if s == 1:
                    raise InputError(f"the graph has a cycle through node {p.name!r} ({p.op_type})")
                state[id(p)] = 1
                stack[-1] = (node, deps, i)
                stack.append((p, list(_node_deps(p)), 0))
                break
            else:
                stack.pop()
                state[id(node)] = 2
                order.append(node)
    return order


def _node_deps(node: Node) -> Iterator[Value]:
    for v in node.inputs:
        if v is not None:
            yield v
    yield from node.implicit_inputs


def _has_subgraph(p: onnx.NodeProto) -> bool:
    return any(a.type in _SUBGRAPH_ATTR_TYPES for a in p.attribute)


def _attr_graphs(a: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if a.type == onnx.AttributeProto.GRAPH:
        return [a.g]
    if a.type == onnx.AttributeProto.GRAPHS:
        return list(a.graphs)
    return []


def nested_nodes(g: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of `g` and of the bodies nested in it."""
    for n in g.node:
        yield n
        for a in n.attribute:
            for sub in _attr_graphs(a):
                yield from nested_nodes(sub)


def _defined_names(g: onnx.GraphProto) -> Iterator[str]:
    """Every name `g` or a body nested in it defines."""
    yield from (i.name for i in g.input)
    yield from (t.name for t in g.initializer)
    for n in g.node:
        yield from n.output
        for a in n.attribute:
            for sub in _attr_graphs(a):
                yield from _defined_names(sub)


def _outer_names(g: onnx.GraphProto) -> set[str]:
    """Names a subgraph uses but does not define (its references to enclosing scopes)."""
    defined = ({i.name for i in g.input} | {t.name for t in g.initializer}
               | {t.values.name for t in g.sparse_initializer})
    used: set[str] = set()
    for n in g.node:
        used.update(x for x in n.input if x)
        defined.update(n.output)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= _outer_names(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    used |= _outer_names(sub)
    used.update(o.name for o in g.output)
    return used - defined


def _pop_last(nodes: list[Node], node: Node) -> None:
    if nodes and nodes[-1] is node:
        nodes.pop()
    else:
        nodes.remove(node)


def _omitted_output(node: Node, graph: Graph) -> Value:
    """A placeholder for an optional output the node leaves out (`''`): it keeps the position
    of the outputs after it, belongs to no name index, and is never read."""
    v = Value("", graph)
    v.producer = node
    v._type = None
    return v


def infer_types(model: onnx.ModelProto, *, data_prop: bool = True,
                default_opset: int | None = None) -> onnx.ModelProto:
    """ONNX shape inference of `model` without a copy of its weights: the model inference sees
    (and returns, typed) is `model` with every tensor of rank 2 or more, initializer or
    `Constant`, reduced to its name, element type and dims.

    `onnx.shape_inference.infer_shapes` serializes the model it is given and returns an
    inferred copy of it, weights included: on a model of 20 MB of weights, three more copies
    at the peak and one that stays alive as long as any of its value_info is referenced.
    Inference reads the data of tensors of rank 0 or 1 only (Reshape/Expand/Slice/Pad shapes,
    axes, scales; data propagation reads 1-D integers alone), so what it infers is the same.
    The reduced model is serialized straight from `model`, piece by piece (`serialize`).
    `default_opset` infers as if the model imported that version of the default domain (the
    model itself is left as it is). Raises what `infer_shapes` raises."""
    def types_only(field: str, item):
        if field == "initializer" and len(item.dims) > 1:
            return _type_only(item)
        if field == "node" and item.op_type == "Constant" and item.domain in ("", "ai.onnx"):
            return _constant_type_only(item)
        if field == "opset_import" and default_opset is not None and item.domain in ("", "ai.onnx"):
            return onnx.OperatorSetIdProto(domain=item.domain, version=default_opset)
        return item
    reduced = b"".join(serialized(model, types_only))
    try:
        return onnx.shape_inference.infer_shapes(reduced, data_prop=data_prop)
    finally:
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's `malloc_trim`; elsewhere a
    no-op). ONNX's C++ inference frees what it built (about twice the graph's size) into the C
    heap, where Python's own small objects (the IR's nodes and values, in arenas of their own)
    never reuse it: without this it would stay in the process for the rest of the rewrite."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _libc_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc
        return None


_malloc_trim = _libc_malloc_trim()


def write_inferred_types(model: onnx.ModelProto) -> None:
    """Type `model` in place as `onnx.shape_inference.infer_shapes(model)` would return it (the
    same value_info, graph output types and If/Loop/Scan bodies), without its copies of the
    weights (`infer_types`)."""
    inferred = infer_types(model, data_prop=False).graph
    g = model.graph
    g.ClearField("value_info")
    g.value_info.extend(inferred.value_info)
    for out, typed in zip(g.output, inferred.output):
        if out != typed:
            out.CopyFrom(typed)
    for n, typed in zip(g.node, inferred.node):
        if _has_subgraph(n) and n != typed:  # inference types the bodies' values too
            n.CopyFrom(typed)


def _type_only(t: onnx.TensorProto) -> onnx.TensorProto:
    return onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)


def _constant_type_only(n: onnx.NodeProto) -> onnx.NodeProto:
    """A `Constant` node whose tensor of rank 2 or more is reduced to its type (`infer_types`)."""
    value = next((a for a in n.attribute if a.name == "value"), None)
    if value is None or len(value.t.dims) <= 1:
        return n
    typed = onnx.NodeProto(name=n.name, op_type=n.op_type, domain=n.domain, input=n.input, output=n.output)
    for a in n.attribute:
        if a.name == "value":
            typed.attribute.add(name=a.name, type=a.type, t=_type_only(a.t))
        else:
            typed.attribute.append(a)
    return typed


def _densify(t: onnx.SparseTensorProto) -> np.ndarray:
    """A sparse initializer's value as a dense array (read only when a rule asks for it)."""
    values = numpy_helper.to_array(t.values)
    dense = np.zeros(tuple(t.dims), dtype=values.dtype)
    indices = numpy_helper.to_array(t.indices) if t.HasField("indices") else np.zeros((0,), np.int64)
    if indices.ndim == 2:  # [NNZ, rank] coordinates
        dense[tuple(indices.T)] = values
    else:  # [NNZ] positions in the flattened tensor
        dense.reshape(-1)[indices] = values
    return dense


def _read_external(t: onnx.TensorProto, base_dir: str) -> np.ndarray:
    """Read one small external tensor without touching the rest of its file (the reference is
    checked first: inside the model's folder and long enough, else InputError)."""
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.frombuffer(external_data.read(t, base_dir), dtype=dtype).reshape(tuple(t.dims)).copy()
