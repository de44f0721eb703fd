"""Attention of one query token against a KV cache (decode), split over the keys.

Why a kernel of its own: with Sq = 1 the prefill kernel (``attention.py``) runs one program
per (batch, query head) over BLOCK_M = 16 padded query rows, so a batch-1 step of a 32-head
model keeps 32 of 132 SMs busy, each streaming the whole cache serially, and the query
heads of one GQA group each read the same K/V again.  Decode is bound by reading K and V
once (2 * B * Hkv * Sk * D elements); everything here serves that:

- one program per (batch, kv head, key split) loads the GROUP query heads that share the
  kv head as the rows of one [BLOCK_G, D] tile, so K/V are read once for the whole group
  and QK^T / PV are small tensor-core dots (BLOCK_G >= 16 rows, the padding masked);
- the keys are split into ``splits`` contiguous ranges (flash-decoding) so that 2-4
  programs per SM stream the cache at once, whatever the batch (``with_splits``);
- each split writes its unnormalised fp32 output with its running max and denominator
  (log2 domain); a second, tiny kernel rescales and sums the splits per query head.  With
  one split (large batch x kv heads) the first kernel writes O itself and the second is
  not launched.

Semantics are ``reference.attention`` with Sq = 1: additive mask broadcastable to
[B, Hq, 1, Sk], causal upper-left aligned (the one query sees key 0 only), a row whose
scores are all -inf (or holds a NaN or +inf score) outputs 0 with ``zero_nan_rows`` (SDPA's
guard) and NaN without (eager softmax).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Split programs per SM the split count aims at (H200 sweeps, KERNEL_NOTES.md): 4 once the
# batch x kv heads alone fill the SMs (B64: 2 splits beat 1 by 7% at 8k-32k keys), 2 below
# (B1-B16: 4 per SM read 5-13% slower than 2, shorter splits each pay the pipeline ramp).
PROGRAMS_PER_SM = 4
PROGRAMS_PER_SM_SMALL_BATCH = 2
NUM_SMS = 132        # H100/H200 SXM; the launcher passes the device's own count
MAX_SPLITS = 256
SMEM_BUDGET = 200 * 1024  # as in attention.py: below the 227 KB opt-in limit of sm_90


@triton.jit
def _finish(acc, l, ZERO_NAN_ROWS: tl.constexpr):
    """acc / l (l broadcast over acc's rows); a row whose softmax is NaN (every score -inf:
    l == 0; a NaN or +inf score: l NaN) outputs 0 under ZERO_NAN_ROWS (SDPA's guard), NaN
    otherwise (eager), as ``reference.attention`` and the prefill kernel define."""
    nan_row = (l == 0.0) | (l != l)
    if ZERO_NAN_ROWS:
        return tl.where(nan_row, 0.0, acc / tl.where(nan_row, 1.0, l))
    return tl.where(nan_row, float("nan"), acc / l)


@triton.jit
def decode_split_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, part_ptr, ml_ptr, o_ptr,
    sqb, sqh, skb, skh, skn, svb, svh, svn, smb, smh, smn, sob, soh,
    HKV, SK, SPLIT_LEN, SPLITS, qk_scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
    DIRECT: tl.constexpr, ZERO_NAN_ROWS: tl.constexpr,
):
    """Keys [split * SPLIT_LEN, +SPLIT_LEN) for the GROUP query heads of one kv head;
    grid (SPLITS, B * HKV).  DIRECT (one split): write O; else the split's partials."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    kvh = (bh % HKV).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    h = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b * sqb + h[:, None] * sqh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = k_ptr + b * skb + kvh * skh + offs_n[:, None] * skn + offs_d[None, :]
    v_ptrs = v_ptr + b * svb + kvh * svh + offs_n[:, None] * svn + offs_d[None, :]
    mask_ptrs = mask_ptr + b * smb + h[:, None] * smh + offs_n[None, :] * smn

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, SK)
    for start_n in range(start, end, BLOCK_N):
        col_ok = start_n + offs_n < end
        if BLOCK_D == HEAD_DIM:
            kv_mask = col_ok[:, None]
        else:
            kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs + start_n * skn, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if HAS_MASK:
            bias = tl.load(mask_ptrs + start_n * smn, mask=g_ok[:, None] & col_ok[None, :],
                           other=0.0)
            qk += bias.to(tl.float32) * 1.4426950408889634
        qk = tl.where(col_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows masked so far
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + start_n * svn, mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    if DIRECT:
        out = _finish(acc, l_i[:, None], ZERO_NAN_ROWS)
        tl.store(o_ptr + b * sob + h[:, None] * soh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        # partials of query head (b, h), split s at row (b * HQ + h) * SPLITS + s
        prow = ((bh * GROUP + offs_g) * SPLITS + split).to(tl.int64)
        tl.store(part_ptr + prow[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=g_ok[:, None] & d_ok[None, :])
        tl.store(ml_ptr + prow * 2, m_i, mask=g_ok)
        tl.store(ml_ptr + prow * 2 + 1, l_i, mask=g_ok)


@triton.jit
def decode_combine_kernel(
    part_ptr, ml_ptr, o_ptr, sob, soh, HQ, SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, ZERO_NAN_ROWS: tl.constexpr,
):
    """O[b, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s; grid (B * HQ,)."""
    bh = tl.program_id(0)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < SPLITS
    d_ok = offs_d < HEAD_DIM
    prow = bh.to(tl.int64) * SPLITS + offs_s
    m = tl.load(ml_ptr + prow * 2, mask=s_ok, other=float("-inf"))
    l_s = tl.load(ml_ptr + prow * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    denom = tl.sum(l_s * weight, 0)
    part = tl.load(part_ptr + prow[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = _finish(tl.sum(part * weight[:, None], 0), denom, ZERO_NAN_ROWS)
    tl.store(o_ptr + b * sob + h * soh + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_ok)


def decode_smem_bytes(cfg: dict, itemsize: int) -> int:
    """Shared memory of the Q tile plus ``num_stages`` K and V tiles."""
    return (cfg["BLOCK_G"] + 2 * cfg["num_stages"] * cfg["BLOCK_N"]) * cfg["BLOCK_D"] * itemsize


def decode_config(group: int, head_dim: int, itemsize: int = 2) -> dict:
    """Tiles, warps and stages (H200 sweep in KERNEL_NOTES.md); ``with_splits`` adds the split.
    Large tiles (fp32) shed stages, then BLOCK_N, until they fit ``SMEM_BUDGET``."""
    cfg = {"BLOCK_G": max(16, triton.next_power_of_2(group)),
           "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
           "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    while decode_smem_bytes(cfg, itemsize) > SMEM_BUDGET:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif cfg["BLOCK_N"] > 16:
            cfg["BLOCK_N"] //= 2
        else:
            break
    return cfg


def with_splits(cfg: dict, batch: int, heads_kv: int, seq_k: int, num_sms: int = NUM_SMS,
                programs_per_sm: int | None = None) -> dict:
    """``cfg`` plus SPLITS and SPLIT_LEN: about ``programs_per_sm`` programs per SM (by
    default ``PROGRAMS_PER_SM``, or ``PROGRAMS_PER_SM_SMALL_BATCH`` while batch x kv heads
    is below the SM count), never a split without keys (SPLIT_LEN is a multiple of BLOCK_N,
    so only the last split has a ragged block)."""
    if programs_per_sm is None:
        programs_per_sm = (PROGRAMS_PER_SM if batch * heads_kv >= num_sms
                           else PROGRAMS_PER_SM_SMALL_BATCH)
    seq_k = max(seq_k, 1)
    blocks = triton.cdiv(seq_k, cfg["BLOCK_N"])
    want = triton.cdiv(programs_per_sm * num_sms, max(batch * heads_kv, 1))
    splits = max(1, min(want, blocks, MAX_SPLITS))
    split_len = triton.cdiv(blocks, splits) * cfg["BLOCK_N"]
    return dict(cfg, SPLITS=triton.cdiv(seq_k, split_len), SPLIT_LEN=split_len)


def workspace_elems(batch: int, heads_q: int, cfg: dict, head_dim: int) -> tuple[int, int]:
    """fp32 elements of the partial outputs and of the (max, denominator) pairs; (0, 0)
    with one split."""
    if cfg["SPLITS"] == 1:
        return 0, 0
    rows = batch * heads_q * cfg["SPLITS"]
    return rows * head_dim, rows * 2


def workspace_bound_bytes(batch: int, heads_q: int, heads_kv: int, head_dim: int,
                          num_sms: int = NUM_SMS) -> int:
    """Bytes of fp32 partials and pairs that any decode step with at most ``batch`` sequences
    (any cache length) needs on a GPU of ``num_sms`` SMs: what a TensorRT plugin reserves as
    its workspace from the profile's largest shape.  The plugin sizes it for ``NUM_SMS``
    without asking the device (an engine may be built where it does not run, or on no GPU):
    a GPU with more SMs may need more at small batches, and the launcher then takes its own
    buffer rather than overrun the reserved one.  ``with_splits`` picks
    SPLITS <= ceil(p * num_sms / (batch * heads_kv)) with p <= PROGRAMS_PER_SM, so
    batch * heads_kv * SPLITS < PROGRAMS_PER_SM * num_sms + batch * heads_kv, and the rows
    (batch * heads_q * SPLITS) are that times the group size; a few MB for 7B-class shapes.
    Growing in ``batch`` and ``heads_q`` and falling in ``heads_kv``, so the largest query
    heads with the fewest kv heads bound a range of them."""
    rows = heads_q // heads_kv * PROGRAMS_PER_SM * num_sms + batch * heads_q
    return 4 * rows * (head_dim + 2)


def takes(seq_q: int, softcap: float) -> bool:
    """Whether an attention call is these kernels': one query token, and no soft cap (they
    compute none); the prefill kernel takes the rest."""
    return seq_q == 1 and not softcap


def decode_attention(q, k, v, mask=None, scale=None, is_causal=False, config=None, out=None, zero_nan_rows=True):
    """Torch entry: Q [B, Hq, 1, D], K/V [B, Hkv, Sk, D], additive mask broadcastable to
    [B, Hq, 1, Sk]; returns O [B, Hq, 1, D] in Q's dtype (into ``out`` if given).
    ``config`` (any of BLOCK_N, num_warps, num_stages, programs_per_sm) overrides the
    defaults; the split is derived from the problem and the device's SM count. Triton's JIT
    launches it; ``entry.decode_attention`` takes the cached launcher where it can."""
    import torch

    bsz, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if sq != 1:
        raise ValueError(f"decode attention takes one query token, got {sq}")
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o = q.new_empty(q.shape) if out is None else out
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    sk_seen = min(sk, 1) if is_causal else sk  # upper-left causal: the query sees key 0
    group = hq // hkv
    cfg = dict(decode_config(group, d, q.element_size()), **(config or {}))
    cfg = with_splits(cfg, bsz, hkv, sk_seen, _sm_count(q.device),
                      cfg.pop("programs_per_sm", None))
    n_part, n_ml = workspace_elems(bsz, hq, cfg, d)
    part = torch.empty(max(n_part, 1), device=q.device, dtype=torch.float32)
    ml = torch.empty(max(n_ml, 1), device=q.device, dtype=torch.float32)
    mstr = (0, 0, 0)
    if mask is not None:
        full = mask.expand(bsz, hq, 1, sk).stride()
        mstr = (full[0], full[1], full[3])
    decode_split_kernel[(cfg["SPLITS"], bsz * hkv)](
        q, k, v, q if mask is None else mask, part, ml, o,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *mstr, o.stride(0), o.stride(1),
        hkv, sk_seen, cfg["SPLIT_LEN"], cfg["SPLITS"], float(scale) * LOG2E,
        GROUP=group, BLOCK_G=cfg["BLOCK_G"], HEAD_DIM=d, BLOCK_D=cfg["BLOCK_D"],
        BLOCK_N=cfg["BLOCK_N"], HAS_MASK=mask is not None, DIRECT=cfg["SPLITS"] == 1,
        ZERO_NAN_ROWS=bool(zero_nan_rows),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if cfg["SPLITS"] > 1:
        decode_combine_kernel[(bsz * hq,)](
            part, ml, o, o.stride(0), o.stride(1), hq, cfg["SPLITS"],
            HEAD_DIM=d, BLOCK_D=cfg["BLOCK_D"], BLOCK_S=triton.next_power_of_2(cfg["SPLITS"]),
            ZERO_NAN_ROWS=bool(zero_nan_rows),
            num_warps=combine_warps(cfg["BLOCK_D"]),
        )
    return o


def combine_warps(block_d: int) -> int:
    return 4 if block_d >= 128 else 1


def _sm_count(device) -> int:
    if device.type != "cuda":
        return NUM_SMS
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count
