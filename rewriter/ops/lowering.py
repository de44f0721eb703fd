"""Lowering fused ops per target: what a `fusegraph` op becomes in the model a runtime loads.

Fusion rules find a subgraph and write one `fusegraph` op whose ONNX local function is its
reference decomposition. That portable form runs everywhere, but a runtime only goes faster
where it has a kernel for the op: ONNX Runtime inlines the function and runs the same
decomposition again; TensorRT's parser inlines it too and re-fuses what it can. So after
fusion, a *target* lowers each fused op into the operators that runtime executes fastest:

- `portable` (default): the fused ops and their local functions, unchanged; any ONNX runtime.
- `onnxruntime`: ONNX Runtime's contrib ops where its CPU provider has a kernel that beats the
  portable form (`com.microsoft.FastGelu`, `com.microsoft.RotaryEmbedding`, and
  `SimplifiedLayerNormalization`, which ONNX Runtime registers in the default domain), and the
  decomposition again where a fusion is
  slower there than what it replaced: the `qkv` rules' one GEMM on concatenated weights and
  its Split (a copy of Q, K and V) become three GEMMs. The output is for ONNX Runtime only:
  `onnx.checker` does not know these ops.
- `tensorrt`: the portable ops, which TensorRT's parser maps to its layers (opset-23
  `Attention` and `RMSNormalization` where the model's opset has them; local functions inlined),
  and to fusegraph's plugins with `rewrite build --plugins` (which rewrites for this target).
  No op is replaced, but bodies are written for TensorRT (`fused_ops.Body.target`): where
  ONNX Runtime and TensorRT want different forms of the same semantics, the attention's
  dead-row guard (`fusegraph.ops.attention_op`), each target gets its own.

Each lowering is a `Rule` whose pattern is a fused op (or a fusion's output), run by the same
driver after the fusion rules, so it is matched, checked and recorded like any fusion, and each
is verified like a rule (`tests/core/test_lowering.py`: equal outputs in ONNX Runtime). Which op lowers to what
was chosen by measurement, not assumption: `benchmarks/bench_lowering.py` times each fused op's
original decomposition, portable form and contrib op in ONNX Runtime, and an op whose contrib
kernel is not faster keeps its portable form (the timings are in benchmarks/RESULTS.md §7.5).
The portable form is the default, which every test of a rule sees, so a portable body slower
than the subgraph it replaced is made faster in place (`norm_ops`, `rope_ops`), not lowered.
"""

from __future__ import annotations

import numpy as np
import onnx

from fusegraph.pattern import Attr, PatternOps
from fusegraph.rule import Rule, reject

from .fused_ops import DOMAIN, TARGETS
MS_DOMAIN = "com.microsoft"


def float32_only(x) -> bool:
    """The contrib kernels chosen here are measured (and registered on the CPU) for float32;
    other element types keep the portable form."""
    return x.dtype == onnx.TensorProto.FLOAT or reject(f"element type {x.dtype}: lowered for float32 only")


def bias_vector(b) -> bool:
    return b.rank == 1 or reject(f"bias rank {b.rank}: FastGelu adds a 1-D bias")


# -- onnxruntime -----------------------------------------------------------------------------
def _rms_norm(op: PatternOps, x, gamma):
    return op.RMSNorm(x, gamma, _domain=DOMAIN, epsilon=Attr("epsilon"))


def _rms_norm_ort(op, x, gamma, epsilon):
    """fusegraph.RMSNorm -> SimplifiedLayerNormalization (ONNX Runtime's, default domain)"""
    return op.SimplifiedLayerNormalization(x, gamma, axis=-1, epsilon=epsilon, stash_type=1)


def _gelu_tanh(op: PatternOps, x):
    return op.GeluTanh(x, _domain=DOMAIN)


def _gelu_tanh_ort(op, x):
    """fusegraph.GeluTanh -> com.microsoft.FastGelu"""
    return op.FastGelu(x, _domain=MS_DOMAIN)


def _matmul_gelu_tanh(op: PatternOps, x, w):
    return op.MatMulGeluTanh(x, w, _domain=DOMAIN)


def _matmul_gelu_tanh_ort(op, x, w):
    """fusegraph.MatMulGeluTanh -> MatMul + com.microsoft.FastGelu"""
    return op.FastGelu(op.MatMul(x, w), _domain=MS_DOMAIN)


def _matmul_bias_gelu_tanh(op: PatternOps, x, w, b):
    return op.MatMulBiasGeluTanh(x, w, b, _domain=DOMAIN)


def _matmul_bias_gelu_tanh_ort(op, x, w, b):
    """fusegraph.MatMulBiasGeluTanh -> MatMul + com.microsoft.FastGelu (with its bias input)"""
    return op.FastGelu(op.MatMul(x, w), b, _domain=MS_DOMAIN)


def _rope(op: PatternOps, x, cos, sin):
    return op.RotaryEmbedding(x, cos, sin, _domain=DOMAIN, interleaved=0)


def half_table_freqs(table, trig: str):
    """freqs where `table` is trig(Concat(freqs, freqs)) over the last axis, unsqueezed at the
    head axis (1): the rotate-half tables as HF exports compute them, once per model for every
    layer (so a walk, not a pattern: the table's other readers would refuse a match). Else None."""
    unsqueeze = table.producer
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.inputs) != 2:
        return None
    axes = unsqueeze.inputs[1].const_value if unsqueeze.inputs[1] is not None else None
    if axes is None or axes.size != 1 or int(axes.reshape(())) not in (1, -3):
        return None
    wave = unsqueeze.inputs[0].producer
    if wave is None or wave.op_type != trig or wave.domain:
        return None
    concat = wave.inputs[0].producer
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2 or concat.attr("axis") not in (-1, 2):
        return None
    freqs = concat.inputs[0]
    return freqs if concat.inputs[1] is freqs and freqs.rank == 3 else None


def _rope_ort(op, x, cos, sin):
    """fusegraph.RotaryEmbedding (rotate-half) -> com.microsoft.RotaryEmbedding

    The contrib op reads its tables as caches [rows, rotary_dim / 2] from row position_ids[0]
    on (a [1] tensor: every batch row at the same positions): the cos and sin of freqs
    [1, S, rotary_dim / 2] (the table's first half, which equals its second) viewed [S, rd / 2],
    read from row 0. Two nodes per call, the Cos and Sin shared by every layer's. Where the
    table's length is not known to be X's sequence (an export's Range of a symbolic length), it
    is broadcast to X's first (`same_positions`): a one-row table rotates every position alike
    there, as it does in the portable op, where the kernel would refuse it."""
    freqs = half_table_freqs(cos, "Cos")
    cache = op.const(np.array([-1, freqs.shape[-1]], np.int64))
    tables = op.Cos(freqs), op.Sin(freqs)
    if not same_positions(x, freqs):
        ints = lambda *v: op.const(np.array(v, np.int64))  # noqa: E731
        rows = op.Concat(ints(1), op.Slice(op.Shape(x), ints(2), ints(3)), ints(1), axis=0)  # [1, S, 1]
        tables = tuple(op.Expand(t, rows) for t in tables)
    return op.RotaryEmbedding(x, op.const(np.zeros(1, np.int64)), *(op.Reshape(t, cache) for t in tables),
                              _domain=MS_DOMAIN, interleaved=0)


def same_positions(x, freqs) -> bool:
    """Is freqs' length X's sequence, as shapes state it (the same number or symbol)?"""
    return freqs.shape[1] == x.shape[2] and freqs.shape[1] is not None


def rope_fits_the_contrib_kernel(x, cos, sin) -> bool:
    """X [B, H, S, D] float32 rotated over all its D channels (ONNX Runtime's kernel passes
    channels beyond rotary_dim through only with num_heads stated, not measured here), by
    rotate-half tables of one freqs [1, S, D / 2] (`half_table_freqs`): one table for the batch,
    as exports compute it from one position range (a table per batch row would need position
    ids computed per call, which cost a decode step more than the kernel saves)."""
    if x.dtype != onnx.TensorProto.FLOAT:
        return reject(f"element type {x.dtype}: lowered for float32 only")
    if x.rank != 4:
        return reject(f"X of rank {x.rank}: the kernel's layout here is X [B, H, S, D]")
    freqs = half_table_freqs(cos, "Cos")
    if freqs is None or half_table_freqs(sin, "Sin") is not freqs:
        return reject("the tables are not Cos and Sin of one Concat(freqs, freqs) unsqueezed at the head axis")
    if freqs.shape[0] != 1:
        return reject(f"freqs of batch {freqs.shape[0]}: one table for the batch (batch 1) only")
    rows, seq = freqs.shape[1], x.shape[2]
    if isinstance(rows, int) and rows != 1 and isinstance(seq, int) and rows != seq:
        return reject(f"a table of {rows} positions for a sequence of {seq}")
    d, half = x.shape[-1], freqs.shape[-1]
    if not isinstance(d, int) or not isinstance(half, int) or 2 * half != d:
        return reject(f"freqs' last dim {half} is not half of X's head dim {d}: a partial rotation or unknown dims")
    return True


def _split_gemm(op: PatternOps, x, w, b, sizes):
    return op.Split(op.MatMulBias(x, w, b, _domain=DOMAIN), sizes, axis=Attr("axis"), _outputs=3)


def _split_gemm_bare(op: PatternOps, x, w, sizes):
    return op.Split(op.MatMul(x, w), sizes, axis=Attr("axis"), _outputs=3)


def _separate_gemms(op, x, w, sizes, b=None):
    """MatMul (+ bias) split in three along the features (`qkv`) -> three MatMuls (+ bias)"""
    cuts = np.cumsum(sizes.const_value)[:-1]
    weights = np.split(w.const_value, cuts, axis=1)
    if b is None:
        return tuple(op.MatMul(x, op.const(wi)) for wi in weights)
    return tuple(op.MatMulBias(x, op.const(wi), op.const(bi), _domain=DOMAIN)
                 for wi, bi in zip(weights, np.split(b.const_value, cuts)))


def _split_gemm_ort(op, x, w, b, sizes, axis):
    """fusegraph.MatMulBias + Split -> three fusegraph.MatMulBias"""
    return _separate_gemms(op, x, w, sizes, b)


def _split_gemm_bare_ort(op, x, w, sizes, axis):
    """MatMul + Split -> three MatMuls"""
    return _separate_gemms(op, x, w, sizes)


def split_of_constant_matrix(x, w, sizes, axis, b=None) -> bool:
    """The weight (and bias) in memory, split by constant positive sizes along the product's
    last axis (-1, or its number: GPT-2's exports split axis 2)."""
    if w.const_value is None or w.rank != 2:
        return reject("the weight is no 2-D constant in memory")
    last = max(x.rank, 2) - 1 if x.rank is not None and x.rank != 1 else 0
    if axis != -1 and (x.rank is None or axis != last):
        return reject(f"split axis {axis} is not the product's last (rank of X {x.rank})")
    split = sizes.const_value
    if split is None or split.ndim != 1 or (split <= 0).any() or int(split.sum()) != w.shape[1]:
        return reject("the split sizes are no constant cover of the weight's columns")
    if b is not None and (b.const_value is None or b.shape != (w.shape[1],)):
        return reject(f"the bias is no constant [{w.shape[1]}] vector")
    return True


#: The ops whose contrib kernel beat the portable form in `bench_lowering.py` (RMSNorm 1.4-2.4x
#: of the export, tanh-GELU 1.7-2.9x, Linear + tanh-GELU 1.1-1.2x, rotate-half RoPE 1.1-1.4x at
#: one row and 1.9-2.3x at 128-512 rows, where the portable body runs 0.6-0.9x), and the split
#: GEMM whose three GEMMs beat it at prefill sizes (the fused one with its Split 0.89-0.92x of
#: the export at 128-512 rows, the three 0.98-1.00x; at one row, a decode step, level).
#: Measured no faster, so left portable (benchmarks/RESULTS.md §7.5, the contrib forms timed
#: next to each block): SkipRMSNorm (SkipSimplifiedLayerNormalization 1.00-1.05x of the export at
#: 128-512 rows, where the portable body runs 1.5-1.6x), SkipLayerNorm (ONNX Runtime's
#: SkipLayerNormalization, with the bias it takes from the GEMM before, 0.15-0.6x of
#: LayerNormalization and the Adds), erf GELU and Linear + GELU (ONNX Runtime fuses the
#: decomposition itself), SiLU and QuickGELU (level), SwiGLU, and attention:
#: com.microsoft.MultiHeadAttention and GroupQueryAttention (Q, or Q, K and V, transposed to
#: [B, S, H * D], a padding mask as attention_bias, causal by their flag) ran 0.68-0.79x of the
#: export at 1-128 rows and 0.90-1.08x at 512-1024 with a padding mask (ONNX Runtime 1.32's CPU
#: kernels: MLAS GEMMs and a softmax, as the export); only GroupQueryAttention's purely causal
#: form gained (1.12x at 1024 rows), which no measured model has (Llama's mask is causal and
#: padding in one, an attention_bias to that kernel).
def _lowerings_onnxruntime() -> list[Rule]:
    name = "lower.onnxruntime."
    return [
        Rule(name + "RotaryEmbedding", _rope, _rope_ort, [rope_fits_the_contrib_kernel]),
        Rule(name + "RMSNorm", _rms_norm, _rms_norm_ort, [float32_only]),
        Rule(name + "GeluTanh", _gelu_tanh, _gelu_tanh_ort, [float32_only]),
        Rule(name + "MatMulGeluTanh", _matmul_gelu_tanh, _matmul_gelu_tanh_ort, [float32_only]),
        Rule(name + "MatMulBiasGeluTanh", _matmul_bias_gelu_tanh, _matmul_bias_gelu_tanh_ort,
             [float32_only, bias_vector]),
        Rule(name + "SplitMatMulBias", _split_gemm, _split_gemm_ort, [split_of_constant_matrix]),
        Rule(name + "SplitMatMul", _split_gemm_bare, _split_gemm_bare_ort, [split_of_constant_matrix]),
    ]


def lowering_rules(target: str) -> list[Rule]:
    """The rules that lower fused ops for `target` (none for the portable form)."""
    if target not in TARGETS:
        from fusegraph.errors import InputError
        raise InputError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    return _lowerings_onnxruntime() if target == "onnxruntime" else []
