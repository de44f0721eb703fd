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


#: The two main loops: two dots (gate and up) per K step, or one dot over [Wg tile | Wu tile]
#: split into gate and up in the epilogue (ragged N: columns past N are masked off the loads).
LOOPS = {"two_dots": SMALL, "paired": dict(SMALL, PAIRED=True)}


@pytest.mark.parametrize("loop", sorted(LOOPS))
@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 50),
       act=st.sampled_from(["Silu", "Gelu"]), bias=st.booleans(),
       dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 2**16))
def test_swiglu_matches_reference(device, check, loop, m, n, k, act, bias, dtype, seed):
    rng = np.random.default_rng(seed)
    x = _data(rng, (m, k), dtype)
    wg, wu = (_data(rng, (k, n), dtype, 1 / np.sqrt(k)) for _ in range(2))
    bg, bu = (_data(rng, n, dtype) if bias else None for _ in range(2))
    t = lambda a: None if a is None else torch.from_numpy(a).to(device)  # noqa: E731
    y = gemm_epilogue.swiglu(t(x), t(wg), t(wu), t(bg), t(bu), act, config=LOOPS[loop])
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


def test_gelu_erf_epilogue_is_accurate_everywhere(device):
    """The branch-free erfc fit behind the Gelu epilogue, on a dense grid through both signs,
    the tails (exp underflow) and zero, against float64 erf: within ~2 fp32 ulps of |x|."""
    import math

    import triton
    import triton.language as tl

    @triton.jit
    def gelu_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        x = tl.load(x_ptr + offs, mask=ok, other=0.0)
        tl.store(y_ptr + offs, gemm_epilogue.apply_activation(x, "Gelu"), mask=ok)

    xs = np.concatenate([np.linspace(-12, 12, 40001), [0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0]])
    x = torch.tensor(xs, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    gelu_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    x64 = x.double().cpu().numpy()
    ref = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x64])
    err = np.abs(y.double().cpu().numpy() - ref)
    assert np.isfinite(y.cpu().numpy()).all()
    assert (err <= 2.5e-7 * np.maximum(np.abs(x64), 1e-30) + 1e-37).all(), err.max()


@pytest.mark.parametrize("glu", [False, True])
def test_fp32_tiles_fit_shared_memory(glu):
    """fp32 operand buffers are twice the bf16 ones: the config must shrink them under the
    budget (round 1's fp32 GLU tile needed 288 KB, over the H100's 227 KB opt-in limit)."""
    for m, n, k in ((111, 96, 64), (4096, 4096, 4096), (8192, 14336, 4096)):
        cfg16 = gemm_epilogue.gemm_config(m, n, k, glu, 2)
        cfg32 = gemm_epilogue.gemm_config(m, n, k, glu, 4)
        assert gemm_epilogue.gemm_smem_bytes(cfg32, glu, 4) <= gemm_epilogue.SMEM_BUDGET
        assert cfg16 == gemm_epilogue.gemm_config(m, n, k, glu)  # 16-bit tiles unchanged
        assert (cfg32["BLOCK_M"], cfg32["BLOCK_N"]) == (cfg16["BLOCK_M"], cfg16["BLOCK_N"])


@pytest.mark.parametrize("m,n", [(1, 70), (16, 4100), (100, 70), (100, 4100)])
def test_small_m_default_tiles_match_reference(device, check, m, n):
    """The decode-to-small-batch tiles (M <= 128; narrow and wide N), ragged K."""
    cfg = gemm_epilogue.gemm_config(m, n, 300, False)
    assert cfg["BLOCK_M"] <= 64 and cfg["num_warps"] == 4
    rng = np.random.default_rng(m + n)
    x = rng.standard_normal((m, 300)).astype(np.float32)
    w = (rng.standard_normal((300, n)) / 17).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    y = gemm_epilogue.matmul_bias_act(t(x), t(w), t(b), "Silu")
    check(y, reference.matmul_bias_act(x, w, b, "Silu", compute_dtype=np.float64), "float32")


PAIRED = LOOPS["paired"]


def test_paired_swiglu_reads_wu_wherever_it_lies(device, check):
    """Wu addressed as an offset from Wg: below Wg in memory, inside one [K, 2N] buffer (the
    usual packed weight), and misaligned (a view one element in: not pairable, so the
    two-dot loop runs instead of a main loop whose 16-byte promise would be false)."""
    rng = np.random.default_rng(7)
    k, n = 24, 40
    x = torch.from_numpy(_data(rng, (33, k), "float32")).to(device)
    packed = torch.from_numpy(_data(rng, (k, 2 * n + 1), "float32", 0.2)).to(device)
    wg, wu = packed[:, :n], packed[:, n:2 * n]
    cases = {"packed": (wg, wu), "up first": (wu, wg)}
    flat = torch.from_numpy(_data(rng, 2 * k * n + 1, "float32", 0.2)).to(device)
    odd_wg, odd_wu = flat[1:k * n + 1].view(k, n), flat[k * n + 1:].view(k, n)
    assert not gemm_epilogue.pairable(odd_wg.data_ptr(), odd_wu.data_ptr())
    cases["misaligned"] = (odd_wg, odd_wu)
    for what, (g, u) in cases.items():
        y = gemm_epilogue.swiglu(x, g, u, config=PAIRED)
        ref = reference.swiglu(x.cpu().numpy(), g.cpu().numpy(), u.cpu().numpy(), act="Silu",
                               compute_dtype=np.float64)
        check(y, ref, "float32", what)


def test_swiglu_defaults_pair_only_aligned_weights():
    """SwiGLU's default tiles take the paired loop, through the torch entry's config and the
    torch-free launcher alike; the launcher falls back to two dots when Wu is not 16-byte
    aligned (its pointer pattern keys the prepared launch, so the two never mix), and a
    plain GEMM never pairs."""
    from fusegraph.kernels import launch

    for m in (1, 16, 128, 2048, 8192):
        assert gemm_epilogue.gemm_config(m, 14336, 4096, True)["PAIRED"]
        assert not gemm_epilogue.gemm_config(m, 14336, 4096, False).get("PAIRED")
    p = 1 << 20

    def paired(wu_ptr, glu=True):
        desc = launch.gemm_launch(p, p, wu_ptr if glu else 0, 0, 0, p, 4096, 11008, 4096,
                                  "Silu", "bfloat16")
        return dict(desc.constexprs)["PAIRED"]

    assert paired(p + 2 * 4096 * 11008)
    assert not paired(p + 2 * 4096 * 11008 + 2)
    assert not paired(0, glu=False)
