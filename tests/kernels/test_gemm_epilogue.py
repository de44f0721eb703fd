"""MatMulBias{Act} and SwiGLU against kernels/reference.py."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="kernel tests drive Triton through torch tensors")
pytest.importorskip("triton", reason="kernels are written in Triton")
from hypothesis import given, settings, strategies as st  # noqa: E402

from fusegraph.kernels import gemm_epilogue, reference  # noqa: E402

pytestmark = pytest.mark.triton

DTYPES = {"float32": torch.float32, "float16": torch.float16}
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}


def _data(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 50),
       act=st.sampled_from(reference.ACTIVATIONS), bias=st.booleans(),
       dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 2**16))
def test_matmul_bias_act_matches_reference(device, check, m, n, k, act, bias, dtype, seed):
    rng = np.random.default_rng(seed)
    x = _data(rng, (m, k), dtype)
    w = _data(rng, (k, n), dtype, 1 / np.sqrt(k))
    b = _data(rng, n, dtype) if bias else None
    t = lambda a: None if a is None else torch.from_numpy(a).to(device)  # noqa: E731
    y = gemm_epilogue.matmul_bias_act(t(x), t(w), t(b), act, config=SMALL)
    check(y, reference.matmul_bias_act(x, w, b, act, compute_dtype=np.float64), dtype, act)


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 50),
       act=st.sampled_from(["Silu", "Gelu"]), bias=st.booleans(),
       dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 2**16))
def test_swiglu_matches_reference(device, check, m, n, k, act, bias, dtype, seed):
    rng = np.random.default_rng(seed)
    x = _data(rng, (m, k), dtype)
    wg, wu = (_data(rng, (k, n), dtype, 1 / np.sqrt(k)) for _ in range(2))
    bg, bu = (_data(rng, n, dtype) if bias else None for _ in range(2))
    t = lambda a: None if a is None else torch.from_numpy(a).to(device)  # noqa: E731
    y = gemm_epilogue.swiglu(t(x), t(wg), t(wu), t(bg), t(bu), act, config=SMALL)
    check(y, reference.swiglu(x, wg, wu, bg, bu, act, compute_dtype=np.float64), dtype, act)


def test_default_config_batched_input(device, check):
    """The tiles the torch-free launcher uses, on a 3-D X (leading dims flattened)."""
    rng = np.random.default_rng(3)
    x = _data(rng, (2, 9, 70), np.float32)
    w = _data(rng, (70, 33), np.float32, 0.1)
    b = _data(rng, 33, np.float32)
    y = gemm_epilogue.matmul_bias_act(*(torch.from_numpy(a).to(device) for a in (x, w, b)),
                                      act="GeluTanh")
    assert y.shape == (2, 9, 33)
    check(y, reference.matmul_bias_act(x, w, b, "GeluTanh", compute_dtype=np.float64), "float32")


def test_unknown_activation_is_refused():
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="unknown activation"):
        gemm_epilogue.matmul_bias_act(x, x, act="Swish")
