"""Rules: a pattern, a replacement and optional conditions, as in onnxscript's rewriter.

    def pattern(op, x, w, b):
        return op.Relu(op.Add(op.MatMul(x, w), b))

    def replacement(op, x, w, b):
        return op.MatMulBiasRelu(x, w, b, _domain="fusegraph")

    def bias_is_vector(w, b):
        return b.rank == 1 or reject("bias is not a vector")

    rule = Rule("matmul_bias_relu", pattern, replacement, condition=bias_is_vector)

Pattern and replacement are plain functions over `op`; the replacement and conditions receive
the pattern's captures by name (values as `Value`, captured attributes as Python values) and
declare only those they use. A condition returns a bool or calls `reject(why)`, whose reason
`--explain` prints. A condition that raises anything else refuses the candidate too, and the
driver names the rule among the run's errors (`RewriteReport.errors`): one faulty rule never
ends a run.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable, Sequence

from .errors import InputError
from .matcher import pattern_depth, raised, root_op_types
from .pattern import Pattern, trace


class Reject(Exception):
    """Raised by a condition to refuse a match, with the reason --explain shows."""


def reject(reason: str) -> bool:
    raise Reject(reason)


class RuleRaised(Exception):
    """A rule's condition raised (not `reject`): the message says which and what."""


@dataclass(frozen=True)
class Leaf:
    """How the self-check realises a captured `Var` named in a rule's `examples=`: a graph input
    or a constant, of some rank and kind. Declared here, with the rule, so that a rule library
    states its examples without importing the verifier that reads them.

    `kind` is "float" (the instance's float type), "positive" (the same, in [0.5, 1.5): a
    variance, a divisor), "int64" or "bool"; every dim is the instance's size `n`, except
    those listed in `ones` (1, for broadcasting).
    """

    const: bool = False
    rank: int = 2
    kind: str = "float"
    ones: tuple[int, ...] = ()

    def shape(self, n: int) -> tuple[int, ...]:
        return tuple(1 if i in self.ones else n for i in range(self.rank))


@dataclass
class Rule:
    name: str
    pattern: Callable[..., Any] | Pattern | tuple[Pattern, ...]
    replacement: Callable[..., Any]
    condition: Callable[..., bool] | Sequence[Callable[..., bool]] | None = None
    #: Rules of higher priority run first over the whole graph; rules of equal priority visit the
    #: graph together, each node trying them in list order.
    priority: int = 0
    description: str = ""
    #: Concrete captures the self-check (`fusegraph.verify.verify_rule`) builds graphs from,
    #: where a generic search can't guess them: name -> np.ndarray (a constant of that value),
    #: (shape, dtype) (a graph input), a `Leaf` (an input or constant
    #: sized by the instance), or a Python value (a captured attribute). Float arrays and
    #: inputs take the instance's float type, which the random phase varies.
    examples: Sequence[dict[str, Any]] = ()
    outputs: tuple[Pattern, ...] = field(init=False, repr=False)
    root_ops: frozenset[tuple[str, str]] = field(init=False, repr=False)
    depth: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        p = self.pattern
        self.outputs = p if isinstance(p, tuple) else (p,) if isinstance(p, Pattern) else trace(p)
        for out in self.outputs:
            if not root_op_types(out):
                raise InputError(f"rule {self.name!r}: pattern can't be matched: its output {out!r} "
                                 "is not computed by an operator")
        self.root_ops = frozenset(root_op_types(self.outputs[0]))
        self.depth = max(pattern_depth(o) for o in self.outputs)
        conds = self.condition
        self.conditions = tuple(conds) if isinstance(conds, (list, tuple)) else (conds,) if conds else ()
        if not self.description:
            self.description = (inspect.getdoc(self.replacement) or "").split("\n")[0]

    def check(self, captures: dict[str, Any]) -> str | None:
        """None if every condition holds, else the reason the first one refused."""
        for cond in self.conditions:
            name = getattr(cond, "__name__", None) or repr(cond)
            try:
                ok = call_with_captures(cond, (), captures)
            except Reject as r:
                return str(r)
            except Exception as e:  # the rule's own code: refuse the candidate, name the rule
                raise RuleRaised(raised(f"condition {name}", e)) from e
            if not ok:
                return f"condition {name} is false"
        return None


def call_with_captures(fn: Callable[..., Any], leading: tuple[Any, ...], captures: dict[str, Any]) -> Any:
    """Call `fn(*leading, **captures)` passing only the captures `fn` declares.

    A capture an optional branch did not bind (an absent mask, say) arrives as None.
    """
    names = _parameters(fn)
    if names is None:
        return fn(*leading, **captures)
    return fn(*leading, **{k: captures.get(k) for k in names[len(leading):]})


@lru_cache(maxsize=None)
def _parameters(fn: Callable[..., Any]) -> tuple[str, ...] | None:
    """The parameter names of `fn`, or None if it takes **kwargs."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return tuple(params)


def _short_repr(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


class RuleSet:
    """An ordered, named collection of rules; `select` picks by name or name prefix."""

    def __init__(self, rules: Iterable[Rule]):
        if isinstance(rules, (Rule, str, bytes)) or not isinstance(rules, Iterable):
            raise InputError(f"rules must be a list of fusegraph.Rule, not {type(rules).__name__} {_short_repr(rules)}")
        self.rules = list(rules)
        seen: set[str] = set()
        for r in self.rules:
            if not isinstance(r, Rule):
                raise InputError(f"not a fusegraph.Rule in the rules: {type(r).__name__} {_short_repr(r)}")
            if r.name in seen:
                raise InputError(f"two rules are named {r.name!r}")
            seen.add(r.name)

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def by_priority(self) -> list[Rule]:
        return sorted(self.rules, key=lambda r: -r.priority)

    def select(self, names: Iterable[str]) -> "RuleSet":
        """Rules named exactly, or whose name starts with `prefix*`; unknown names are errors."""
        chosen: list[Rule] = []
        for name in names:
            if name.endswith("*"):
                hits = [r for r in self.rules if r.name.startswith(name[:-1])]
            else:
                hits = [r for r in self.rules if r.name == name]
            if not hits:
                known = ", ".join(r.name for r in self.rules)
                raise InputError(f"no rule named {name!r} (known: {known})")
            chosen.extend(h for h in hits if h not in chosen)
        return RuleSet(chosen)
