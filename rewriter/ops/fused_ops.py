"""fusegraph's fused operators and their reference decompositions (ONNX local functions).

The catalogue. Every fused op is declared once, by one `register(FusedOp(...))` in the module of
its family (`activation_ops`, `norm_ops`, `rope_ops`, `attention_op`, and the GEMM epilogues
here): its name, inputs, outputs, attributes (kind and the value a plugin assumes where a node
omits one), the activation it applies (one of `ACTIVATIONS`), its ONNX body per opset and
target, and the name of its numpy reference in `fusegraph.kernels.reference`. What else knows
the op reads it from `REGISTRY`: the rewriter's type checks and `attach_functions`, the
TensorRT plugins' signatures (`fusegraph.plugins.core`), the kernels' activation names, the
rules' gated-MLP map (`GATED` in `activation_ops`).

A fused op is a node in the `fusegraph` domain. The rewritten model carries, for every such op
it uses, an ONNX local function with the op's reference decomposition in standard ops, so ONNX
Runtime, `onnx.reference` and TensorRT's ONNX parser (which inlines local functions) run it
unchanged, while a TensorRT plugin registered under the same name can take the node over.

Bodies are written for the model's opset (ReduceMean's axes became an input at 18, Shape's
start/end exist from 15, so bodies slice `Shape`'s output, and Squeeze/Unsqueeze take their
axes as an input from 13). The oldest opset an op's body is valid in is its `min_opset`: 12
for ops with attributes (a function reads them through Constant's `value_float`/`value_int`,
opset 12), 9 for the activations and GEMM epilogues (Erf); `function` refuses older opsets
and `opset_refusal` gives a rule the reason to refuse before it emits the op.

Element types. A body computes its constants and its result in the element type of the op's
first input (Y always has X's type). From opset 15 `CastLike` does that for every type, so one
polymorphic function serves fp32, fp16 and bf16 alike. Below 15 there is no `CastLike` and no
other way for a body to learn X's type (every arithmetic op wants equal types; a node attribute
naming the type would change the ops' signatures, which the TensorRT plugins check), so each
node calls a body specialised to its element type: the function and the node carry the type's
name as their `overload` ("float16"; IR version 10), and the body writes `Cast(to=float16)`
where the polymorphic one writes `CastLike`. Measured with ONNX Runtime 1.32 and TensorRT-RTX
1.7: both run overloaded functions and ONNX Runtime picks the overload each node names, but
TensorRT's parser (like `onnx.reference`) looks local functions up by name alone, so one model
that uses the same op at two element types below opset 15 parses only through `rewrite build`,
which gives each overload a name of its own first (`fusegraph.plugins.engine`). The numpy references in
`fusegraph.kernels.reference` implement the same semantics for the GPU kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import onnx
from onnx import helper

from ..graph_builder import GraphBuilder

DOMAIN = "fusegraph"
VERSION = 1
#: The oldest opset a body that reads the function's attributes is valid in (Constant's
#: value_float/value_int); bodies without attributes may declare an older one.
MIN_OPSET = 12
#: From this opset one body serves every element type (CastLike); below, bodies are per type.
POLYMORPHIC_OPSET = 15
#: The IR version that has `overload` on functions and nodes.
OVERLOAD_IR_VERSION = 10
#: The runtimes a model is rewritten for (`rewrite --target`): bodies may differ per target
#: (`Body.target`), and `fusegraph.ops.lowering` lowers fused ops for each.
TARGETS = ("portable", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class Attribute:
    """One attribute of a fused op: its name, "float" or "int", and the value a consumer that
    reads the node (a TensorRT plugin) assumes where the node omits it; the rules always write
    every attribute. `optional` attributes, added after nodes without them were written, get
    that default in the local function too (its attribute_proto), so those older nodes still
    run in ONNX Runtime and pass the checker."""

    name: str
    kind: str
    default: float | int
    optional: bool = False


@dataclass(frozen=True)
class FusedOp:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    body: Callable[["Body", int], None]
    doc: str
    attrs: tuple[Attribute, ...] = ()
    #: The oldest opset this op's body is valid in.
    min_opset: int = MIN_OPSET
    #: The activation the op applies (a key of `ACTIVATIONS`, "" for none), None where the op
    #: is not an activation, a GEMM epilogue or a gated MLP.
    activation: str | None = None
    #: The function of `fusegraph.kernels.reference` that states the op's semantics in numpy.
    reference: str = ""

    @property
    def attributes(self) -> tuple[str, ...]:
        """The attributes' names, in the order the local function declares them."""
        return tuple(a.name for a in self.attrs)

    def function(self, opset: int, dtype: int | None = None, target: str = "portable") -> onnx.FunctionProto:
        """The local function for a model of default-domain `opset`, called by a node whose first
        input has element type `dtype`: one polymorphic body from opset 15 (`dtype` unused), the
        body specialised to `dtype` (and named by it as its overload) below. `target` is the
        runtime that will inline the body (`Body.target`)."""
        if opset < self.min_opset:
            raise ValueError(f"fusegraph.{self.name} has no body for opset {opset} (needs {self.min_opset})")
        if opset >= POLYMORPHIC_OPSET:
            dtype = None
        elif dtype is None:
            raise ValueError(f"fusegraph.{self.name} at opset {opset}: below opset {POLYMORPHIC_OPSET} "
                             "a body is specialised to its input's element type; give the type")
        b = Body(dtype, target)
        self.body(b, opset)
        f = helper.make_function(
            DOMAIN, self.name, list(self.inputs), list(self.outputs), b.nodes,
            [helper.make_opsetid("", opset)], doc_string=self.doc,
            attributes=[a.name for a in self.attrs if not a.optional],
            attribute_protos=[helper.make_attribute(a.name, a.default) for a in self.attrs if a.optional])
        if dtype is not None:
            f.overload = overload(dtype)
        return f


def writes(f: onnx.FunctionProto, opset: int) -> bool:
    """Whether `f` is a body this fusegraph writes into a model of default-domain `opset`, for
    some target: the `fusegraph` domain is fusegraph's own, and a model that defines one of its
    ops otherwise (by hand, or adversarially) would have that definition replaced."""
    op = REGISTRY.get(f.name) if f.domain == DOMAIN else None
    if op is None or opset < op.min_opset:
        return False
    dtype = onnx.TensorProto.DataType.Value(f.overload.upper()) if f.overload else None
    if (opset < POLYMORPHIC_OPSET) != (dtype is not None):
        return False
    own = f.SerializeToString(deterministic=True)
    return any(op.function(opset, dtype, target).SerializeToString(deterministic=True) == own for target in TARGETS)


def overload(dtype: int) -> str:
    """The overload name of a body specialised to element type `dtype`: 'float16', 'bfloat16'."""
    return onnx.TensorProto.DataType.Name(dtype).lower()


def attribute_reference(attr: str, attr_type: int, name: str | None = None) -> onnx.AttributeProto:
    """A node attribute `name` (default `attr`) whose value is the function's attribute `attr`."""
    a = onnx.AttributeProto(name=name or attr, type=attr_type)
    a.ref_attr_name = attr
    return a


class Body(GraphBuilder):
    """The graph builder specialised for function bodies: `b.op("Add", "a", "b")` returns the
    output name, `outputs="Y"` names it (the function's outputs), and constants are `Constant`
    nodes (a function has no initializers), each naming its type.

    `dtype` is the element type the body is specialised to, None for a polymorphic body;
    `cast_like(v, like)` and `const_like` hide the difference (`like` must have X's type).
    `target` is the runtime the model is rewritten for (`fusegraph.ops.lowering.TARGETS`): every
    runtime inlines the body, and where two forms of the same semantics run fast in different
    runtimes a body picks by it (the attention's dead-row guard: `attention_op`). Any ONNX
    runtime runs either form.
    """

    def __init__(self, dtype: int | None = None, target: str = "portable") -> None:
        super().__init__(dtype, const_nodes=True)
        self.target = target

    def cast_like(self, value: str, like: str, outputs: int | str = 1) -> str:
        """`value` in the element type of `like` (X's type)."""
        if self.dtype is None:
            return self.op("CastLike", value, like, outputs=outputs)
        return self.op("Cast", value, outputs=outputs, to=self.dtype)

    def const_like(self, value: float, like: str) -> str:
        """A scalar constant of the same element type as `like`, rounded once from `value`: a
        float64 constant cast down (a float32 one would cost a float64 body 1e-8 at sqrt(2/pi))."""
        return self.cast_like(self.const(value, onnx.TensorProto.DOUBLE), like)

    def last_dim(self, x: str) -> str:
        """x.shape[-1] as a 1-D int64 tensor of one element (Shape's `start` needs opset 15)."""
        return self.op("Slice", self.op("Shape", x), self.ints(-1), self.ints(2**62))

    def attr_const(self, attr: str, attr_type: int, like: str | None = None) -> str:
        """A scalar Constant whose value is the function's attribute `attr`."""
        slot = "value_float" if attr_type == onnx.AttributeProto.FLOAT else "value_int"
        (value,) = self.add("Constant", [], 1, {slot: attribute_reference(attr, attr_type, slot)})
        return self.cast_like(value, like) if like else value

    def if_attr(self, attr: str, then: Callable[[], str], otherwise: Callable[[], str]) -> str:
        """The value `then()` builds where the function's int attribute `attr` is nonzero, else
        `otherwise()`'s: an If on the attribute, each callback building its branch with this
        builder (whose fresh names keep the branches' values apart from each other and from the
        body's). Once the function is inlined the condition is a constant, so ONNX Runtime
        (constant folding) and TensorRT's parser keep only the chosen branch: a body whose
        structure depends on an attribute pays nothing for it at run time. (An int: TensorRT-RTX
        1.7 folds Cast(int -> bool) of the attribute, but no op on a float one, and a model with
        a live If fails in its Myelin builder.)"""
        flag = self.cast(self.attr_const(attr, onnx.AttributeProto.INT), onnx.TensorProto.BOOL)
        branches = []
        for label, build in (("then", then), ("else", otherwise)):
            start = len(self.nodes)
            out = build()
            if len(self.nodes) == start:  # a branch must compute its output
                out = self.op("Identity", out)
            nodes = self.nodes[start:]
            del self.nodes[start:]
            branches.append(helper.make_graph(nodes, f"{attr}_{label}", [], [onnx.ValueInfoProto(name=out)]))
        return self.op("If", flag, then_branch=branches[0], else_branch=branches[1])


REGISTRY: dict[str, FusedOp] = {}


def register(op: FusedOp) -> FusedOp:
    if op.name in REGISTRY and REGISTRY[op.name] != op:
        raise ValueError(f"fused op {op.name} registered twice")
    REGISTRY[op.name] = op
    return op


def opset_refusal(name: str, opset: int) -> str | None:
    """Why fused op `name` cannot be emitted into a model of default-domain `opset` (None: it can)."""
    need = REGISTRY[name].min_opset
    return None if opset >= need else f"model opset {opset}: fusegraph.{name}'s body needs opset {need} or newer"


# -- activations, shared by every epilogue --------------------------------------------------
def _gelu_erf(b: Body, x: str, out: str) -> str:
    half = b.op("Mul", x, b.const_like(0.5, x))
    erf = b.op("Erf", b.op("Div", x, b.const_like(math.sqrt(2.0), x)))
    return b.op("Mul", half, b.op("Add", erf, b.const_like(1.0, x)), outputs=out)


def _gelu_tanh(b: Body, x: str, out: str) -> str:
    # Pow(x, 3), not x * x * x: the form ONNX Runtime fuses into FastGelu (and a bias before it
    # into FastGelu's bias) when it inlines the body, as it fuses the exported decomposition.
    # The exponent has x's type where a body is per type (Pow wants one type before opset 12),
    # else float32: polymorphic bodies (opset 15+) and bfloat16 ones (13+), whose type no Pow
    # exponent may have before opset 15.
    per_type = b.dtype is not None and b.dtype != onnx.TensorProto.BFLOAT16
    cube = b.op("Pow", x, b.const_like(3.0, x) if per_type else b.op("Constant", value_float=3.0))
    inner = b.op("Add", x, b.op("Mul", cube, b.const_like(0.044715, x)))
    t = b.op("Tanh", b.op("Mul", inner, b.const_like(math.sqrt(2.0 / math.pi), x)))
    half = b.op("Mul", x, b.const_like(0.5, x))
    return b.op("Mul", half, b.op("Add", t, b.const_like(1.0, x)), outputs=out)


#: The oldest opset of every op in `ACTIVATIONS`' bodies (Erf).
ACTIVATIONS_OPSET = 9
ACTIVATIONS: dict[str, Callable[[Body, str, str], str]] = {
    "": lambda b, x, out: b.op("Identity", x, outputs=out),
    "Relu": lambda b, x, out: b.op("Relu", x, outputs=out),
    "Gelu": _gelu_erf,
    "GeluTanh": _gelu_tanh,
    "Sigmoid": lambda b, x, out: b.op("Sigmoid", x, outputs=out),
    "Tanh": lambda b, x, out: b.op("Tanh", x, outputs=out),
    "Silu": lambda b, x, out: b.op("Mul", x, b.op("Sigmoid", x), outputs=out),
}


def matmul_epilogue_name(bias: bool, activation: str) -> str:
    return f"MatMul{'Bias' if bias else ''}{activation}"


def _register_matmul_epilogues() -> tuple[str, ...]:
    names = []
    for bias in (False, True):
        for act in ACTIVATIONS:
            if not bias and not act:
                continue

            def body(b: Body, opset: int, bias: bool = bias, act: str = act) -> None:
                y = b.op("MatMul", "X", "W")
                if bias:
                    y = b.op("Add", y, "B")
                ACTIVATIONS[act](b, y, "Y")

            names.append(register(FusedOp(
                matmul_epilogue_name(bias, act), ("X", "W", "B") if bias else ("X", "W"), ("Y",), body,
                f"Y = {act or 'identity'}(X @ W{' + B' if bias else ''})", min_opset=ACTIVATIONS_OPSET,
                activation=act, reference="matmul_bias_act")).name)
    return tuple(names)


#: The GEMM epilogues: MatMul{Bias}{Act} for every activation (`matmul_epilogue_name`).
MATMUL_EPILOGUES = _register_matmul_epilogues()


def attach_functions(model: onnx.ModelProto, element_type: Callable[[onnx.NodeProto], int | None] | None = None,
                     target: str = "portable") -> None:
    """Give every fused node of `model` (in If/Loop/Scan bodies too) the local function it calls.

    Below opset 15 each node is pointed at the body for its element type (its `overload`) and
    the model's IR version raised to 10 if need be. `element_type(node)` says a node's element
    type (that of its first input, or equally of its first output); where it says None (or is
    not given), ONNX shape inference of the model does. Bodies are written for `target`
    (`Body.target`). The domain is fusegraph's own, so its functions are always this version's
    bodies for `target`: one a model already has (a model rewritten before, by an older
    fusegraph or for another target) is replaced, and one no node calls any more (a fused op
    lowered for a target) removed; other domains' functions stay.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ValueError("the model has no opset import for the default domain")
    nodes = [n for n in _nodes(model.graph) if n.domain == DOMAIN]
    if opset < POLYMORPHIC_OPSET and nodes:
        types = [element_type(n) if element_type else None for n in nodes]
        if not all(types):
            inferred = _inferred_types(model)
            types = [t or inferred.get(n.input[0]) or inferred.get(n.output[0]) for n, t in zip(nodes, types)]
        for n, t in zip(nodes, types):
            if not t:
                raise ValueError(f"fusegraph.{n.op_type} node {n.name!r}: the element type of "
                                 f"{n.input[0]!r} is unknown, and opset {opset} bodies are per type")
            n.overload = overload(t)
        model.ir_version = max(model.ir_version, OVERLOAD_IR_VERSION)
    called = {(n.op_type, n.overload) for n in nodes}
    for f in [f for f in model.functions
              if f.domain == DOMAIN and (f.name in REGISTRY or (f.name, f.overload) not in called)]:
        model.functions.remove(f)
    have = {(f.name, f.overload) for f in model.functions if f.domain == DOMAIN}
    for name, ov in sorted(called - have):
        if name not in REGISTRY:
            raise ValueError(f"fusegraph.{name} is no fused op of this fusegraph and the model has no function for it")
        model.functions.append(REGISTRY[name].function(opset, onnx.TensorProto.DataType.Value(ov.upper())
                                                       if ov else None, target))


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The graph's nodes and, depth first, those of the subgraphs in their attributes."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            for g in (a.g,) if a.type == onnx.AttributeProto.GRAPH else a.graphs:
                yield from _nodes(g)


def _inferred_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the model's values (subgraphs' too) by ONNX shape inference; fused ops
    without a body yet are skipped, so what flows out of them is known only where the model says."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError):
        inferred = model
    out: dict[str, int] = {}

    def collect(g: onnx.GraphProto) -> None:
        out.update((t.name, t.data_type) for t in g.initializer)
        for vi in (*g.input, *g.value_info, *g.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                out[vi.name] = vi.type.tensor_type.elem_type
        for n in g.node:
            for a in n.attribute:
                for sub in (a.g,) if a.type == onnx.AttributeProto.GRAPH else a.graphs:
                    collect(sub)
    collect(inferred.graph)
    return out
