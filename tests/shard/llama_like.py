"""Llama-like decoder graphs for the sharding tests, built op by op as the exporters write them:
embedding Gather, decomposed RMSNorm, Q/K/V projections reshaped to heads (a constant target shape,
or one built from Shape/Gather/Concat as dynamic exports do), rotate-half RoPE, GQA KV repeat
(Unsqueeze/Expand/Reshape), scaled scores with an additive causal mask, softmax, o_proj +
residual, SwiGLU MLP (gate/up/down), final norm and an optional LM head."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from hypothesis import strategies as st

from fusegraph.graph_builder import GraphBuilder


@dataclass(frozen=True)
class Config:
    layers: int = 1
    hidden: int = 32
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    ffn: int = 48
    vocab: int = 64
    lm_head: bool = True
    dynamic: bool = False  # reshape targets from Shape/Gather/Concat instead of constants
    qkv_bias: bool = False
    batch: int = 2
    seq: int = 5


def configs(tp: int):
    """Configs that shard over `tp` (heads a multiple of tp; KV heads a multiple or a divisor)."""
    return st.builds(
        Config,
        layers=st.integers(1, 2),
        heads=st.sampled_from([max(tp, 2), 2 * tp]),
        # MQA (one KV head) where there is more than one rank to replicate it over
        kv_heads=st.sampled_from(sorted({2} | ({1, tp // 2, tp} if tp > 1 else set()))),
        head_dim=st.sampled_from([4, 8]),
        ffn=st.sampled_from([8 * tp, 16 * tp]),
        vocab=st.sampled_from([16 * tp, 24 * tp]),
        lm_head=st.booleans(),
        dynamic=st.booleans(),
        qkv_bias=st.booleans(),
    ).filter(lambda c: c.heads % c.kv_heads == 0 and (c.kv_heads % tp == 0 or tp % c.kv_heads == 0))


def build(c: Config, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    g = GraphBuilder(np.float32)

    def const(base, array):
        array = np.asarray(array)
        return g.weight(array, array.dtype, hint=base)

    def op(op_type, inputs, **attrs):
        out = g.fresh(op_type.lower())
        return g.op(op_type, *inputs, outputs=out, name=out + "_node", **attrs)

    def weight(k, n):
        return const("w", (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32))

    def rms_norm(x):
        var = op("ReduceMean", [op("Pow", [x, const("two", np.float32(2))])], axes=[-1])
        inv = op("Div", [const("one", np.float32(1)), op("Sqrt", [op("Add", [var, const("eps", np.float32(1e-6))])])])
        return op("Mul", [op("Mul", [x, inv]), const("g", (1 + 0.1 * rng.standard_normal(c.hidden)).astype(np.float32))])

    ids = "input_ids"
    batch_seq = None
    if c.dynamic:
        shape = op("Shape", [ids])
        batch_seq = op("Slice", [shape, const("s0", np.array([0])), const("s2", np.array([2]))])

    def target(*tail):
        """[batch, seq, *tail]: one constant, or Concat(Shape(ids)[0:2], tail) when dynamic."""
        if not c.dynamic:
            return const("shape", np.array([c.batch, c.seq, *tail], dtype=np.int64))
        return op("Concat", [batch_seq, const("tail", np.array(tail, dtype=np.int64))], axis=0)

    def heads_of(x, n_heads):
        return op("Transpose", [op("Reshape", [x, target(n_heads, c.head_dim)])], perm=[0, 2, 1, 3])

    half = c.head_dim // 2
    positions = np.arange(c.seq)[:, None] * (1.0 / 10000 ** (np.arange(half) / half))[None]
    angles = np.concatenate([positions, positions], axis=-1).astype(np.float32)
    cos, sin = const("cos", np.cos(angles)[None, None]), const("sin", np.sin(angles)[None, None])

    def rope(x):
        first = op("Slice", [x, const("a", np.array([0])), const("b", np.array([half])), const("ax", np.array([3]))])
        second = op("Slice", [x, const("a", np.array([half])), const("b", np.array([c.head_dim])), const("ax", np.array([3]))])
        rotated = op("Concat", [op("Neg", [second]), first], axis=-1)
        return op("Add", [op("Mul", [x, cos]), op("Mul", [rotated, sin])])

    mask = const("mask", np.triu(np.full((c.seq, c.seq), -1e9, np.float32), 1)[None, None])
    emb = const("embed", rng.standard_normal((c.vocab, c.hidden)).astype(np.float32))
    h = op("Gather", [emb, ids], axis=0)
    for _ in range(c.layers):
        x = rms_norm(h)
        q, k, v = (op("MatMul", [x, weight(c.hidden, n * c.head_dim)]) for n in (c.heads, c.kv_heads, c.kv_heads))
        if c.qkv_bias:
            q, k, v = (op("Add", [t, const("bias", rng.standard_normal(n * c.head_dim).astype(np.float32))])
                       for t, n in ((q, c.heads), (k, c.kv_heads), (v, c.kv_heads)))
        q, k, v = heads_of(q, c.heads), heads_of(k, c.kv_heads), heads_of(v, c.kv_heads)
        q, k = rope(q), rope(k)
        if c.kv_heads != c.heads:
            rep = c.heads // c.kv_heads
            full = const("rep", np.array([c.batch, c.kv_heads, rep, c.seq, c.head_dim], dtype=np.int64))
            merged = const("merged", np.array([c.batch, c.heads, c.seq, c.head_dim], dtype=np.int64))
            k, v = (op("Reshape", [op("Expand", [op("Unsqueeze", [t, const("axis", np.array([2]))]), full]), merged])
                    for t in (k, v))
        scores = op("Mul", [op("MatMul", [q, op("Transpose", [k], perm=[0, 1, 3, 2])]),
                            const("scale", np.float32(c.head_dim ** -0.5))])
        probs = op("Softmax", [op("Add", [scores, mask])], axis=-1)
        attn = op("Transpose", [op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        attn = op("Reshape", [attn, target(c.heads * c.head_dim)])
        h = op("Add", [h, op("MatMul", [attn, weight(c.heads * c.head_dim, c.hidden)])])
        x = rms_norm(h)
        gate = op("MatMul", [x, weight(c.hidden, c.ffn)])
        up = op("MatMul", [x, weight(c.hidden, c.ffn)])
        act = op("Mul", [gate, op("Sigmoid", [gate])])
        h = op("Add", [h, op("MatMul", [op("Mul", [act, up]), weight(c.ffn, c.hidden)])])
    out = rms_norm(h)
    outputs = {}
    if c.lm_head:
        out = op("MatMul", [out, weight(c.hidden, c.vocab)])
        g.nodes[-1].output[0] = "logits"
        outputs["logits"] = (np.float32, [c.batch, c.seq, c.vocab])
    else:
        g.nodes[-1].output[0] = "hidden"
        outputs["hidden"] = (np.float32, [c.batch, c.seq, c.hidden])
    model = g.model({ids: (np.int64, [c.batch, c.seq])}, outputs, 17)
    onnx.checker.check_model(model, full_check=True)
    return model
