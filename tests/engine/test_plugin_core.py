"""The plugins' TensorRT-free logic: attributes, output shapes and dtypes, format support.

Runs without TensorRT or a GPU; benchmarks/check_plugins_gpu.py runs the same cores' `enqueue`
on a GPU and compares with onnxruntime.
"""

from __future__ import annotations

import pytest

import fusegraph

from fusegraph.ops.fused_ops import REGISTRY
from fusegraph.plugins.core import CORES, NAMESPACE, Attention, MaskedAttention, RMSNorm, RotaryEmbedding, SkipLayerNorm


def test_plugins_match_the_fused_ops_the_rewriter_emits():
    """Same op names, inputs, outputs and attributes as `fusegraph.ops.fused_ops`, so the parser's
    plugin lookup (by op type) finds them and the attributes arrive as the plugin's fields."""
    fusegraph.default_rules()  # importing the rules registers their fused ops
    expected = {f"MatMul{b}{a}" for b in ("", "Bias") for a in ("", "Relu", "Gelu", "GeluTanh", "Sigmoid", "Tanh", "Silu")}
    expected -= {"MatMul"}
    expected |= {"Attention", "MaskedAttention", "SwiGLU", "GeGLU", "GeGLUTanh", "RMSNorm", "SkipRMSNorm",
                 "SkipLayerNorm", "RotaryEmbedding"}
    assert set(CORES) == expected
    for name, core in CORES.items():
        op = REGISTRY[name]
        assert (core.inputs, core.outputs) == (op.inputs, op.outputs), name
        assert {f.name for f in core.fields} == set(op.attributes), name
    assert NAMESPACE == "fusegraph"


@pytest.mark.parametrize("op, shapes, expected", [
    ("MatMulBiasRelu", [(2, 5, 64), (64, 32), (32,)], [(2, 5, 32)]),
    ("MatMulGelu", [(7, 16), (16, 8)], [(7, 8)]),
    ("Attention", [(2, 8, 10, 64), (2, 2, 12, 64), (2, 2, 12, 64)], [(2, 8, 10, 64)]),
    ("MaskedAttention", [(1, 4, 10, 16), (1, 4, 10, 16), (1, 4, 10, 16), (10, 10)], [(1, 4, 10, 16)]),
    ("SwiGLU", [(2, 5, 64), (64, 48), (64, 48)], [(2, 5, 48)]),
    ("RMSNorm", [(3, 4, 32), (32,)], [(3, 4, 32)]),
    ("SkipRMSNorm", [(3, 32), (3, 32), (32,)], [(3, 32), (3, 32)]),
    ("SkipLayerNorm", [(3, 32), (3, 32), (32,), (32,)], [(3, 32), (3, 32)]),
    ("RotaryEmbedding", [(2, 4, 6, 16), (6, 16), (6, 16)], [(2, 4, 6, 16)]),
])
def test_output_shapes(op, shapes, expected):
    core = CORES[op]()
    assert core.output_shapes(shapes) == expected
    assert len(core.output_dims([len(s) for s in shapes])) == len(core.outputs)


@pytest.mark.parametrize("op, shapes", [
    ("MatMulBias", [(2, 64), (63, 32), (32,)]),
    ("MatMulBias", [(2, 64), (64, 32), (31,)]),
    ("Attention", [(2, 6, 10, 64), (2, 4, 12, 64), (2, 4, 12, 64)]),
    ("MaskedAttention", [(1, 4, 10, 16), (1, 4, 10, 16), (1, 4, 10, 16), (3, 10)]),
    ("GeGLU", [(2, 64), (64, 48), (64, 32)]),
    ("SkipRMSNorm", [(3, 32), (2, 32), (32,)]),
    ("RMSNorm", [(3, 32), (16,)]),
    ("RotaryEmbedding", [(2, 4, 6, 16), (6, 8), (6, 8)]),
    ("MatMulRelu", [(2, 64)]),
])
def test_bad_shapes_are_rejected(op, shapes):
    with pytest.raises(ValueError):
        CORES[op]().output_shapes(shapes)


@pytest.mark.parametrize("op", sorted(CORES))
def test_dtypes_follow_the_first_input(op):
    core = CORES[op]()
    n = core.min_inputs
    for dt in ("float32", "float16", "bfloat16"):
        assert core.output_dtypes([dt] * n) == [dt] * len(core.outputs)
        assert core.supports(0, [dt], n)
        assert core.supports(1, [dt, dt], n) and not core.supports(1, [dt, "int32"], n)
    assert not core.supports(0, ["int32"], n) and not core.supports(0, ["int8"], n)


def test_masked_attention_mask_may_have_its_own_float_type():
    core = MaskedAttention()
    assert core.supports(3, ["float16"] * 3 + ["float32"], 4) and not core.supports(3, ["float16"] * 3 + ["int32"], 4)
    assert core.supports(4, ["float16"] * 3 + ["float32", "float16"], 4)


def test_attributes_defaults_and_validation():
    assert Attention().attributes == {"scale": 0.0, "is_causal": 0, "softcap": 0.0, "softcapped": 0,
                                      "zero_nan_rows": 1}
    assert Attention(scale=0.125, is_causal=True, zero_nan_rows=0).attributes == {
        "scale": 0.125, "is_causal": 1, "softcap": 0.0, "softcapped": 0, "zero_nan_rows": 0}
    assert RMSNorm().attributes == {"epsilon": 1e-6} and SkipLayerNorm().attributes == {"epsilon": 1e-5}
    with pytest.raises(ValueError, match="no attribute"):
        RMSNorm(eps=1e-5)
    assert CORES["MatMulBiasSilu"]().attributes == {}


def test_broadcast_strides():
    q = (2, 4, 10, 16)
    assert Attention.mask_strides([q, q, q, (10, 10)]) == (0, 0, 10, 1)
    assert Attention.mask_strides([q, q, q, (2, 1, 1, 10)]) == (10, 0, 0, 1)
    assert Attention.mask_strides([q, q, q, (2, 4, 10, 10)]) == (400, 100, 10, 1)
    rope = RotaryEmbedding(rotary_dim=8)
    x = (2, 4, 6, 16)
    assert rope.cs_strides([x, (6, 8), (6, 8)]) == (0, 0, 8)
    assert rope.cs_strides([x, (2, 1, 6, 8), (2, 1, 6, 8)]) == (48, 0, 8)
    with pytest.raises(ValueError):
        RotaryEmbedding(rotary_dim=7).cs_strides([x, (6, 7), (6, 7)])


def test_attention_reserves_the_decode_partials_as_workspace(monkeypatch):
    """TensorRT's workspace carries the split-KV decode partials: Attention asks for the bound
    over its profile (largest batch and query heads, fewest kv heads) when one query token
    can reach it, nothing when it cannot (Sq >= 2 throughout, or a soft cap, which the decode
    kernels leave to the prefill kernel), and its enqueue hands the pointer to the launcher."""
    from fusegraph.kernels import decode_attention, launch

    launched = []
    monkeypatch.setattr(launch, "launch_attention", lambda *a, **kw: launched.append(kw["workspace"]))
    lo = [(1, 32, 1, 128), (1, 8, 1, 128), (1, 8, 1, 128)]
    hi = [(64, 32, 1, 128), (64, 8, 4096, 128), (64, 8, 4096, 128)]
    reserved = Attention().workspace_bytes(lo, hi)  # no device asked: CPU-only builds work
    assert reserved == decode_attention.workspace_bound_bytes(64, 32, 8, 128) > 0
    assert Attention().workspace_bytes(lo, lo) <= reserved  # what enqueue is told, per shape
    assert Attention().workspace_bytes([(1, 32, 16, 128)] + lo[1:], hi) == 0  # prefill only
    assert Attention(softcapped=1, softcap=30.0).workspace_bytes(lo, hi) == 0
    assert MaskedAttention().workspace_bytes(lo + [(1, 1, 1, 1)], hi + [(64, 1, 1, 4096)]) == reserved
    Attention().enqueue(hi, ["float16"] * 3, [1, 2, 3], [4], 0, workspace=(1 << 20, reserved))
    assert launched == [(1 << 20, reserved)]
    assert RMSNorm().workspace_bytes([(2, 8), (8,)], [(2, 8), (8,)]) == 0
