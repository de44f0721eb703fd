"""A synthetic rule library for `bench_library.py`: 499 distinct generated op chains (`--rule-file`).

Each rule is a chain root(op(op(...))) of 2-4 operators, binary ones taking a captured second
operand. Half the roots are the ops `synthetic.mlp_blocks` is made of (Relu, Add, MatMul), so
dispatch has real candidates to sort out, and every chain holds an operator that graph lacks, so
none fires: the library costs attempts, never fusions, and the fused graph stays comparable.
"""

from __future__ import annotations

import random

from fusegraph import Rule
from fusegraph.pattern import Pattern, PatternOps, Var

COUNT = 499
IN_GRAPH = ("Relu", "Add", "MatMul")
UNARY = ("Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Exp", "Log", "Sqrt", "Erf", "Softmax", "Transpose", "Reciprocal")
BINARY = ("Add", "Mul", "Sub", "Div", "MatMul", "Max", "Min", "Pow")


def chains(count: int = COUNT, seed: int = 0) -> list[tuple[str, ...]]:
    rng = random.Random(seed)
    found: dict[tuple[str, ...], None] = {}
    while len(found) < count:
        root = rng.choice(IN_GRAPH) if rng.random() < 0.5 else rng.choice(UNARY + BINARY)
        inner = tuple(rng.choice(UNARY + BINARY) for _ in range(rng.randint(1, 3)))
        if all(op in IN_GRAPH for op in inner):
            continue
        found[(root,) + inner] = None
    return list(found)


def chain_pattern(chain: tuple[str, ...]) -> Pattern:
    """root(op(...(x))), each binary op's second operand a capture of its own."""
    op = PatternOps()
    y: Pattern = Var("x")
    for i, op_type in enumerate(reversed(chain)):
        make = getattr(op, op_type)
        y = make(y, Var(f"v{i}")) if op_type in BINARY else make(y)
    return y


def replacement(op, x):
    return op.Chain(x, _domain="synth")


RULES = [Rule(f"synth.chain{i:03d}", chain_pattern(c), replacement, description="(".join(c) + "(...)")
         for i, c in enumerate(chains())]
