"""RMSNorm / LayerNorm (and their Skip* forms) against kernels/reference.py."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="kernel tests drive Triton through torch tensors")
pytest.importorskip("triton", reason="kernels are written in Triton")
from hypothesis import given, settings, strategies as st  # noqa: E402

from fusegraph.kernels import norms, reference  # noqa: E402

pytestmark = pytest.mark.triton

DTYPES = {"float32": torch.float32, "float16": torch.float16}


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 200), dtype=st.sampled_from(sorted(DTYPES)),
       kind=st.sampled_from(["rms", "layer", "layer_nobeta"]), skip=st.booleans(),
       seed=st.integers(0, 2**16))
def test_norm_matches_reference(device, check, rows, cols, dtype, kind, skip, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 3 + 1).astype(dtype)
    r = rng.standard_normal((rows, cols)).astype(dtype)
    g = rng.standard_normal(cols).astype(dtype)
    b = rng.standard_normal(cols).astype(dtype)
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    eps = 1e-5
    beta = None if kind != "layer" else b
    if kind == "rms":
        got = norms.rms_norm(t(x), t(g), eps, residual=t(r) if skip else None)
        want = (reference.skip_rms_norm(x, r, g, eps, compute_dtype=np.float64) if skip
                else reference.rms_norm(x, g, eps, compute_dtype=np.float64))
    else:
        got = norms.layer_norm(t(x), t(g), None if beta is None else t(beta), eps,
                               residual=t(r) if skip else None)
        want = (reference.skip_layer_norm(x, r, g, beta, eps, compute_dtype=np.float64) if skip
                else reference.layer_norm(x, g, beta, eps, compute_dtype=np.float64))
    if skip:
        (y, s), (y_ref, s_ref) = got, want
        # S is X + R rounded once to X's dtype: bit-exact against the reference.
        np.testing.assert_array_equal(s.cpu().numpy(), s_ref)
        check(y, y_ref, dtype, kind)
    else:
        check(got, want, dtype, kind)


def test_norm_keeps_leading_dims_and_many_rows_per_program(device, check):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 48)).astype(np.float32)
    g = rng.standard_normal(48).astype(np.float32)
    cfg = norms.norm_config(15, 48, 4)
    assert cfg["BLOCK_R"] > 1, "short rows should be stacked in one program"
    y = norms.rms_norm(torch.from_numpy(x).to(device), torch.from_numpy(g).to(device))
    assert y.shape == x.shape
    check(y, reference.rms_norm(x, g, compute_dtype=np.float64), "float32")


def test_norm_rejects_rows_wider_than_supported():
    with pytest.raises(ValueError, match="at most"):
        norms.norm_config(1, norms.MAX_COLS + 1, 2)
