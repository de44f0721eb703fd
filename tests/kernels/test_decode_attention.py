"""Split-KV decode attention (one query token) against kernels/reference.py."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="kernel tests drive Triton through torch tensors")
pytest.importorskip("triton", reason="kernels are written in Triton")
from hypothesis import given, settings, strategies as st  # noqa: E402

from fusegraph.kernels import attention, decode_attention, reference  # noqa: E402

pytestmark = pytest.mark.triton

DTYPES = {"float32": torch.float32, "float16": torch.float16}
SMALL = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 2}
MASK_SHAPES = {"none": None, "Sk": lambda b, h, k: (k,), "B11Sk": lambda b, h, k: (b, 1, 1, k),
               "BH1Sk": lambda b, h, k: (b, h, 1, k)}


def _t(device):
    return lambda a: None if a is None else torch.from_numpy(a).to(device)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), group=st.sampled_from([1, 3, 4, 8]),
       sk=st.integers(1, 150), d=st.sampled_from([16, 24, 32]), causal=st.booleans(),
       mask=st.sampled_from(sorted(MASK_SHAPES)), scale=st.sampled_from([None, 0.3]),
       sms=st.sampled_from([1, 4, 132]), dtype=st.sampled_from(sorted(DTYPES)),
       seed=st.integers(0, 2**16))
def test_decode_matches_reference(device, check, b, hkv, group, sk, d, causal, mask, scale,
                                  sms, dtype, seed):
    """Any split count (one split written directly; several, with multi-block splits when
    the device has few SMs), GQA groups padded to 16 rows, ragged D and Sk."""
    rng = np.random.default_rng(seed)
    hq = hkv * group
    q = rng.standard_normal((b, hq, 1, d)).astype(dtype)
    k, v = (rng.standard_normal((b, hkv, sk, d)).astype(dtype) for _ in range(2))
    m = None if mask == "none" else rng.standard_normal(MASK_SHAPES[mask](b, hq, sk)).astype(dtype)
    t = _t(device)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode_attention, "NUM_SMS", sms)
        o = decode_attention.decode_attention(t(q), t(k), t(v), t(m), scale, causal, config=SMALL)
    want = reference.attention(q, k, v, m, scale, causal, compute_dtype=np.float64)
    check(o, want, dtype, f"splits, causal={causal} mask={mask}")


@pytest.mark.parametrize("sms", [1, 132])
def test_decode_fully_masked_heads_and_splits(device, check, monkeypatch, sms):
    """A head whose keys are all -inf outputs 0; a head masked over whole splits (their max
    stays -inf) still combines the other splits exactly."""
    monkeypatch.setattr(decode_attention, "NUM_SMS", sms)
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 4, 1, 16)).astype(np.float32)
    k, v = (rng.standard_normal((1, 1, 100, 16)).astype(np.float32) for _ in range(2))
    m = np.zeros((1, 4, 1, 100), np.float32)
    m[:, 1] = -np.inf            # whole head
    m[:, 2, :, :70] = -np.inf    # the first splits of head 2
    m[:, 3, :, 5] = -np.inf      # one key
    t = _t(device)
    o = decode_attention.decode_attention(t(q), t(k), t(v), t(m), config=SMALL)
    assert (o[:, 1].cpu().numpy() == 0).all()
    check(o, reference.attention(q, k, v, m, compute_dtype=np.float64), "float32")


def test_split_plan_covers_every_key_once():
    for batch, hkv, sk, sms in [(1, 8, 1000, 132), (1, 8, 131072, 132), (64, 8, 4096, 132),
                                (128, 8, 4096, 132),
                                (3, 1, 17, 1), (2, 2, 64, 4), (1, 1, 1, 132)]:
        cfg = decode_attention.with_splits({"BLOCK_N": 64}, batch, hkv, sk, sms)
        splits, length = cfg["SPLITS"], cfg["SPLIT_LEN"]
        assert length % 64 == 0 and splits <= decode_attention.MAX_SPLITS
        assert (splits - 1) * length < sk <= splits * length, cfg  # no empty split, no gap
        if batch * hkv >= decode_attention.PROGRAMS_PER_SM * sms:
            assert splits == 1


def test_small_batches_aim_at_fewer_programs_per_sm():
    """Below one program per SM from the batch alone, the split count aims at 2 programs per
    SM (the H200 sweep: 4 read 5-13% slower there); from there on at 4."""
    small = decode_attention.with_splits({"BLOCK_N": 64}, 1, 4, 131072, 132)
    assert small["SPLITS"] == 64  # ~2 x 132 programs over 4 (batch, kv head) pairs, whole blocks
    large = decode_attention.with_splits({"BLOCK_N": 64}, 64, 8, 32768, 132)
    assert large["SPLITS"] == 2   # ceil(4 x 132 / 512)
    forced = decode_attention.with_splits({"BLOCK_N": 64}, 1, 4, 131072, 132, programs_per_sm=4)
    assert forced["SPLITS"] == 128


def test_workspace_bound_holds_every_plan_up_to_the_batch():
    """What a plugin reserves from its profile's largest batch holds the partials of every
    step it may run: any smaller batch, any cache length, fewer query heads or more kv heads,
    and both programs-per-SM regimes (the batch crossing the SM count)."""
    for sms in (132, 78, 7):
        for hq, hkv, d in ((32, 4, 128), (32, 8, 128), (8, 8, 64), (64, 8, 128)):
            bound = decode_attention.workspace_bound_bytes(70, hq, hkv, d, sms)
            for batch in (1, 2, 3, 16, 17, 33, 64, 70):
                for sk in (1, 63, 1000, 4096, 131072):
                    for q_heads, kv_heads in ((hq, hkv), (hq // 2, hkv), (hq, 2 * hkv)):
                        if q_heads < kv_heads or q_heads % kv_heads:
                            continue
                        cfg = decode_attention.with_splits(
                            decode_attention.decode_config(q_heads // kv_heads, d, 2),
                            batch, kv_heads, sk, sms)
                        n_part, n_ml = decode_attention.workspace_elems(batch, q_heads, cfg, d)
                        assert 4 * (n_part + n_ml) <= bound, (sms, hq, hkv, batch, sk, cfg)
    llama = decode_attention.workspace_bound_bytes(64, 32, 8, 128, 132)
    assert llama < 8 * 2**20  # a few MB: cheap to reserve in every engine with decode steps


def test_attention_entry_sends_one_query_token_to_decode(device, check, monkeypatch):
    """``attention.attention`` with Sq = 1 and no config runs the decode kernels (GQA 8:1)."""
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 16, 1, 32)).astype(np.float16)
    k, v = (rng.standard_normal((2, 2, 300, 32)).astype(np.float16) for _ in range(2))
    t = _t(device)
    calls = []
    real = decode_attention.decode_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_attention, "decode_attention", spy)
    o = attention.attention(t(q), t(k), t(v))
    assert calls
    check(o, reference.attention(q, k, v, compute_dtype=np.float64), "float16")


def test_decode_rejects_bad_shapes():
    q = torch.zeros(1, 3, 1, 16)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention.decode_attention(q, torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4, 16))
    with pytest.raises(ValueError, match="one query token"):
        decode_attention.decode_attention(torch.zeros(1, 2, 2, 16), torch.zeros(1, 2, 4, 16),
                                          torch.zeros(1, 2, 4, 16))


def test_fp32_tiles_fit_shared_memory():
    for d in (64, 128, 256):
        for item in (2, 4):
            cfg = decode_attention.decode_config(8, d, item)
            assert decode_attention.decode_smem_bytes(cfg, item) <= decode_attention.SMEM_BUDGET
    assert decode_attention.decode_config(8, 128, 2)["num_stages"] == 3  # bf16 unchanged


@pytest.mark.parametrize("zero_nan_rows", [True, False])
@pytest.mark.parametrize("programs_per_sm", [0, 4])  # one split (the direct store), several (combine)
def test_nan_rows_follow_zero_nan_rows(device, check, zero_nan_rows, programs_per_sm):
    """A NaN in Q, a +inf in K and a fully masked head give NaN softmax rows: zeros under the
    guard, NaN for an eager graph, exactly as the reference; the other heads are untouched."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 8, 1, 16)).astype(np.float32)
    k, v = (rng.standard_normal((1, 4, 40, 16)).astype(np.float32) for _ in range(2))
    m = np.zeros((1, 8, 1, 40), np.float32)
    q[0, 1, 0, 3] = np.nan      # head 1: NaN score row
    k[0, 2, 7, 2] = np.inf      # kv head 2 (query heads 4, 5): +inf / NaN scores
    m[0, 7] = -np.inf           # head 7: every key masked
    t = _t(device)
    cfg = dict(SMALL, programs_per_sm=programs_per_sm)
    o = decode_attention.decode_attention(t(q), t(k), t(v), t(m), config=cfg, zero_nan_rows=zero_nan_rows)
    want = reference.attention(q, k, v, m, zero_nan_rows=zero_nan_rows, compute_dtype=np.float64)
    got = o.cpu().numpy()
    assert (np.isnan(got) == np.isnan(want)).all()
    assert np.isnan(want).any() != zero_nan_rows
    check(o.nan_to_num(), np.nan_to_num(want), "float32")
