"""What each fusegraph TensorRT plugin does, in plain Python: no `tensorrt` import.

A plugin is mostly bookkeeping (attributes, output shapes and dtypes, which dtype
combinations it accepts) plus one kernel launch. Keeping that here, apart from the thin
TensorRT adapter in `fusegraph.plugins.tensorrt_plugin`, lets the same code be tested where
TensorRT is missing: on CPU (shapes, dtypes, serialization) and on a GPU machine without
TensorRT, by calling `enqueue` with raw device pointers (benchmarks/check_plugins_gpu.py).

Shapes are described symbolically, as references to input dimensions, because TensorRT
asks for output shapes as expressions of the input dimensions before any size is known;
every fused op's outputs are made of input dimensions only, so no arithmetic is needed.
Tensors are dense row-major (TensorRT's LINEAR format). Dtype names are numpy's:
"float32", "float16", "bfloat16" (the names `fusegraph.kernels.launch` takes).

A plugin's signature (inputs, outputs, attributes with their defaults, the activation it
applies) is its fused op's, read from the catalogue (`fusegraph.ops.fused_ops.REGISTRY`): a
core class names its op and adds only what TensorRT asks beyond it.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

from fusegraph.ops import fused_ops
from fusegraph.ops.activation_ops import GATED
from fusegraph.ops.fused_ops import Attribute, FusedOp

FLOATS = ("float32", "float16", "bfloat16")
NAMESPACE = "fusegraph"  # engine.py routes fusegraph-domain nodes here (plugin_namespace attribute)
VERSION = "1"

DimRef = tuple[int, int]  # (input index, dimension index)


def broadcast_strides(what: str, shape: tuple[int, ...], full: tuple[int, ...], inner: int = 1) -> tuple[int, ...]:
    """Element strides of a contiguous tensor of `shape` read as if broadcast to `full` (0 on the
    broadcast axes); `inner` is the element count of trailing axes outside `full`."""
    if len(shape) > len(full):
        raise ValueError(f"{what} {shape} has more dims than {full}")
    padded = (1,) * (len(full) - len(shape)) + tuple(shape)
    strides, step = [0] * len(full), inner
    for axis in range(len(full) - 1, -1, -1):
        if padded[axis] not in (1, full[axis]):
            raise ValueError(f"{what} {shape} does not broadcast to {full}")
        strides[axis] = step if padded[axis] == full[axis] and full[axis] != 1 else 0
        step *= padded[axis]
    return tuple(strides)


def _volume(dims: Sequence[int]) -> int:
    return math.prod(dims)


class PluginCore:
    """Base class: subclasses set `op` and the op-specific methods; the signature comes from
    the op's catalogue entry when the class is defined."""

    op: ClassVar[str]
    spec: ClassVar[FusedOp]
    inputs: ClassVar[tuple[str, ...]]  # names; a trailing "?" marks an optional input
    outputs: ClassVar[tuple[str, ...]]
    fields: ClassVar[tuple[Attribute, ...]] = ()
    dtypes: ClassVar[tuple[str, ...]] = FLOATS

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "op" in cls.__dict__:
            cls.spec = fused_ops.REGISTRY[cls.op]
            cls.inputs, cls.outputs, cls.fields = cls.spec.inputs, cls.spec.outputs, cls.spec.attrs

    def __init__(self, **attributes: Any) -> None:
        known = {f.name: f for f in self.fields}
        unknown = set(attributes) - set(known)
        if unknown:
            raise ValueError(f"{self.op} has no attribute(s) {sorted(unknown)}; it takes {sorted(known) or 'none'}")
        self.attributes: dict[str, float | int] = {}
        for f in self.fields:
            value = attributes.get(f.name, f.default)
            self.attributes[f.name] = float(value) if f.kind == "float" else int(value)

    @property
    def min_inputs(self) -> int:
        return sum(not n.endswith("?") for n in self.inputs)

    def check_input_count(self, n: int) -> None:
        if not self.min_inputs <= n <= len(self.inputs):
            raise ValueError(f"{self.op} takes {self.min_inputs}..{len(self.inputs)} inputs, got {n}")

    # -- build time -------------------------------------------------------------------------
    def output_dims(self, ranks: Sequence[int]) -> list[list[DimRef]]:
        """Each output's dims as (input, dim) references, given the inputs' ranks."""
        raise NotImplementedError

    def output_shapes(self, shapes: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
        """Concrete output shapes (the references above, evaluated), after checking the inputs."""
        self.check_shapes(shapes)
        return [tuple(shapes[i][d] for i, d in refs) for refs in self.output_dims([len(s) for s in shapes])]

    def check_shapes(self, shapes: Sequence[Sequence[int]]) -> None:
        self.check_input_count(len(shapes))

    def output_dtypes(self, dtypes: Sequence[str]) -> list[str]:
        return [dtypes[0]] * len(self.outputs)

    def supports(self, pos: int, dtypes: Sequence[str], n_inputs: int) -> bool:
        """TensorRT's supportsFormatCombination for LINEAR tensors: may position `pos` (inputs
        first, then outputs) have dtype `dtypes[pos]`, given positions < pos? All tensors share
        the first input's dtype, one of the kernels' float types."""
        if pos == 0:
            return dtypes[0] in self.dtypes
        return dtypes[pos] == dtypes[0]

    def workspace_bytes(self, min_shapes: Sequence[Sequence[int]], max_shapes: Sequence[Sequence[int]]) -> int:
        """Device scratch the kernels need for any input shapes between `min_shapes` and
        `max_shapes` (TensorRT's getWorkspaceSize, asked with a profile's bounds); TensorRT
        hands it to every `enqueue`, so nothing is allocated per call. None by default."""
        return 0

    # -- run time ---------------------------------------------------------------------------
    def enqueue(self, shapes: Sequence[Sequence[int]], dtypes: Sequence[str], inputs: Sequence[int],
                outputs: Sequence[int], stream: int, workspace: tuple[int, int] = (0, 0)) -> None:
        """Launch the kernel on `stream` with device pointers (ints) to dense row-major tensors;
        `workspace` is (device pointer, bytes) of scratch, at least `workspace_bytes` of these
        shapes, or (0, 0) for none (the kernels then use scratch of their own)."""
        raise NotImplementedError


class MatMulAct(PluginCore):
    """`MatMul{Bias}{Act}`: Y [..., N] = act(X [..., K] @ W [K, N] (+ B [N]))."""

    def output_dims(self, ranks):
        return [[(0, d) for d in range(ranks[0] - 1)] + [(1, 1)]]

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        x, w = shapes[0], shapes[1]
        if len(w) != 2 or len(x) < 2 or x[-1] != w[0]:
            raise ValueError(f"{self.op}: X {tuple(x)} @ W {tuple(w)} needs W 2-D and X[-1] == W[0]")
        if len(shapes) > 2 and tuple(shapes[2]) != (w[1],):
            raise ValueError(f"{self.op}: B {tuple(shapes[2])} must be ({w[1]},)")

    def enqueue(self, shapes, dtypes, inputs, outputs, stream, workspace=(0, 0)):
        from fusegraph.kernels.launch import launch_matmul_bias_act

        x, w = shapes[0], shapes[1]
        bias = inputs[2] if len(inputs) > 2 else 0
        launch_matmul_bias_act(inputs[0], inputs[1], bias, outputs[0], _volume(x[:-1]), w[1], w[0],
                               self.spec.activation or "none", dtypes[0], stream)


class Attention(PluginCore):
    """`Attention(Q, K, V)`: Q [B, Hq, Sq, D], K/V [B, Hkv, Sk, D], Hq a multiple of Hkv;
    scale 0 means 1/sqrt(D) (the rewriter always states it), softcap where softcapped; a row whose
    softmax is NaN reads as zeros unless zero_nan_rows is 0 (`fusegraph.ops.attention_op`)."""

    op = "Attention"

    def output_dims(self, ranks):
        return [[(0, 0), (0, 1), (0, 2), (0, 3)]]

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        q, k, v = (tuple(s) for s in shapes[:3])
        if not (len(q) == len(k) == len(v) == 4) or k != v or q[0] != k[0] or q[3] != k[3] or q[1] % k[1]:
            raise ValueError(f"{self.op}: Q {q}, K {k}, V {v} must be [B,Hq,Sq,D], [B,Hkv,Sk,D] x2, Hq % Hkv == 0")
        if len(shapes) > 3:
            self.mask_strides(shapes)

    @staticmethod
    def mask_strides(shapes) -> tuple[int, int, int, int]:
        """Element strides of the mask over (b, h, q, k), 0 on broadcast axes."""
        q, k = shapes[0], shapes[1]
        return broadcast_strides("MaskedAttention: mask", tuple(shapes[3]), (q[0], q[1], q[2], k[2]))

    def workspace_bytes(self, min_shapes, max_shapes):
        """The split-KV decode kernels' partials (one query token, no soft cap): a bound over
        every batch up to the largest, a few MB (`decode_attention.workspace_bound_bytes`).
        The same number for the same shapes wherever it is asked, so what `enqueue` is told
        never exceeds what the build reserved."""
        from fusegraph.kernels import decode_attention

        softcap = self.attributes["softcap"] if self.attributes["softcapped"] else 0.0
        if not decode_attention.takes(min_shapes[0][2], softcap):
            return 0
        batch, heads_q, _, head_dim = max_shapes[0]
        return decode_attention.workspace_bound_bytes(batch, heads_q, min_shapes[1][1], head_dim)

    def enqueue(self, shapes, dtypes, inputs, outputs, stream, workspace=(0, 0)):
        from fusegraph.kernels.launch import launch_attention

        b, hq, sq, d = shapes[0]
        hkv, sk = shapes[1][1], shapes[1][2]
        has_mask = len(inputs) > 3
        launch_attention(inputs[0], inputs[1], inputs[2], outputs[0], b, hq, hkv, sq, sk, d,
                         self.attributes["scale"] or None, bool(self.attributes["is_causal"]), dtypes[0],
                         stream, mask_ptr=inputs[3] if has_mask else 0,
                         mask_strides=self.mask_strides(shapes) if has_mask else (0, 0, 0, 0),
                         mask_dtype=dtypes[3] if has_mask else None,
                         softcap=self.attributes["softcap"] if self.attributes["softcapped"] else 0.0,
                         zero_nan_rows=bool(self.attributes["zero_nan_rows"]), workspace=workspace)


class MaskedAttention(Attention):
    """`MaskedAttention(Q, K, V, Mask)`: Attention plus an additive mask of any float type,
    broadcastable to [B, Hq, Sq, Sk] (a separate op because function bodies cannot branch)."""

    op = "MaskedAttention"

    def supports(self, pos, dtypes, n_inputs):
        if pos == 3:
            return dtypes[3] in FLOATS
        return super().supports(pos, dtypes, n_inputs)


class GatedMatMul(PluginCore):
    """The gated MLPs (`GATED`): Y [..., N] = act(X @ Wg) * (X @ Wu), X [..., K], W* [K, N]."""

    def output_dims(self, ranks):
        return [[(0, d) for d in range(ranks[0] - 1)] + [(1, 1)]]

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        x, wg, wu = (tuple(s) for s in shapes)
        if len(wg) != 2 or wg != wu or len(x) < 2 or x[-1] != wg[0]:
            raise ValueError(f"{self.op}: X {x}, Wg {wg}, Wu {wu} need Wg == Wu 2-D and X[-1] == Wg[0]")

    def enqueue(self, shapes, dtypes, inputs, outputs, stream, workspace=(0, 0)):
        from fusegraph.kernels.launch import launch_swiglu

        x, w = shapes[0], shapes[1]
        launch_swiglu(inputs[0], inputs[1], inputs[2], 0, 0, outputs[0], _volume(x[:-1]), w[1], w[0],
                      self.spec.activation, dtypes[0], stream)


class _Norm(PluginCore):
    """Normalization over the last axis; the other inputs are [C] (gamma, beta) or like X."""

    def output_dims(self, ranks):
        return [[(0, d) for d in range(ranks[0])] for _ in self.outputs]

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        x = tuple(shapes[0])
        for name, s in zip(self.inputs[1:], shapes[1:]):
            want = x if name == "R" else (x[-1],)
            if tuple(s) != want:
                raise ValueError(f"{self.op}: {name} {tuple(s)} must be {want} for X {x}")

    def _rows_cols(self, shapes):
        return _volume(shapes[0][:-1]), shapes[0][-1]


class RMSNorm(_Norm):
    op = "RMSNorm"

    def enqueue(self, shapes, dtypes, inputs, outputs, stream, workspace=(0, 0)):
        from fusegraph.kernels.launch import launch_rms_norm

        rows, cols = self._rows_cols(shapes)
        launch_rms_norm(inputs[0], inputs[1], outputs[0], rows, cols, self.attributes["epsilon"], dtypes[0], stream)


class SkipRMSNorm(_Norm):
    op = "SkipRMSNorm"

    def enqueue(self, shapes, dtypes, inputs, outputs, stream, workspace=(0, 0)):
        from fusegraph.kernels.launch import launch_skip_rms_norm

        rows, cols = self._rows_cols(shapes)
        launch_skip_rms_norm(inputs[0], inputs[1], inputs[2], outputs[0], outputs[1], rows, cols,
                             self.attributes["epsilon"], dtypes[0], stream)


class SkipLayerNorm(_Norm):
    op = "SkipLayerNorm"

    def enqueue(self, shapes, dtypes, inputs, outputs, stream, workspace=(0, 0)):
        from fusegraph.kernels.launch import launch_skip_layer_norm

        rows, cols = self._rows_cols(shapes)
        launch_skip_layer_norm(inputs[0], inputs[1], inputs[2], inputs[3],
                               outputs[0], outputs[1], rows, cols, self.attributes["epsilon"], dtypes[0], stream)


class RotaryEmbedding(PluginCore):
    """`RotaryEmbedding(X, cos, sin)`: X [B, H, S, D]; cos/sin broadcastable to [B, H, S, rd]
    with rd = rotary_dim (0 = D); the channels past rd pass through."""

    op = "RotaryEmbedding"

    def output_dims(self, ranks):
        return [[(0, d) for d in range(ranks[0])]]

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        self.cs_strides(shapes)

    def rotary(self, shapes) -> int:
        return self.attributes["rotary_dim"] or shapes[0][-1]

    def cs_strides(self, shapes) -> tuple[int, int, int]:
        """(b, h, s) element strides shared by cos and sin, 0 on broadcast axes."""
        x, cos, sin = (tuple(s) for s in shapes)
        rd = self.rotary(shapes)
        if len(x) != 4 or rd % 2 or rd > x[3]:
            raise ValueError(f"RotaryEmbedding: X {x} must be [B,H,S,D] with even rotary_dim {rd} <= D")
        if cos != sin or len(cos) > 4 or not cos or cos[-1] != rd:
            raise ValueError(f"RotaryEmbedding: cos {cos} and sin {sin} must match and end in rotary_dim {rd}")
        return broadcast_strides("RotaryEmbedding: cos", cos[:-1], x[:3], inner=rd)

    def enqueue(self, shapes, dtypes, inputs, outputs, stream, workspace=(0, 0)):
        from fusegraph.kernels.launch import launch_rotary_embedding

        b, h, s, d = shapes[0]
        launch_rotary_embedding(inputs[0], inputs[1], inputs[2], outputs[0], b, h, s, d,
                                self.attributes["rotary_dim"], bool(self.attributes["interleaved"]),
                                dtypes[0], stream, cs_strides=self.cs_strides(shapes))


def _per_op(base: type[PluginCore], names) -> list[type[PluginCore]]:
    """One core class per op of a family the catalogue lists (the GEMM epilogues, the gated MLPs)."""
    return [type(name, (base,), {"op": name, "__doc__": base.__doc__}) for name in names]


CORES: dict[str, type[PluginCore]] = {
    c.op: c for c in (*_per_op(MatMulAct, fused_ops.MATMUL_EPILOGUES), Attention, MaskedAttention,
                      *_per_op(GatedMatMul, GATED), RMSNorm, SkipRMSNorm, SkipLayerNorm, RotaryEmbedding)}
