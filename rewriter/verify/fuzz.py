"""Graph fuzzing: a hypothesis strategy for random valid ONNX DAGs with planted fusions.

`graphs()` draws models of opset 18 in float32 or float16 whose nodes mix noise (elementwise
ops, MatMul, Reshape/Transpose, Softmax, reductions, Concat/Split, Cast round trips) with planted
instances of what the library fuses and a decoy of each that almost matches:

- MatMul+Add+Relu (decoy: a bias that is not a constant), x*Sigmoid(x) (x*Sigmoid(y)), erf-GELU
  (decoys: a wrong constant, one 0.1% off, a 0.5 whose broadcast grows the output, a 0.5
  that is an initializer also listed among the graph inputs, i.e. an overridable default) and
  tanh-GELU (a wrong constant, or an intermediate read elsewhere);
- LayerNorm and RMSNorm decomposed over the last axis, and a residual Add feeding a LayerNorm
  whose sum is also read later (decoys: a mean over axis 0, a gamma that is not a vector, an
  intermediate read elsewhere, a constant summand, a square taken as Pow(d, 2.002));
- BMM-Softmax-BMM attention on [B, H, S, D] (Q.K^T.scale, optional additive mask, softmax over
  the last axis, .V; decoys: softmax over axis 2, a per-key scale, scores read elsewhere,
  a causal Where whose fill (0, -10, -1e4) is not a mask's, probabilities cast through int32);
- a Q/K/V trio of projections (+ bias) of one input (decoy: a fourth projection).

Shared intermediates (values read twice, intermediates that are also graph outputs) exercise the
driver's safety checks. Shapes are tracked, so every draw is valid ONNX; every value of the
main stream is 2-D [rows, features] (attention reshapes to 4-D and back). Values stay tame
(weights scaled by 1/sqrt(fan-in), constants near 1) so float16 neither overflows nor loses the
comparison to rounding; float16 norms take a larger epsilon for the same reason.

Each planted instance and decoy is recorded in the model's metadata (`planted(model)`): a
planted root that should fuse and the intermediates it needs unshared, or a decoy's marker value
that must keep its op.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import onnx
from onnx import helper

from fusegraph.graph_builder import GraphBuilder

OPSET = 18
FEATURES = (4, 6, 8)
DTYPES = (np.float32, np.float16)
#: Norm epsilon per dtype. A norm multiplies the rounding error of its input by up to
#: 1/sqrt(eps) (a row of nearly equal values; x/sqrt(x^2 + eps) near 0 in the axis-0 decoy of
#: a one-row graph); float16 rounds to ~1e-3, so the fused float32 norm would differ from the
#: decomposition by more than float16's tolerance (1e-2) for eps = 1e-2 already.
NORM_EPS = {onnx.TensorProto.FLOAT: 1e-5, onnx.TensorProto.FLOAT16: 0.1}
PLANTED_KEY = "fusegraph.verify.fuzz.planted"


class _GraphBuilder(GraphBuilder):
    """The graph builder with what a draw adds: the shape of every value (so each draw is valid
    ONNX), the generator its values come from, and the record of what it planted."""

    def __init__(self, rng: np.random.Generator, dtype: np.dtype):
        super().__init__(dtype)
        self.rng = rng
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.planted: list[dict] = []
        #: Initializers also listed among the graph inputs (defaults a caller may override).
        self.overridable: list[str] = []

    def input(self, name: str, shape: tuple[int, ...], dtype: Any = None) -> str:
        self.shapes[name] = tuple(shape)
        return super().input(name, shape, dtype)

    def uniform(self, lo: float, hi: float, shape: tuple[int, ...]) -> str:
        return self.const(self.rng.uniform(lo, hi, shape))

    def random_weight(self, shape: tuple[int, ...]) -> str:
        """A weight scaled by 1/sqrt(fan-in), so products of several stay near 1."""
        return self.weight(self.rng.uniform(-1, 1, shape) / math.sqrt(shape[0]))

    def shaped(self, op_type: str, inputs: list[str], shape: tuple[int, ...], outputs: int = 1,
               **attrs: Any) -> list[str]:
        """A named node whose outputs all have `shape`."""
        outs = self.add(op_type, inputs, outputs, attrs, name=self.fresh("n"))
        self.shapes.update(dict.fromkeys(outs, shape))
        return outs

    def one(self, op_type: str, inputs: list[str], shape: tuple[int, ...], **attrs: Any) -> str:
        return self.shaped(op_type, inputs, shape, **attrs)[0]

    def producer(self, value: str) -> str:
        return next(n.op_type for n in self.nodes if value in n.output)

    def plant(self, kind: str, start: int, outputs: list[str], fused: str | None = None,
              projects: str | None = None) -> None:
        """The nodes from `start` on are an instance whose root `outputs[0]` should fuse (its
        producer is replaced, by `fused` where given) whenever no value of it but `outputs` is
        read outside it or is a graph output, and the value it `projects` with a MatMul does
        not feed exactly three MatMuls (a Q/K/V trio, which fuses first)."""
        values = [o for n in self.nodes[start:] for o in n.output]
        self.planted.append({"kind": kind, "root": outputs[0], "op": self.producer(outputs[0]), "values": values,
                             "internal": [v for v in values if v not in outputs], "fused": fused,
                             "projects": projects})

    def decoy(self, kind: str, marker: str, forbidden: list[str] | None = None) -> None:
        """A value of the decoy that no rule may fuse away (it keeps its producer's op), or, with
        `forbidden`, one that none of those ops may produce (it may fuse otherwise)."""
        self.planted.append({"kind": kind, "marker": marker, "op": self.producer(marker), "forbidden": forbidden})


def _variant(b: _GraphBuilder, kind: str, variants: tuple[str, ...]) -> str | None:
    """None for a planted instance; for a decoy, which way it misses."""
    return str(b.rng.choice(variants)) if kind.endswith("_decoy") else None


def _read_elsewhere(b: _GraphBuilder, kind: str, v: str) -> str:
    """The decoy whose intermediate `v` has a reader outside the pattern: `v` keeps its op."""
    b.decoy(kind, v)
    return b.one("Neg", [v], b.shapes[v])


def _mean_last(b: _GraphBuilder, x: str, axis: int = -1) -> str:
    rows, f = b.shapes[x]
    return b.one("ReduceMean", [x, b.ints(axis)], (1, f) if axis == 0 else (rows, 1), keepdims=1)


def _norm(b: _GraphBuilder, kind: str, x: str, miss: str | None) -> tuple[str, str]:
    """LayerNorm (centered) or RMSNorm of x over the last axis, as exporters decompose them;
    returns the result and the normalized value before gamma. The decoy `miss` = "axis" takes
    the LayerNorm's mean or the RMSNorm's mean square over axis 0 (a BatchNorm-like statistic)."""
    sx = b.shapes[x]
    start = len(b.nodes)
    layer = not kind.startswith("rms")
    axis0 = _mean_last(b, x, 0) if miss == "axis" and layer else None
    d = b.one("Sub", [x, axis0 or _mean_last(b, x)], sx) if layer else x
    if miss == "pow":  # 0.1% off the square: NaN for negative d, which x*x is not
        sq = b.one("Pow", [d, b.const(2.002)], sx)
    else:
        sq = b.one("Mul", [d, d], sx) if b.rng.integers(2) else b.one("Pow", [d, b.const(2.0)], sx)
    var = _mean_last(b, sq, 0 if miss == "axis" and not layer else -1)
    axis0 = axis0 or (var if miss == "axis" else None)
    root = b.one("Sqrt", [b.one("Add", [var, b.const(NORM_EPS[b.dtype])], b.shapes[var])], b.shapes[var])
    n = b.one("Div", [d, root], sx)
    gamma = b.uniform(0.5, 1.5, sx if miss == "const" else sx[-1:])
    y = b.one("Mul", [n, gamma], sx)
    if layer:
        y = b.one("Add", [y, b.uniform(-0.5, 0.5, sx[-1:])], sx)
    if miss is None:
        b.plant(kind, start, [y])
    elif miss in ("axis", "const"):
        b.decoy(f"{kind} {miss}", axis0 or root)
    elif miss == "pow":
        b.decoy(f"{kind} {miss}", sq)
    return y, n


def _attention(b: _GraphBuilder, kind: str, x: str, y: str) -> list[str]:
    """softmax(Q.K^T.scale [+ mask]) . V on [rows, H, S, D] projected from x (Q, V) and y (K)."""
    miss = _variant(b, kind, ("fill", "cast") if kind == "attention_mask_decoy" else ("axis", "const", "consumer"))
    rows = b.shapes[x][0]
    h, s, d = int(b.rng.integers(1, 3)), int(b.rng.integers(2, 4)), int(b.rng.integers(1, 3))
    heads = (rows, h, s, d)

    def project(src: str) -> str:
        mm = b.one("MatMul", [src, b.random_weight((b.shapes[src][-1], h * s * d))], (rows, h * s * d))
        return b.one("Reshape", [mm, b.ints(*heads)], heads)
    q, k, v = project(x), project(y), project(x)
    start = len(b.nodes)
    kt = b.one("Transpose", [k], (rows, h, d, s), perm=[0, 1, 3, 2])
    scores = b.one("MatMul", [q, kt], (rows, h, s, s))
    scale = b.uniform(0.2, 1.0, (1, h, 1, s)) if miss == "const" else b.const(1 / math.sqrt(d))
    scaled = b.one("Mul", [scores, scale], (rows, h, s, s))
    mask = int(b.rng.integers(3))  # none, causal triangle, random additive
    masked = scaled
    if miss == "fill":  # Where(causal, s, fill) with a fill that does not zero softmax
        keep = b.const(np.tril(np.ones((s, s), np.bool_)).reshape(1, 1, s, s), np.bool_)
        fill = b.const(float(b.rng.choice([0.0, -10.0, -1e4])))
        masked = b.one("Where", [keep, scaled, fill], (rows, h, s, s))
    elif mask:
        m = (np.triu(np.full((s, s), -1e4), 1) if mask == 1 else b.rng.uniform(-1, 0, (s, s)))
        masked = b.one("Add", [scaled, b.const(m.reshape(1, 1, s, s))], (rows, h, s, s))
    probs = b.one("Softmax", [masked], (rows, h, s, s), axis=2 if miss == "axis" else -1)
    weights = probs
    if miss == "cast":  # probabilities truncated to int32 and back: not a softmax any more
        weights = b.one("Cast", [b.one("Cast", [probs], (rows, h, s, s), to=onnx.TensorProto.INT32)],
                        (rows, h, s, s), to=b.dtype)
    out = b.one("MatMul", [weights, v], heads)
    if miss is None:
        b.plant(kind, start, [out])
    elif miss != "consumer":
        b.decoy(f"{kind} {miss}", probs)
    flat = b.one("Reshape", [out, b.ints(rows, h * s * d)], (rows, h * s * d))
    if miss == "consumer":  # the scores are read elsewhere too, as a 2-D value of the stream; the
        # unmasked ones: a causal mask's -1e4 in the stream would overflow float16 downstream
        b.decoy(kind, scaled)
        return [flat, b.one("Reshape", [scaled, b.ints(rows, h * s * s)], (rows, h * s * s))]
    return [flat]


def _qkv(b: _GraphBuilder, kind: str, x: str) -> list[str]:
    """Three projections (+ bias) of one input that nothing else reads; the decoy has four."""
    rows, f = b.shapes[x]
    start = len(b.nodes)
    p = b.one("Neg", [x], (rows, f))  # the shared input, read by the projections only
    bias = bool(b.rng.integers(2))
    outs = []
    for _ in range(4 if kind.endswith("_decoy") else 3):
        m = int(b.rng.choice(FEATURES))
        y = b.one("MatMul", [p, b.random_weight((f, m))], (rows, m))
        outs.append(b.one("Add", [y, b.uniform(-1, 1, (m,))], (rows, m)) if bias else y)
    if kind.endswith("_decoy"):
        b.decoy(kind, outs[0], forbidden=["Split"])
    else:
        b.plant(kind, start, outs)
    return outs


def _step(b: _GraphBuilder, kind: str, x: str, y: str) -> list[str]:
    """Apply one generator step to value `x` (and `y` for binary ops); returns new values."""
    sx = b.shapes[x]
    rows, f = sx[0], sx[-1]
    if kind == "unary":
        op = ["Relu", "Sigmoid", "Tanh", "Neg", "Abs"][b.rng.integers(5)]
        return [b.one(op, [x], sx)]
    if kind == "binary":
        op = ["Add", "Mul", "Sub", "Max", "Min"][b.rng.integers(5)]
        other = y if b.shapes[y] == sx else b.uniform(0.5, 1.5, (f,))
        return [b.one(op, [x, other], sx)]
    if kind == "matmul":
        m = int(b.rng.choice(FEATURES))
        return [b.one("MatMul", [x, b.random_weight((f, m))], (rows, m))]
    if kind == "reshape":  # [r, f] -> [r, 2, f/2] -> Transpose -> back
        r3 = b.one("Reshape", [x, b.ints(rows, 2, f // 2)], (rows, 2, f // 2))
        t = b.one("Transpose", [r3], (rows, f // 2, 2), perm=[0, 2, 1])
        return [b.one("Reshape", [t, b.ints(rows, f)], (rows, f))]
    if kind == "softmax":
        return [b.one("Softmax", [x], sx, axis=int(b.rng.choice([-1, 0])))]
    if kind == "reduce":
        op = ["ReduceMean", "ReduceSum", "ReduceMax"][b.rng.integers(3)]
        r = b.one(op, [x, b.ints(-1)], (rows, 1), keepdims=1)
        return [b.one("Sub", [x, r], sx)]
    if kind == "concat_split":
        c = b.one("Concat", [x, y if b.shapes[y] == sx else x], (rows, 2 * f), axis=1)
        return b.shaped("Split", [c], sx, outputs=2, axis=1, num_outputs=2)
    if kind == "cast":
        h = b.one("Cast", [x], sx, to=onnx.TensorProto.DOUBLE)
        return [b.one("Cast", [h], sx, to=b.dtype)]
    # planted patterns and their decoys
    if kind in ("mm_bias_relu", "mm_bias_decoy"):
        m = int(b.rng.choice(FEATURES))
        start = len(b.nodes)
        mm = b.one("MatMul", [x, b.random_weight((f, m))], (rows, m))
        bias = (b.uniform(-1, 1, (m,)) if kind == "mm_bias_relu"
                else b.one("Sigmoid", [b.one("MatMul", [y, b.random_weight((b.shapes[y][-1], m))], (rows, m))], (rows, m)))
        add = b.one("Add", [mm, bias], (rows, m))
        out = b.one("Relu", [add], (rows, m))
        if kind == "mm_bias_relu":
            b.plant(kind, start, [out], projects=x)
        return [out]
    if kind in ("silu", "silu_decoy"):
        other = x if kind == "silu" else y if b.shapes[y] == sx else b.one("Neg", [x], sx)
        start = len(b.nodes)
        sig = b.one("Sigmoid", [other], sx)
        out = b.one("Mul", [x, sig], sx)
        if other == x:  # a decoy whose y is x is a SiLU
            b.plant(kind, start, [out])
        else:  # Sigmoid(y) may fuse with what made y, the Mul not into a SiLU
            b.decoy(kind, out, forbidden=["Silu"])
        return [out]
    if kind in ("gelu", "gelu_decoy", "gelu_near_decoy"):
        miss = "const" if kind == "gelu_decoy" else _variant(b, kind, ("near", "broadcast", "input"))
        start = len(b.nodes)
        d = b.one("Div", [x, b.const(math.sqrt(2.0))], sx)
        erf = b.one("Erf", [d], sx)
        e = b.one("Add", [erf, b.const(1.0)], sx)
        # 0.5 shaped [k, 1, 1] makes the output [k, rows, features]: not shape-neutral
        grown = (int(b.rng.integers(1, 3)),) if miss == "broadcast" else ()
        half = b.const(np.full(grown + (1, 1) if grown else (), {"const": 0.6, "near": 0.5 * 1.001}.get(miss, 0.5)))
        if miss == "input":
            b.overridable.append(half)
        out = b.one("Mul", [b.one("Mul", [x, half], grown + sx), e], grown + sx)
        if miss is None:
            b.plant(kind, start, [out])
        else:
            b.decoy(f"{kind} {miss}", erf)
        if grown:  # back to the stream's [rows, features]
            out = b.one("ReduceSum", [out, b.ints(0)], sx, keepdims=0)
        return [out]
    if kind in ("gelu_tanh", "gelu_tanh_decoy"):
        miss = _variant(b, kind, ("const", "consumer"))
        start = len(b.nodes)
        cube = b.one("Pow", [x, b.const(3.0)], sx)
        inner = b.one("Add", [x, b.one("Mul", [cube, b.const(0.05 if miss == "const" else 0.044715)], sx)], sx)
        t = b.one("Tanh", [b.one("Mul", [inner, b.const(math.sqrt(2 / math.pi))], sx)], sx)
        out = b.one("Mul", [b.one("Mul", [x, b.const(0.5)], sx), b.one("Add", [t, b.const(1.0)], sx)], sx)
        if miss is None:
            b.plant(kind, start, [out])
        elif miss == "const":
            b.decoy(kind, t)
        return [out, _read_elsewhere(b, kind, t)] if miss == "consumer" else [out]
    if kind in ("layer_norm_pow_decoy", "rms_norm_pow_decoy"):
        return [_norm(b, kind, x, "pow")[0]]
    if kind in ("layer_norm", "layer_norm_decoy", "rms_norm", "rms_norm_decoy"):
        miss = _variant(b, kind, ("axis", "const", "consumer"))
        out, normalized = _norm(b, kind, x, miss)
        return [out, _read_elsewhere(b, kind, normalized)] if miss == "consumer" else [out]
    if kind in ("skip_norm", "skip_norm_decoy"):
        miss = _variant(b, kind, ("const", "norm"))
        r = b.uniform(-1, 1, (f,)) if miss == "const" else (y if b.shapes[y] == sx else b.one("Relu", [x], sx))
        s = b.one("Add", [x, r], sx)
        out, _ = _norm(b, kind, s, "axis" if miss == "norm" else None)
        if miss is None:
            b.planted[-1]["fused"] = "SkipLayerNorm"
        elif miss == "const":  # a bias: the LayerNorm fuses, the Add stays outside it
            b.decoy(kind, out, forbidden=["SkipLayerNorm"])
        return [out, s]
    if kind in ("attention", "attention_decoy", "attention_mask_decoy"):
        return _attention(b, kind, x, y)
    if kind in ("qkv", "qkv_decoy"):
        return _qkv(b, kind, x)
    raise ValueError(kind)


STEPS = ("unary", "binary", "matmul", "reshape", "softmax", "reduce", "concat_split", "cast",
         "mm_bias_relu", "mm_bias_decoy", "silu", "silu_decoy", "gelu", "gelu_decoy",
         "gelu_tanh", "gelu_tanh_decoy", "layer_norm", "layer_norm_decoy", "rms_norm", "rms_norm_decoy",
         "skip_norm", "skip_norm_decoy", "attention", "attention_decoy", "qkv", "qkv_decoy",
         # near misses (issue 9): each must be refused, or rewritten into something equal
         "gelu_near_decoy", "layer_norm_pow_decoy", "rms_norm_pow_decoy", "attention_mask_decoy")


def build_graph(rows: int, n_inputs: int, steps: list[tuple[str, int, int]], extra_outputs: list[int],
                seed: int, dtype: Any = np.float32) -> onnx.ModelProto:
    """The model a drawn recipe describes: `steps` are (kind, index of x, index of y) over the
    values so far; `extra_outputs` picks intermediates that are also graph outputs."""
    b = _GraphBuilder(np.random.default_rng(seed), dtype)
    values = [b.input(f"in{i}", (rows, FEATURES[i % len(FEATURES)])) for i in range(n_inputs)]
    for kind, i, j in steps:
        x, y = values[i % len(values)], values[j % len(values)]
        if kind in ("reshape",) and b.shapes[x][-1] % 2:
            kind = "unary"
        values.extend(_step(b, kind, x, y))
    consumed = {n for node in b.nodes for n in node.input}
    made = values[n_inputs:]
    outs = [v for v in made if v not in consumed] + [made[k % len(made)] for k in extra_outputs]
    model = b.model({t.name: (t.data_type, list(t.dims)) for t in b.initializers if t.name in b.overridable},
                    {o: (b.dtype, b.shapes[o]) for o in dict.fromkeys(outs)}, OPSET, ir_version=8, name="fuzz")
    helper.set_model_props(model, {PLANTED_KEY: json.dumps(b.planted)})
    return model


def planted(model: onnx.ModelProto) -> list[dict]:
    """The planted instances and decoys `build_graph` recorded in `model`."""
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props.get(PLANTED_KEY, "[]"))


def graphs(max_steps: int = 12):
    """The hypothesis strategy: random valid models with planted fusions and decoys."""
    from hypothesis import strategies as st

    step = st.tuples(st.sampled_from(STEPS), st.integers(0, 63), st.integers(0, 63))
    return st.builds(build_graph, rows=st.integers(1, 3), n_inputs=st.integers(1, 3),
                     steps=st.lists(step, min_size=1, max_size=max_steps),
                     extra_outputs=st.lists(st.integers(0, 63), max_size=2), seed=st.integers(0, 2**16),
                     dtype=st.sampled_from(DTYPES))
