"""Tensor-parallel sharding: one model in, one model per rank out, each holding its slice of the
weights, with `fusegraph` collectives (`collectives.py`) where the ranks exchange data.

Megatron's scheme, found from the graph's dataflow, never from layer names:

- **Seeds.** A MatMul whose weight is a constant [K, N] matrix and whose input is replicated is
  column-parallel: rank r keeps columns r*N/tp.. of the weight, its output is *sharded* on the last
  axis. A fused gated MLP (`fusegraph.SwiGLU/GeGLU`: X, Wg, Wu) is one such seed for both
  weights. A fused QKV projection (one MatMul, bias, then a Split: the `qkv` rule's output) is a
  seed per segment: each of Q, K, V is split on its own, so the rank's weight is [Wq_r|Wk_r|Wv_r].
  A Gather from a constant [V, H] table by runtime ids is a vocabulary-parallel embedding: rank r
  looks up the ids it owns (the others read a zero row it appends) and an AllReduce sums the ranks.
- **Propagation.** Nodes are visited in order and each value is replicated or `Sharded` (axis,
  and which seeds it came from). Elementwise ops, Transpose, (Un)Squeeze, Reshape (the sharded
  axis followed through the reshape; a constant shape element holding a sharded extent divided by
  tp, an element read from a sharded tensor's Shape left as it is), Expand, Softmax and reductions
  over other axes, Slice/Split/Concat/Gather on other axes, batched MatMuls over the heads axis,
  RotaryEmbedding and fused attention (heads axis) carry the sharding through. A replicated
  operand that meets a sharded one at full extent is sliced to the rank's part (a constant bias
  gets its slice; a computed tensor a Slice node: GQA KV heads that stayed replicated are sliced to
  the KV head(s) of the rank's query heads, so fused attention keeps its head grouping).
- **Closing.** A MatMul that contracts the sharded axis with a constant weight is row-parallel
  (rank r keeps the matching rows) and its partial sums are all-reduced at once. A sharded graph
  output is all-gathered (a vocabulary-parallel LM head). Norms and everything else see only
  replicated values: they stay whole on every rank.
- **Backing off.** When a sharded value reaches what cannot carry it (a norm over the sharded
  axis, fewer KV heads than ranks, a shape computed in a form the tracer does not follow), the
  seeds it came from are replicated instead and the walk starts again, each reason kept for the
  report; the loop ends after at most one walk per seed. Refused (InputError, exit 2): heads that
  cannot be split exactly (neither divisible by tp nor dividing it), projection columns that do
  not divide by tp (except where they end in fewer heads than ranks, or an LM head's: kept whole),
  and a model where nothing can be sharded at all.

Cost: O(nodes) per walk, at most one walk per seed; weights are read one at a time when the
rank models are written (`write_shards`), never all at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import external_data, model_io
from .ops import collectives
from .errors import InputError
from .ir import Graph

#: Rank weights above this many bytes go to an external data file beside the rank model.
EXTERNAL_DATA_ABOVE = 1 << 30
#: Tensors at least this big go to that file; smaller ones stay inline.
EXTERNAL_TENSOR_MIN = 1024
MANIFEST = "shard.json"

ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Mod", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "And", "Or", "Xor", "Not", "Neg", "Abs", "Sigmoid", "Tanh", "Relu", "LeakyRelu", "Elu",
    "Selu", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Cast", "Identity", "Sin", "Cos", "Softplus", "Softsign",
    "HardSigmoid", "HardSwish", "Gelu", "Mish", "Floor", "Ceil", "Round", "Sign", "IsNaN", "IsInf", "Clip",
    "fusegraph.Silu", "fusegraph.Gelu", "fusegraph.GeluTanh", "fusegraph.QuickGelu",
}
GATED_MLPS = {"fusegraph.SwiGLU", "fusegraph.GeGLU", "fusegraph.GeGLUTanh"}
#: `fusegraph.MatMul{Bias}{Act}` (X, W[, B]): the bias and the activation follow the columns
GEMM_EPILOGUE = "fusegraph.MatMul"
FUSED_ATTENTION = {"fusegraph.Attention", "fusegraph.MaskedAttention", "Attention"}
ROTARY = {"fusegraph.RotaryEmbedding", "RotaryEmbedding"}
REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
              "ReduceSumSquare", "ReduceLogSumExp"}
#: ops the shape tracer follows (int vectors built from Shape and constants)
SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Identity", "Reshape", "Mul", "Div",
             "Where", "ConstantOfShape", "Equal", "Slice"}

Seed = tuple  # (node index, segment index)


@dataclass(frozen=True)
class Sharded:
    """A value split over the ranks along `axis`. `segments` are the blocks the axis concatenates
    (one, except between a fused QKV MatMul and its Split): (global size, the seeds it comes
    from); a block without seeds is whole on every rank."""
    axis: int
    segments: tuple

    @property
    def seeds(self) -> frozenset:
        return frozenset().union(*(s for _, s in self.segments))

    @property
    def simple(self) -> bool:
        return len(self.segments) == 1 and bool(self.segments[0][1])

    @property
    def extent(self) -> int:
        return sum(size for size, _ in self.segments)


class _Refusal(Exception):
    def __init__(self, reason: str, seeds=frozenset(), fatal: bool = False):
        super().__init__(reason)
        self.reason, self.seeds, self.fatal = reason, frozenset(seeds), fatal


@dataclass
class Plan:
    """What every rank model changes, rank-independent (materialized per rank by `rank_model`)."""
    tp: int
    weight_slices: dict = field(default_factory=dict)  # (node, input) -> (axis, segments)
    const_edits: dict = field(default_factory=dict)    # (node, input) -> {offset: new value}
    local_slices: dict = field(default_factory=dict)   # (node, input) -> (axis, starts per rank, length, full)
    split_sizes: dict = field(default_factory=dict)    # node -> new sizes
    embeddings: dict = field(default_factory=dict)     # node -> vocabulary size
    all_reduce: list = field(default_factory=list)     # values
    all_gather: dict = field(default_factory=dict)     # graph output -> axis
    sharded_seeds: dict = field(default_factory=dict)  # node -> "column" | "row" | "embedding" | "gated"
    replicated: dict = field(default_factory=dict)     # (node, block of a fused projection or None) -> reason


@dataclass
class ShardReport:
    tp: int
    column: int = 0
    row: int = 0
    embeddings: int = 0
    collectives: Counter = field(default_factory=Counter)
    sharded_bytes: int = 0      # of the original: weights split over the ranks
    replicated_bytes: int = 0   # of the original: weights every rank keeps whole
    rank_bytes: list = field(default_factory=list)
    replicated: dict = field(default_factory=dict)  # node name -> why it stayed whole
    written: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["collectives"] = dict(self.collectives)
        return d


def shard(model: onnx.ModelProto, tp: int, *, base_dir: str | None = None) -> list[onnx.ModelProto]:
    """The `tp` rank models of `model` (see the module docstring); weights inline."""
    sharder = Sharder(model, tp, base_dir)
    return [sharder.rank_model(r) for r in range(tp)]


def shard_file(src: str, out_dir: str, tp: int, *, external: bool | None = None) -> ShardReport:
    """Shard the model at `src` into `out_dir/rank{r}.onnx` (+ `.data` when large or `external`),
    each written atomically (`model_io.save_model`), and `out_dir/shard.json`."""
    if not os.path.isdir(out_dir):
        raise InputError(f"{out_dir}: " + ("is not a folder" if os.path.exists(out_dir) else "no such folder") +
                         " (-o takes an existing folder for the rank models)")
    model, data = model_io.load_checked(src)
    base_dir = os.path.dirname(os.path.abspath(src))
    # Planned first: the plan refuses a tp that divides nothing, before a name per rank is made.
    sharder = Sharder(model, tp, base_dir, source=src)
    targets = [os.path.join(out_dir, f"rank{r}.onnx") for r in range(tp)]
    for path in targets:
        model_io.check_output(path, src, data)
    report = sharder.report()
    for r, path in enumerate(targets):
        rank = sharder.rank_model(r)
        report.rank_bytes.append(_weight_bytes(rank))
        big = external if external is not None else (bool(data) or report.rank_bytes[-1] > EXTERNAL_DATA_ABOVE)
        _save_rank(rank, path, big, base_dir)
        report.written.append(path)
    manifest = {"tp": tp, "source": os.path.basename(src), "ranks": [os.path.basename(p) for p in targets],
                "report": report.to_dict()}
    tmp = os.path.join(out_dir, f"{model_io.TEMP_PREFIX}{os.getpid()}-manifest.json")
    try:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, os.path.join(out_dir, MANIFEST))
    except OSError as e:
        raise InputError(f"{out_dir}: cannot write ({e.strerror or e})") from None
    return report


class Sharder:
    """The plan for one model and tp (built at construction), and the rank models from it."""

    def __init__(self, model: onnx.ModelProto, tp: int, base_dir: str | None = None, source: str = "model"):
        if not isinstance(tp, int) or tp < 1:
            raise InputError(f"--tp {tp!r}: the tensor-parallel size must be a positive integer")
        # What `rewrite` refuses (an opset onnx does not know or too old, a cycle, a dangling
        # input, a redefined name) is refused here too, before inference prints its own lines.
        model_io.validate(model, Graph(model, base_dir), source)
        self.model, self.tp, self.base_dir, self.source = model, tp, base_dir, source
        graph = model.graph
        self.nodes = list(graph.node)
        self.inits = {t.name: t for t in graph.initializer}
        self.graph_inputs = {i.name for i in graph.input}
        self.const_nodes = {n.output[0]: n for n in self.nodes if n.op_type == "Constant" and n.output}
        self.opset = {o.domain or "": o.version for o in model.opset_import}.get("", 0)
        self.consumers: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for name in n.input:
                self.consumers.setdefault(name, []).append(i)
        self._arrays: dict[str, np.ndarray] = {}
        self.shapes, self.types = _inferred(model)
        self.symbols = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
        self.plan = self._plan()

    # --- constants -------------------------------------------------------------------------
    def is_const(self, name: str) -> bool:
        return (name in self.inits and name not in self.graph_inputs) or name in self.const_nodes

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            if name in self.inits:
                t = self.inits[name]
                if external_data.is_external(t):
                    if self.base_dir is None:
                        raise InputError(f"tensor {name!r} is in external data, but no folder was given to read it")
                    u = onnx.TensorProto()
                    u.CopyFrom(t)
                    del u.external_data[:]
                    u.data_location = onnx.TensorProto.DEFAULT
                    u.raw_data = external_data.read(t, self.base_dir)
                    t = u
                self._arrays[name] = numpy_helper.to_array(t)
            else:
                attr = self.const_nodes[name].attribute[0]
                self._arrays[name] = numpy_helper.to_array(attr.t) if attr.type == onnx.AttributeProto.TENSOR \
                    else np.asarray(helper.get_attribute_value(attr))
        return self._arrays[name]

    def small_ints(self, name: str):
        """A constant int vector or scalar (shape arithmetic), else None."""
        if not self.is_const(name) or not self._const_is_small(name):
            return None
        a = self.array(name)
        return a.reshape(-1).astype(np.int64).tolist() if a.dtype.kind in "iu" and a.ndim <= 1 else None

    def _const_is_small(self, name: str) -> bool:
        if name in self.inits:
            return external_data.element_count(self.inits[name]) <= 64
        return True

    def weight(self, name: str):
        """The dims of a float constant matrix (an initializer), else None."""
        t = self.inits.get(name)
        if t is None or name in self.graph_inputs or len(t.dims) != 2:
            return None
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                               onnx.TensorProto.DOUBLE):
            return None
        return tuple(t.dims)

    def rank_of(self, name: str):
        s = self.shapes.get(name)
        return None if s is None else len(s)

    # --- planning --------------------------------------------------------------------------
    def _plan(self) -> Plan:
        excluded: set = set()
        reasons: dict = {}
        while True:
            try:
                plan = _Walk(self, excluded).run()
                break
            except _Refusal as r:
                new = r.seeds - excluded
                if r.fatal or not new:
                    raise InputError(f"{self.source}: cannot shard over tp {self.tp}: {r.reason}") from None
                excluded |= new
                for seed in new:
                    reasons.setdefault(seed, r.reason)
        # a seed's node, or its block of a fused projection whose other blocks shard (a node that
        # ended row-parallel, once tried as a column seed, is no replicated one)
        for (i, k), why in reasons.items():
            kind = plan.sharded_seeds.get(i)
            if kind is None or kind in ("column", "gated"):
                plan.replicated[(i, None if kind is None else k)] = why
        if self.tp > 1 and not plan.sharded_seeds:
            why = next(iter(plan.replicated.values()), "no MatMul with a constant [K, N] weight, no embedding table")
            raise InputError(f"{self.source}: nothing to shard over tp {self.tp}: {why}")
        return plan

    # --- reporting -------------------------------------------------------------------------
    def report(self) -> ShardReport:
        plan = self.plan
        rep = ShardReport(self.tp)
        kinds = Counter(plan.sharded_seeds.values())
        rep.column, rep.row, rep.embeddings = kinds["column"] + kinds["gated"], kinds["row"], kinds["embedding"]
        rep.collectives = Counter({"AllReduce": len(plan.all_reduce), "AllGather": len(plan.all_gather)})
        rep.collectives = +rep.collectives
        # the fraction of each initializer that is split: a fused QKV weight whose K/V blocks
        # stay whole is split only in its Q columns
        split_fraction = {self.nodes[i].input[0]: 1.0 for i in plan.embeddings}
        for (i, j), (_, segments) in plan.weight_slices.items():
            total = sum(size for size, _ in segments)
            split_fraction.setdefault(self.nodes[i].input[j], sum(size for size, sd in segments if sd) / total)
        for name, t in self.inits.items():
            if name in self.graph_inputs or name not in self.consumers:
                continue
            n = external_data.nbytes(t) or 0
            split = round(n * split_fraction.get(name, 0.0))
            rep.sharded_bytes += split
            rep.replicated_bytes += n - split
        rep.replicated = {self._node_label(i) + ("" if block is None else f" block {block}"): why
                          for (i, block), why in plan.replicated.items()}
        return rep

    def _node_label(self, i: int) -> str:
        n = self.nodes[i]
        return f"{n.op_type} {n.name or n.output[0]!r}"

    # --- rank models -----------------------------------------------------------------------
    def rank_model(self, rank: int) -> onnx.ModelProto:
        return _materialize(self, rank)


def _inferred(model: onnx.ModelProto):
    """Global shapes and element types of every value (ONNX inference, data propagation on)."""
    header = onnx.ModelProto()
    header.CopyFrom(model)
    for t in header.graph.initializer:  # inference reads dims, not bytes
        if external_data.is_external(t) or len(t.raw_data) > 4096:
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.ClearField("raw_data")
            for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(f)
            header.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    shapes, types = {}, {}
    symbols = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    # ONNX's inference first, then ONNX Runtime's symbolic one over it where that knows more: it
    # follows the Shape/Gather/Concat arithmetic of dynamic exports (`batch`, not `unk__9`).
    for infer in (lambda m: onnx.shape_inference.infer_shapes(m, data_prop=True), _symbolic_inference):
        try:
            g = infer(header).graph
        except Exception:  # an inference that fails leaves what the other found
            continue
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                continue
            if tt.elem_type:
                types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
                if vi.name not in shapes or _known(dims, symbols) > _known(shapes[vi.name], symbols):
                    shapes[vi.name] = dims
    for t in model.graph.initializer:
        shapes[t.name], types[t.name] = tuple(t.dims), t.data_type
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
            t = n.attribute[0].t
            shapes[n.output[0]], types[n.output[0]] = tuple(t.dims), t.data_type
    return shapes, types


def _symbolic_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    return SymbolicShapeInference.infer_shapes(model, auto_merge=True)


def _known(dims, symbols) -> int:
    """How much a shape says: dims that are numbers or the model's input symbols (`batch`), not
    an inference's placeholders (`unk__9`)."""
    return sum(isinstance(d, int) or d in symbols for d in dims)


def _product(dims):
    """A product of dims as (int factor, sorted symbols), or None if a dim is unknown."""
    k, syms = 1, []
    for d in dims:
        if isinstance(d, int):
            k *= d
        elif isinstance(d, str):
            syms.append(d)
        else:
            return None
    return k, tuple(sorted(syms))


class _Walk:
    """One pass over the graph with a fixed set of replicated seeds; raises _Refusal."""

    def __init__(self, sharder: Sharder, excluded: set):
        self.s, self.tp, self.excluded = sharder, sharder.tp, excluded
        self.plan = Plan(sharder.tp)
        self.graph_outputs = {o.name for o in sharder.model.graph.output}
        self.uneven: dict = {}  # seed -> why its columns cannot be split evenly
        self.state: dict[str, Sharded] = {}
        self.elems: dict[str, list] = {}
        self.edit_requests: dict = {}  # (node, input) -> set of requesting nodes
        self._node_seeds: dict = {}     # requesting node -> its seeds

    def run(self) -> Plan:
        s = self.s
        for i, n in enumerate(s.nodes):
            key = f"{n.domain}.{n.op_type}" if n.domain and n.domain != "ai.onnx" else n.op_type
            self._refine_shape(n, key)
            self._trace_shape(i, n, key)
            ins = [self.state.get(x) for x in n.input]
            seeded = self._seed(i, n, key, ins)
            if seeded:
                continue
            if not any(ins):
                self._check_local_dims(i, n, key)
                continue
            seeds = frozenset().union(*(st.seeds for st in ins if st))
            if key not in ELEMENTWISE and key != "Reshape":
                self._check_uneven(seeds, True)
            handler = getattr(self, "_op_" + key.replace(".", "_"), None)
            if key in ELEMENTWISE:
                handler = self._elementwise
            elif key in REDUCTIONS:
                handler = self._reduce
            elif key in FUSED_ATTENTION:
                handler = self._attention
            elif key in ROTARY:
                handler = self._rotary
            if handler is None:
                raise _Refusal(f"{self._label(i)} reads a sharded value and has no sharding rule", seeds)
            handler(i, n, ins, seeds)
        for sub in (a.g for n in s.nodes for a in n.attribute if a.type == onnx.AttributeProto.GRAPH):
            for name in _outer_names(sub):
                if name in self.state:
                    raise _Refusal(f"a subgraph reads the sharded value {name!r}", self.state[name].seeds)
        for o in s.model.graph.output:
            st = self.state.get(o.name)
            if st is None:
                continue
            self._check_uneven(st.seeds, False)  # an LM head over a vocabulary that does not divide: whole
            if not st.simple:
                raise _Refusal(f"graph output {o.name!r} concatenates sharded and whole blocks", st.seeds)
            self.plan.all_gather[o.name] = st.axis
        self._check_uneven(frozenset(self.uneven), False)  # a split nothing reads
        for (i, j), requesters in self.edit_requests.items():
            producer = s.nodes[i]
            users = {c for out in producer.output for c in s.consumers.get(out, ())}
            if producer.op_type != "Reshape" and producer.op_type != "Expand" and not users <= requesters:
                raise _Refusal(f"the shape computed by {self._label(i)} serves a sharded and a whole tensor",
                               frozenset().union(*(self._node_seeds.get(r, frozenset()) for r in requesters)))
        return self.plan

    def _label(self, i: int) -> str:
        return self.s._node_label(i)

    def _check_uneven(self, seeds, fatal: bool):
        """Columns that do not divide by tp are carried through elementwise ops to the Reshape
        that splits them into heads: fewer heads than ranks keeps them whole there (GQA's KV);
        anything else they reach cannot shard them exactly: refused (`fatal`), or kept whole."""
        uneven = [seed for seed in seeds if seed in self.uneven]
        if uneven:
            raise _Refusal(self.uneven[uneven[0]] + ("" if fatal else ": kept whole"), frozenset(uneven), fatal)

    def _set(self, name: str, st: Sharded | None):
        if st is not None:
            self.state[name] = st

    def _refine_shape(self, n, key):
        """Output shapes the inferences miss (fused ops have no shape function in ONNX Runtime's
        symbolic inference; ONNX's loses the symbols), derived from the inputs' for the ops
        that carry sharding."""
        shapes = self.s.shapes
        ins = [shapes.get(x) for x in n.input]
        derived = None
        if key in FUSED_ATTENTION and ins[0] and len(ins) > 2 and ins[2] and len(ins[0]) == 4:
            derived = ins[0][:-1] + ins[2][-1:]
        elif (key in ROTARY or key in ELEMENTWISE and len(n.input) == 1) and ins[0]:
            derived = ins[0]
        elif key == "Transpose" and ins[0]:
            perm = _attr(n, "perm", None) or list(reversed(range(len(ins[0]))))
            derived = tuple(ins[0][p] for p in perm)
        elif (key in GATED_MLPS or key.startswith(GEMM_EPILOGUE)) and ins[0] and self.s.weight(n.input[1]):
            derived = ins[0][:-1] + (self.s.weight(n.input[1])[1],)
        if derived is not None and n.output:
            known = self.s.symbols
            if n.output[0] not in shapes or _known(derived, known) > _known(shapes[n.output[0]], known):
                shapes[n.output[0]] = tuple(derived)

    # --- seeds ----------------------------------------------------------------------------
    def _seed(self, i, n, key, ins) -> bool:
        s = self.s
        if key == "MatMul" and not ins[0] and s.weight(n.input[1]) and not s.is_const(n.input[0]):
            return self._column(i, n, [1])
        if key in GATED_MLPS and not ins[0] and all(s.weight(w) for w in n.input[1:3]):
            return self._column(i, n, [1, 2], kind="gated")
        if key.startswith(GEMM_EPILOGUE) and not ins[0] and len(n.input) > 1 and s.weight(n.input[1]):
            return self._column(i, n, [1], bias=2 if len(n.input) > 2 and n.input[2] else None)
        if key == "Gather" and not ins[1] and s.weight(n.input[0]) and not s.is_const(n.input[1]):
            axis = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"), 0)
            vocab = s.weight(n.input[0])[0]
            if axis != 0:
                return False
            if vocab % self.tp:
                self.plan.replicated[(i, None)] = f"vocabulary {vocab} does not divide by tp {self.tp}"
                return False
            if (i, 0) in self.excluded:
                return False
            self.plan.embeddings[i] = vocab
            self.plan.all_reduce.append(n.output[0])
            self.plan.sharded_seeds[i] = "embedding"
            return True
        return False

    def _column(self, i, n, weight_inputs, kind="column", bias=None) -> bool:
        s = self.s
        cols = s.weight(n.input[weight_inputs[0]])[1]
        sizes = self._segments_ahead(n.output[0], cols)
        segments = []
        for k, size in enumerate(sizes):
            seed = (i, k)
            if seed in self.excluded:
                segments.append((size, frozenset()))
            else:
                if size % self.tp:  # only a reshape into fewer heads than ranks may excuse it (below)
                    self.uneven[seed] = f"{self._label(i)}: its {size} output columns do not divide by tp {self.tp}"
                segments.append((size, frozenset([seed])))
        segments = tuple(segments)
        if not any(sd for _, sd in segments):
            return False
        for j in weight_inputs:
            self.plan.weight_slices[(i, j)] = (1, segments)
        if bias is not None:
            if not s.is_const(n.input[bias]):
                raise _Refusal(f"{self._label(i)}: a computed bias", frozenset().union(*(sd for _, sd in segments)))
            self.plan.weight_slices[(i, bias)] = (len(s.shapes[n.input[bias]]) - 1, segments)
        rank = s.rank_of(n.output[0]) or s.rank_of(n.input[0])
        if rank is None:
            raise _Refusal(f"{self._label(i)}: the rank of its output is unknown", frozenset().union(*(sd for _, sd in segments)))
        self._set(n.output[0], Sharded(rank - 1, segments))
        self.plan.sharded_seeds[i] = kind
        return True

    def _segments_ahead(self, out: str, cols: int) -> list[int]:
        """The blocks of a fused projection: sizes of the Split its output (or its bias Add's)
        feeds along the last axis, else one block."""
        s = self.s
        users = s.consumers.get(out, [])
        if len(users) == 1 and s.nodes[users[0]].op_type == "Add":
            add = s.nodes[users[0]]
            if any(s.is_const(x) for x in add.input):
                users = s.consumers.get(add.output[0], [])
        if len(users) == 1 and s.nodes[users[0]].op_type == "Split":
            sizes = self._split_sizes(users[0], cols)
            rank = s.rank_of(out)
            axis = _attr(s.nodes[users[0]], "axis", 0)
            if sizes and rank and axis % rank == rank - 1 and sum(sizes) == cols:
                return sizes
        return [cols]

    def _split_sizes(self, i, extent):
        s = self.s
        n = s.nodes[i]
        if len(n.input) > 1 and n.input[1]:
            return s.small_ints(n.input[1])
        split = _attr(n, "split", None)
        if split is not None:
            return list(split)
        parts = len(n.output)
        return [extent // parts] * parts if extent % parts == 0 else None

    # --- operand alignment ----------------------------------------------------------------
    def _broadcast_operand(self, i, j, name, out_axis, out_rank, st: Sharded, seeds):
        """A replicated operand of an op whose output is sharded on out_axis: broadcast over
        it, or sliced to the rank's part."""
        s = self.s
        r = s.rank_of(name)
        if r is None:
            raise _Refusal(f"{self._label(i)}: the shape of its input {name!r} is unknown", seeds)
        pos = out_axis - (out_rank - r)
        if pos < 0:
            return
        extent = s.shapes[name][pos]
        if extent == 1:
            return
        if not isinstance(extent, int) and not s.is_const(name) and st.simple:
            # 1 or the full extent, known only when it runs (a mask built by shape arithmetic)
            self._slice_local(i, j, pos, st.extent, dynamic=True)
            return
        if extent != st.extent:
            raise _Refusal(f"{self._label(i)}: input {name!r} has {extent} where the sharded axis has {st.extent}", seeds)
        if s.is_const(name):
            self.plan.weight_slices[(i, j)] = (pos, st.segments)
        elif st.simple:
            self._slice_local(i, j, pos, st.extent)
        else:
            raise _Refusal(f"{self._label(i)}: a computed input meets a partly sharded one", seeds)

    def _slice_local(self, i, j, axis, extent, starts=None, length=None, dynamic=False):
        """Rank r reads [starts[r], +length) of a replicated operand's axis; `dynamic`: only if
        that axis has the full `extent` when it runs (else it broadcasts and is read whole)."""
        length = length if length is not None else extent // self.tp
        starts = starts if starts is not None else tuple(r * length for r in range(self.tp))
        self.plan.local_slices[(i, j)] = (axis, tuple(starts), length, extent if dynamic else None)

    # --- op rules -------------------------------------------------------------------------
    def _elementwise(self, i, n, ins, seeds):
        s = self.s
        out_rank = s.rank_of(n.output[0])
        if out_rank is None:
            raise _Refusal(f"{self._label(i)}: the rank of its output is unknown", seeds)
        # Clip's min/max are scalars, broadcast everywhere; every other input is an operand
        operands = [0] if n.op_type == "Clip" else range(len(n.input))
        target = None
        for j in range(len(n.input)):
            st = ins[j]
            if st is None:
                continue
            if j not in operands:
                raise _Refusal(f"{self._label(i)}: a sharded bound", seeds)
            target = _merge(target, Sharded(st.axis + out_rank - s.rank_of(n.input[j]), st.segments))
            if target is None:
                raise _Refusal(f"{self._label(i)}: its inputs are sharded differently", seeds)
        for j, name in enumerate(n.input):
            if name and ins[j] is None and j in operands:
                self._broadcast_operand(i, j, name, target.axis, out_rank, target, seeds)
        for out in n.output:
            self._set(out, target)

    def _op_Transpose(self, i, n, ins, seeds):
        st = ins[0]
        perm = _attr(n, "perm", None) or list(reversed(range(self.s.rank_of(n.input[0]))))
        self._set(n.output[0], Sharded(list(perm).index(st.axis), st.segments))

    def _axes(self, n, default=None):
        axes = _attr(n, "axes", None)
        if axes is None and len(n.input) > 1 and n.input[1]:
            axes = self.s.small_ints(n.input[1])
            if axes is None:
                raise _Refusal(f"{self._label(self.s.nodes.index(n))}: its axes are not constant")
        return default if axes is None else list(axes)

    def _op_Unsqueeze(self, i, n, ins, seeds):
        st = ins[0]
        out_rank = self.s.rank_of(n.input[0]) + len(self._axes(n))
        axes = {a % out_rank for a in self._axes(n)}
        kept = [p for p in range(out_rank) if p not in axes]
        self._set(n.output[0], Sharded(kept[st.axis], st.segments))

    def _op_Squeeze(self, i, n, ins, seeds):
        st = ins[0]
        r = self.s.rank_of(n.input[0])
        axes = self._axes(n)
        if axes is None:
            axes = [p for p, d in enumerate(self.s.shapes[n.input[0]]) if d == 1]
        axes = [a % r for a in axes]
        if st.axis in axes:
            raise _Refusal(f"{self._label(i)} squeezes the sharded axis", seeds)
        self._set(n.output[0], Sharded(st.axis - sum(a < st.axis for a in axes), st.segments))

    def _op_Softmax(self, i, n, ins, seeds):
        st = ins[0]
        r = self.s.rank_of(n.input[0])
        axis = _attr(n, "axis", -1 if self.s.opset >= 13 else 1) % r
        if (self.s.opset >= 13 and axis == st.axis) or (self.s.opset < 13 and st.axis >= axis):
            raise _Refusal(f"{self._label(i)} normalizes over the sharded axis", seeds)
        self._set(n.output[0], st)

    _op_LogSoftmax = _op_Softmax

    def _reduce(self, i, n, ins, seeds):
        st = ins[0]
        r = self.s.rank_of(n.input[0])
        axes = self._axes(n)
        axes = list(range(r)) if not axes else [a % r for a in axes]
        if st.axis in axes or len(n.input) > 1 and ins[1:] and any(ins[1:]):
            raise _Refusal(f"{self._label(i)} reduces over the sharded axis", seeds)
        keep = _attr(n, "keepdims", 1)
        self._set(n.output[0], Sharded(st.axis if keep else st.axis - sum(a < st.axis for a in axes), st.segments))

    def _op_Slice(self, i, n, ins, seeds):
        st = ins[0]
        if any(ins[1:]):
            raise _Refusal(f"{self._label(i)}: sharded slice bounds", seeds)
        r = self.s.rank_of(n.input[0])
        if len(n.input) > 3 and n.input[3]:
            axes = self.s.small_ints(n.input[3])
        elif len(n.input) > 1:
            starts = self.s.shapes.get(n.input[1])
            axes = list(range(starts[0])) if starts and isinstance(starts[0], int) else None
        else:
            axes = _attr(n, "axes", None) or list(range(len(_attr(n, "starts", []))))
        if axes is None:
            raise _Refusal(f"{self._label(i)}: its axes are not constant", seeds)
        if st.axis in [a % r for a in axes]:
            raise _Refusal(f"{self._label(i)} slices the sharded axis", seeds)
        self._set(n.output[0], st)

    def _op_Split(self, i, n, ins, seeds):
        st = ins[0]
        r = self.s.rank_of(n.input[0])
        axis = _attr(n, "axis", 0) % r
        if axis != st.axis:
            for out in n.output:
                self._set(out, st)
            return
        sizes = self._split_sizes(i, st.extent)
        if sizes != [size for size, _ in st.segments]:
            raise _Refusal(f"{self._label(i)} splits the sharded axis into {sizes}, not its blocks "
                           f"{[size for size, _ in st.segments]}", seeds)
        self.plan.split_sizes[i] = [size // self.tp if sd else size for size, sd in st.segments]
        for out, (size, sd) in zip(n.output, st.segments):
            self._set(out, Sharded(axis, ((size, sd),)) if sd else None)

    def _op_Concat(self, i, n, ins, seeds):
        r = self.s.rank_of(n.output[0])
        axis = _attr(n, "axis", 0) % r
        st = None
        for j, x in enumerate(ins):
            if x is not None:
                st = _merge(st, Sharded(x.axis + r - self.s.rank_of(n.input[j]), x.segments))
                if st is None:
                    break
        if st is None or st.axis == axis:
            raise _Refusal(f"{self._label(i)} concatenates along or across differently sharded axes", seeds)
        for j, name in enumerate(n.input):
            if ins[j] is None:
                self._broadcast_operand(i, j, name, st.axis, r, st, seeds)
        self._set(n.output[0], st)

    def _op_Gather(self, i, n, ins, seeds):
        st = ins[0]
        if st is None or ins[1]:
            raise _Refusal(f"{self._label(i)} gathers with sharded indices", seeds)
        axis = _attr(n, "axis", 0) % self.s.rank_of(n.input[0])
        if axis == st.axis:
            raise _Refusal(f"{self._label(i)} gathers along the sharded axis", seeds)
        k = self.s.rank_of(n.input[1])
        self._set(n.output[0], Sharded(st.axis if st.axis < axis else st.axis - 1 + k, st.segments))

    def _op_Shape(self, i, n, ins, seeds):
        pass  # the tracer records which elements are rank-local

    def _op_MatMul(self, i, n, ins, seeds):
        s = self.s
        a, b = ins
        ra, rb = s.rank_of(n.input[0]), s.rank_of(n.input[1])
        ro = s.rank_of(n.output[0])
        if None in (ra, rb, ro) or ra < 2 or rb < 2:
            raise _Refusal(f"{self._label(i)}: a sharded MatMul of unknown or vector operands", seeds)
        if a is not None and b is None and a.axis == ra - 1:
            if rb == 2 and s.weight(n.input[1]):  # row-parallel
                self.plan.weight_slices[(i, 1)] = (0, a.segments)
                self.plan.all_reduce.append(n.output[0])
                self.plan.sharded_seeds[i] = "row"
                return
            raise _Refusal(f"{self._label(i)} contracts the sharded axis with a computed matrix", seeds)
        if a is not None and b is not None and a.axis == ra - 1 and b.axis == rb - 2:
            if not (a.simple and b.simple):
                raise _Refusal(f"{self._label(i)}: partly sharded contraction", seeds)
            self.plan.all_reduce.append(n.output[0])
            return
        if a is not None and b is None and a.axis == ra - 2:
            return self._set(n.output[0], Sharded(ro - 2, a.segments))
        if b is not None and a is None and b.axis == rb - 1:
            return self._set(n.output[0], Sharded(ro - 1, b.segments))
        # the sharded axis is a batch axis (attention heads)
        target = None
        for st, r in ((a, ra), (b, rb)):
            if st is None:
                continue
            if st.axis >= r - 2:
                raise _Refusal(f"{self._label(i)}: operands sharded on mismatched matrix axes", seeds)
            target = _merge(target, Sharded(st.axis + ro - r, st.segments))
            if target is None:
                raise _Refusal(f"{self._label(i)}: operands sharded on different batch axes", seeds)
        for j, (st, r) in enumerate(((a, ra), (b, rb))):
            if st is None:
                pos = target.axis - (ro - r)
                if pos >= r - 2:
                    raise _Refusal(f"{self._label(i)}: operands sharded on mismatched axes", seeds)
                self._broadcast_operand(i, j, n.input[j], target.axis, ro, target, seeds)
        self._set(n.output[0], target)

    def _op_Reshape(self, i, n, ins, seeds):
        s = self.s
        st = ins[0]
        if ins[1] or not st.simple:
            raise _Refusal(f"{self._label(i)}: reshapes a partly sharded value", seeds)
        shin = s.shapes.get(n.input[0])
        elems = self._shape_elements(i, 1)
        if shin is None or elems is None:
            raise _Refusal(f"{self._label(i)}: its input shape or its target shape is unknown (computed in a form "
                           "the sharder does not follow)", seeds)
        shout = _reshape_target(shin, elems) or _solve_reshape(shin, s.shapes.get(n.output[0]) or ())
        s.shapes[n.output[0]] = shout  # what the ops after it read (inference may have lost the symbols)
        prefix = _product(shin[:st.axis])
        # the first output axis after the same prefix takes the split (a 1 there is one head: no split)
        b = next((b for b in range(len(shout)) if _product(shout[:b]) == prefix), None)
        if prefix is None or b is None or not isinstance(shout[b], int):
            raise _Refusal(f"{self._label(i)}: the sharded axis {st.axis} of {list(shin)} has no counterpart in "
                           f"{list(shout)}", seeds)
        heads = shout[b]
        if heads % self.tp:
            if heads < self.tp and self.tp % heads == 0:  # GQA's few KV heads: whole, sliced where read
                raise _Refusal(f"{self._label(i)}: {heads} head{'s' if heads > 1 else ''} (axis {b} of {_fmt(shout)}), "
                               f"fewer than tp {self.tp}: kept whole on every rank", seeds)
            raise _Refusal(f"{self._label(i)} splits axis {st.axis} of {_fmt(shin)} into {heads} groups "
                           f"(heads) on axis {b} of {_fmt(shout)}; {heads} does not divide by tp {self.tp}", seeds, True)
        if len(elems) != len(shout):
            raise _Refusal(f"{self._label(i)}: its target shape is computed in a form the sharder does not follow", seeds)
        for p, e in enumerate(elems):
            if p == b:
                self._require_local(i, e, heads, seeds, copy_ok=(st.axis == b and shin[b] == heads))
            elif e[0] == "dim" and e[1]:
                raise _Refusal(f"{self._label(i)}: element {p} of its shape is read from a sharded tensor", seeds | e[1])
            elif e[0] == "const" and e[1] == 0 and p == st.axis:
                raise _Refusal(f"{self._label(i)} copies the sharded axis into a whole one", seeds)
        self._set(n.output[0], Sharded(b, ((heads, st.seeds),)))

    def _op_Expand(self, i, n, ins, seeds):
        s = self.s
        st = ins[0]
        if ins[1] or not st.simple:
            raise _Refusal(f"{self._label(i)}: expands a partly sharded value", seeds)
        ro, rx = s.rank_of(n.output[0]), s.rank_of(n.input[0])
        elems = self._shape_elements(i, 1)
        if elems is None or ro is None:
            raise _Refusal(f"{self._label(i)}: its shape is computed in a form the sharder does not follow", seeds)
        out_axis = st.axis + ro - rx
        for p, e in enumerate(elems):
            q = p + ro - len(elems)
            if q == out_axis:
                if not (e[0] == "const" and e[1] == 1):
                    self._require_local(i, e, st.extent, seeds, copy_ok=False)
            elif e[0] == "dim" and e[1]:
                raise _Refusal(f"{self._label(i)}: element {p} of its shape is read from a sharded tensor", seeds)
        self._set(n.output[0], Sharded(out_axis, st.segments))

    def _require_local(self, i, e, extent, seeds, copy_ok):
        """Shape element `e` must hold the rank's extent of a sharded axis (global `extent`)."""
        if e[0] == "dim":
            if not e[1]:
                raise _Refusal(f"{self._label(i)}: its shape reads the whole extent of a sharded axis from a "
                               "whole tensor", seeds)
            return
        if e[0] == "const" and (e[1] == -1 or (e[1] == 0 and copy_ok)):
            return
        if e[0] == "const" and e[1] == extent and e[2] is not None:
            node, inp, offset = e[2]
            self.plan.const_edits.setdefault((node, inp), {})[offset] = extent // self.tp
            self.edit_requests.setdefault((node, inp), set()).add(i)
            self._node_seeds[i] = seeds
            return
        raise _Refusal(f"{self._label(i)}: a shape element ({_describe(e)}) where the rank's part of {extent} is needed",
                       seeds)

    def _attention(self, i, n, ins, seeds):
        s = self.s
        q, k, v = ins[:3]
        if n.op_type == "Attention" and not n.domain and (len(n.input) > 4 or s.rank_of(n.input[0]) != 4):
            raise _Refusal(f"{self._label(i)}: ONNX Attention with a KV cache or 3-D inputs", seeds)
        if q is None or q.axis != 1 or not q.simple:
            raise _Refusal(f"{self._label(i)}: query not sharded on its heads axis", seeds)
        hq = s.shapes[n.input[0]][1]
        hkv = s.shapes[n.input[1]][1]
        if not isinstance(hq, int) or not isinstance(hkv, int) or hq % hkv:
            raise _Refusal(f"{self._label(i)}: {hq} query heads over {hkv} KV heads", seeds)
        if (k is None) != (v is None):
            raise _Refusal(f"{self._label(i)}: K and V sharded differently", seeds)
        if k is not None:
            if k.axis != 1 or not k.simple:
                raise _Refusal(f"{self._label(i)}: K/V sharded off their heads axis", seeds)
        else:  # replicated KV heads: each rank slices the ones its query heads read
            group, local_q = hq // hkv, hq // self.tp
            if local_q % group == 0:
                length = local_q // group
                starts = [r * length for r in range(self.tp)]
            elif group % local_q == 0:
                length, starts = 1, [r * local_q // group for r in range(self.tp)]
            else:
                raise _Refusal(f"{self._label(i)}: {hq} query heads in groups of {group} do not split over tp {self.tp}",
                               seeds, fatal=True)
            for j in (1, 2):
                self._slice_local(i, j, 1, hkv, starts, length)
        for j in range(3, len(n.input)):
            if n.input[j]:
                if ins[j]:
                    raise _Refusal(f"{self._label(i)}: a sharded mask", seeds)
                self._broadcast_operand(i, j, n.input[j], 1, 4, q, seeds)
        self._set(n.output[0], q)

    def _rotary(self, i, n, ins, seeds):
        st = ins[0]
        r = self.s.rank_of(n.input[0])
        if st is None or any(ins[1:]) or st.axis == r - 1 or not st.simple:
            raise _Refusal(f"{self._label(i)}: rotary embedding over the sharded axis", seeds)
        if n.domain:  # fusegraph's: cos/sin broadcast against X
            for j in (1, 2):
                self._broadcast_operand(i, j, n.input[j], st.axis, r, st, seeds)
        self._set(n.output[0], st)

    # --- the shape tracer -------------------------------------------------------------------
    def _shape_elements(self, i, j):
        """The elements of node i's input j, an int vector: ("const", value, (node, input, offset)
        or None when computed), ("dim", seeds: non-empty when read from a sharded axis) or ("other",)."""
        name = self.s.nodes[i].input[j]
        ints = self.s.small_ints(name)
        if ints is not None:
            return [("const", v, (i, j, k)) for k, v in enumerate(ints)]
        return self.elems.get(name)

    def _trace_shape(self, i, n, key):
        if key not in SHAPE_OPS:
            return
        s = self.s
        out = n.output[0] if n.output else None
        if key == "Shape":
            r = s.rank_of(n.input[0])
            if r is None:
                return
            st = self.state.get(n.input[0])
            shape = s.shapes[n.input[0]]
            dims = [("dim", st.seeds if st and st.axis == p else frozenset(), shape[p]) for p in range(r)]
            start, end = _attr(n, "start", 0), _attr(n, "end", None)
            self.elems[out] = dims[start:end]
            return
        if key == "ConstantOfShape":
            shape = s.shapes.get(out)
            value = next((numpy_helper.to_array(a.t).reshape(-1)[0] for a in n.attribute if a.name == "value"), 0)
            if shape and len(shape) == 1 and isinstance(shape[0], int) and np.asarray(value).dtype.kind in "iu":
                self.elems[out] = [("const", int(value), None)] * shape[0]
            return
        args = [self._shape_elements(i, j) if x else None for j, x in enumerate(n.input)]
        if key in ("Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape"):
            if args[0] is not None:
                self.elems[out] = args[0]
        elif key == "Gather":
            idx = s.small_ints(n.input[1]) if len(n.input) > 1 else None
            if args[0] is not None and idx is not None and len(idx) == 1 and -len(args[0]) <= idx[0] < len(args[0]):
                self.elems[out] = [args[0][idx[0]]]
        elif key == "Slice" and args[0] is not None and len(n.input) >= 3:
            bounds = [s.small_ints(x) if x else None for x in n.input[1:5]]
            starts, ends = bounds[0], bounds[1]
            axes = bounds[2] if len(bounds) > 2 and n.input[3:4] and n.input[3] else [0]
            steps = bounds[3] if len(bounds) > 3 and n.input[4:5] and n.input[4] else [1]
            if starts and ends and axes == [0] and steps == [1] and len(starts) == 1:
                self.elems[out] = args[0][slice(starts[0], ends[0])]
        elif key == "Concat":
            if all(a is not None for a in args):
                self.elems[out] = [e for a in args for e in a]
        elif key in ("Mul", "Div"):
            a, b = args
            if a is not None and b is not None and (len(a) == len(b) or 1 in (len(a), len(b))):
                m = max(len(a), len(b))
                self.elems[out] = [_combine(key, a[p % len(a)], b[p % len(b)]) for p in range(m)]
        elif key == "Where":
            _, a, b = args
            if a is not None and b is not None and (len(a) == len(b) or 1 in (len(a), len(b))):
                m = max(len(a), len(b))
                self.elems[out] = [_pick(a[p % len(a)], b[p % len(b)]) for p in range(m)]

    def _check_local_dims(self, i, n, key):
        """A node that reads no sharded tensor must not read a rank-local extent either (unless
        it only passes it on to the shape tracer's ops)."""
        if (n.output and n.output[0] in self.elems) or key in ("Equal", "ConstantOfShape", "Shape"):
            return  # shape arithmetic the tracer follows; what it builds is checked where it is used
        for j, name in enumerate(n.input):
            for e in self.elems.get(name) or ():
                if e[0] == "dim" and e[1]:
                    raise _Refusal(f"{self._label(i)} computes with a rank-local extent of a sharded axis", e[1])


def _combine(op, a, b):
    if a[0] == "const" and b[0] == "const":
        return ("const", a[1] * b[1] if op == "Mul" else (a[1] // b[1] if b[1] else 0), None)
    for x, y in ((a, b), (b, a)):
        if x[0] == "dim" and y[0] == "const" and (op == "Mul" or x is a):
            value = x[2] * y[1] if op == "Mul" else (x[2] // y[1] if y[1] and not x[2] % y[1] else None)
            return ("dim", x[1], value if isinstance(x[2], int) else None)
    return ("other",)


def _pick(a, b):
    """Where(cond, a, b) element: Expand's `-1 -> 1` idiom picks b where a is the constant 1."""
    if a[0] == "const" and a[1] == 1:
        return b
    if b[0] == "const" and b[1] == 1:
        return a
    return a if a == b else ("other",)


def _describe(e):
    return {"const": lambda: f"{e[1]}" + ("" if e[2] else ", computed"), "dim": lambda: "a dim of a whole tensor",
            "other": lambda: "computed"}[e[0]]()


def _fmt(shape):
    return "[" + ",".join(str(d) if d is not None else "?" for d in shape) + "]"


def _reshape_target(shin, elems):
    """The global output shape a Reshape's traced target elements say (-1 solved), or None."""
    dims = []
    for p, e in enumerate(elems):
        if e[0] == "const" and e[1] > 0:
            dims.append(e[1])
        elif e[0] == "const" and e[1] == 0 and p < len(shin):
            dims.append(shin[p])
        elif e[0] == "dim" and e[2] is not None:
            dims.append(e[2])
        elif e[0] == "const" and e[1] == -1:
            dims.append(None)
        else:
            return None
    if dims.count(None) > 1:
        return None
    if None in dims:
        solved = _solve_reshape(shin, tuple("?" if d is None else d for d in dims))
        return None if "?" in solved else solved
    return tuple(dims)


def _solve_reshape(shin, shout):
    """The reshape's output shape with its one unknown dim (a `-1` inference left symbolic)
    computed from the input's size, when the other dims account for everything else."""
    unknown = [p for p, d in enumerate(shout) if not isinstance(d, int) and d not in shin]
    total = _product(shin)
    if len(unknown) != 1 or total is None:
        return shout
    rest = _product([d for p, d in enumerate(shout) if p != unknown[0]])
    if rest is None or rest[0] == 0 or total[0] % rest[0]:
        return shout
    left = list(total[1])
    for sym in rest[1]:
        if sym not in left:
            return shout
        left.remove(sym)
    if left:
        return shout
    return tuple(total[0] // rest[0] if p == unknown[0] else d for p, d in enumerate(shout))


def _merge(a: Sharded | None, b: Sharded) -> Sharded | None:
    """Two operands' sharding as their result's (seeds joined), None when the layouts differ."""
    if a is None:
        return b
    if a.axis != b.axis or [(n, bool(x)) for n, x in a.segments] != [(n, bool(x)) for n, x in b.segments]:
        return None
    return Sharded(a.axis, tuple((n, x | y) for (n, x), (_, y) in zip(a.segments, b.segments)))


def _attr(n, name, default):
    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _outer_names(g: onnx.GraphProto) -> set:
    defined = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    used = set()
    for n in g.node:
        used |= {x for x in n.input if x}
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= _outer_names(a.g)
    return used - defined


# --- materializing one rank -------------------------------------------------------------------

def _materialize(s: Sharder, rank: int) -> onnx.ModelProto:
    plan, tp = s.plan, s.tp
    out = onnx.ModelProto()
    out.CopyFrom(s.model)
    g = out.graph
    del g.node[:]
    del g.value_info[:]
    kept_inits = {t.name: t for t in s.model.graph.initializer}
    new_inits: dict[str, onnx.TensorProto] = {}
    taken = set(kept_inits) | {o for n in s.nodes for o in n.output} | {i.name for i in g.input}
    info: list[onnx.ValueInfoProto] = []

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    def add_const(base: str, array: np.ndarray) -> str:
        name = fresh(base)
        new_inits[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    sliced_cache: dict = {}
    local_name: dict[str, str] = {}  # an all-gathered graph output -> the rank's part, which nodes read
    for i, node in enumerate(s.nodes):
        if i in plan.embeddings:
            g.node.extend(_vocab_parallel(s, node, rank, add_const, fresh, info))
            continue
        n = onnx.NodeProto()
        n.CopyFrom(node)
        for j, name in enumerate(n.input):
            if name in local_name:
                n.input[j] = local_name[name]
        pre = []
        for j, name in enumerate(node.input):
            if (i, j) in plan.weight_slices:
                axis, segments = plan.weight_slices[(i, j)]
                key = (name, axis, segments)
                if key not in sliced_cache:
                    sliced_cache[key] = add_const(f"{name}.tp{tp}", _slice_segments(s.array(name), axis, segments, rank, tp))
                n.input[j] = sliced_cache[key]
            elif (i, j) in plan.const_edits:
                values = np.array(s.array(name), copy=True)
                flat = values.reshape(-1)
                for offset, v in plan.const_edits[(i, j)].items():
                    flat[offset] = v
                n.input[j] = add_const(f"{name}.tp{tp}", values)
            elif (i, j) in plan.local_slices:
                axis, starts, length, full = plan.local_slices[(i, j)]
                sliced = fresh(f"{name}.rank{rank}")
                pre += _slice_nodes(s, name, sliced, axis, starts[rank], length, full, add_const, fresh)
                n.input[j] = sliced
        if i in plan.split_sizes:
            sizes = np.array(plan.split_sizes[i], dtype=np.int64)
            if len(node.input) > 1 and node.input[1]:
                n.input[1] = add_const(f"{node.input[1]}.tp{tp}", sizes)
            else:
                for a in n.attribute:
                    if a.name == "split":
                        del a.ints[:]
                        a.ints.extend(sizes.tolist())
                        break
                else:
                    n.attribute.append(helper.make_attribute("split", sizes.tolist()))
        post = []
        for k, o in enumerate(node.output):
            if o in plan.all_reduce:
                partial = fresh(f"{o}.partial")
                n.output[k] = partial
                post.append(collectives.make_node("AllReduce", partial, o, tp, name=fresh(f"{o}/AllReduce")))
                info += [_vi(s, partial, o), _vi(s, o, o)]
            elif o in plan.all_gather:
                local = local_name[o] = fresh(f"{o}.local")
                n.output[k] = local
                post.append(collectives.make_node("AllGather", local, o, tp, name=fresh(f"{o}/AllGather"),
                                                  axis=plan.all_gather[o]))
                info.append(_vi(s, local, o, shaped=False))
        g.node.extend(pre + [n] + post)
    used = {x for n in g.node for x in n.input} | {x for n in g.node for a in n.attribute
                                                     if a.type == onnx.AttributeProto.GRAPH for x in _outer_names(a.g)}
    del g.initializer[:]
    g.initializer.extend(t for name, t in kept_inits.items() if name in used or name in {i.name for i in g.input})
    g.initializer.extend(new_inits.values())
    outputs = {o.name for o in g.output}
    g.value_info.extend(v for v in info if v.name not in outputs)
    if not any(o.domain == collectives.DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(collectives.DOMAIN, 1))
    meta = {p.key: p for p in out.metadata_props}
    entry = meta.get("fusegraph.shard") or out.metadata_props.add()
    entry.key, entry.value = "fusegraph.shard", json.dumps({"tp": tp, "rank": rank})
    return out


def _vi(s: Sharder, name: str, like: str, shaped: bool = True) -> onnx.ValueInfoProto:
    shape = s.shapes.get(like) if shaped else None
    return helper.make_tensor_value_info(name, s.types.get(like, 0), list(shape) if shape is not None else None)


def _slice_segments(array: np.ndarray, axis: int, segments, rank: int, tp: int) -> np.ndarray:
    pieces, start = [], 0
    for size, seeds in segments:
        block = np.take(array, range(start, start + size), axis=axis) if array.shape[axis] != 1 else array
        if seeds:
            block = np.split(block, tp, axis=axis)[rank]
        pieces.append(block)
        start += size
    return np.concatenate(pieces, axis=axis)


def _slice_nodes(s: Sharder, x: str, y: str, axis: int, start: int, length: int, full: int | None,
                 add_const, fresh) -> list[onnx.NodeProto]:
    """y = x[start:start+length] on `axis`; with `full`, only where that axis is `full` long
    when it runs (an axis of 1 broadcasts: read whole)."""
    def const(what, v):
        return add_const(f"{y}.{what}", np.array([v], dtype=np.int64))
    if full is None:
        if s.opset < 10:
            return [helper.make_node("Slice", [x], [y], name=y + "/Slice", starts=[start], ends=[start + length], axes=[axis])]
        return [helper.make_node("Slice", [x, const("starts", start), const("ends", start + length), const("axes", axis)],
                                 [y], name=y + "/Slice")]
    if s.opset < 10:
        raise InputError(f"slicing {x!r} by its runtime extent needs opset 10 or newer")
    v = {k: fresh(f"{y}.{k}") for k in ("shape", "dim", "full", "starts", "ends")}
    nodes = [
        helper.make_node("Shape", [x], [v["shape"]]),
        helper.make_node("Gather", [v["shape"], const("axis", axis)], [v["dim"]], axis=0),
        helper.make_node("Equal", [v["dim"], const("extent", full)], [v["full"]]),
        helper.make_node("Where", [v["full"], const("start", start), const("zero", 0)], [v["starts"]]),
        helper.make_node("Where", [v["full"], const("end", start + length), const("one", 1)], [v["ends"]]),
        helper.make_node("Slice", [x, v["starts"], v["ends"], const("axes", axis)], [y]),
    ]
    for k, nd in enumerate(nodes):
        nd.name = fresh(f"{y}/slice_{k}")
    return nodes


def _vocab_parallel(s: Sharder, node: onnx.NodeProto, rank: int, add_const, fresh, info) -> list[onnx.NodeProto]:
    """Gather(E, ids) -> rank r's rows of E plus a zero row; ids outside them read the zero row;
    the ranks' results add up (the AllReduce after it) to the original lookup."""
    table, ids = node.input[0], node.input[1]
    full = s.array(table)
    vocab, tp = full.shape[0], s.tp
    part = vocab // tp
    local = np.concatenate([full[rank * part:(rank + 1) * part], np.zeros((1,) + full.shape[1:], full.dtype)])
    id_type = helper.tensor_dtype_to_np_dtype(s.types.get(ids, onnx.TensorProto.INT64))
    c = {k: add_const(f"{table}.tp{tp}.{k}", np.array(v, dtype=id_type))
         for k, v in (("zero", 0), ("vocab", vocab), ("start", rank * part), ("end", (rank + 1) * part), ("pad", part))}
    weights = add_const(f"{table}.tp{tp}", local)
    v = {k: fresh(f"{node.output[0]}.{k}") for k in ("neg", "wrapped", "ids", "below", "inside", "above", "inrange",
                                                      "shifted", "local")}
    partial = fresh(f"{node.output[0]}.partial")
    out = node.output[0]
    nodes = [
        helper.make_node("Less", [ids, c["zero"]], [v["neg"]]),
        helper.make_node("Add", [ids, c["vocab"]], [v["wrapped"]]),
        helper.make_node("Where", [v["neg"], v["wrapped"], ids], [v["ids"]]),  # negative ids count from the end
        helper.make_node("Less", [v["ids"], c["start"]], [v["below"]]),
        helper.make_node("Not", [v["below"]], [v["inside"]]),
        helper.make_node("Less", [v["ids"], c["end"]], [v["above"]]),
        helper.make_node("And", [v["inside"], v["above"]], [v["inrange"]]),
        helper.make_node("Sub", [v["ids"], c["start"]], [v["shifted"]]),
        helper.make_node("Where", [v["inrange"], v["shifted"], c["pad"]], [v["local"]]),
        helper.make_node("Gather", [weights, v["local"]], [partial], axis=0),
        collectives.make_node("AllReduce", partial, out, tp, name=fresh(f"{out}/AllReduce")),
    ]
    for k, nd in enumerate(nodes[:-1]):
        nd.name = fresh(f"{out}/vocab_parallel_{k}")
    info += [_vi(s, partial, out), _vi(s, out, out)]
    return nodes


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(external_data.nbytes(t) or 0 for t in model.graph.initializer)


def _save_rank(model: onnx.ModelProto, path: str, external: bool, source_dir: str) -> None:
    """`model_io.save_model`, with the rank's big tensors first moved into `path.data` (written
    under a temporary name and renamed in just before the model, as save_model does); tensors the
    rank keeps whole from an input with external data are copied there from `source_dir`."""
    if not external:
        model_io.save_model(model, path)
        return
    folder = os.path.dirname(os.path.abspath(path))
    temps: list[str] = []
    location = os.path.basename(model_io.data_path(path))
    try:
        tmp = model_io._new_temp(folder, ".data", temps)
        with open(tmp, "wb") as f:
            for t in model.graph.initializer:
                if external_data.is_external(t):
                    raw = external_data.read(t, source_dir)
                elif len(t.raw_data) < EXTERNAL_TENSOR_MIN and external_data.element_count(t) * 4 < EXTERNAL_TENSOR_MIN:
                    continue
                else:
                    raw = t.raw_data or numpy_helper.to_array(t).tobytes()
                offset = -(-f.tell() // 4096) * 4096
                f.seek(offset)
                f.write(raw)
                for fld in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    t.ClearField(fld)
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for k, val in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, val
        with model_io._signals_deferred():
            if os.path.lexists(path):
                os.unlink(path)  # the old rank model must never be seen with the new weights
            os.replace(tmp, model_io.data_path(path))
            temps.clear()
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        for t in temps:
            model_io._unlink_quietly(t)
    model_io.save_model(model, path)


def summary_lines(report: ShardReport) -> list[str]:
    """What `rewrite shard` prints."""
    lines = [f"tp {report.tp}: {report.column} column-parallel, {report.row} row-parallel projections, "
             f"{report.embeddings} vocabulary-parallel embedding{'s' if report.embeddings != 1 else ''}"]
    lines.append("collectives per rank: " + (", ".join(f"{k} {v}" for k, v in sorted(report.collectives.items())) or "none"))
    if report.rank_bytes:
        expected = report.sharded_bytes / report.tp + report.replicated_bytes
        lines.append(f"weights per rank: {_size(max(report.rank_bytes))} = 1/{report.tp} of {_size(report.sharded_bytes)} "
                     f"sharded + {_size(report.replicated_bytes)} replicated "
                     f"(+{_size(max(report.rank_bytes) - expected)} of zero row and rank constants; original "
                     f"{_size(report.sharded_bytes + report.replicated_bytes)})")
    for what, why in report.replicated.items():
        lines.append(f"replicated: {what}: {why}")
    for path in report.written:
        lines.append(f"wrote {path}")
    return lines


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
