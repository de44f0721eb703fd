"""What a constant attention mask does: hard masking, the causal triangle, whole rows masked.

A kernel that knows the mask is the causal triangle skips the blocks above the diagonal and
reads no mask from memory. Exporters build the triangle in many ways (Triu/Trilu of ones,
Range and a comparison, a constant buffer, `masked_fill` of one of those); rather than one
pattern per way, the mask's producers are evaluated when they depend on constants only (a
static-shape export), and the values are checked. A mask that also depends on an input
(padding) stays a mask input.

Only values that give a masked score zero weight for any scores the type can hold count as
masking: -inf, and the lowest finite value of the mask's type (the masked score then sits the
type's whole range below the kept ones; in float32 it even absorbs the score). A finite -1e4 or
-1e9 is an additive term like any other: with scores of 1e4 it lets the key through, so a
triangle of them is not `is_causal`.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from onnx import helper

from fusegraph.canonicalize import evaluate

#: A causal mask's producers are a handful of nodes; bigger subgraphs are left alone.
MAX_NODES = 32
MAX_ELEMENTS = 1 << 20


def lowest(dtype: np.dtype) -> float | None:
    """The lowest finite value of a float type (bfloat16 included), None for other types."""
    try:
        return float(ml_dtypes.finfo(dtype).min)
    except ValueError:
        return None


def masks_hard(a: np.ndarray) -> np.ndarray:
    """Elementwise: the value masks hard (-inf, or at most the lowest finite value of its type)."""
    low = lowest(a.dtype)
    if low is None:
        return np.zeros(a.shape, bool)
    return a.astype(np.float64) <= low


def is_causal_triangle(a: np.ndarray | None, q_len, k_len) -> bool:
    """True if the additive mask `a` (a constant's value, or None) is exactly the causal
    triangle from position 0 for `q_len` queries and `k_len` keys: zero on and below the
    diagonal, hard masking above it, the same for every batch and head, and square in the
    query and key lengths, which must be static and equal (a decoder step with a KV cache,
    one query against 8 keys, is offset, not causal-from-0). A key length that is unknown
    is proven by broadcasting only where the mask has more than one key column."""
    if a is None or not isinstance(q_len, int) or lowest(a.dtype) is None or a.ndim < 2:
        return False
    n = a.shape[-1]
    if a.shape[-2:] != (n, n) or q_len != n or not (k_len == n or (k_len is None and n >= 2)):
        return False
    a = a.reshape(-1, n, n)
    if not (a == a[:1]).all():
        return False
    above = np.triu(np.ones((n, n), bool), k=1)
    return bool((a[0][~above] == 0).all() and masks_hard(a[0][above]).all())


#: Ops that move or copy their first input's elements without changing their values.
_VALUE_PRESERVING = frozenset({"Expand", "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Identity", "Flatten", "Tile"})


def value_set(v, depth: int = 16) -> np.ndarray | None:
    """The distinct values `v` may hold (float64), where constants decide them though a
    condition or a shape may come from an input: a constant, Where(cond, a, b) of such values,
    and moves, copies and Casts of them (`masked_fill` masks are built so). None if unknown."""
    a = constant_value(v)
    if a is not None:
        return np.unique(a.astype(np.float64))
    p = v.producer
    if p is None or p.domain or depth == 0 or not p.inputs or p.inputs[0] is None:
        return None
    if p.op_type == "Where" and None not in p.inputs:
        chosen = [value_set(x, depth - 1) for x in p.inputs[1:]]
        return None if any(c is None for c in chosen) else np.unique(np.concatenate(chosen))
    if p.op_type in _VALUE_PRESERVING:
        return value_set(p.inputs[0], depth - 1)
    if p.op_type == "Cast":
        values = value_set(p.inputs[0], depth - 1)
        if values is None:
            return None
        with np.errstate(all="ignore"):
            return np.unique(values.astype(helper.tensor_dtype_to_np_dtype(p.attr("to"))).astype(np.float64))
    return None


def is_fixed(v) -> bool:
    """A constant no caller can change: an initializer that is also a graph input is only a
    default the caller may feed (ONNX IR), not a constant."""
    return v.is_constant and all(v is not i for i in v.graph.inputs)


def constant_value(v) -> np.ndarray | None:
    """The value of `v` if it is a constant or computed from constants by a few standard nodes
    (the canonicalizer's evaluator, reading weights too: a constant causal buffer is one)."""
    if v.is_constant:
        return v.const_value if is_fixed(v) else None
    known = evaluate(v, max_nodes=MAX_NODES, max_elements=MAX_ELEMENTS, any_op=True, read_weights=True)
    return None if known is None else known.value
