"""The pattern algebra: values, operators, alternatives and constraints, written like the math.

A pattern describes a subgraph by the value it computes. Two ways to write one, freely mixed:

    # traced from an ordinary function over `op` (as in onnxscript and PyTorch Inductor)
    def gelu(op, x):
        return op.Mul(op.Mul(x, 0.5), op.Add(op.Erf(op.Div(x, SQRT2)), 1.0))

    # or built directly (as in TVM's dataflow patterns)
    x = Var("x")
    relu = is_op("Relu")(is_op("Add")(is_op("MatMul")(x, Var("w")), Var("b")))

Building blocks:
- `Var("x")` captures the matched value as `x`; the same Var used twice must match the same value
  (`op.Mul(x, op.Sigmoid(x))`); `wildcard()` matches anything without capturing.
- `Const(value)` matches a constant (initializer or Constant node) equal to `value` as its dtype
  stores it (within one unit in the last place: `Pow(x, 2.001)` is not a square, an fp16 0.5 is
  0.5); `Const(value, rtol=.., atol=..)` opts in to a tolerance. `Const(name="eps")` captures
  any constant; `Const(where=pred)` tests its array. A constant operand of a broadcasting op
  must not broadcast the op's output to a bigger shape (see `matcher`): a pattern that absorbs
  it would change the shape.
- `a | b` tries alternatives in order; `optional(op.Cast(x))` matches the Cast or just `x`.
- tagged alternatives bind which one matched, for conditions and the replacement (as onnxscript's
  `OrValue(tag_var=, tag_values=)`): `op.any_of("Relu", "Tanh", tag="act")(y)` captures the
  matched op type as `act`; `tagged("act", {"Relu": relu, "Silu": silu})` (or
  `(relu | silu).tagged("act", ["Relu", "Silu"])`) captures the label of the matching branch.
- `.named("expand")` captures the value an inner pattern matched (an intermediate), so a
  condition reads it by name instead of walking producers by hand.
- `.has_dtype(...)`, `.has_rank(n)`, `.has_shape(...)`, `.where(pred, why)` constrain a value.
- attributes: `op.Softmax(x, axis=-1)` requires the value (ONNX defaults apply when the node
  omits it); `axis=Attr("axis")` captures it; `Attr(where=pred)` tests it.
- commutative ops (Add, Mul, Max, Min, And, Or, Xor, Equal, Sum) match either operand order.
- a function returning a tuple is a pattern with several outputs.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx

from .errors import InputError

COMMUTATIVE_OPS = frozenset({"Add", "Mul", "Max", "Min", "And", "Or", "Xor", "Equal", "Sum",
                             "BitwiseAnd", "BitwiseOr", "BitwiseXor"})
#: Ops whose inputs broadcast against each other (multidirectionally, or PRelu's slope onto X).
BROADCASTING_OPS = COMMUTATIVE_OPS | {"Sub", "Div", "Pow", "Mod", "Mean", "Where", "Less", "LessOrEqual",
                                      "Greater", "GreaterOrEqual", "BitShift", "PRelu"}


class Pattern:
    """A pattern that matches one value of the graph."""

    def __or__(self, other: "Pattern") -> "Alt":
        return Alt(self, as_pattern(other))

    def __ror__(self, other: "Pattern") -> "Alt":
        return Alt(as_pattern(other), self)

    def where(self, predicate: Callable[[Any], bool], why: str) -> "Constrained":
        """Constrain the matched `Value` with `predicate`; `why` names it in --explain."""
        return Constrained(self, predicate, why)

    def has_dtype(self, *dtypes: int | str | np.dtype) -> "Constrained":
        wanted = frozenset(to_onnx_dtype(d) for d in dtypes)
        names = "|".join(onnx.TensorProto.DataType.Name(d) for d in sorted(wanted))
        return self.where(lambda v: v.dtype in wanted, f"dtype is {names}")

    def has_rank(self, *ranks: int) -> "Constrained":
        return self.where(lambda v: v.rank in ranks, f"rank is {'|'.join(map(str, ranks))}")

    def has_shape(self, shape: Sequence[int | str | None]) -> "Constrained":
        """Each dim: an int (exact), a string (that symbolic name) or None (anything)."""
        want = tuple(shape)

        def fits(v: Any) -> bool:
            s = v.shape
            return s is not None and len(s) == len(want) and all(
                w is None or w == d for w, d in zip(want, s))
        return self.where(fits, f"shape is {want}")

    def named(self, name: str) -> "Named":
        """Capture the value this pattern matches as `name`, wherever it sits in the pattern."""
        return Named(self, name)


class Var(Pattern):
    """Any value; captured under `name` (and required equal wherever the same Var recurs)."""

    __slots__ = ("name",)

    def __init__(self, name: str | None = None):
        self.name = name

    def __repr__(self) -> str:
        return self.name or "_"


def wildcard() -> Var:
    return Var(None)


class Const(Pattern):
    """A constant: an initializer or a Constant node's output.

    `value` (optional) must match elementwise (a scalar also matches any tensor whose elements
    all equal it) exactly as the constant's dtype stores it: `value` rounded to that dtype (from
    float64, or via float32 as an exporter that casts a float32 constant to float16 writes it);
    integers exactly. A replacement writes the canonical value, so anything looser changes the
    result: `Pow(x, 2.0000002)` is NaN on negative x where a square is not, which is why not
    even one ulp is let through. `rtol` and `atol` opt in to a tolerance. `where` tests the array; `name` captures the value.
    """

    __slots__ = ("value", "name", "rtol", "atol", "predicate", "why")

    def __init__(self, value: Any = None, *, name: str | None = None, rtol: float = 0.0,
                 atol: float = 0.0, where: Callable[[np.ndarray], bool] | None = None,
                 why: str | None = None):
        self.value = None if value is None else np.asarray(value)
        self.name = name
        self.rtol = rtol
        self.atol = atol
        self.predicate = where
        self.why = why or ("constant" if value is None else
                           f"constant = {value}" if not (rtol or atol) else f"constant ≈ {value}")

    def __repr__(self) -> str:
        return self.why

    def accepts(self, array: np.ndarray | None) -> bool:
        if self.value is None and self.predicate is None:
            return True
        if array is None:
            return False
        if self.value is not None and not self._equals(array):
            return False
        return self.predicate is None or bool(self.predicate(array))

    def _equals(self, array: np.ndarray) -> bool:
        if array.size == 0 or (self.value.ndim and self.value.shape != array.shape):
            return False
        if array.dtype.kind not in "biuf" and array.dtype not in _ML_FLOATS:
            return False
        got = array.astype(np.float64)
        if self.rtol or self.atol:
            with np.errstate(invalid="ignore"):  # inf - inf: equal infinities are caught by ==
                near = np.abs(got - self.value) <= self.atol + self.rtol * np.abs(self.value.astype(np.float64))
            return bool(np.all((got == self.value) | near))
        return bool(np.all((got == _rounded(self.value, array.dtype)) | (got == _rounded(
            self.value.astype(np.float32), array.dtype))))


class Attr:
    """An attribute pattern: capture it as `name`, and/or test it with `where`."""

    __slots__ = ("name", "predicate", "why")

    def __init__(self, name: str | None = None, *, where: Callable[[Any], bool] | None = None,
                 why: str | None = None):
        self.name = name
        self.predicate = where
        self.why = why or "attribute predicate"


class NodePattern:
    """One operator of a pattern; its outputs are `NodeOutput` patterns."""

    __slots__ = ("op_type", "domain", "inputs", "attrs", "num_outputs", "commutative", "absorbed")

    def __init__(self, op_type: str, inputs: Sequence[Pattern | None], attrs: dict[str, Any],
                 domain: str = "", num_outputs: int = 1):
        self.op_type = op_type
        self.domain = domain
        self.inputs = tuple(inputs)
        self.attrs = attrs
        self.num_outputs = num_outputs
        self.commutative = op_type in COMMUTATIVE_OPS and not domain and len(inputs) == 2
        #: Positions of constants the pattern absorbs into a broadcasting op: the matcher
        #: requires them shape-neutral.
        self.absorbed = tuple(i for i, q in enumerate(self.inputs) if _is_const(q)) if (
            op_type in BROADCASTING_OPS and not domain) else ()

    def __repr__(self) -> str:
        return f"{self.domain + '.' if self.domain else ''}{self.op_type}({', '.join(map(repr, self.inputs))})"


class NodeOutput(Pattern):
    __slots__ = ("node", "index")

    def __init__(self, node: NodePattern, index: int = 0):
        self.node = node
        self.index = index

    def __repr__(self) -> str:
        return repr(self.node) + (f"[{self.index}]" if self.node.num_outputs > 1 else "")


class Alt(Pattern):
    """The first alternative that matches (and lets the rest of the pattern match) wins."""

    __slots__ = ("options",)

    def __init__(self, *options: Pattern):
        flat: list[Pattern] = []
        for o in options:
            flat.extend(o.options if isinstance(o, Alt) else (o,))
        self.options = tuple(flat)

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.options))

    def tagged(self, tag: str, labels: Sequence[Any]) -> "Tagged":
        """These alternatives, binding `tag` to the label of the one that matched."""
        if len(labels) != len(self.options):
            raise InputError(f"tagged({tag!r}): {len(labels)} labels for {len(self.options)} alternatives "
                             f"(nested alternatives flatten: use tagged({tag!r}, {{label: pattern}}))")
        return Tagged(tag, dict(zip(labels, self.options)))


class Tagged(Pattern):
    """Alternatives that bind which one matched: `tag` captures the label of the first option
    that lets the whole pattern match. A tag used twice must bind the same label."""

    __slots__ = ("tag", "labels", "options")

    def __init__(self, tag: str, options: Mapping[Any, Any]):
        if not options:
            raise InputError(f"tagged({tag!r}) needs at least one alternative")
        self.tag = tag
        self.labels = tuple(options)
        self.options = tuple(as_pattern(o) for o in options.values())

    def __repr__(self) -> str:
        return f"{self.tag}=(" + " | ".join(f"{lab}: {o!r}" for lab, o in zip(self.labels, self.options)) + ")"


def tagged(tag: str, options: Mapping[Any, Any]) -> Tagged:
    """`tagged("act", {"Relu": op.Relu(y), "Silu": op.Mul(y, op.Sigmoid(y))})`: the first option
    that matches, with `act` bound to its label (a capture like an attribute)."""
    return Tagged(tag, options)


class Named(Pattern):
    """`inner`, with the value it matched captured as `name` (same rules as a `Var`'s capture)."""

    __slots__ = ("inner", "name")

    def __init__(self, inner: Pattern, name: str):
        self.inner = inner
        self.name = name

    def __repr__(self) -> str:
        return f"{self.inner!r} as {self.name}"


class Constrained(Pattern):
    __slots__ = ("inner", "predicate", "why")

    def __init__(self, inner: Pattern, predicate: Callable[[Any], bool], why: str):
        self.inner = inner
        self.predicate = predicate
        self.why = why

    def __repr__(self) -> str:
        return f"{self.inner!r}.where({self.why})"


def _is_const(p: Pattern | None) -> bool:
    return isinstance(p, Const) or isinstance(p, Constrained) and _is_const(p.inner)


def optional(p: Pattern) -> Alt:
    """Match the operator `p` or, when it is absent, its first input (an optional Cast, Add, ...)."""
    base = p.inner if isinstance(p, Constrained) else p
    if not isinstance(base, NodeOutput) or not base.node.inputs or base.node.inputs[0] is None:
        raise InputError("optional() takes an operator pattern with a first input")
    return Alt(p, base.node.inputs[0])


def as_pattern(x: Any) -> Pattern:
    if isinstance(x, Pattern):
        return x
    if isinstance(x, (int, float, np.ndarray, np.generic, list)):
        return Const(x)
    raise InputError(f"cannot use {x!r} in a pattern")


def is_op(op_type: str, domain: str = "", num_outputs: int = 1) -> Callable[..., Any]:
    """TVM-style constructor: `is_op("Add")(a, b, attr=...)`."""
    def make(*inputs: Any, **attrs: Any) -> Any:
        return _make_node(op_type, domain, num_outputs, inputs, attrs)
    return make


def any_of(*op_types: str, tag: str | None = None, domain: str = "") -> Callable[..., Any]:
    """An op-type set, TVM-style: `any_of("Relu", "Tanh", tag="act")(y)` matches a Relu or a
    Tanh of `y` (same inputs and attributes), binding the op type it found as `act`."""
    if not op_types:
        raise InputError("any_of() needs at least one op type")

    def make(*inputs: Any, **attrs: Any) -> Pattern:
        options = {t: _make_node(t, domain, 1, inputs, attrs) for t in op_types}
        return Tagged(tag, options) if tag is not None else Alt(*options.values())
    return make


def _make_node(op_type: str, domain: str, num_outputs: int, inputs: Iterable[Any],
               attrs: dict[str, Any]) -> Any:
    node = NodePattern(op_type, [None if i is None else as_pattern(i) for i in inputs], attrs,
                       domain, num_outputs)
    if num_outputs == 1:
        return NodeOutput(node, 0)
    return tuple(NodeOutput(node, i) for i in range(num_outputs))


class PatternOps:
    """The `op` handed to pattern functions: `op.Relu(x)`, `op.Split(x, _outputs=2)`,
    `op.MyOp(x, _domain="custom")`."""

    @staticmethod
    def any_of(*op_types: str, tag: str | None = None, _domain: str = "") -> Callable[..., Any]:
        """`op.any_of("Relu", "Sigmoid", tag="act")(y)`: see `any_of`."""
        return any_of(*op_types, tag=tag, domain=_domain)

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs: Any, _domain: str = "", _outputs: int = 1, **attrs: Any) -> Any:
            return _make_node(op_type, _domain, _outputs, inputs, attrs)
        return make


def trace(fn: Callable[..., Any]) -> tuple[Pattern, ...]:
    """Turn a pattern function `fn(op, x, y, ...)` into its output patterns; each parameter
    after `op` becomes a `Var` of the same name."""
    params = list(inspect.signature(fn).parameters)[1:]
    out = fn(PatternOps(), *[Var(p) for p in params])
    outs = out if isinstance(out, tuple) else (out,)
    return tuple(as_pattern(o) for o in outs)


_ML_FLOATS = frozenset(np.dtype(t) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e4m3fnuz,
                                            ml_dtypes.float8_e5m2, ml_dtypes.float8_e5m2fnuz))


def _rounded(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`value` as `dtype` stores it (an integer dtype holds only integral values), in float64."""
    if dtype.kind in "biu":
        return np.where(value == np.round(value), value, np.nan).astype(np.float64)
    with np.errstate(over="ignore"):
        return value.astype(dtype).astype(np.float64)


def to_onnx_dtype(d: int | str | np.dtype | type) -> int:
    if isinstance(d, int) and not isinstance(d, bool):
        return d
    if isinstance(d, str) and d.upper() in onnx.TensorProto.DataType.keys():
        return onnx.TensorProto.DataType.Value(d.upper())
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(d))


def attr_equal(actual: Any, expected: Any) -> bool:
    if isinstance(expected, float) or isinstance(actual, float):
        try:
            return math.isclose(float(actual), float(expected), rel_tol=1e-6, abs_tol=1e-9)
        except (TypeError, ValueError):
            return False
    if isinstance(expected, (list, tuple)):
        return isinstance(actual, (list, tuple)) and len(actual) == len(expected) and all(
            attr_equal(a, e) for a, e in zip(actual, expected))
    return actual == expected
