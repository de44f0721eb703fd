"""Recognising a causal attention mask, so the fused op gets `is_causal=1` and no mask input.

A kernel that knows the mask is the causal triangle skips the blocks above the diagonal and
reads no mask from memory. Exporters build the triangle in many ways (Triu/Trilu of ones,
Range and a comparison, a constant buffer, `masked_fill` of one of those); rather than one
pattern per way, the mask's producers are evaluated when they depend on constants only (a
static-shape export), and the values are checked: zero on and below the diagonal, -inf (or a
large negative number that underflows exp) above it, equal across the leading dims, square of
the query length. A mask that also depends on an input (padding) stays a mask input.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import helper

#: Additive values at or below this are masked out: exp of them underflows in float32.
MASKED = -1.0e4
#: A causal mask's producers are a handful of nodes; bigger subgraphs are left alone.
MAX_NODES = 32
MAX_ELEMENTS = 1 << 20


def is_causal_triangle(mask, q_len) -> bool:
    """True if `mask` (an additive mask Value, or None) is exactly the causal triangle for
    queries of length `q_len` (an int; unknown lengths never are)."""
    if mask is None or not isinstance(q_len, int):
        return False
    a = constant_value(mask)
    if a is None or a.ndim < 2 or a.shape[-2:] != (q_len, q_len) or a.dtype.kind != "f":
        return False
    a = a.reshape(-1, q_len, q_len)
    if not (a == a[:1]).all():
        return False
    above = np.triu(np.ones((q_len, q_len), bool), k=1)
    return bool((a[0][~above] == 0).all() and (a[0][above] <= MASKED).all())


def constant_value(v) -> np.ndarray | None:
    """The value of `v` if it is a constant or computed from constants by a few nodes."""
    if v.is_constant:
        return v.const_value
    nodes, leaves = _cone(v)
    if nodes is None:
        return None
    inits = []
    for leaf in leaves:
        a = leaf.const_value
        if a is None or a.size > MAX_ELEMENTS:
            return None
        inits.append(onnx.numpy_helper.from_array(a, leaf.name))
    graph = helper.make_graph([n.to_proto() for n in nodes], "mask", [],
                              [helper.make_value_info(v.name, onnx.TypeProto())], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, n) for d, n in v.graph.opset.items()])
    from onnx.reference import ReferenceEvaluator
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = ReferenceEvaluator(model).run(None, {})[0]
    except Exception:  # an op the evaluator lacks: then the mask is simply not recognised
        return None
    out = np.asarray(out)
    return out if out.size <= MAX_ELEMENTS else None


def _cone(v):
    """The nodes computing `v` (in order) and the constants they read, or (None, None) if a
    graph input, a non-standard op or too many nodes are involved."""
    seen, order, leaves = set(), [], {}
    stack = [v]
    while stack:
        x = stack.pop()
        p = x.producer
        if x.is_constant:
            leaves[x.name] = x
            continue
        if p is None or p.domain or p.implicit_inputs:
            return None, None
        if id(p) in seen:
            continue
        seen.add(id(p))
        order.append(p)
        if len(order) > MAX_NODES:
            return None, None
        stack.extend(i for i in p.inputs if i is not None)
    return _producers_first(order), list(leaves.values())


def _producers_first(nodes: list) -> list:
    """The collected nodes ordered so each comes after the ones among them it reads."""
    inside = {id(n) for n in nodes}
    done: set[int] = set()
    out: list = []

    def visit(n) -> None:
        if id(n) in done:
            return
        done.add(id(n))
        for i in n.inputs:
            if i is not None and i.producer is not None and id(i.producer) in inside:
                visit(i.producer)
        out.append(n)
    for n in nodes:
        visit(n)
    return out
