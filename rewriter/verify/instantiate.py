"""Concrete graphs from a pattern: the pattern, read as a recipe, builds a model it must match.

A rule's self-check needs graphs the rule is meant to fire on. The pattern already says what
they look like, so this module walks it and emits one ONNX node per operator pattern, with
two kinds of freedom, kept apart on purpose:

- *branch choices* (which option of an `Alt` or `optional()`, which operand order of a
  commutative op) pick the structure; `branch_paths` covers every option of every choice
  point, so the self-check can show each alternative fires;
- *value choices* (shapes, dtypes, which captures are constants, constant values, attribute
  values under a predicate) pick a concrete instance; hypothesis draws them.

Constraints (`where`, `has_rank`, conditions) are opaque predicates: nothing here tries to solve
them. Candidates are generated and the caller keeps the instances the rule fires on. Attribute
and constant predicates are tested directly on their candidates (they are pure functions of the
value), so only the ones that pass are offered. Where no whole-pattern candidate fits, the
captures are fitted operator by operator to what the op schemas' shape inference and ONNX
Runtime accept (`fitted_leaves`: a user's Conv, BatchNormalization or Resize); where nothing
generic fits (a Reshape's target shape, say) a rule names concrete captures in `Rule.examples`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from fusegraph.graph_builder import GraphBuilder
from fusegraph.ops import fused_ops
from fusegraph.pattern import Alt, Attr, Const, Constrained, Named, NodeOutput, NodePattern, Pattern, Tagged, Var
from fusegraph.rule import Leaf

from .differential import make_inputs, run
from .exact import integer_array

FLOAT_DTYPES = (np.float32, np.float16, np.float64)


#: Leaf realisations in the order the search tries them: plain activations first, then weights
#: and biases, then everything else.
LEAF_CANDIDATES = (
    Leaf(False, 2), Leaf(True, 2), Leaf(True, 1), Leaf(False, 3), Leaf(False, 1), Leaf(True, 0),
    Leaf(False, 4), Leaf(True, 3), Leaf(False, 0), Leaf(True, 4), Leaf(False, 2, "int64"),
    Leaf(False, 2, "bool"), Leaf(False, 4, ones=(1, 2)), Leaf(True, 4, ones=(0, 1, 2)),
    Leaf(False, 1, "int64"), Leaf(True, 2, ones=(0,)),
)


@dataclass
class Instance:
    """One concrete choice of everything a pattern leaves open (all but the branch path)."""

    n: int = 3
    float_dtype: Any = np.float32
    opset: int = 18
    leaves: Mapping[str, Leaf] = field(default_factory=dict)
    #: Concrete captures from `Rule.examples`: arrays (constants), (shape, dtype) (inputs),
    #: `Leaf`s, or Python values (captured attributes). Float arrays and inputs take the
    #: instance's float type, so varying it varies the examples too.
    example: Mapping[str, Any] = field(default_factory=dict)
    const_as_node: bool = False
    seed: int = 0
    #: Integer-valued constants, for exact mode (`fusegraph.verify.exact`).
    integer: bool = False
    #: The value choices (see `Picker`) that realised this instance.
    picks: tuple[int, ...] = ()
    #: Extra scalar candidates for constants (the numbers a rule's conditions mention).
    hints: tuple[float, ...] = ()


class Built:
    """A model built from a pattern, and what the build found out on the way."""

    def __init__(self, model: onnx.ModelProto, var_names: list[str], nodes: int):
        self.model = model
        self.var_names = var_names
        self.nodes = nodes


class Chooser:
    """Makes the branch choices. A choice point is keyed by its pattern object (an `Alt`, or a
    commutative operator for its operand order); `overrides` fixes some, the rest take option
    0. Each call records (key, arity, option), which is how `branch_paths` finds new ones."""

    def __init__(self, overrides: Mapping[int, int] | None = None):
        self.overrides = dict(overrides or {})
        self.taken: list[tuple[int, int, int]] = []

    def __call__(self, n: int, key: int) -> int:
        c = min(self.overrides.get(key, 0), n - 1)
        self.taken.append((key, n, c))
        return c


class Picker:
    """Makes the value choices (constants, attribute values): option `base[i] + offset(n)` at
    the i-th choice, so a recorded `base` replays an instance and offsets vary it."""

    def __init__(self, base: Sequence[int] = (), offset: Callable[[int], int] | None = None):
        self.base = tuple(base)
        self.offset = offset
        self.taken: list[int] = []

    def __call__(self, options: Sequence[Any]) -> Any:
        i = len(self.taken)
        c = self.base[i] if i < len(self.base) else 0
        if self.offset is not None:
            c += self.offset(len(options))
        c %= len(options)
        self.taken.append(c)
        return options[c]


def branch_paths(outputs: Sequence[Pattern], limit: int = 256) -> list[dict[int, int]]:
    """Branch choices covering every option of every choice point at least once.

    The first path takes option 0 everywhere; every other path deviates from the path that
    discovered a choice point in that one point (so nested alternatives keep the context that
    reaches them). That is 1 + sum(options - 1) paths, not the product of all combinations.
    """
    paths: list[dict[int, int]] = []
    queue: list[dict[int, int]] = [{}]
    queued: set[tuple[int, int]] = set()
    while queue and len(paths) < limit:
        overrides = queue.pop(0)
        chooser = Chooser(overrides)
        _Walker(chooser, Instance(), Picker(), lenient=True).build(outputs)
        paths.append({key: c for key, _, c in chooser.taken})
        for key, n, c in chooser.taken:
            queued.add((key, c))
            for option in range(n):
                if (key, option) not in queued:
                    queued.add((key, option))
                    queue.append({**overrides, key: option})
    return paths


def describe_path(outputs: Sequence[Pattern], path: Mapping[int, int]) -> list[int]:
    """The options a path takes, in the order the walk meets its choice points."""
    chooser = Chooser(path)
    _Walker(chooser, Instance(), Picker(), lenient=True).build(outputs)
    return [c for _, _, c in chooser.taken]


def build(outputs: Sequence[Pattern], path: Mapping[int, int], inst: Instance,
          picker: Picker | None = None) -> Built:
    """The model the pattern's outputs describe along branch `path`, realised as `inst` says;
    `picker` makes the value choices (default: the first candidate each time)."""
    walker = _Walker(Chooser(path), inst, picker or Picker(inst.picks))
    model = walker.build(outputs)
    return Built(model, walker.var_order, len(model.graph.node))


class _Walker:
    """Walks a pattern, building its instance with a `GraphBuilder`: one node per operator
    pattern (memoised, so a shared sub-pattern is one node), a graph input or a constant per
    capture."""

    def __init__(self, choose: Chooser, inst: Instance, pick: Picker, lenient: bool = False):
        #: Only the structure matters (enumerating branches): placeholders where no value fits.
        self.lenient = lenient
        self.choose = choose
        self.inst = inst
        self.pick = pick
        self.rng = np.random.default_rng(inst.seed)
        self.graph = GraphBuilder(inst.float_dtype, const_nodes=inst.const_as_node)
        self.memo: dict[int, list[str]] = {}
        self.vars: dict[str, str] = {}
        self.var_order: list[str] = []

    def build(self, outputs: Sequence[Pattern]) -> onnx.ModelProto:
        """The model whose outputs are the patterns' values; its outputs carry no type (the
        pattern does not say it), and a value that is an input or another output is returned
        through an Identity (a graph output is one value of its own)."""
        outs: list[str] = []
        for name in [self.value(p) for p in outputs]:
            outs.append(self.graph.op("Identity", name) if name in outs or name in self.graph.inputs else name)
        model = self.graph.model({}, dict.fromkeys(outs), self.inst.opset, ir_version=8, name="instance")
        fused_ops.attach_functions(model)
        return model

    # -- values --------------------------------------------------------------------------
    def value(self, p: Pattern, types: frozenset[str] | None = None) -> str:
        """`types`: the element types the consuming input slot allows (None: any)."""
        if isinstance(p, NodeOutput):
            return self.node(p)[p.index]
        if isinstance(p, Var):
            return self.var(p.name, types)
        if isinstance(p, (Alt, Tagged)):
            return self.value(p.options[self.choose(len(p.options), id(p))], types)
        if isinstance(p, (Constrained, Named)):
            return self.value(p.inner, types)
        if isinstance(p, Const):
            return self.const(p, types)
        raise TypeError(f"not a pattern: {p!r}")

    def var(self, name: str | None, types: frozenset[str] | None = None) -> str:
        if name is not None and name in self.vars:
            return self.vars[name]
        key = name or self.graph.fresh("any")
        given = self.inst.example.get(key)
        float_type = f"tensor({_type_name(np.dtype(self.inst.float_dtype))})"
        if given is None and types is not None and float_type not in types:
            # An index-like slot (axes, starts, shape): a small integer constant.
            given = self.pick(self.typed(self.const_candidates(), types) or [None])
        if isinstance(given, np.ndarray):
            out = self.constant(self.float_typed(given), key)
        elif isinstance(given, tuple):
            shape, dtype = given
            dtype = np.dtype(dtype)
            out = self.graph.input(key, shape, np.dtype(self.inst.float_dtype) if dtype.kind == "f" else dtype)
        else:
            leaf = given if isinstance(given, Leaf) else self.inst.leaves.get(key, Leaf())
            shape = leaf.shape(self.inst.n)
            dtype = np.dtype(self.inst.float_dtype if leaf.kind in ("float", "positive") else leaf.kind)
            if leaf.const:
                make = integer_array if self.inst.integer and dtype.kind == "f" else random_array
                array = make(self.rng, shape, dtype)
                if leaf.kind == "positive":
                    array = (np.abs(array) + 0.5).astype(dtype)
                out = self.constant(array, key)
            else:
                out = self.graph.input(key, shape, dtype)
        if name is not None:
            self.vars[name] = out
            self.var_order.append(name)
        return out

    def constant(self, array: np.ndarray, hint: str) -> str:
        """`array` as it is, an initializer or a Constant node as the instance says."""
        return self.graph.const(array, array.dtype, hint)

    def const(self, p: Const, types: frozenset[str] | None = None) -> str:
        if p.name is not None and p.name in self.vars:
            return self.vars[p.name]
        given = self.inst.example.get(p.name) if p.name else None
        if given is not None:
            array = self.float_typed(np.asarray(given))
        elif p.value is not None:
            array = p.value
            if array.dtype.kind == "f":
                array = array.astype(self.inst.float_dtype)
            # A scalar target also matches a tensor of equal elements: a scalar is simplest.
        else:
            array = self.pick(self.typed([c for c in self.const_candidates() if p.accepts(c)], types)
                              or [None])
            if array is None and self.lenient:
                array = np.zeros((), self.inst.float_dtype)
            elif array is None:
                raise Uninstantiable(f"no generic constant satisfies {p!r}; "
                                     f"name it and give a value in Rule.examples")
        out = self.constant(np.asarray(array), p.name or "c")
        if p.name is not None:
            self.vars[p.name] = out
        return out

    def float_typed(self, array: np.ndarray) -> np.ndarray:
        """An example's float array in the instance's float type (other arrays as given)."""
        return array.astype(self.inst.float_dtype) if array.dtype.kind == "f" else array

    def typed(self, candidates: list[np.ndarray], types: frozenset[str] | None) -> list[np.ndarray]:
        """The candidates a slot accepts; only floats of the instance's type where it takes those."""
        float_type = f"tensor({_type_name(np.dtype(self.inst.float_dtype))})"
        if types is None or float_type in types:
            return [c for c in candidates if c.dtype == self.inst.float_dtype] or candidates
        return [c for c in candidates if f"tensor({_type_name(c.dtype)})" in types]

    def const_candidates(self) -> list[np.ndarray]:
        f = self.inst.float_dtype
        n = self.inst.n
        scalars = [1e-5, 0.5, 2.0, 1.0, 1 / math.sqrt(n), math.sqrt(n), 1e-6, 1e-12, 3.0, *self.inst.hints]
        return ([np.array(s, f) for s in scalars] + [np.full((n,), 0.5, f)]
                + [np.array(v, np.int64) for v in ([-1], [0], [1], [2], -1, 0, 1)])

    # -- operators -----------------------------------------------------------------------
    def node(self, p: NodeOutput) -> list[str]:
        np_ = p.node
        if id(np_) in self.memo:
            return self.memo[id(np_)]
        pats = list(np_.inputs)
        if np_.commutative and self.choose(2, id(np_)):
            pats.reverse()
        ins = ["" if q is None else self.value(q, self.slot_types(np_, i)) for i, q in enumerate(pats)]
        attrs = self.required_attrs(np_.op_type, np_.num_outputs, len(ins))
        for name, want in np_.attrs.items():
            value = self.attr(np_.op_type, np_.domain, name, want)
            if value is not None:
                attrs[name] = value
        outs = self.graph.add(np_.op_type, ins, np_.num_outputs,
                              {k: self.attribute(np_.op_type, np_.domain, k, v) for k, v in attrs.items()},
                              domain=np_.domain)
        self.memo[id(np_)] = outs
        return outs

    def slot_types(self, np_: Any, index: int) -> frozenset[str] | None:
        """The element types an input slot of the op accepts, from its schema."""
        try:
            schema = onnx.defs.get_schema(np_.op_type, self.inst.opset, np_.domain)
        except onnx.defs.SchemaError:
            return None
        if not schema.inputs:
            return None
        formal = schema.inputs[min(index, len(schema.inputs) - 1)]
        for c in schema.type_constraints:
            if c.type_param_str == formal.type_str:
                return frozenset(c.allowed_type_strs)
        return frozenset({formal.type_str})

    def required_attrs(self, op_type: str, num_outputs: int, num_inputs: int) -> dict[str, Any]:
        """Attributes a pattern may leave out but a valid node needs (Cast's target type)."""
        if op_type == "Cast":
            return {"to": helper.np_dtype_to_tensor_dtype(np.dtype(self.inst.float_dtype))}
        if op_type == "Split" and self.inst.opset >= 18 and num_inputs == 1:
            return {"num_outputs": num_outputs}
        return {}

    def attr(self, op_type: str, domain: str, name: str, want: Any) -> Any:
        if not isinstance(want, Attr):
            return want
        if want.name is not None and want.name in self.inst.example:
            return self.inst.example[want.name]
        typed = [c for c in ATTR_CANDIDATES if _fits_type(self.attr_type(op_type, domain, name), c)]
        if want.predicate is None:  # None: the schema default
            return self.pick([None] + typed) if want.name is not None else None
        fits = [c for c in typed if _safe(want.predicate, c)]
        if not fits and self.lenient:
            return None
        if not fits:
            raise Uninstantiable(f"no generic value of attribute {name} of {op_type} satisfies "
                                 f"{want.why!r}; capture it and give one in Rule.examples")
        return self.pick(fits)

    def attr_type(self, op_type: str, domain: str, name: str) -> int | None:
        try:
            return onnx.defs.get_schema(op_type, self.inst.opset, domain).attributes[name].type
        except (onnx.defs.SchemaError, KeyError):
            return None

    def attribute(self, op_type: str, domain: str, name: str, value: Any) -> onnx.AttributeProto:
        """The attribute, typed as the op's schema declares (1 where a float is wanted is 1.0)."""
        kind = self.attr_type(op_type, domain, name)
        A = onnx.AttributeProto
        if kind == A.FLOAT and isinstance(value, (int, float)):
            value = float(value)
        elif kind == A.FLOATS and isinstance(value, (list, tuple)):
            value = [float(v) for v in value]
        elif kind == A.INTS and isinstance(value, int):
            value = [value]
        return helper.make_attribute(name, value)


#: Values tried for an attribute pattern with a predicate, in order.
ATTR_CANDIDATES = (-1, 0, 1, 2, 3, 1e-5, 1e-6, 1e-12, 0.5, 1.0, "none", "tanh",
                   [-1], [0], [1], [0, 2, 1, 3], [1, 0], [0, 1, 3, 2])


class Uninstantiable(Exception):
    """The pattern has a part no generic candidate satisfies (the rule needs `examples`)."""


def _fits_type(kind: int | None, value: Any) -> bool:
    """Whether a candidate can be an attribute of schema type `kind` (None: unknown, any)."""
    A = onnx.AttributeProto
    if kind is None:
        return True
    if isinstance(value, str):
        return kind == A.STRING
    if isinstance(value, list):
        return kind in (A.INTS, A.FLOATS)
    if isinstance(value, float):
        return kind == A.FLOAT
    return kind in (A.INT, A.INTS, A.FLOAT)


def _type_name(dtype: np.dtype) -> str:
    return {"float32": "float", "float64": "double"}.get(np.dtype(dtype).name, np.dtype(dtype).name)


def _safe(pred: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(pred(value))
    except Exception:  # a predicate written for another type of value refuses this one
        return False


def mentioned_numbers(functions: Sequence[Callable[..., Any]]) -> tuple[float, ...]:
    """Float literals in the code of `functions` (and code nested in it): a condition that
    wants `alpha` near 1.702 says 1.702, the constant a generic search would never guess."""
    found: list[float] = []
    stack = [getattr(f, "__code__", None) for f in functions]
    while stack:
        code = stack.pop()
        if code is None:
            continue
        for c in code.co_consts:
            if isinstance(c, float) and c not in found and abs(c) >= 1e-3:
                found.append(c)
            elif hasattr(c, "co_consts"):
                stack.append(c)
    return tuple(found)


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Tame values: floats in [-1, 1), small non-negative ints, random bools."""
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        return rng.integers(0, 3, size=shape).astype(dtype)
    return rng.uniform(-1.0, 1.0, size=shape).astype(dtype)


def fitted_leaves(outputs: Sequence[Pattern], path: Mapping[int, int], inst: Instance,
                  limit: int, per_node: int = 2) -> Iterator[dict[str, Leaf]]:
    """Leaf realisations fitted operator by operator, innermost first, to the ONNX schemas.

    The generic search (`leaf_assignments`) tries whole assignments simplest first, which
    never reaches an operator that wants ranks far down the candidate list (a Conv: input,
    weight of the same rank >= 3, bias of rank 1). Here each operator's subtree is built
    alone with the captures it introduces, and only realisations that the op schemas' type
    and shape inference and ONNX Runtime accept are kept (the first `per_node` per operator), so the cost is
    a sum over operators instead of a product over captures; the combinations are yielded
    depth first, up to `limit`. Captures an operator shares with an inner one keep the inner
    one's realisation."""
    steps = _operators(outputs, path)

    def fits(node: NodePattern, fixed: dict[str, Leaf]) -> list[dict[str, Leaf]]:
        sub = [NodeOutput(node, i) for i in range(node.num_outputs)]
        try:
            names = [v for v in build(sub, path, Instance(opset=inst.opset, example=inst.example)).var_names
                     if v not in inst.example and v not in fixed]
        except Uninstantiable:
            return []
        found = []
        for leaves in leaf_assignments(names, SEARCH_PER_NODE, FIT_CANDIDATES) if names else [{}]:
            try:
                model = build(sub, path, Instance(opset=inst.opset, leaves={**fixed, **leaves}, example=inst.example,
                                                  hints=inst.hints)).model
                model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
                onnx.checker.check_model(model, full_check=True)
                outputs = run(model, make_inputs(model))  # ONNX Runtime checks what inference leaves open
            except Exception:  # not valid ONNX with these realisations (or no value fits)
                continue
            if not all(np.all(np.isfinite(v)) for v in outputs.values() if v.dtype.kind == "f"):
                continue
            found.append(leaves)
            if len(found) == per_node:
                break
        return found

    def combine(i: int, fixed: dict[str, Leaf]) -> Iterator[dict[str, Leaf]]:
        if i == len(steps):
            yield fixed
            return
        for leaves in fits(steps[i], fixed):
            yield from combine(i + 1, {**fixed, **leaves})

    yield from itertools.islice(combine(0, {}), limit)


#: Realisations tried per operator by `fitted_leaves`.
SEARCH_PER_NODE = 1500
#: The realisations `fitted_leaves` tries, simplest first: `LEAF_CANDIDATES` without the
#: broadcasting variants, with positive constants (a BatchNormalization's variance).
FIT_CANDIDATES = (
    Leaf(False, 2), Leaf(True, 1), Leaf(True, 1, "positive"), Leaf(False, 3), Leaf(True, 2), Leaf(False, 4),
    Leaf(True, 3), Leaf(True, 4), Leaf(False, 1), Leaf(True, 0), Leaf(False, 0), Leaf(False, 2, "int64"),
    Leaf(False, 1, "int64"), Leaf(False, 2, "bool"),
)


def _operators(outputs: Sequence[Pattern], path: Mapping[int, int]) -> list[NodePattern]:
    """The operator patterns on branch `path`, each after the operators it consumes."""
    order: list[NodePattern] = []
    seen: set[int] = set()

    def visit(p: Pattern | None) -> None:
        if isinstance(p, Alt):
            visit(p.options[min(path.get(id(p), 0), len(p.options) - 1)])
        elif isinstance(p, Constrained):
            visit(p.inner)
        elif isinstance(p, NodeOutput) and id(p.node) not in seen:
            seen.add(id(p.node))
            for q in p.node.inputs:
                visit(q)
            order.append(p.node)
    for out in outputs:
        visit(out)
    return order


def leaf_assignments(var_names: Sequence[str], limit: int,
                     candidates: Sequence[Leaf] = LEAF_CANDIDATES) -> Iterator[dict[str, Leaf]]:
    """Leaf realisations for the pattern's captures, simplest first (by summed candidate index)."""
    k = len(var_names)
    m = len(candidates)
    produced = 0
    for total in range(k * (m - 1) + 1):
        for combo in _compositions(total, k, m - 1):
            yield {v: candidates[i] for v, i in zip(var_names, combo)}
            produced += 1
            if produced >= limit:
                return


def _compositions(total: int, parts: int, cap: int) -> Iterator[tuple[int, ...]]:
    if parts == 0:
        if total == 0:
            yield ()
        return
    for first in range(min(total, cap) + 1):
        for rest in _compositions(total - first, parts - 1, cap):
            yield (first,) + rest
