"""Canonicalization before matching: one spelling for what exporters write many ways.

A batch-1 static TorchScript export computes an attention mask's Expand shape as
`Where(Equal(C, Mul(ConstantOfShape([4]), -1)), ConstantOfShape(...), C)` over constants, reads
the same value through two no-op Casts, and derives Reshape targets from `Shape` of tensors whose
dims are static. Shape inference cannot see through a computed shape (it types that mask
`[?,?,32,32]`), so a rule that checks the mask's broadcast refuses it, and a pattern written for
`x` misses `Cast(x)`. Rather than teach every pattern every spelling, this stage rewrites the main
graph into one spelling first; each step is counted like a rule (`RewriteReport.canonicalized`):

- `fold_constants`: a node of a deterministic standard op (`FOLDABLE`) whose inputs are all small
  constants is evaluated by ONNX's reference implementation, and its consumers read the result;
- `fold_shapes`: `Shape`/`Size` of a value whose dims are static, and Gather/Slice/Concat/...
  of a shape that pick only its static dims, then on through `fold_constants`. A partially
  static shape is a value and a mark per element (known; computed from an unknown dim; or a
  dynamic dim itself, with the value and index `Shape` read it from): it flows through the
  ops that only move elements (`_DATA_INPUTS`: the marks move with them) and the elementwise
  ones (`_ELEMENTWISE`: an element is known where all the elements it is computed from are),
  so `Where(Equal(C, -1), 1, C)` of `C = [batch, -1, 1, past + 1]` is `[?, 1, 1, ?]`. A
  Reshape of x whose target's unknown elements are all x's own dims at the same index
  (`x.flatten(-2)`: `Concat(Shape(x)[:-2], [-1])`) reads a constant target with 0 there;
- `prove_shapes`: an Expand or Reshape whose shape stays computed but is partly known gets the
  output dims that shape proves (`Expand(m [b, 1, 1, k], [?, 1, 1, ?])` is `[?, 1, 1, ?]`, where
  shape inference, blind to Where, types it `[?, ?, ?, ?]`), written into the model's
  value_info for inference to carry on. A dim is only proven from known elements (an unknown
  element of an Expand shape proves the input's dim only where that dim is a static one
  other than 1); nothing is assumed of an unknown one. At opset 13, whose inference gives a
  Reshape by a computed shape no rank, Reshape outputs are typed as opset 14 types them;
- `remove_noops`: Identity, Cast to the input's own type, Reshape/Expand to the input's own static
  shape, `Mul(x, 1)`/`Div(x, 1)` by a one-element 1 that broadcasting does not grow x by (not
  `Add(x, 0)`: it turns -0.0 into +0.0);
- `cse`: nodes with the same op, attributes and inputs (constants compared by value) computed
  once. Never for random ops, ops of other domains or nodes that own subgraphs.

The evaluation is shared: `evaluate` gives a pattern's condition what the folding knows of a
value (RoPE's Slice bounds and Reshape targets, an attention mask's constant values), with the
same kernels, caps and notion of a constant.

Contract. The canonical graph computes the same outputs as the original, bit for bit (folding
uses only exactly rounded ops). Graph inputs and outputs keep their names and order; a graph
output whose producer is folded is produced by a `Constant` of that name, and a no-op or
duplicate whose output is a graph output (or is read by a subgraph by name) stays. Initializers
that are also graph inputs can be overridden at run time, so they are not constants. Nothing that
reads a weight (a float initializer of more than one element) or reads or produces more than
`MAX_FOLD_ELEMENTS` elements is folded: weights are never read nor duplicated (`Transpose(weight)`
stays), and a model grows by at most the few small constants that replace the nodes computing them. Nodes inside If/Loop/Scan bodies are left alone.

Cost. One pass over the nodes in topological order: O(1) per node plus the evaluation of small
tensors (a cached reference kernel per distinct node signature, ~20 µs a call). Types come from
the IR, which runs ONNX shape inference at most once on the model as loaded; when anything
changed, the IR is reloaded once from the canonical model, so rules see the types the folding made
static (the mask above becomes `[1,1,32,32]`), at the price of one more inference (and one
more where `prove_shapes` typed something, or an opset-13 model has untyped Reshapes). On a 128-layer
static batch-1 Llama stand-in (18k nodes) the stage takes 0.6 s of CPU, a 100k-node graph with
nothing to change 0.4 s. Memory: the graph is reloaded in place (`Graph.reload`: the old nodes and
values are freed before the new ones are made and inference runs in between, on the model
without its weights), so the stage never holds two IRs or a copy of the weights.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .ir import Graph, Node, Value, infer_types
from .rewrite import RewriteReport

#: The most elements a folded node may read or produce: shape vectors, scalars, small masks.
#: Weights are bigger, so they are never read here nor copied into a folded result.
MAX_FOLD_ELEMENTS = 1024

#: Deterministic standard ops whose reference results equal ONNX Runtime's bit for bit: integer
#: and bool logic, data movement, and exactly rounded float arithmetic (no transcendentals, whose
#: last bit depends on the library).
FOLDABLE = frozenset({
    "Abs", "Add", "And", "Cast", "CastLike", "Ceil", "Concat", "ConstantOfShape", "Div", "Equal",
    "Expand", "Flatten", "Floor", "Gather", "GatherElements", "Greater", "GreaterOrEqual",
    "Identity", "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Not", "Or", "Range",
    "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSum", "Reshape", "Shape", "Sign", "Size",
    "Slice", "Sqrt", "Squeeze", "Sub", "Tile", "Transpose", "Trilu", "Unsqueeze", "Where", "Xor",
})

#: Ops exact on integers only: a float sum's rounding depends on its order, ONNX Runtime's
#: and numpy's differ.
_INTEGER_ONLY = frozenset({"Range", "ReduceProd", "ReduceSum"})

#: Ops that only move elements of these inputs (None: all of them). A shape with unknown dims
#: may be their data; the result is known when it picked none of the unknown dims.
_DATA_INPUTS: dict[str, tuple[int, ...] | None] = {
    "Concat": None, "Flatten": (0,), "Gather": (0,), "Identity": (0,), "Reshape": (0,),
    "Slice": (0,), "Squeeze": (0,), "Unsqueeze": (0,),
}

#: Ops computing each output element from the input elements broadcasting aligns with it: an
#: output element is known where all of those are.
_ELEMENTWISE = frozenset({
    "Abs", "Add", "And", "Cast", "Ceil", "Div", "Equal", "Floor", "Greater", "GreaterOrEqual",
    "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Not", "Or", "Sign", "Sub", "Where",
    "Xor",
})

#: Ops whose two evaluations may differ: never merged by CSE.
_RANDOM = frozenset({"Bernoulli", "Dropout", "Multinomial", "RandomNormal", "RandomNormalLike",
                     "RandomUniform", "RandomUniformLike"})

_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                          onnx.TensorProto.BFLOAT16})

#: Stands for an unknown element of a partially known value while evaluating it (its mask says
#: it is unknown): 1 divides and indexes without failing.
_FILLER = 1

_PLAIN_DTYPES = frozenset(np.dtype(t) for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64))

@dataclass
class Canonicalized:
    """What `canonicalize` did: the graph to match on, the steps taken, and the main graph's op
    counts before and after it (If/Loop/Scan bodies are left as they are)."""

    graph: Graph
    steps: Counter
    ops_before: Counter
    ops_after: Counter
    seconds: float

    def amend(self, report: RewriteReport) -> None:
        """Fold this stage into a `RewriteReport` of the rewrite that followed it: the counts
        before are the model's as loaded (the rewrite counted the canonical main graph)."""
        report.canonicalized = self.steps
        before = Counter(report.ops_before)
        before.subtract(self.ops_after)
        before.update(self.ops_before)
        report.ops_before = +before
        report.seconds += self.seconds


def canonicalize(graph: Graph) -> Canonicalized:
    """Canonicalize `graph` (edited in place); returns the graph rules should match on."""
    start = time.perf_counter()
    ops_before = _op_counts(graph)
    canonicalizer = _Canonicalizer(graph)
    steps = canonicalizer.run()
    shapes = canonicalizer.partial_shapes()
    del canonicalizer  # its values and nodes go with the graph's when it is reloaded
    if steps:
        model = graph.to_model()
        if steps["fold_constants"] or steps["fold_shapes"]:
            _drop_unknown_dims(model.graph)
        graph.reload(infer=True)
        graph.toposort()
    # Proven on the types of the canonical graph (folding typed more of the Expand inputs),
    # then typed by one more inference, only where a proof added a static dim.
    proven = _proven_dims(graph, shapes) | _reshape_ranks_at_opset_13(graph)
    if proven:
        steps["prove_shapes"] = len(proven)
        _write_proven_dims(graph.to_model().graph, proven)
        graph.reload(infer=True)
        graph.toposort()
    return Canonicalized(graph, steps, ops_before, _op_counts(graph), time.perf_counter() - start)


@dataclass
class Evaluated:
    """What `evaluate` knows of a value: its elements, and which of them are unknown (0 known,
    -1 computed from an unknown dim, k > 0 the dynamic dim `dims_of[k]` itself: (the value
    whose `Shape` read it, its index, its symbolic name or None))."""

    elements: np.ndarray
    unknown: np.ndarray
    dims_of: list[tuple[Value | None, int, str | None]]

    @property
    def value(self) -> np.ndarray | None:
        """The whole value, if every element is known."""
        return None if self.unknown.any() else self.elements

    def dims(self) -> np.ndarray:
        """The elements as an object array: ints, symbolic names (str) and None (unknown)."""
        out = np.empty(self.elements.shape, object)
        for i, (e, u) in enumerate(zip(self.elements.reshape(-1).tolist(), self.unknown.reshape(-1).tolist())):
            out.reshape(-1)[i] = e if u == 0 else (self.dims_of[u][2] if u > 0 else None)
        return out


def evaluate(v: Value | None, *, max_nodes: int = 32, max_elements: int = MAX_FOLD_ELEMENTS,
             any_op: bool = False, read_weights: bool = False) -> Evaluated | None:
    """What the canonicalizer's folding knows of `v`, for a pattern's condition: the value of a
    constant or of a computation over constants (at most `max_nodes` nodes, no tensor over
    `max_elements`), or the known elements of a shape computed from `Shape` of a value with
    dynamic dims. `any_op` evaluates any deterministic standard op (the folding only exactly
    rounded ones), `read_weights` reads float initializers too. A graph input's default is not
    a constant (the caller may feed it). None if nothing is known."""
    if v is None:
        return None
    ev = _Evaluator(v.graph, max_elements, None if any_op else FOLDABLE, read_weights)
    budget = [max_nodes]

    def visit(x: Value) -> None:
        if x in ev.partial or ev.known(x) is not None:
            return
        node = x.producer
        if node is None or not ev.evaluable(node) or budget[0] == 0:
            return
        budget[0] -= 1
        if node.op_type not in ("Shape", "Size"):
            for i in node.inputs:
                if i is not None:
                    visit(i)
        ev.fold(node)

    visit(v)
    if v in ev.partial:
        return Evaluated(*ev.partial[v], ev.dims_of)
    a = ev.known(v)
    return None if a is None else Evaluated(a, np.zeros(a.shape, np.int64), ev.dims_of)


def _op_counts(graph: Graph) -> Counter:
    return Counter(n.op_type if not n.domain else f"{n.domain}.{n.op_type}" for n in graph.live_nodes())


class _Evaluator:
    """Values of small computations: constants, what standard ops compute from them, and the
    known elements of shapes with dynamic dims. The folding below and the patterns' conditions
    (`evaluate`) share it, so both see one semantics: ONNX's reference kernels.

    `max_elements` caps what is read and made; `ops` the op types evaluated (None: any
    deterministic standard op); `read_weights` lets it read float initializers (a constant
    causal-mask buffer is one; folding never reads one)."""

    def __init__(self, graph: Graph, max_elements: int = MAX_FOLD_ELEMENTS,
                 ops: frozenset[str] | None = FOLDABLE, read_weights: bool = False):
        self.graph = graph
        self.max_elements = max_elements
        self.ops = ops
        self.read_weights = read_weights
        self.graph_inputs = {v.name for v in graph.inputs}
        self.opset = graph.opset.get("", 1)
        #: value -> its array, for small constants and folded results (None: not known)
        self.full: dict[Value, np.ndarray | None] = {}
        #: value -> (its elements, which are unknown), for shapes with dynamic dims: 0 known,
        #: -1 computed from an unknown dim, k > 0 the dynamic dim `dims_of[k]` itself
        self.partial: dict[Value, tuple[np.ndarray, np.ndarray]] = {}
        #: a dynamic dim read by `Shape`: (the value, the dim's index, its symbolic name or None)
        self.dims_of: list[tuple[Value | None, int, str | None]] = [(None, -1, None)]
        self.dim_ids: dict[tuple[Value | None, int, str | None], int] = {}

    def plain(self, a: np.ndarray) -> bool:
        """A type folding may hold (numpy's own; bfloat16 and float8 come from ml_dtypes, whose
        arithmetic ONNX Runtime's need not match); analysis takes any."""
        return self.ops is None or a.dtype in _PLAIN_DTYPES

    def evaluable(self, node: Node) -> bool:
        return (node.op_type in self.ops if self.ops is not None else node.op_type not in _RANDOM) and \
            not node.domain and not node.implicit_inputs and bool(node.outputs)

    # -- what is known ------------------------------------------------------------------
    def known(self, v: Value | None) -> np.ndarray | None:
        """The value of a small constant (or folded result), else None."""
        if v is None:
            return None
        if v in self.full:
            return self.full[v]
        self.full[v] = value = self._small_constant(v)
        return value

    def _small_constant(self, v: Value) -> np.ndarray | None:
        if v.name in self.graph_inputs or not v.is_constant:
            return None
        t = self.graph.constants.get(v.name)
        if t is None:
            t = v.producer.attr("value")
        if isinstance(t, onnx.SparseTensorProto):  # a sparse weight: never densified to fold
            return None
        if isinstance(t, onnx.TensorProto) and _elements(t.dims) > self.max_elements:
            return None
        a = v.const_value
        return a if a is not None and a.size <= self.max_elements and self.plain(a) else None

    def is_weight(self, v: Value) -> bool:
        """A float initializer of more than one element: a model parameter, which stays as it is
        (`Transpose(w)` is not folded into a transposed copy), so fine-tuning, a TensorRT refit
        or a rule looking for that weight still finds it. Scalars (eps, scales) are not weights."""
        if self.read_weights:
            return False
        t = self.graph.initializers.get(v.name)
        return t is not None and t.data_type in _FLOAT_TYPES and _elements(t.dims) > 1

    # -- folding ------------------------------------------------------------------------
    def fold(self, node: Node) -> str | None:
        """Evaluate the node if its inputs are known; returns the step's name, or None."""
        op = node.op_type
        if not self.evaluable(node):
            return None
        if op in ("Shape", "Size"):
            return self._fold_shape(node)
        args: list[np.ndarray | None] = []
        unknown: dict[int, np.ndarray] = {}  # input index -> its unknown elements
        data_inputs = _DATA_INPUTS.get(op, ())
        for i, v in enumerate(node.inputs):
            if v is None:
                args.append(None)
                continue
            if self.is_weight(v):
                return None
            a = self.known(v)
            if a is None and v in self.partial and (op in _ELEMENTWISE or data_inputs is None or i in data_inputs):
                a, unknown[i] = self.partial[v]
            if a is None:
                return None
            args.append(a)
        if not _output_fits(node, args, self.max_elements):
            return None
        if self.ops is not None and op in _INTEGER_ONLY and args[0].dtype.kind not in "biu":
            return None  # folded values must be ONNX Runtime's bit for bit (analysis takes numpy's)
        if op in ("Div", "Mod") and args[1].dtype.kind in "iu" and not args[1].all():
            return None  # integer division by zero: ONNX Runtime fails (or worse) where numpy gives 0
        outs = self._evaluate(node, args)
        if outs is None:
            return None
        if unknown:
            unknown_out = self._unknown_elements(node, args, unknown, outs)
            if unknown_out is None:
                return None
            if any(u.any() for u in unknown_out):
                for v, o, u in zip(node.outputs, outs, unknown_out):
                    self.partial[v] = (o, u)
                return None
        for v, o in zip(node.outputs, outs):
            self.full[v] = o
        return "fold_shapes" if unknown else "fold_constants"

    def _unknown_elements(self, node: Node, args: list[np.ndarray | None], unknown: dict[int, np.ndarray],
                          outs: list[np.ndarray]) -> list[np.ndarray] | None:
        """Which output elements depend on an unknown input element (as `partial` marks them):
        for an op that moves elements, the op run on the marks themselves (a dynamic dim
        stays itself, so does one cast to int64, which holds every dim); elementwise, any
        unknown input element the output element is computed from makes it unknown (-1)."""
        op = node.op_type
        if op in _ELEMENTWISE and not (op == "Cast" and outs[0].dtype == np.int64):
            try:
                return [-np.logical_or.reduce([np.broadcast_to(u != 0, o.shape) for u in unknown.values()]).astype(np.int64)
                        for o in outs]
            except ValueError:
                return None
        if op == "Cast":
            return [unknown[0]]
        moved = []
        for i, a in enumerate(args):
            if i in unknown:  # the marks in the data's own type; a non-integer one keeps only "unknown"
                u = unknown[i]
                moved.append(u.astype(a.dtype) if a.dtype.kind == "i" else (u != 0).astype(a.dtype))
            else:
                moved.append(np.zeros(a.shape, a.dtype) if a is not None and op == "Concat" else a)
        marks = self._evaluate(node, moved)
        if marks is None:
            return None
        return [m.astype(np.int64) if m.dtype.kind == "i" else -(m != 0).astype(np.int64) for m in marks]

    def _fold_shape(self, node: Node) -> str | None:
        x = node.inputs[0]
        if x is None:
            return None
        # A value evaluated here has the shape of its elements, which inference may not know.
        a = self.full.get(x)
        if a is None and x in self.partial:
            a = self.partial[x][0]
        dims = a.shape if a is not None else x.shape
        if dims is None:
            return None
        if node.op_type == "Size":
            if not all(isinstance(d, int) for d in dims):
                return None
            self.full[node.outputs[0]] = np.array(int(np.prod(dims, dtype=np.int64)), np.int64)
            return "fold_shapes"
        rank = len(dims)
        start, end = node.attr("start", 0), node.attr("end", rank)
        picked = dims[slice(*_clamped_range(start, end, rank))]
        shape = np.array([d if isinstance(d, int) else _FILLER for d in picked], np.int64)
        first = _clamped_range(start, end, rank)[0]
        unknown = np.array([0 if isinstance(d, int) else self._dim_id(x, first + i, d) for i, d in enumerate(picked)],
                           np.int64)
        if unknown.any():
            self.partial[node.outputs[0]] = (shape, unknown)
            return None
        self.full[node.outputs[0]] = shape
        return "fold_shapes"

    def _evaluate(self, node: Node, args: list[np.ndarray | None]) -> list[np.ndarray] | None:
        """The node's outputs by ONNX's reference kernel, or None if it fails or is too big."""
        evaluator = _evaluator(node, [a is not None for a in args], self.opset)
        feeds = {f"i{i}": a for i, a in enumerate(args) if a is not None}
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outs = [np.asarray(o) for o in evaluator.run(None, feeds)]
        except Exception:  # an input the op refuses: then the node is simply left to run
            return None
        for v, o in zip(node.outputs, outs):
            if not self.plain(o) or o.size > self.max_elements:
                return None
            if v.dtype is not None and helper.np_dtype_to_tensor_dtype(o.dtype) != v.dtype:
                return None
        return outs

    def _dim_id(self, x: Value, index: int, name: str | None) -> int:
        """The mark of `x`'s dynamic dim `index` (its number in `dims_of`)."""
        key = (x, index, name)
        if key not in self.dim_ids:
            self.dim_ids[key] = len(self.dims_of)
            self.dims_of.append(key)
        return self.dim_ids[key]


class _Canonicalizer(_Evaluator):
    def __init__(self, graph: Graph):
        super().__init__(graph)
        self.steps: Counter = Counter()
        self.folded: dict[Node, None] = {}
        #: folded nodes that read a partial shape, and those of them kept computed
        self.from_partial_shapes: dict[Node, None] = {}
        self.unfolded: dict[Node, None] = {}
        #: CSE key -> the first node computing it
        self.seen: dict[tuple, Node] = {}
        #: the constant Reshape targets `_copy_dims_in_place` made, by content
        self.copied_targets: dict[tuple, Value] = {}
        self.read_in_subgraphs = {v for n in graph.nodes if n.implicit_inputs for v in n.implicit_inputs}

    def read_by_subgraph(self, v: Value) -> bool:
        """Is `v` read by name inside a subgraph (an implicit input of its owner)? Then it keeps
        its name: renaming it would need the subgraph rewritten too."""
        return v in self.read_in_subgraphs

    def run(self) -> Counter:
        for node in self.graph.toposort():
            if not node.alive or node.domain or node.implicit_inputs or node.op_type in ("If", "Loop", "Scan"):
                continue
            step = None if any(self.read_by_subgraph(v) for v in node.outputs) else self.fold(node)
            if step is not None:
                self.steps[step] += 1
                self.folded[node] = None
                if step == "fold_shapes" and node.op_type not in ("Shape", "Size"):
                    self.from_partial_shapes[node] = None
                continue
            if self._copy_dims_in_place(node):
                self.steps["fold_shapes"] += 1
            if self._remove_noop(node):
                self.steps["remove_noops"] += 1
            elif self._merge_duplicate(node):
                self.steps["cse"] += 1
        self._keep_dynamic_shapes()
        if self.folded:
            self._materialize()
        if self.steps:
            self.graph.remove_dead()
        return +self.steps

    def _keep_dynamic_shapes(self) -> None:
        """Keep computing the static pieces of a shape that stays computed (a Concat with
        dynamic dims), for that shape's sake.

        Folding them makes nothing static and only respells a shape computation (a Concat of
        three Slices of Shape(k) becomes a Slice and two constants), which the patterns and
        TensorRT know in its exported form. Readers folded themselves keep their constants.
        Consumers come after producers, so walking back unfolds whole chains."""
        for node in reversed(list(self.from_partial_shapes)):
            if any(self._stays_dynamic(c) for v in node.outputs for c in v.consumers):
                del self.folded[node]
                self.unfolded[node] = None
                self.steps["fold_shapes"] -= 1

    def partial_shapes(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The shape vectors found partly known (`partial`), by value name: what `_proven_dims`
        reads once the graph is reloaded."""
        return {v.name: (target, unknown) for v, (target, unknown) in self.partial.items()
                if v.name and target.ndim == 1 and target.dtype == np.int64}

    def _copy_dims_in_place(self, node: Node) -> bool:
        """`Reshape(x, target)` where each unknown element of the target is x's own dim at that
        index (read by `Shape(x)`, as `x.flatten(-2)` exports) reads the constant target with 0
        there instead (0 copies the input's dim): the same shape, and x is no longer read by a
        Shape, which would keep it from being fused away as an intermediate."""
        if node.op_type != "Reshape" or node.domain or node.attr("allowzero", 0) or node.inputs[1] not in self.partial:
            return False
        x, computed = node.inputs
        target, unknown = self.partial[computed]
        if target.ndim != 1:
            return False
        for i, u in enumerate(unknown.tolist()):
            if u != 0 and (u < 0 or self.dims_of[u][:2] != (x, i)):
                return False
        constant = np.where(unknown != 0, 0, target).astype(np.int64)
        key = _content_key(constant)
        new = self.copied_targets.get(key)
        if new is None:
            new = self.copied_targets[key] = self.graph.add_initializer(constant, computed.name)
        computed.consumers.pop(node, None)
        node.inputs = [x, new]
        new.consumers[node] = None
        node.touch()
        return True

    def _stays_dynamic(self, node: Node) -> bool:
        return node in self.unfolded or (node not in self.folded and any(v in self.partial for v in node.outputs))

    def _materialize(self) -> None:
        """Give folded values read by the remaining nodes an initializer (one per distinct
        value), make folded graph outputs Constants of their names, drop the folded nodes."""
        graph = self.graph
        by_content: dict[tuple, Value] = {}
        for node in self.folded:
            for v in node.outputs:
                if any(c not in self.folded for c in v.consumers):
                    key = _content_key(self.full[v])
                    new = by_content.get(key)
                    if new is None:
                        new = by_content[key] = graph.add_initializer(self.full[v], v.name)
                    graph.replace_uses(v, new)
        for node in self.folded:
            graph.remove_node(node)
            for v in node.outputs:
                if v.is_graph_output:
                    const = graph.add_node("Constant", [], attrs={"value": numpy_helper.from_array(self.full[v])},
                                           name=f"{node.name}_folded")
                    const.order = const.order_lo = node.order
                    graph.set_producer(v, const, 0)

    # -- no-ops -------------------------------------------------------------------------
    def _remove_noop(self, node: Node) -> bool:
        """Point the readers of the node's output at the input it provably equals."""
        if len(node.outputs) != 1:
            return False
        out = node.outputs[0]
        if out.is_graph_output or self.read_by_subgraph(out):
            return False
        x = self._forwarded(node)
        if x is None:
            return False
        self.graph.replace_uses(out, x)
        return True

    def _forwarded(self, node: Node) -> Value | None:
        """The input whose value (dtype and shape included) the node's output is, or None."""
        op = node.op_type
        ins = node.inputs
        x = ins[0] if ins else None
        if x is None:
            return None
        if op == "Identity":
            return x
        if op == "Cast":
            return x if x.dtype is not None and node.attr("to") == x.dtype else None
        if len(ins) != 2 or ins[1] is None:
            return None
        if op == "Mul":
            if self._is_ones_for(ins[1], x):
                return x
            return ins[1] if self._is_ones_for(x, ins[1]) else None
        if op == "Div":
            return x if self._is_ones_for(ins[1], x) else None
        if op not in ("Reshape", "Expand"):
            return None
        dims = x.shape
        target = self.known(ins[1])
        if dims is None or target is None or target.ndim != 1:
            return None
        if op == "Expand":
            if not all(isinstance(d, int) for d in dims):
                return None
            try:
                same = np.broadcast_shapes(tuple(dims), tuple(int(t) for t in target)) == tuple(dims)
            except ValueError:
                return None
        else:
            same = _reshape_keeps(dims, [int(t) for t in target], bool(node.attr("allowzero", 0)))
        return x if same else None

    def _is_ones_for(self, c: Value | None, x: Value | None) -> bool:
        """Is `c` a single 1 whose broadcast against `x` leaves x's shape as it is?

        One element only: a vector of ones is a weight that happens to be freshly initialized
        (a norm's gamma), which fine-tuning or a TensorRT refit changes; a scalar 1 is the
        exporter's."""
        a = self.known(c)
        if a is None or a.size != 1 or x is None or not bool(a.reshape(()) == 1):
            return False
        rank = x.rank  # asked last: the first type asked for runs shape inference
        return rank is not None and a.ndim <= rank

    # -- common subexpressions ----------------------------------------------------------
    def _merge_duplicate(self, node: Node) -> bool:
        """Point the readers of a node's outputs at an earlier identical node's."""
        if node.op_type in _RANDOM or not node.outputs:
            return False
        if node.op_type == "Constant":
            value = self.known(node.outputs[0])
            if value is None:
                return False  # a weight: comparing it would read it
            key: tuple = ("Constant", _content_key(value))
        else:
            operands = []
            for v in node.inputs:
                a = self.known(v)
                operands.append(None if v is None else (_content_key(a) if a is not None else id(v)))
            # Attributes in their written order: the same ones written in another order are
            # merely not merged.
            attrs = node.proto.attribute if node.proto is not None else node.attrs.values()
            key = (node.op_type, len(node.outputs), tuple(operands), tuple(a.SerializeToString() for a in attrs))
        first = self.seen.get(key)
        if first is None or not first.alive:
            self.seen[key] = node
            return False
        if any(v.is_graph_output or self.read_by_subgraph(v) for v in node.outputs):
            return False
        for v, kept in zip(node.outputs, first.outputs):
            self.graph.replace_uses(v, kept)
        return True


def _proven_dims(graph: Graph, shapes: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[Value, list[int | None]]:
    """The output dims of each Expand/Reshape of `graph` whose shape stayed computed but partly
    known (`shapes`, by name: the graph may be reloaded since), where they prove a static dim
    its type lacks (`prove_shapes`)."""
    proven = {}
    for name, (target, unknown) in shapes.items():
        kept = graph.values.get(name)
        if kept is None:
            continue
        for node in kept.consumers:
            if node.op_type not in ("Expand", "Reshape") or node.domain or node.inputs[1] is not kept:
                continue
            out, x = node.outputs[0], node.inputs[0].shape
            if node.op_type == "Expand":
                dims = _expanded_dims(x, target, unknown)
            else:
                dims = _reshaped_dims(x, target, unknown, bool(node.attr("allowzero", 0)))
            have = out.shape
            if dims is not None and any(isinstance(d, int) and (have is None or not isinstance(h, int))
                                        for d, h in zip(dims, have or dims)):
                proven[out] = dims
    return proven

def _evaluator(node: Node, present: list[bool], opset: int):
    """One reference evaluator per op, attributes, input pattern and opset, for the process:
    building one costs ~150 µs, running it ~20 µs, and shape computations repeat the same few
    nodes per layer (and per model)."""
    from onnx.reference import ReferenceEvaluator
    attrs = tuple(sorted((k, a.SerializeToString(deterministic=True)) for k, a in node.attrs.items()))
    key = (node.op_type, tuple(present), len(node.outputs), attrs, opset)
    evaluator = _EVALUATORS.get(key)
    if evaluator is None:
        proto = helper.make_node(node.op_type, [f"i{i}" if p else "" for i, p in enumerate(present)],
                                 [f"o{i}" for i in range(len(node.outputs))])
        proto.attribute.extend(node.attrs.values())
        evaluator = _EVALUATORS[key] = ReferenceEvaluator(proto, opsets={"": opset})
    return evaluator


_EVALUATORS: dict[tuple, Any] = {}


def _drop_unknown_dims(g: onnx.GraphProto) -> None:
    """Forget the types an exporter wrote with unknown dims: the IR prefers written types to
    inferred ones, and inference now sees constants where the exporter saw computations (the
    `[?, ?, ?]` it wrote for a Reshape to a folded `[-1, 17, 16]` becomes `[batch*4, 17, 16]`)."""
    def weak(vi: onnx.ValueInfoProto) -> bool:
        t = vi.type.tensor_type
        return vi.type.HasField("tensor_type") and (not t.HasField("shape") or any(
            not d.HasField("dim_value") and not d.dim_param for d in t.shape.dim))
    if any(weak(vi) for vi in g.value_info):
        keep = [vi for vi in g.value_info if not weak(vi)]
        g.ClearField("value_info")
        g.value_info.extend(keep)


def _reshape_ranks_at_opset_13(graph: Graph) -> dict[Value, list[int | None]]:
    """The dims of Reshape outputs that opset 13's shape inference leaves without a rank.

    ONNX types `Reshape(x, shape)` by the length of a computed `shape` from opset 14 on, not at
    13; a TorchScript opset-13 export reshapes by computed shapes in every layer (repeat_kv), and
    from the first one on nothing downstream has a rank. Reshape-14 with allowzero 0 is
    Reshape-13, and no other op of opset 13 changed what it computes at 14, so the model's types
    are inferred once at 14 and the Reshape outputs keep theirs (static dims only, the rest
    unknown); inference at 13 carries them on from there."""
    if graph.opset.get("", 1) != 13:
        return {}
    untyped = [n.outputs[0] for n in graph.live_nodes() if n.op_type == "Reshape" and not n.domain and n.outputs[0].shape is None]
    if not untyped:
        return {}
    try:
        inferred = infer_types(graph.to_model(), default_opset=14)
    except (onnx.shape_inference.InferenceError, ValueError):
        return {}
    typed = {vi.name: vi.type.tensor_type for vi in inferred.graph.value_info}
    proven = {}
    for v in untyped:
        t = typed.get(v.name)
        if t is not None and t.HasField("shape"):
            proven[v] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return proven


def _write_proven_dims(g: onnx.GraphProto, proven: dict[Value, list[int | None]]) -> None:
    """Type the values `prove_shapes` proved dims of (their other dims left unknown, for shape
    inference to fill in), in place of what the model said of them."""
    typed = {v.name: (v.dtype, dims) for v, dims in proven.items() if v.dtype is not None and not v.is_graph_output}
    keep = [vi for vi in g.value_info if vi.name not in typed]
    g.ClearField("value_info")
    g.value_info.extend(keep)
    g.value_info.extend(helper.make_tensor_value_info(name, dtype, dims) for name, (dtype, dims) in typed.items())


def _elements(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _content_key(a: np.ndarray) -> tuple:
    return (a.dtype.str, a.shape, a.tobytes())


def _clamped_range(start: int, end: int, rank: int) -> tuple[int, int]:
    """Shape's start/end (opset 15): negative counts from the back, both clamped to [0, rank]."""
    def clamp(i: int) -> int:
        return min(max(i + rank if i < 0 else i, 0), rank)
    return clamp(start), clamp(end)


def _output_fits(node: Node, args: list[np.ndarray | None], max_elements: int) -> bool:
    """Ops that can make a large tensor from small inputs are sized before they run: three
    inputs of 1024 elements broadcast by a Where or Max to 2^30, a Gather of 1024 rows by 1024
    indices to 2^20 (and analysis caps inputs at 2^20). An op outside `FOLDABLE` (analysis
    only: OneHot, Pad, MatMul, ...) is sized by its inferred output shape, and not run without one."""
    op = node.op_type
    try:
        if op in _ELEMENTWISE:
            n = _elements(np.broadcast_shapes(*(a.shape for a in args if a is not None)))
        elif op == "Gather":
            data, indices = args[0], args[1]
            n = data.size // max(data.shape[node.attr("axis", 0)], 1) * indices.size if data.ndim else None
        elif op not in FOLDABLE:
            shapes = [v.shape if v is not None else None for v in node.outputs]
            n = None if any(s is None or not all(isinstance(d, int) for d in s) for s in shapes) else \
                max(_elements(s) for s in shapes)
        elif op == "ConstantOfShape":
            n = _elements(args[0]) if args[0].ndim == 1 and (args[0] >= 0).all() else None
        elif op == "Expand":
            n = _elements(np.broadcast_shapes(args[0].shape, tuple(int(d) for d in args[1])))
        elif op == "Tile":
            n = args[0].size * _elements(args[1]) if (args[1] >= 0).all() else None
        elif op == "Range":
            start, limit, delta = (float(a) for a in args)
            n = max(0, int(np.ceil((limit - start) / delta))) if delta else None
        else:
            return True
    except (ValueError, TypeError, IndexError, OverflowError, AttributeError):
        return False
    return n is not None and n <= max_elements


def _reshape_keeps(dims: tuple[int | str | None, ...], target: list[int], allowzero: bool) -> bool:
    """Does Reshape(x, target) give x's own shape `dims`? A dynamic dim only where the target
    copies it (0)."""
    if len(target) != len(dims):
        return False
    inferred = 0
    for t, d in zip(target, dims):
        if t == 0 and not allowzero:
            continue  # copies the input's dim
        if t == -1:
            inferred += 1
        elif t != d:
            return False
    # With every other dim equal, a single -1 can only be the remaining dim (if no dim is 0,
    # which only static dims prove).
    return inferred == 0 or (inferred == 1 and all(isinstance(d, int) and d for d in dims))


def _expanded_dims(x: tuple | None, target: np.ndarray, unknown: np.ndarray) -> list[int | None] | None:
    """Expand(x, target)'s dims where provable (None where not): a known target element other
    than 1 is the dim; a known 1 keeps x's static dim; an unknown element keeps x's static dim
    other than 1 (the target must then be 1 or that dim). None if x's rank is unknown."""
    if x is None:
        return None
    rank = max(len(x), len(target))
    xs = (None,) * (rank - len(x)) + tuple(d if isinstance(d, int) else None for d in x)
    ts = [None] * (rank - len(target)) + [None if u else int(t) for t, u in zip(target, unknown)]
    dims: list[int | None] = []
    for i, (xd, td) in enumerate(zip(xs, ts)):
        if i < rank - len(target):
            dims.append(xd)  # x's own leading dims, the target has none there
        elif td is not None and td != 1:
            dims.append(td if xd in (None, 1, td) else None)  # a mismatch fails at run time
        elif td == 1 or (td is None and xd != 1):
            dims.append(xd)
        else:
            dims.append(None)
    return dims


def _reshaped_dims(x: tuple | None, target: np.ndarray, unknown: np.ndarray, allowzero: bool) -> list[int | None]:
    """Reshape(x, target)'s dims where provable: a known positive element is the dim, a known 0
    copies x's static dim at that index (unless `allowzero`); -1 and unknown elements prove none."""
    dims: list[int | None] = []
    for i, (t, u) in enumerate(zip(target, unknown)):
        t = int(t)
        if u or t < 0:
            dims.append(None)
        elif t == 0 and not allowzero:
            dims.append(x[i] if x is not None and i < len(x) and isinstance(x[i], int) else None)
        else:
            dims.append(t)
    return dims
