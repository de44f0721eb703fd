"""RotaryEmbedding (rotate-half and interleaved, partial rotary dims, in/out of place)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="kernel tests drive Triton through torch tensors")
pytest.importorskip("triton", reason="kernels are written in Triton")
from hypothesis import given, settings, strategies as st  # noqa: E402

from fusegraph.kernels import reference, rope  # noqa: E402

pytestmark = pytest.mark.triton

DTYPES = {"float32": torch.float32, "float16": torch.float16}


@st.composite
def rope_case(draw):
    d = draw(st.integers(1, 20)) * 2
    rd = draw(st.sampled_from([0, d])) or draw(st.integers(1, d // 2)) * 2
    cs_shape = draw(st.sampled_from(["S", "1S", "B1S", "BHS"]))
    return d, rd, cs_shape


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), s=st.integers(1, 9), case=rope_case(),
       interleaved=st.booleans(), in_place=st.booleans(),
       dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 2**16))
def test_rope_matches_reference(device, check, b, h, s, case, interleaved, in_place, dtype, seed):
    d, rd, cs_shape = case
    rot = rd or d
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, s, d)).astype(dtype)
    lead = {"S": (), "1S": (1,), "B1S": (b, 1), "BHS": (b, h)}[cs_shape]
    cos = rng.standard_normal((*lead, s, rot)).astype(dtype)
    sin = rng.standard_normal((*lead, s, rot)).astype(dtype)
    want = reference.rotary_embedding(x, cos, sin, interleaved, rd, compute_dtype=np.float64)
    xt = torch.from_numpy(x).to(device)
    args = (torch.from_numpy(cos).to(device), torch.from_numpy(sin).to(device), interleaved, rd)
    if in_place:
        y = rope.rotary_embedding(xt, *args, out=xt)
        assert y.data_ptr() == xt.data_ptr()
    else:
        y = rope.rotary_embedding(xt, *args)
        np.testing.assert_array_equal(xt.cpu().numpy(), x)  # input untouched
    check(y, want, dtype, "rope")
    # channels past rotary_dim pass through bit-exact
    np.testing.assert_array_equal(y.cpu().numpy()[..., rot:], x[..., rot:])


def test_rope_rejects_odd_rotary_dim():
    with pytest.raises(ValueError, match="even"):
        rope.rope_config(4, 8, 8, 3, 2, False, True)


@pytest.mark.parametrize("d,rd", [(10, 6), (96, 96), (128, 64), (80, 32), (256, 128)])
@pytest.mark.parametrize("in_place", [False, True])
def test_rope_config_launches_a_power_of_two_warps(d, rd, in_place):
    """The GPU compiler rejects other warp counts; the interpreter would not notice."""
    for itemsize in (2, 4):
        for seq in (1, 7, 2048):
            warps = rope.rope_config(16, seq, d, rd, itemsize, in_place, True)["num_warps"]
            assert warps & (warps - 1) == 0 and 1 <= warps <= 8
