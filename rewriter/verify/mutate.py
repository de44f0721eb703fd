"""Near misses: graphs one edit away from a rule's instance, and the inputs that tell them apart.

A rule's own instances prove that it fires where it should; they prove nothing about where it
must not. The graphs a real model holds that *look* fusable but mean something else differ from
an instance by one detail: a constant a hair off its canonical value (`Pow(x, 2.001)`), a mask
fill that is large but finite (GPT-2's -1e4), an attribute the pattern never looked at (a
Conv's pads), a Cast to a narrower type, a constant whose broadcast grows the output, an
initializer that is also a graph input (an overridable default, not a constant). `mutants`
makes those graphs from an instance, one edit each; `adversarial_feeds` makes the inputs on
which a wrong fusion shows (large magnitudes, zero-variance rows, -inf / -1e9 / finfo.min
masks and fully masked rows). The self-check (`fusegraph.verify.selfcheck`) requires of every mutant
that the rule refuses it or rewrites it into a valid model equal to it on every such input.

Everything here is derived from the instance's ModelProto and the ONNX op schemas, so it
applies to any rule, the library's or a user's. Mutants that are not valid ONNX are produced
freely (an axis out of range, pads on a rank-2 Conv): the caller discards them. Opset and
float-type variants are rebuilt from the pattern by the caller (`fusegraph.verify.selfcheck`).

Cost: O(nodes x attributes + constants) mutants per instance, each a copy of a small model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .differential import make_inputs

A = onnx.AttributeProto
T = onnx.TensorProto

#: Ops through which a value still acts as (part of) an additive or boolean attention mask on
#: its way to a Softmax: a value reaching a Softmax only through these is a mask (or scores).
MASK_PATH_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast", "CastLike", "Reshape", "Expand",
                           "Unsqueeze", "Squeeze", "Slice", "Transpose", "Identity", "Neg", "Not",
                           "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or",
                           "Concat", "Max", "Min", "Clip"})
#: Types a Cast is retargeted to (its target must be what the fused op can cover losslessly).
CAST_TARGETS = (T.DOUBLE, T.FLOAT, T.FLOAT16, T.BFLOAT16, T.INT32, T.INT64, T.BOOL)
#: Lossy round trips inserted after a Cast (`Softmax -> Cast(bool) -> Cast(fp32)`).
ROUND_TRIPS = (T.FLOAT16, T.BFLOAT16, T.INT32, T.BOOL)
#: The other values of string attributes whose options are known.
STRING_OPTIONS = {"approximate": ("none", "tanh"), "auto_pad": ("NOTSET", "SAME_UPPER", "VALID"),
                  "mode": ("nearest", "linear", "cubic"), "direction": ("LEFT", "RIGHT"),
                  "coordinate_transformation_mode": ("half_pixel", "asymmetric", "align_corners")}
#: Int attributes that are flags: mutated by flipping.
FLAGS = frozenset({"keepdims", "noop_with_empty_axes", "transA", "transB", "interleaved", "is_causal",
                   "select_last_index", "exclusive", "reverse", "ceil_mode", "count_include_pad",
                   "stash_type", "training_mode", "largest", "sorted", "allowzero", "saturate"})
#: Feed sets whose magnitudes may overflow a correct original: a non-finite original output on
#: them is an overflow, not a semantic difference, and that input set is skipped.
LARGE_FEEDS = frozenset({"x100", "+-1e4"})


@dataclass
class Mutant:
    """One near miss: `kind` is its class (what a failure is reported and deduplicated by),
    `detail` says which node or constant changed and how."""

    kind: str
    detail: str
    model: onnx.ModelProto
    #: Values fed to initializers that are also graph inputs (differing from the initializer).
    overrides: dict[str, np.ndarray] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.kind} ({self.detail})"


def mutants(model: onnx.ModelProto, seed: int = 0) -> list[Mutant]:
    """Every one-edit near miss of `model` that this module knows how to make."""
    info = _Info(model)
    rng = np.random.default_rng(seed)
    out: list[Mutant] = []
    for make in (_constant_mutants, _attribute_mutants, _cast_mutants, _input_shape_mutants,
                 _overridable_mutants, _retype_mutants):
        out.extend(make(model, info, rng))
    return out


# -- constants -------------------------------------------------------------------------------
def _constant_mutants(model: onnx.ModelProto, info: "_Info", rng: np.random.Generator) -> Iterator[Mutant]:
    for name, array in info.constants.items():
        if array.dtype.kind == "f" and array.size:
            yield from _near_misses(model, info, name, array)
            if name in info.mask_path:
                yield from _mask_fills(model, name, array)
        elif array.dtype.kind in "iu" and 0 < array.size <= 8:
            for i, step in itertools.product(range(array.size), (1, -1)):
                changed = array.copy().reshape(-1)
                if abs(int(changed[i])) >= 1 << 31:  # INT64_MAX as "to the end" and the like
                    continue
                changed[i] += step
                yield Mutant("int constant +-1", f"{name}{array.tolist()} -> {changed.tolist()}",
                             _with_constant(model, name, changed.reshape(array.shape)))


def _near_misses(model: onnx.ModelProto, info: "_Info", name: str, array: np.ndarray) -> Iterator[Mutant]:
    wide = array.astype(np.float64)
    variants = [
        ("constant +1 ulp", np.nextafter(array, np.array(np.inf, array.dtype))),
        ("constant -1 ulp", np.nextafter(array, np.array(-np.inf, array.dtype))),
        ("constant +0.1%", (wide * 1.001).astype(array.dtype)),
        ("constant -0.1%", (wide * 0.999).astype(array.dtype)),
        ("constant +1%", (wide * 1.01).astype(array.dtype)),
        ("constant -1%", (wide * 0.99).astype(array.dtype)),
        ("constant sign flip", -array),
    ]
    for kind, changed in variants:
        if not np.array_equal(changed, array):
            yield Mutant(kind, f"{name}: {_show(array)} -> {_show(changed)}", _with_constant(model, name, changed))
    # Shapes that broadcast the output to a higher rank, and to a batch of 2 on a new axis.
    rank = info.max_rank + 1
    if array.ndim < rank:
        grown = array.reshape((1,) * (rank - array.ndim) + array.shape)
        yield Mutant("constant broadcast-growing shape", f"{name}: {list(array.shape)} -> {list(grown.shape)}",
                     _with_constant(model, name, grown))
        batch = np.broadcast_to(grown, (2,) + grown.shape[1:]).copy()
        yield Mutant("constant broadcast-growing shape", f"{name}: {list(array.shape)} -> {list(batch.shape)}",
                     _with_constant(model, name, batch))


def _mask_fills(model: onnx.ModelProto, name: str, array: np.ndarray) -> Iterator[Mutant]:
    """A mask constant's fill replaced: only -inf and the dtype's lowest make softmax exactly zero."""
    lowest = np.finfo(array.dtype).min
    for fill in (0.0, -10.0, -1e4, -1e9, lowest, -np.inf):
        with np.errstate(over="ignore"):
            value = np.array(fill).astype(array.dtype)
        masked = np.where(array < 0, value, array).astype(array.dtype) if (array < 0).any() and (array >= 0).any() \
            else np.full(array.shape, value, array.dtype)
        if not np.array_equal(masked, array):
            yield Mutant("mask fill", f"{name}: fill {fill:g}", _with_constant(model, name, masked))
    if array.ndim >= 2 and array.shape[-1] == array.shape[-2] and not np.array_equal(array, np.swapaxes(array, -1, -2)):
        yield Mutant("mask transposed", f"{name}: upper instead of lower triangle",
                     _with_constant(model, name, np.ascontiguousarray(np.swapaxes(array, -1, -2))))


def _overridable_mutants(model: onnx.ModelProto, info: "_Info", rng: np.random.Generator) -> Iterator[Mutant]:
    """An initializer listed among the graph inputs is a default the caller may override."""
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind != "f" or not array.size:
            continue
        m = _copy(model)
        m.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(array.shape)))
        fed = np.asarray(array.astype(np.float64) * 1.5 + rng.uniform(0.25, 0.75, array.shape)).astype(array.dtype)
        yield Mutant("initializer that is also a graph input",
                     f"{init.name} fed {_show(fed)} instead of {_show(array)}",
                     m, {init.name: fed})


# -- attributes ------------------------------------------------------------------------------
def _attribute_mutants(model: onnx.ModelProto, info: "_Info", rng: np.random.Generator) -> Iterator[Mutant]:
    """Every attribute a node sets, and those its schema has that it leaves at the default
    (the ones a pattern that does not pin them would silently drop), set to other values."""
    for index, node in enumerate(model.graph.node):
        if node.op_type == "Constant" or (node.op_type == "Cast" and not node.domain):
            continue
        schema = info.schema(node)
        if schema is None:
            continue
        rank = info.rank(node.input[0]) if node.input and node.input[0] else None
        present = {a.name: a for a in node.attribute}
        for name, formal in schema.attributes.items():
            current = helper.get_attribute_value(present[name]) if name in present else None
            if current is None and formal.default_value.type:
                current = helper.get_attribute_value(formal.default_value)
            was = f"{name}={_show(current)}" if name in present else f"{name} unset (default {_show(current)})"
            for value in _other_values(name, formal.type, current, rank):
                yield Mutant(f"attribute {name}", f"{node.op_type} {node.name or index}: {was} -> {_show(value)}",
                             _with_attribute(model, index, name, formal.type, value))


def _other_values(name: str, kind: int, current, rank: int | None) -> list:
    """Other values for attribute `name` of schema type `kind`, now `current` (None: no
    default), on a node whose first input has rank `rank`: every other axis, a flipped flag,
    a few other permutations, one more in an int list, pads/strides/dilations where unset,
    1% off a float, the other options of a known string."""
    if isinstance(current, bytes):
        current = current.decode()
    if kind == A.INT:
        if name == "to":
            return []
        if "axis" in name and rank:
            return [a for a in range(rank) if current is None or a != current % rank]
        if name in FLAGS or current in (0, 1) and name not in ("group", "blocksize", "num_outputs"):
            return [1 - int(current or 0)]
        return [] if current is None else [current + 1, current - 1]
    if kind == A.INTS:
        if name == "perm" and rank and rank <= 5:
            perms = [list(p) for p in itertools.permutations(range(rank))]
            cur = list(current) if current else list(reversed(range(rank)))
            return [p for p in perms if p != cur][:6]
        if "axes" in name and rank:
            cur = sorted(a % rank for a in (current or []))
            last_two = [[-1, -2]] if rank >= 2 and cur != [rank - 2, rank - 1] else []
            return [[a] for a in range(rank) if [a] != cur][:4] + last_two
        if current:
            return [[v + 1 if i == 0 else v for i, v in enumerate(current)]]
        spatial = (rank or 0) - 2
        if spatial >= 1 and name in ("pads", "strides", "dilations", "output_padding"):
            return [[1] * (2 * spatial)] if name == "pads" else [[2] * spatial]
        return []
    if kind == A.FLOAT and current is not None:
        return [current * 1.01, current * 0.99, -current] if current else [0.5]
    if kind == A.STRING and name in STRING_OPTIONS:
        return [s for s in STRING_OPTIONS[name] if s != (current or STRING_OPTIONS[name][0])]
    return []


# -- casts -----------------------------------------------------------------------------------
def _cast_mutants(model: onnx.ModelProto, info: "_Info", rng: np.random.Generator) -> Iterator[Mutant]:
    for index, node in enumerate(model.graph.node):
        if node.op_type != "Cast" or node.domain:
            continue
        to = next(a.i for a in node.attribute if a.name == "to")
        for target in CAST_TARGETS:
            if target != to:
                yield Mutant("Cast target", f"Cast {node.name or index}: to {_type(to)} -> {_type(target)}",
                             _with_attribute(model, index, "to", A.INT, target))
        for via in ROUND_TRIPS:
            if via != to:
                m = _copy(model)
                cast = m.graph.node[index]
                inner = cast.output[0] + "_via"
                m.graph.node.insert(index, helper.make_node("Cast", [cast.input[0]], [inner], to=via))
                cast.input[0] = inner
                yield Mutant("Cast round trip", f"Cast {node.name or index}: via {_type(via)} to {_type(to)}", m)


# -- inputs and types ------------------------------------------------------------------------
def _input_shape_mutants(model: onnx.ModelProto, info: "_Info", rng: np.random.Generator) -> Iterator[Mutant]:
    """One dim of one input set to 1: a query of length 1 against keys of length n, a mask that
    broadcasts over heads or queries, a batch-1 table against a larger batch."""
    for i, vi in enumerate(model.graph.input):
        if vi.name in info.constants:
            continue
        for d, dim in enumerate(vi.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 1:
                m = _copy(model)
                m.graph.input[i].type.tensor_type.shape.dim[d].dim_value = 1
                yield Mutant("input dim 1", f"{vi.name} dim {d}: {dim.dim_value} -> 1", m)


def _retype_mutants(model: onnx.ModelProto, info: "_Info", rng: np.random.Generator) -> Iterator[Mutant]:
    """The whole graph in bfloat16 or int32 (fp16/fp64 instances are built by the caller)."""
    source = info.float_type
    if source is None:
        return
    for target in (T.BFLOAT16, T.INT32):
        if target != source:
            yield Mutant("dtype", f"{_type(source)} -> {_type(target)}", retype(model, source, target))


def retype(model: onnx.ModelProto, source: int, target: int) -> onnx.ModelProto:
    """`model` with every tensor of element type `source` (inputs, constants, Cast targets) in `target`."""
    m = _copy(model)
    np_target = helper.tensor_dtype_to_np_dtype(target)
    for vi in m.graph.input:
        if vi.type.tensor_type.elem_type == source:
            vi.type.tensor_type.elem_type = target

    def convert(t: onnx.TensorProto) -> onnx.TensorProto:
        if t.data_type != source:
            return t
        with np.errstate(all="ignore"):
            return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64).astype(np_target), t.name)
    inits = [convert(t) for t in m.graph.initializer]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    for node in m.graph.node:
        for a in node.attribute:
            if node.op_type == "Constant" and a.name == "value":
                a.t.CopyFrom(convert(a.t))
            elif node.op_type == "Cast" and a.name == "to" and a.i == source:
                a.i = target
    return m


# -- inputs ----------------------------------------------------------------------------------
def adversarial_feeds(model: onnx.ModelProto, seed: int = 0,
                      overrides: dict[str, np.ndarray] | None = None) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(label, feeds) pairs on which a wrong fusion shows: tame values, large magnitudes, zeros,
    negatives, rows of zero variance, and for every mask input (see `MASK_PATH_OPS`) masked
    positions and a fully masked row with -inf, -1e9 and the dtype's lowest (False / 0 for
    boolean and integer masks)."""
    normal = {**make_inputs(model, seed=seed), **(overrides or {})}
    floats = [k for k, v in normal.items() if v.dtype.kind == "f" and k not in (overrides or {})]

    def scaled(fn: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
        with np.errstate(all="ignore"):
            return {**normal, **{k: fn(normal[k].astype(np.float64)).astype(normal[k].dtype) for k in floats}}
    yield "normal", normal
    yield "x100", scaled(lambda a: a * 100)
    yield "+-1e4", scaled(lambda a: np.where(a < 0, -1e4, 1e4))
    yield "zeros", scaled(np.zeros_like)
    yield "negatives", scaled(lambda a: -np.abs(a) - 0.5)
    yield "zero-variance rows", scaled(lambda a: np.broadcast_to(a[..., :1], a.shape) if a.ndim else a)
    masks = _Info(model).mask_path
    for name in normal:
        if name not in masks or (overrides and name in overrides):
            continue
        value = normal[name]
        if value.ndim == 0 or value.size < 2:
            continue
        if value.dtype.kind == "f":
            for fill in (-np.inf, -1e9, float(np.finfo(value.dtype).min) if value.dtype.itemsize >= 2 else -np.inf):
                with np.errstate(over="ignore"):
                    fill_value = np.array(fill).astype(value.dtype)
                part = np.where(np.arange(value.shape[-1]) % 2 == 1, fill_value, value).astype(value.dtype)
                yield f"{name} masked with {fill:g}", {**normal, name: part}
                row = value.copy()
                row.reshape(-1, value.shape[-1])[0] = fill_value
                yield f"{name} fully masked row ({fill:g})", {**normal, name: row}
        else:
            row = value.copy()
            row.reshape(-1, value.shape[-1])[0] = 0
            yield f"{name} fully masked row (0)", {**normal, name: row}
            yield f"{name} all ones", {**normal, name: np.ones_like(value)}


# -- helpers ---------------------------------------------------------------------------------
class _Info:
    """What the mutators need to know about a model: its constants, ranks, schemas, masks."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.opset = {o.domain or "": o.version for o in model.opset_import}
        self.constants: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and not node.domain:
                for a in node.attribute:
                    if a.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(a.t)
        self.types: dict[str, onnx.TypeProto] = {}
        for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
            self.types[vi.name] = vi.type
        ranks = [len(t.tensor_type.shape.dim) for t in self.types.values() if t.tensor_type.HasField("shape")]
        self.max_rank = max(ranks + [a.ndim for a in self.constants.values()], default=0)
        kinds = [vi.type.tensor_type.elem_type for vi in model.graph.input] + \
                [t.data_type for t in model.graph.initializer]
        self.float_type = next((k for k in kinds if k in (T.FLOAT, T.FLOAT16, T.DOUBLE)), None)
        self.mask_path = self._mask_path()

    def rank(self, name: str) -> int | None:
        if name in self.constants:
            return self.constants[name].ndim
        t = self.types.get(name)
        return len(t.tensor_type.shape.dim) if t is not None and t.tensor_type.HasField("shape") else None

    def schema(self, node: onnx.NodeProto):
        try:
            return onnx.defs.get_schema(node.op_type, self.opset.get(node.domain or "", 1), node.domain or "")
        except onnx.defs.SchemaError:
            return None

    def _mask_path(self) -> set[str]:
        """Values that reach a Softmax's input only through `MASK_PATH_OPS`."""
        producer = {o: n for n in self.model.graph.node for o in n.output}
        found: set[str] = set()
        stack = [n.input[0] for n in self.model.graph.node if n.op_type == "Softmax" and n.input]
        while stack:
            name = stack.pop()
            if name in found:
                continue
            found.add(name)
            node = producer.get(name)
            if node is not None and node.op_type in MASK_PATH_OPS and not node.domain:
                stack.extend(i for i in node.input if i)
        return found


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without the inferred types, which a mutation may invalidate (the caller re-infers)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for o in m.graph.output:
        o.ClearField("type")
    return m


def _with_constant(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    m = _copy(model)
    tensor = numpy_helper.from_array(np.asarray(array), name)
    for i, t in enumerate(m.graph.initializer):
        if t.name == name:
            m.graph.initializer[i].CopyFrom(tensor)
            return m
    for node in m.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", tensor))
            return m
    raise KeyError(name)


def _with_attribute(model: onnx.ModelProto, index: int, name: str, kind: int, value) -> onnx.ModelProto:
    m = _copy(model)
    node = m.graph.node[index]
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.append(helper.make_attribute(name, value, attr_type=kind))
    return m


def _type(elem_type: int) -> str:
    return T.DataType.Name(elem_type).lower()


def _show(value) -> str:
    if isinstance(value, np.ndarray):
        if value.size == 1:
            return f"{value.reshape(-1)[0].item():.9g}" if value.dtype.kind == "f" else str(value.reshape(-1)[0].item())
        return f"{value.dtype.name}{list(value.shape)}"
    if isinstance(value, float):
        return f"{value:.9g}"
    if isinstance(value, bytes):
        return value.decode()
    return str(value)
