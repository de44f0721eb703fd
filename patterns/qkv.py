"""Three projections of one input (attention's Q, K, V) -> one MatMul on the concatenated weights
and a Split.

    Q = X @ Wq (+ bq),  K = X @ Wk (+ bk),  V = X @ Wv (+ bv)
    ->  Y = X @ [Wq | Wk | Wv] (+ [bq | bk | bv]);  Q, K, V = Split(Y, [Nq, Nk, Nv], axis=-1)

One GEMM reads X once instead of three times and fills the GPU with one launch instead of three
small ones; Q, K and V keep their names, so the attention, RoPE and head-split nodes that read
them are untouched. The fused MatMul (+ bias) is an ordinary one, so the GEMM epilogue rules take
it next.

Weights. When all three are in memory they are concatenated here into one new initializer. When
any is left on disk (external data, a model too big to load) the replacement concatenates them
with a graph-level `Concat` instead, which TensorRT and ONNX Runtime fold into a constant when
they build: the rewrite never reads a large weight.

Which matches. X must feed exactly three MatMuls (the trio is the whole projection fan-out of X,
counting projections the GEMM epilogues fused in an earlier pass):
where it feeds more (a decoder's cross-attention K and V of every layer read the encoder output,
GPT-J's parallel MLP reads the attention input) there is no one trio to pick, and fusing some
three of them would be arbitrary. Weights are constant 2-D [K, N_i] matrices (a batched or 1-D
weight is not a projection), and biases constant [N_i] vectors; an initializer that is also a
graph input is a default a caller may feed, so it is never concatenated into a new constant.
`qkv.projections_bias` takes a trio with a constant [N_i] bias on each projection;
`qkv.projections` a trio of bare MatMuls (also the MatMuls of a trio where only some have a
bias: the bias Adds then stay, on the Split's outputs).

Priority (`priorities.QKV`): after attention (which starts at the projected Q, K, V and never
looks at the MatMuls) and the gated MLPs, before the GEMM epilogues, which would otherwise take
each MatMul + bias alone.
"""

from __future__ import annotations

import numpy as np

from fusegraph.ops.fused_ops import DOMAIN
from fusegraph.rule import Rule, reject

from .conditions import opset, overridable
from .gemm_epilogue import constant_source
from .priorities import QKV
SPLIT_INPUT_OPSET = 13  # Split takes its sizes as an input from opset 13


def biased(op, x, wq, wk, wv, bq, bk, bv):
    return op.Add(op.MatMul(x, wq), bq), op.Add(op.MatMul(x, wk), bk), op.Add(op.MatMul(x, wv), bv)


def bare(op, x, wq, wk, wv):
    return op.MatMul(x, wq), op.MatMul(x, wk), op.MatMul(x, wv)


def fused_biased(op, x, wq, wk, wv, bq, bk, bv):
    """Q, K, V projections (+ bias) of one input -> one MatMul + bias on concatenated weights + Split"""
    y = op.Add(op.MatMul(x, _concat(op, (wq, wk, wv), axis=1)), _concat(op, (bq, bk, bv), axis=0))
    return _split(op, y, (wq, wk, wv))


def fused_bare(op, x, wq, wk, wv):
    """Q, K, V projections of one input -> one MatMul on concatenated weights + Split"""
    return _split(op, op.MatMul(x, _concat(op, (wq, wk, wv), axis=1)), (wq, wk, wv))


def _split(op, y, weights):
    sizes = np.array([w.shape[1] for w in weights], np.int64)
    return op.Split(y, op.const(sizes), axis=-1, _outputs=3)


def _concat(op, parts, axis):
    """One initializer when every part is in memory, else a Concat node the builder folds."""
    arrays = [constant_source(p).const_value for p in parts]
    if all(a is not None for a in arrays):
        return op.const(np.concatenate(arrays, axis=axis))
    return op.Concat(*parts, axis=axis)


def is_projection(consumer, x) -> bool:
    """A MatMul of X, or one the GEMM epilogues already fused: they run after this rule, so in
    a later pass a fourth projection of X may have become a `fusegraph.MatMul*` op, and the
    three bare MatMuls left would be an arbitrary three of four."""
    if consumer.op_type == "MatMul" and not consumer.domain:
        return True
    return (consumer.domain == DOMAIN and consumer.op_type.startswith("MatMul")
            and consumer.inputs[0] is x)


def x_feeds_three_matmuls(x) -> bool:
    n = sum(is_projection(c, x) for c in x.consumers)
    return n == 3 or reject(f"X feeds {n} MatMuls, not a Q/K/V trio")


def weights_are_constant_matrices(wq, wk, wv) -> bool:
    for w in (wq, wk, wv):
        if not w.is_constant or overridable(w):
            return reject(f"weight {w.name!r} is not a constant")
        if w.rank != 2:
            return reject(f"weight {w.name!r} has rank {w.rank}, not 2")
    return True


def biases_are_vectors(wq, wk, wv, bq, bk, bv) -> bool:
    """Concatenated, the biases must still be one vector over the output features."""
    for w, b in zip((wq, wk, wv), (bq, bk, bv)):
        source = constant_source(b)
        if not source.is_constant or overridable(source) or b.shape != (w.shape[1],):
            return reject(f"bias {b.name!r} is not a constant of shape [{w.shape[1]}]")
    return True


def opset_has_split_input(x) -> bool:
    return opset(x) >= SPLIT_INPUT_OPSET or reject("Split sizes as an input need opset 13")


def _example(bias: bool) -> dict:
    rng = np.random.default_rng(0)
    ex = {"x": ((2, 3, 8), "float32"), **{f"w{c}": rng.standard_normal((8, n)).astype(np.float32)
                                           for c, n in zip("qkv", (8, 4, 4))}}
    if bias:
        ex.update({f"b{c}": rng.standard_normal(n).astype(np.float32) for c, n in zip("qkv", (8, 4, 4))})
    return ex


CONDITIONS = [x_feeds_three_matmuls, weights_are_constant_matrices, opset_has_split_input]
RULES = [
    # All three biased first: a bare trio match would leave the bias Adds behind.
    Rule("qkv.projections_bias", biased, fused_biased, CONDITIONS + [biases_are_vectors], QKV + 1,
         examples=[_example(True)]),
    Rule("qkv.projections", bare, fused_bare, CONDITIONS, QKV, examples=[_example(False)]),
]
