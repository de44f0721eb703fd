"""What a replacement produces, checked against the values it replaces, before it is spliced in.

A replacement that returns a value of another element type or shape (a user's rule that drops
a Reshape, a fused op fed a bias that broadcasts further than the pattern's Add did) would give
a model ONNX Runtime refuses to load, or one that computes something else. So each match's new
nodes are typed by ONNX shape inference, one node at a time in creation order: standard ops by
their schema (`infer_node_outputs`, with the values of small constant inputs, so Reshape and
Split see their shapes), `fusegraph` ops by their function body at the model's opset
(`infer_function_output_types`). A user's custom-domain op has no signature to infer from: its
outputs are unknown and only what is known is compared.

Then every returned value must agree with the value it replaces wherever both are known: the
element type; the rank; every dim known on both sides; and a dim of the original that follows
a dynamic dim of the model's inputs (a `dim_param` of a graph input: it varies at run time)
must not have become a fixed number. Other symbolic names are unknown dims, not variables:
exporters and ONNX inference make them up for dims they could not work out (torch's
`LayerNormalizationlast_hidden_state_dim_1`, inference's `unk__3`), and the new nodes may know
better (a fused op sees through a Shape/Expand chain inference lost track of).

Cost: per match O(new nodes); no whole-graph inference (a type nobody declared or inferred
before is unknown here, and unknown is not checked). Inference results are cached by node
signature (op, attributes, input types and constant data), so a model's repeated layers infer
each fused op once.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import onnx
from onnx import helper, numpy_helper
from onnx.checker import ValidationError
from onnx.shape_inference import InferenceError, infer_function_output_types, infer_node_outputs

from .ops import fused_ops
from .ir import Graph, Node, Value

#: Constant inputs up to this many elements are handed to inference (shapes, sizes, axes).
MAX_DATA_ELEMENTS = 64

_Types = tuple[onnx.TypeProto | None, ...]


class ReplacementTypes:
    """Types a replacement's new nodes, per graph; remembers the types of created values."""

    def __init__(self, graph: Graph):
        self.opset = graph.opset.get("", 1)
        self.opset_imports = [helper.make_opsetid(d, v) for d, v in graph.opset.items()]
        #: The model's dynamic input dims: a value's dim named so varies with the input.
        self.input_dims = frozenset(d.dim_param for vi in graph.root.proto.input
                                    for d in vi.type.tensor_type.shape.dim if d.dim_param)
        #: Inferred types of values replacements created, by name (names are never reused).
        self.created: dict[str, onnx.TypeProto | None] = {}
        self._cache: dict[tuple, _Types | str] = {}

    def check(self, new_nodes: Sequence[Node], results: Sequence[Value], replaced: Sequence[Value]) -> str | None:
        """None if every result agrees with the value it replaces, else the reason it doesn't."""
        for node in new_nodes:
            types = self._infer(node)
            if isinstance(types, str):
                return types
            for v, t in zip(node.outputs, types):
                self.created[v.name] = t
        for new, old in zip(results, replaced):
            if new is not old:
                why = mismatch(self.type_of(new), old.known_type, self.input_dims)
                if why is not None:
                    return f"the replacement's value for {old.name!r} {why}"
        return None

    def type_of(self, v: Value) -> onnx.TypeProto | None:
        return self.created[v.name] if v.name in self.created else v.known_type

    def _infer(self, node: Node) -> _Types | str:
        """The output types of a new node (None where unknown), or why inference refuses it."""
        unknown: _Types = (None,) * len(node.outputs)
        if node.domain not in ("", "ai.onnx", fused_ops.DOMAIN):
            return unknown
        present = [v for v in node.inputs if v is not None]
        in_types = []
        for v in present:
            t = self.type_of(v)
            if t is None:
                return unknown
            in_types.append(t)
        consts = [_small_constant(v) if v.is_constant else None for v in present]
        data = {v.name: t for v, t in zip(present, consts) if t is not None}
        key = (node.domain, node.op_type, tuple(a.SerializeToString() for a in node.attrs.values()),
               tuple(v is None for v in node.inputs),
               tuple(t.SerializeToString() for t in in_types),
               tuple(None if t is None else (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
                     for t in consts))
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._run_inference(node, in_types, data)
        return cached

    def _run_inference(self, node: Node, in_types: list[onnx.TypeProto],
                       data: dict[str, onnx.TensorProto]) -> _Types | str:
        unknown_outputs: _Types = (None,) * len(node.outputs)
        try:
            if node.domain == fused_ops.DOMAIN:
                first = in_types[0].tensor_type.elem_type if in_types and in_types[0] is not None else None
                fn = _function(node.op_type, self.opset, first or None)
                if isinstance(fn, str):
                    return fn
                return tuple(infer_function_output_types(fn, in_types, list(node.attrs.values())))
            try:
                schema = onnx.defs.get_schema(node.op_type, self.opset, "")
            except onnx.defs.SchemaError:
                if node.op_type in RUNTIME_DEFAULT_DOMAIN_OPS:
                    return unknown_outputs
                return f"the replacement uses {node.op_type!r}, which opset {self.opset} does not define"
            names = [v.name for v in node.inputs if v is not None]
            out = infer_node_outputs(schema, node.to_proto(), dict(zip(names, in_types)), data,
                                     opset_imports=self.opset_imports)
            return tuple(out.get(v.name) for v in node.outputs)
        except (InferenceError, ValidationError) as e:
            first = str(e).strip().splitlines()
            return f"the replacement's {node.op_type} fails ONNX shape inference: {first[-1] if first else e}"


#: Ops ONNX Runtime registers in the default domain although ONNX does not define them; only
#: `--target onnxruntime` emits them (`fusegraph.ops.lowering`), and only their types go unchecked.
RUNTIME_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


@lru_cache(maxsize=None)
def _function(op_type: str, opset: int, dtype: int | None) -> onnx.FunctionProto | str:
    """The fused op's body at `opset` for a first input of element type `dtype` (bodies below
    opset 15 are per type; built once per process), or why it has none there."""
    try:
        return fused_ops.REGISTRY[op_type].function(opset, dtype)
    except Exception as e:  # a body that can't be written at this opset: refuse, don't fail
        return f"fusegraph.{op_type} has no body at opset {opset} ({type(e).__name__}: {e})"


def mismatch(got: onnx.TypeProto | None, want: onnx.TypeProto | None,
             input_dims: frozenset[str] = frozenset()) -> str | None:
    """Why a value of type `got` can't stand in for one of type `want` (None: it can, or
    too little is known to tell). A dim of `want` named in `input_dims` varies at run time."""
    if got is None or want is None or not got.HasField("tensor_type") or not want.HasField("tensor_type"):
        return None
    g, w = got.tensor_type, want.tensor_type
    if g.elem_type and w.elem_type and g.elem_type != w.elem_type:
        return (f"has element type {onnx.TensorProto.DataType.Name(g.elem_type)}, not "
                f"{onnx.TensorProto.DataType.Name(w.elem_type)}")
    if not g.HasField("shape") or not w.HasField("shape"):
        return None
    gs, ws = _dims(g.shape), _dims(w.shape)
    if len(gs) != len(ws):
        return f"has shape {_show(gs)}, not {_show(ws)} (rank {len(gs)}, not {len(ws)})"
    for i, (a, b) in enumerate(zip(gs, ws)):
        if isinstance(a, int) and (isinstance(b, int) and a != b or b in input_dims):
            return f"has shape {_show(gs)}, not {_show(ws)} (dim {i})"
    return None


def _dims(shape: onnx.TensorShapeProto) -> list[int | str | None]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def _show(dims: list[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _small_constant(v: Value) -> onnx.TensorProto | None:
    """A constant input's TensorProto for inference, if small and in memory."""
    t = v.graph.constants.get(v.name)
    if t is None and v.producer is not None:
        t = v.producer.attr("value")
    if not isinstance(t, onnx.TensorProto) or t.data_location == onnx.TensorProto.EXTERNAL:
        return None
    size = 1
    for d in t.dims:
        size *= d
    if size > MAX_DATA_ELEMENTS:
        return None
    if t.name != v.name:
        named = onnx.TensorProto()
        named.CopyFrom(t)
        named.name = v.name
        return named
    return t
