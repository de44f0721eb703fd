"""Matching a pattern against the graph, anchored at one candidate node.

The matcher walks from the pattern's root towards its inputs, following each value to its
producer, so one attempt costs O(pattern size) and never scans the graph. Alternatives and
commutative operand orders backtrack through generators: every consistent set of bindings is
produced in a fixed order, so results are deterministic.

When asked to explain, each failure is recorded with how far the match had got (the number of
operators bound), and the deepest ones are the near-misses a pattern author wants to see.

A predicate of the pattern (`.where`, `Const(where=)`, `Attr(where=)`) that raises fails that
branch of the match with the exception as its reason, and is listed in `raised` for the driver
to report: a pattern's own code never ends a run.

A constant that a pattern absorbs (`Const`) as an operand of a broadcasting op must be
shape-neutral: broadcasting it against the op's other operands must not give a bigger output
(`Mul(x, Const(0.5))` with the 0.5 shaped [1, 1, 1, 1, 1] makes a rank-2 x rank 5); the
replacement, which writes the canonical value, would lose that. Captured values (`Var`) are not
absorbed: they reach the replacement, whose output shape the driver checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator

import onnx
from onnx import helper

from .ir import Node, Value
from .pattern import (Alt, Attr, Const, Constrained, Named, NodeOutput, NodePattern, Pattern, Tagged,
                      Var, attr_equal)

_MISSING = object()


class Bindings:
    """What a partial match has bound: captured values and attributes, and matched nodes.

    Copied on every new binding (a handful of entries), so backtracking needs no undo log.
    """

    __slots__ = ("values", "nodes", "attrs")

    def __init__(self, values: dict[str, Value], nodes: dict[int, Node], attrs: dict[str, Any]):
        self.values = values
        self.nodes = nodes
        self.attrs = attrs

    def bind_value(self, name: str, v: Value) -> "Bindings":
        return Bindings({**self.values, name: v}, self.nodes, self.attrs)

    def bind_node(self, np_: NodePattern, n: Node) -> "Bindings":
        return Bindings(self.values, {**self.nodes, id(np_): n}, self.attrs)

    def bind_attr(self, name: str, a: Any) -> "Bindings":
        return Bindings(self.values, self.nodes, {**self.attrs, name: a})


EMPTY = Bindings({}, {}, {})


@dataclass
class Failure:
    """One reason a match attempt stopped: at which graph node, for which pattern part."""

    depth: int
    node: str
    reason: str


@dataclass
class Matcher:
    opset: dict[str, int]
    explain: bool = False
    failures: list[Failure] = field(default_factory=list)
    #: What the pattern's own predicates raised during the current candidate.
    raised: list[str] = field(default_factory=list)

    def _holds(self, env: Bindings, where: Node | Value, what: str, predicate: Any, arg: Any) -> bool | None:
        """`predicate(arg)`; None if it raised (recorded as the failure, and in `raised`)."""
        try:
            return bool(predicate(arg))
        except Exception as e:  # the pattern author's code
            self.raised.append(raised(what, e))
            self._fail(env, where, self.raised[-1])
            return None

    def _fail(self, env: Bindings, where: Node | Value | None, reason: str) -> None:
        if self.explain:
            label = ("graph input/constant " + where.name if isinstance(where, Value)
                     else f"{where.op_type} {where.name!r}" if where is not None else "-")
            self.failures.append(Failure(len(env.nodes), label, reason))

    def match(self, p: Pattern, v: Value | None, env: Bindings) -> Iterator[Bindings]:
        """Every extension of `env` under which pattern `p` matches value `v`."""
        if v is None:
            self._fail(env, None, f"expected {p!r}, found an absent input")
            return
        if isinstance(p, NodeOutput):
            yield from self._match_node_output(p, v, env)
        elif isinstance(p, Var):
            yield from self._capture(p.name, v, env)
        elif isinstance(p, Alt):
            for option in p.options:
                yield from self.match(option, v, env)
        elif isinstance(p, Constrained):
            for e in self.match(p.inner, v, env):
                where = v.producer or v
                ok = self._holds(e, where, f"predicate '{p.why}'", p.predicate, v)
                if ok:
                    yield e
                elif ok is False:
                    self._fail(e, where, f"{v.name!r} fails: {p.why}")
        elif isinstance(p, Const):
            where = v.producer or v
            if not v.is_constant:
                self._fail(env, where, f"expected {p!r}, {v.name!r} is not a constant")
                return
            ok = self._holds(env, where, f"constant test '{p!r}'", p.accepts, v.const_value)
            if not ok:
                if ok is False:
                    self._fail(env, where, f"{v.name!r} fails: {p!r}")
                return
            yield from self._capture(p.name, v, env)
        elif isinstance(p, Tagged):
            yield from self._match_tagged(p, v, env)
        elif isinstance(p, Named):
            for e in self.match(p.inner, v, env):
                yield from self._capture(p.name, v, e)
        else:
            raise TypeError(f"not a pattern: {p!r}")

    def _match_tagged(self, p: Tagged, v: Value, env: Bindings) -> Iterator[Bindings]:
        """Each option in order with the tag bound to its label (a label already bound by the
        same tag elsewhere admits only its own option)."""
        kinds = _tagged_roots(p)
        n = v.producer
        if kinds and (n is None or (n.domain, n.op_type) not in kinds):
            found = n.op_type if n is not None else "a graph input or initializer"
            self._fail(env, n or v, f"expected {'|'.join(sorted(t for _, t in kinds))} ({p.tag}), found {found}")
            return
        bound = env.attrs.get(p.tag, _MISSING)
        for label, option in zip(p.labels, p.options):
            if bound is _MISSING:
                yield from self.match(option, v, env.bind_attr(p.tag, label))
            elif bound == label:
                yield from self.match(option, v, env)
        if bound is not _MISSING and bound not in p.labels:
            self._fail(env, n or v, f"{p.tag} is {bound!r}, none of {list(p.labels)}")

    def _capture(self, name: str | None, v: Value, env: Bindings) -> Iterator[Bindings]:
        """Bind `name` to `v`, or check it is already bound to `v` (a value used twice)."""
        if name is None:
            yield env
            return
        bound = env.values.get(name)
        if bound is None:
            yield env.bind_value(name, v)
        elif bound is v:
            yield env
        else:
            self._fail(env, v.producer or v, f"{name} must be the same value as {bound.name!r}")

    def _match_node_output(self, p: NodeOutput, v: Value, env: Bindings) -> Iterator[Bindings]:
        np_ = p.node
        n = v.producer
        if n is None or not n.alive:
            self._fail(env, v, f"expected {np_.op_type}, {v.name!r} is a graph input or initializer")
            return
        if n.op_type != np_.op_type or n.domain != np_.domain:
            self._fail(env, n, f"expected {np_.op_type}, found {n.op_type}")
            return
        if p.index >= len(n.outputs) or n.outputs[p.index] is not v:
            self._fail(env, n, f"expected output {p.index} of {np_.op_type}")
            return
        bound = env.nodes.get(id(np_))
        if bound is not None:
            if bound is n:
                yield env
            else:
                self._fail(env, n, f"{np_.op_type} must be the node already matched ({bound.name!r})")
            return
        env = env.bind_node(np_, n)
        for name, want in np_.attrs.items():
            actual = n.attr(name, _MISSING)
            if actual is _MISSING:
                actual = default_attribute(n.op_type, n.domain, self.opset.get(n.domain, 1), name)
            if isinstance(want, Attr):
                if want.predicate is not None and actual is None:
                    self._fail(env, n, f"attribute {name} is absent: {want.why}")
                    return
                if want.predicate is not None:
                    ok = self._holds(env, n, f"attribute test '{want.why}'", want.predicate, actual)
                    if not ok:
                        if ok is False:
                            self._fail(env, n, f"attribute {name}={actual!r} fails: {want.why}")
                        return
                if want.name is not None:
                    env = env.bind_attr(want.name, actual)
            elif not attr_equal(actual, want):
                self._fail(env, n, f"attribute {name}={actual!r}, pattern wants {want!r}")
                return
        inputs = n.inputs
        k = len(inputs)
        while k and inputs[k - 1] is None:
            k -= 1
        pats = np_.inputs
        if k != len(pats):
            self._fail(env, n, f"{np_.op_type} has {k} inputs, pattern wants {len(pats)}")
            return
        orders = (inputs, (inputs[1], inputs[0])) if np_.commutative and inputs[0] is not inputs[1] else (inputs,)
        for vals in orders:
            if np_.absorbed:
                why = _absorbed_constant_grows(np_.absorbed, vals, k)
                if why is not None:
                    self._fail(env, n, why)
                    continue
            yield from self._match_inputs(pats, vals, 0, env)

    def _match_inputs(self, pats: tuple[Pattern | None, ...], vals: Any, i: int,
                      env: Bindings) -> Iterator[Bindings]:
        if i == len(pats):
            yield env
            return
        p = pats[i]
        if p is None:
            if vals[i] is None:
                yield from self._match_inputs(pats, vals, i + 1, env)
            return
        for e in self.match(p, vals[i], env):
            yield from self._match_inputs(pats, vals, i + 1, e)


def _absorbed_constant_grows(positions: tuple[int, ...], vals: Any, k: int) -> str | None:
    """Why a constant at one of `positions` would broadcast the op's output beyond the shape of
    its other operands, or None when every such constant is shape-neutral.

    Neutral: rank <= the others' rank, and each dim 1 or equal to a known dim of another operand
    at that position (a symbolic dim may be 1 at run time, and the constant would grow it).
    When another operand's rank is unknown only a size-1 constant of rank <= 1 is neutral
    (a scalar, or [1], which any non-scalar operand absorbs).
    """
    for i in positions:
        c = vals[i]
        if c is None or not c.is_constant:
            continue  # not a constant: the Const pattern refuses it with its own reason
        array = c.const_value
        cshape = array.shape if array is not None else c.shape
        if cshape is None or not cshape:
            continue  # a rank-0 constant never grows anything
        others = [vals[j].shape for j in range(k) if j != i and vals[j] is not None]
        if any(s is None for s in others) or not others:
            if len(cshape) <= 1 and all(d == 1 for d in cshape):
                continue
            return (f"constant {c.name!r} of shape {list(cshape)} may broadcast the output "
                    "(the other operand's rank is unknown)")
        rank = max(len(s) for s in others)
        if len(cshape) > rank:
            return f"constant {c.name!r} of shape {list(cshape)} would raise the output's rank to {len(cshape)}"
        for back in range(1, len(cshape) + 1):
            d = cshape[-back]
            if d != 1 and d not in [s[-back] for s in others if len(s) >= back and isinstance(s[-back], int)]:
                return (f"constant {c.name!r} of shape {list(cshape)} would broadcast dim {rank - back} of "
                        f"the output to {d}")
    return None


def raised(what: str, e: BaseException) -> str:
    """`what raised IndexError: tuple index out of range`: an exception as a refusal reason."""
    lines = str(e).strip().splitlines()
    return f"{what} raised {type(e).__name__}" + (f": {lines[0]}" if lines else "")


@lru_cache(maxsize=None)
def default_attribute(op_type: str, domain: str, version: int, name: str) -> Any:
    """The value ONNX gives an attribute the node leaves out (None if it has no default)."""
    try:
        schema = onnx.defs.get_schema(op_type, version, domain)
    except onnx.defs.SchemaError:
        return None
    a = schema.attributes.get(name)
    if a is None or not a.default_value.name:
        return None
    value = helper.get_attribute_value(a.default_value)
    return value.decode() if isinstance(value, bytes) else value


@lru_cache(maxsize=None)
def _tagged_roots(p: Tagged) -> frozenset[tuple[str, str]]:
    """The op types a tagged alternative's options are rooted at (empty if one is not an op)."""
    return frozenset(root_op_types(p))


def root_op_types(p: Pattern) -> set[tuple[str, str]]:
    """The (domain, op_type)s a pattern's root can be: the index keys its rule visits."""
    if isinstance(p, NodeOutput):
        return {(p.node.domain, p.node.op_type)}
    if isinstance(p, (Constrained, Named)):
        return root_op_types(p.inner)
    if isinstance(p, (Alt, Tagged)):
        out: set[tuple[str, str]] = set()
        for o in p.options:
            sub = root_op_types(o)
            if not sub:
                return set()
            out |= sub
        return out
    return set()


def pattern_depth(p: Pattern | None, seen: dict[int, int] | None = None) -> int:
    """The longest operator chain in a pattern (how far a change can reach a root)."""
    if p is None:
        return 0
    seen = {} if seen is None else seen
    if isinstance(p, NodeOutput):
        key = id(p.node)
        if key not in seen:
            seen[key] = 1 + max((pattern_depth(i, seen) for i in p.node.inputs), default=0)
        return seen[key]
    if isinstance(p, (Constrained, Named)):
        return pattern_depth(p.inner, seen)
    if isinstance(p, (Alt, Tagged)):
        return max(pattern_depth(o, seen) for o in p.options)
    return 0
