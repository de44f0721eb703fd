"""The attention scores viewed with the heads split out of the batch, and merged back.

An attention computed on [B*H, S, D] (heads in the batch: Bloom, which adds its ALiBi bias
[B*H, 1, Sk] there) may apply its mask to a 4-D view of the scores and take the Softmax of
that view:

    Reshape(scores [B*H, Sq, Sk], [B, H, Sq, -1]) + mask -> Softmax -> Reshape(., [B*H, Sq, -1])

The Softmax and the masking act row by row, so this is the 3-D attention with the mask seen
through the same two Reshapes, exactly when the first Reshape keeps the rows of Sk keys and
the Sq queries of each (it only splits B*H into two dims) and the second merges them back to
[B*H, Sq, Sk]. A Reshape may regroup anything, so that is proven from the shapes: the dims the
reshaped value is typed with and those of its target, evaluated (`canonicalize.evaluate`: a
target computed from `Shape` of a dynamic input reads as that input's symbolic dims).

Dims are compared as products: a static dim, a symbolic one ("batch") or a product of them as
the dynamo exporter names it ("4*batch" is "batch" times 4). Anything else (TorchScript's fresh
unk__ names, "((seq**2)//seq)") proves nothing; the rule then refuses rather than assume.

Cost: one `evaluate` of each target (a few small nodes) per candidate.
"""

from __future__ import annotations

import re
from collections import Counter

from fusegraph.canonicalize import evaluate

#: A dim as a product: (integer factor, the symbols multiplied, as a sorted tuple).
Product = tuple[int, tuple[str, ...]]
_FACTOR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")


def as_product(dim) -> Product | None:
    """`dim` (an int, a symbolic name, "4*batch") as a product, or None where it says nothing:
    unknown, -1 (the rest of a Reshape target), 0 (a copied dim) or an expression that is not a
    plain product."""
    if isinstance(dim, int):
        return (dim, ()) if dim > 0 else None
    if not isinstance(dim, str) or dim.startswith("unk__"):
        return None
    factor, symbols = 1, []
    for part in dim.replace(" ", "").split("*"):
        if not _FACTOR.fullmatch(part):
            return None
        if part.isdigit():
            factor *= int(part)
        else:
            symbols.append(part)
    return factor, tuple(sorted(symbols))


def times(*products: Product | None) -> Product | None:
    """The product of products (None if any is unknown)."""
    factor, symbols = 1, Counter()
    for p in products:
        if p is None:
            return None
        factor *= p[0]
        symbols.update(p[1])
    return factor, tuple(sorted(symbols.elements()))


def proven_equal(a: list[Product | None], b: list[Product | None]) -> bool:
    """Some known reading of one dim equals some known reading of the other."""
    return any(x is not None and x == y for x in a for y in b)


def dims_of(v) -> list[list[Product | None]] | None:
    """What is known of each dim of `v`: its inferred dim, and for a Reshape's output, what its
    target says there (evaluated; 0 copies the input's dim at that index unless `allowzero`).
    None if the rank is unknown."""
    rank = v.rank
    node = v.producer
    target = None
    if node is not None and node.op_type == "Reshape" and not node.domain:
        known = evaluate(node.inputs[1])
        if known is not None and known.elements.shape == (rank,):
            target = known.dims().tolist()
    if rank is None:
        return None
    readings = [[as_product(d)] for d in v.shape]
    if target is not None:
        source = node.inputs[0].shape
        for i, t in enumerate(target):
            if t == 0 and not node.attr("allowzero", 0):
                readings[i].append(as_product(source[i]) if source is not None and i < len(source) else None)
            else:
                readings[i].append(as_product(t))
    return readings


def splits_heads(scores: list[list[Product | None]], view: list[list[Product | None]] | None) -> bool:
    """The view [a, b, c, e] of scores [N, Sq, Sk] keeps every query's row of keys: c is Sq and
    e is Sk, or c is Sq and a*b is N (the element count then makes e Sk)."""
    if view is None or len(view) != 4 or len(scores) != 3:
        return False
    if not proven_equal(view[2], scores[1]):
        return False
    return proven_equal(view[3], scores[2]) or any(
        proven_equal([times(a, b)], scores[0]) for a in view[0] for b in view[1])


def merges_heads(scores: list[list[Product | None]], view: list[list[Product | None]],
                 merged: list[list[Product | None]] | None) -> bool:
    """The Reshape of the view [a, b, Sq, Sk] back to 3-D gives [N, Sq, Sk]: two of its dims
    proven (N read as N or as a*b), and the element count makes the third."""
    if merged is None or len(merged) != 3:
        return False
    batch = scores[0] + [times(a, b) for a in view[0] for b in view[1]]
    agree = (proven_equal(merged[0], batch), proven_equal(merged[1], scores[1]), proven_equal(merged[2], scores[2]))
    return sum(agree) >= 2


def static_dims(readings: list[list[Product | None]]) -> tuple[int | None, ...]:
    """Each dim's static size where a reading proves one, else None."""
    return tuple(next((p[0] for p in dim if p is not None and not p[1]), None) for dim in readings)
