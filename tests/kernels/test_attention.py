"""Fused attention forward against kernels/reference.py."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="kernel tests drive Triton through torch tensors")
pytest.importorskip("triton", reason="kernels are written in Triton")
from hypothesis import given, settings, strategies as st  # noqa: E402

from fusegraph.kernels import attention, reference  # noqa: E402

pytestmark = pytest.mark.triton

DTYPES = {"float32": torch.float32, "float16": torch.float16}
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}
MASK_SHAPES = {"none": None, "SqSk": lambda b, h, q, k: (q, k),
               "B1SqSk": lambda b, h, q, k: (b, 1, q, k), "BHSqSk": lambda b, h, q, k: (b, h, q, k)}


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.integers(1, 3),
       sq=st.integers(1, 40), sk=st.integers(1, 40), d=st.sampled_from([16, 24, 32]),
       causal=st.booleans(), mask=st.sampled_from(sorted(MASK_SHAPES)),
       scale=st.sampled_from([None, 0.3]), dtype=st.sampled_from(sorted(DTYPES)),
       seed=st.integers(0, 2**16))
def test_attention_matches_reference(device, check, b, hkv, group, sq, sk, d, causal, mask,
                                     scale, dtype, seed):
    rng = np.random.default_rng(seed)
    hq = hkv * group
    q = rng.standard_normal((b, hq, sq, d)).astype(dtype)
    k = rng.standard_normal((b, hkv, sk, d)).astype(dtype)
    v = rng.standard_normal((b, hkv, sk, d)).astype(dtype)
    m = None if mask == "none" else rng.standard_normal(MASK_SHAPES[mask](b, hq, sq, sk)).astype(dtype)
    t = lambda a: None if a is None else torch.from_numpy(a).to(device)  # noqa: E731
    o = attention.attention(t(q), t(k), t(v), t(m), scale, causal, config=SMALL)
    want = reference.attention(q, k, v, m, scale, causal, compute_dtype=np.float64)
    check(o, want, dtype, f"causal={causal} mask={mask}")


def test_fully_masked_rows_are_zero_and_others_exact(device, check):
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 33, 16)).astype(np.float32) for _ in range(3))
    m = np.zeros((1, 1, 33, 33), np.float32)
    m[..., 4, :] = -np.inf          # whole row masked
    m[..., 20, 17:] = -np.inf       # masked from the second key block on
    m[..., 7, 0] = -np.inf          # first key only
    out = attention.attention(*(torch.from_numpy(a).to(device) for a in (q, k, v, m)),
                              config=SMALL)
    o = out.cpu().numpy()
    assert (o[:, :, 4] == 0).all()
    assert np.isfinite(o).all()
    check(out, reference.attention(q, k, v, m, compute_dtype=np.float64), "float32")


@pytest.mark.parametrize("zero_nan_rows", [True, False])
def test_nan_rows_follow_zero_nan_rows(device, check, zero_nan_rows):
    """A row whose softmax is NaN (fully masked; a NaN in Q; an inf score from K in a later
    key block) is zeros with zero_nan_rows (SDPA's guard), NaN without (eager); every other
    row is the reference's. A row masked only over its first key block still counts its
    later keys (m stays -inf there, with or without a mask)."""
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((1, 2, 33, 16)).astype(np.float32) for _ in range(3))
    m = np.zeros((1, 1, 33, 33), np.float32)
    m[..., 4, :] = -np.inf
    m[..., 9, :16] = -np.inf
    q[0, 0, 12, 3] = np.nan
    q[0, 1, 20, 0] = 1.0
    k[0, 1, 30, 0] = np.inf  # q·k is +inf at key 30 where q[..., 0] > 0 (row 20), -inf where < 0
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    o = attention.attention(t(q), t(k), t(v), t(m), zero_nan_rows=zero_nan_rows, config=SMALL).cpu().numpy()
    want = reference.attention(q, k, v, m, zero_nan_rows=zero_nan_rows, compute_dtype=np.float64)
    dead = np.isnan(want) if not zero_nan_rows else np.zeros(want.shape, bool)
    assert dead[0, :, 4].all() if not zero_nan_rows else (o[0, :, 4] == 0).all()
    assert (np.isnan(o) == np.isnan(want)).all()
    check(t(np.where(dead, 0, o)), np.where(dead, 0, want), "float32")  # on the device: its tf32 bound
    for row in ((0, 12), (1, 20)):
        assert (o[(0, *row)] == 0).all() if zero_nan_rows else np.isnan(o[(0, *row)]).all()
    no_mask = attention.attention(t(q), t(k), t(v), zero_nan_rows=zero_nan_rows, config=SMALL).cpu().numpy()
    want = reference.attention(q, k, v, zero_nan_rows=zero_nan_rows, compute_dtype=np.float64)
    assert (np.isnan(no_mask) == np.isnan(want)).all()


@settings(max_examples=10, deadline=None)
@given(cap=st.sampled_from([0.5, 5.0, 50.0]), causal=st.booleans(), dtype=st.sampled_from(sorted(DTYPES)),
       seed=st.integers(0, 2**16))
def test_softcap_matches_reference(device, check, cap, causal, dtype, seed):
    """cap * tanh(s / cap) on the scaled scores, before the mask (Gemma 2)."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 2, 24, 16)).astype(dtype) * 3 for _ in range(3))
    m = rng.standard_normal((1, 1, 24, 24)).astype(dtype)
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    o = attention.attention(t(q), t(k), t(v), t(m), 0.25, causal, softcap=cap, config=SMALL)
    check(o, reference.attention(q, k, v, m, 0.25, causal, softcap=cap, compute_dtype=np.float64), dtype)


def test_reference_softcap_and_nan_rows():
    """The reference's soft cap bounds the scores before the mask; its NaN rows follow the flag."""
    q = np.full((1, 1, 2, 4), 10.0)
    k, v = np.ones((1, 1, 3, 4)), np.arange(12.0).reshape(1, 1, 3, 4)
    mask = np.array([[0.0, -np.inf, -np.inf], [-np.inf, -np.inf, -np.inf]])
    capped = reference.attention(q, k, v, mask[:1], 1.0, softcap=2.0)
    np.testing.assert_allclose(capped, v[:, :, :1].repeat(2, axis=2))
    assert (reference.attention(q, k, v, mask, 1.0)[0, 0, 1] == 0).all()
    assert np.isnan(reference.attention(q, k, v, mask, 1.0, zero_nan_rows=False)[0, 0, 1]).all()


def test_default_config_head_dim_128_causal(device, check):
    """The tiles the torch-free launcher uses (clipped to a short sequence), GQA 4:1."""
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 4, 70, 128)).astype(np.float16)
    k, v = (rng.standard_normal((1, 1, 70, 128)).astype(np.float16) for _ in range(2))
    o = attention.attention(*(torch.from_numpy(a).to(device) for a in (q, k, v)), is_causal=True)
    check(o, reference.attention(q, k, v, is_causal=True, compute_dtype=np.float64), "float16")


def test_reference_causal_equals_explicit_mask():
    """The reference's causal rule is upper-left aligned: key j visible to query i iff j <= i."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 1, 5, 8))
    k, v = (rng.standard_normal((1, 1, 7, 8)) for _ in range(2))
    mask = np.where(np.arange(7)[None, :] <= np.arange(5)[:, None], 0.0, -np.inf)
    np.testing.assert_allclose(reference.attention(q, k, v, is_causal=True),
                               reference.attention(q, k, v, mask))


def test_grouped_heads_are_rejected_when_not_divisible():
    q = torch.zeros(1, 3, 4, 16)
    k = torch.zeros(1, 2, 4, 16)
    with pytest.raises(ValueError, match="multiple"):
        attention.attention(q, k, k)
