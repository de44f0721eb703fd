"""Which rules can match at a node: an index over the first two levels of every pattern.

Without it the driver tries every rule of a node's op type at every node of that type, and a
library pays for each rule it holds: 25 GEMM-epilogue rules rooted at Relu meant 25 attempts
at every Relu. The first two levels of a pattern (its root operator and what produces each of
the root's inputs) already rule out almost every pair, so they are compiled into an index that
all the rules share.

Contract. `Dispatch(rules)` compiles each rule's first output pattern into *heads*, one per
operator its root can be (alternatives and tagged alternatives unfolded, constraints and names
looked through): the root's (domain, op_type), its number of inputs, and per input what may
produce it: a set of (domain, op_type)s (an operator pattern, or alternatives that are all
operators), ANY (a `Var`, a wildcard, a `Const`, an alternative with a non-operator option), or
ABSENT (an omitted optional input). A commutative root adds the swapped order. `rules_for(node)`
returns, in the order the rules were given, the rules one of whose heads admits the node's own
(domain, op_type), input count and input producers. A head admits a superset of what the
matcher accepts at those two levels (the matcher also checks output indices, attributes, and
everything deeper), so the index never leaves out a rule that could match: dispatch changes
how many attempts are made, never which fusions happen. `unfiltered` rules are admitted at
every node of their root op types (brute force: `--explain`'s rule, and the reference the tests
compare dispatch against).

Cost. Compiling is O(total pattern size). A lookup builds the node's signature (op type, input
count, and the producer op types of the inputs some head constrains: O(inputs)) and reads a memo
of answers per signature; a miss checks the heads of that root op type once. A graph has few
distinct signatures (a few hundred in a transformer), so a node costs O(inputs) whatever the
number of rules, and a rule costs only where its first two levels fit.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from .ir import Node, Value
from .pattern import Alt, Constrained, Named, NodeOutput, NodePattern, Pattern, Tagged
from .rule import Rule

Kind = tuple[str, str]
#: What a head wants at one input: a set of producer kinds, ANY or ABSENT.
Slot = "frozenset[Kind] | Kind | None"

#: A pattern input that admits any value (but not an absent one).
ANY = None
#: A pattern input that must be absent (an omitted optional input).
ABSENT = ("", "")
#: The producer kind of a graph input or initializer: no operator.
LEAF = ("", "<leaf>")
#: An input no head constrains (only ANY slots meet it, and admit it).
UNWATCHED = ("", "<unwatched>")


class Head:
    """One operator a rule's root can be, with what may produce each of its inputs."""

    __slots__ = ("rule", "arity", "slots")

    def __init__(self, rule: int, slots: tuple[Slot, ...]):
        self.rule = rule
        self.arity = len(slots)
        self.slots = slots

    def admits(self, kinds: Sequence[Kind]) -> bool:
        if len(kinds) != self.arity:
            return False
        for want, kind in zip(self.slots, kinds):
            if want is ANY:
                if kind == ABSENT:
                    return False
            elif want == ABSENT:
                if kind != ABSENT:
                    return False
            elif kind not in want:
                return False
        return True


class Dispatch:
    """The rules of one priority, indexed by their first two pattern levels (module docstring)."""

    def __init__(self, rules: Sequence[Rule], unfiltered: Iterable[Rule] = ()):
        self.rules = tuple(rules)
        brute = set(map(id, unfiltered))
        self.heads: dict[Kind, list[Head]] = {}
        #: Unfiltered rules by root op type: admitted at every node of that type.
        self.always: dict[Kind, set[int]] = {}
        for index, rule in enumerate(self.rules):
            for np_ in _root_nodes(rule.outputs[0]):
                key = (np_.domain, np_.op_type)
                if id(rule) in brute:
                    self.always.setdefault(key, set()).add(index)
                    continue
                slots = tuple(_producers(p) for p in np_.inputs)
                orders = {slots, slots[::-1]} if np_.commutative else {slots}
                self.heads.setdefault(key, []).extend(Head(index, s) for s in orders)
        self.root_ops = frozenset(self.heads) | frozenset(self.always)
        #: Per root op type, the input positions some head constrains: only their producers
        #: enter a node's signature (none at all for a root over captures only, as Q/K/V's MatMul).
        self.watched = {key: tuple(sorted({i for h in heads for i, want in enumerate(h.slots) if want is not ANY}))
                        for key, heads in self.heads.items()}
        self._memo: dict[tuple, tuple[Rule, ...]] = {}

    def rules_for(self, node: Node) -> tuple[Rule, ...]:
        """The rules whose first two levels can match at `node`, in the given order."""
        key = (node.domain, node.op_type)
        inputs = node.inputs
        k = len(inputs)
        while k and inputs[k - 1] is None:
            k -= 1
        watched = [i for i in self.watched.get(key, ()) if i < k]
        seen = [_kind(inputs[i]) for i in watched]
        signature = (key, k, *seen)
        found = self._memo.get(signature)
        if found is None:
            kinds = [UNWATCHED] * k
            for i, kind in zip(watched, seen):
                kinds[i] = kind
            found = self._memo[signature] = self._lookup(key, kinds)
        return found

    def _lookup(self, key: Kind, kinds: list[Kind]) -> tuple[Rule, ...]:
        hits = set(self.always.get(key, ()))
        hits.update(h.rule for h in self.heads.get(key, ()) if h.admits(kinds))
        return tuple(self.rules[i] for i in sorted(hits))


def _kind(v: Value | None) -> Kind:
    if v is None:
        return ABSENT
    p = v.producer
    return LEAF if p is None else (p.domain, p.op_type)


def _root_nodes(p: Pattern) -> list[NodePattern]:
    """The operators a pattern's root can be (a rule's root is always an operator)."""
    if isinstance(p, NodeOutput):
        return [p.node]
    if isinstance(p, (Constrained, Named)):
        return _root_nodes(p.inner)
    if isinstance(p, (Alt, Tagged)):
        return [n for o in p.options for n in _root_nodes(o)]
    return []


def _producers(p: Pattern | None) -> Slot:
    """What may produce the value `p` matches: a set of op types, ANY, or ABSENT."""
    if p is None:
        return ABSENT
    if isinstance(p, NodeOutput):
        return frozenset({(p.node.domain, p.node.op_type)})
    if isinstance(p, (Constrained, Named)):
        return _producers(p.inner)
    if isinstance(p, (Alt, Tagged)):
        options = [_producers(o) for o in p.options]
        if any(o is ANY for o in options):
            return ANY
        return frozenset().union(*options)
    return ANY  # a Var, a wildcard or a Const: any value
