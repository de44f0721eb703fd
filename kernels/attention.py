"""Fused attention forward (FlashAttention-2 style) for the ``fusegraph`` ``Attention`` op.

Why: the unfused graph materialises the [B, H, Sq, Sk] score matrix two or three times
(MatMul, Add mask, Softmax) and reads it back for the second MatMul: O(S^2) bytes.
Here one program owns BLOCK_M query rows of one (batch, head), streams K and V in
BLOCK_N blocks, and keeps the running row max ``m``, the running denominator ``l`` and
the fp32 output accumulator in registers (online softmax), so only Q, K, V (and the
mask, when given) are read and O written once.

Details that matter for speed and for the op's semantics:
- exp2 with ``scale * log2(e)`` folded in, so the scale costs one FMA per score.
- Key blocks wholly below the causal diagonal and inside Sk run without any masking;
  only the diagonal block and a ragged tail block pay for masks.
- Grouped-query / multi-query: query head h reads kv head h // GROUP; KV are never
  repeated in memory (the programs of one group hit the same KV lines in L2).
- Causal programs are launched heaviest first (largest query block first), which
  balances the triangular work across the chip.
- Soft-capping (SOFTCAP): cap * tanh(s / cap) on the scaled scores, with the scale over cap
  folded into ``qk_scale`` and cap * log2(e) into ``cap_log2``.
- A row whose softmax is NaN (every score -inf, or a NaN or +inf score from Q or K) leaves
  the online softmax with l == 0 or l NaN; it outputs 0 under ZERO_NAN_ROWS (SDPA's guard)
  and NaN otherwise (eager softmax), as ``reference.attention`` defines. A row whose first
  blocks are all -inf subtracts 0 there and keeps m = -inf, so later finite scores count.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from . import decode_attention

LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(
    acc, m_i, l_i, q, k_ptrs, v_ptrs, mask_ptrs, start_n, offs_m, offs_n, row_ok, d_ok,
    SK, qk_scale, cap_log2,
    EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    PAD_D: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One BLOCK_N step of the online softmax; EDGE blocks mask keys past Sk and the diagonal."""
    cols = start_n + offs_n
    if EDGE:
        col_ok = cols < SK
        kv_mask = col_ok[:, None] & d_ok[None, :]
    elif PAD_D:
        kv_mask = d_ok[None, :]
    if EDGE or PAD_D:
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    else:
        k = tl.load(k_ptrs)
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    if SOFTCAP:  # cap * tanh(x) in the log2 domain; tanh from exp2 of -2|x| (no overflow)
        e = tl.math.exp2(-2.0 * 1.4426950408889634 * tl.abs(qk))
        t = (1.0 - e) / (1.0 + e)
        qk = cap_log2 * tl.where(qk < 0, -t, t)
    if HAS_MASK:
        if EDGE:
            bias = tl.load(mask_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            bias = tl.load(mask_ptrs, mask=row_ok[:, None], other=0.0)
        qk += bias.to(tl.float32) * 1.4426950408889634
    if EDGE:
        keep = col_ok[None, :]
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # Rows still all -inf subtract 0 (not -inf - -inf = NaN) and keep m = -inf for the next block.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    if EDGE or PAD_D:
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, smb, smh, smm, smn, sob, soh, som,
    HQ, GROUP, SQ, SK, qk_scale, cap_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, ZERO_NAN_ROWS: tl.constexpr,
):
    """O[b, h, rows] for BLOCK_M query rows; grid (cdiv(SQ, BLOCK_M), B * HQ). Unit stride on D."""
    if IS_CAUSAL:
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = bh % HQ
    kvh = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < SQ
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = k_ptr + b * skb + kvh * skh + offs_n[:, None] * skn + offs_d[None, :]
    v_ptrs = v_ptr + b * svb + kvh * svh + offs_n[:, None] * svn + offs_d[None, :]
    mask_ptrs = mask_ptr + b * smb + h * smh + offs_m[:, None] * smm + offs_n[None, :] * smn

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if IS_CAUSAL:
        hi = tl.minimum(SK, (start_m + 1) * BLOCK_M)
        full = tl.minimum(start_m * BLOCK_M, SK) // BLOCK_N * BLOCK_N
    else:
        hi = SK
        full = SK // BLOCK_N * BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_ptrs + start_n * skn, v_ptrs + start_n * svn,
            mask_ptrs + start_n * smn, start_n, offs_m, offs_n, row_ok, d_ok, SK, qk_scale, cap_log2,
            False, IS_CAUSAL, HAS_MASK, BLOCK_D != HEAD_DIM, SOFTCAP)
    for start_n in range(full, hi, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_ptrs + start_n * skn, v_ptrs + start_n * svn,
            mask_ptrs + start_n * smn, start_n, offs_m, offs_n, row_ok, d_ok, SK, qk_scale, cap_log2,
            True, IS_CAUSAL, HAS_MASK, BLOCK_D != HEAD_DIM, SOFTCAP)

    nan_row = (l_i == 0.0) | (l_i != l_i)
    if ZERO_NAN_ROWS:
        out = tl.where(nan_row[:, None], 0.0, acc / tl.where(nan_row, 1.0, l_i)[:, None])
    else:
        out = tl.where(nan_row[:, None], float("nan"), acc / l_i[:, None])
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


SMEM_BUDGET = 200 * 1024  # as in gemm_epilogue: below the 227 KB opt-in limit of sm_90


def attention_smem_bytes(cfg: dict, itemsize: int) -> int:
    """Shared memory of the Q tile plus ``num_stages`` K and V tiles (matches sm_90 builds)."""
    return (cfg["BLOCK_M"] + 2 * cfg["num_stages"] * cfg["BLOCK_N"]) * cfg["BLOCK_D"] * itemsize


def attention_config(head_dim: int, seq_q: int, is_causal: bool, itemsize: int = 2) -> dict:
    """Tiles for an H100-class GPU (see benchmarks/KERNEL_NOTES.md), clipped for short rows;
    for large tiles (fp32, head_dim > 128) stages, then BLOCK_N, shrink to fit ``SMEM_BUDGET``."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_d <= 64 and is_causal:  # H200 sweep, issue 14: 0.437 -> 0.386 ms at S 4k
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    elif block_d <= 64:  # 8 warps: 0.739 -> 0.664 ms at S 4k
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    cfg["BLOCK_M"] = max(16, min(cfg["BLOCK_M"], triton.next_power_of_2(seq_q)))
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], cfg["BLOCK_M"])
    cfg["BLOCK_D"] = block_d
    while attention_smem_bytes(cfg, itemsize) > SMEM_BUDGET:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif cfg["BLOCK_N"] > 16:
            cfg["BLOCK_N"] //= 2
        elif cfg["BLOCK_M"] > 16:
            cfg["BLOCK_M"] //= 2
        else:
            break
    return cfg


def attention_grid(batch: int, heads_q: int, seq_q: int, cfg: dict) -> tuple:
    return (triton.cdiv(seq_q, cfg["BLOCK_M"]), batch * heads_q, 1)


def scales(scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, cap_log2): the kernel's factor on Q·Kᵀ and, with a soft cap, on its tanh."""
    if softcap:
        return float(scale) / softcap, float(softcap) * LOG2E
    return float(scale) * LOG2E, 0.0


def attention(q, k, v, mask=None, scale=None, is_causal=False, softcap=0.0, zero_nan_rows=True, config=None,
              out=None):
    """Torch entry: Q [B, Hq, Sq, D], K/V [B, Hkv, Sk, D], additive mask broadcastable to
    [B, Hq, Sq, Sk]; returns O [B, Hq, Sq, D] in Q's dtype (written into ``out`` if given).
    ``softcap`` and ``zero_nan_rows`` as in ``reference.attention``. One query token without a
    ``config`` for this kernel or a soft cap goes to the split-KV decode kernels."""
    bsz, hq, sq, d = q.shape
    if config is None and decode_attention.takes(sq, softcap):
        return decode_attention.decode_attention(q, k, v, mask, scale, is_causal, out=out,
                                                 zero_nan_rows=zero_nan_rows)
    hkv, sk = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o = q.new_empty(q.shape) if out is None else out
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cfg = dict(config or attention_config(d, sq, is_causal, q.element_size()))
    cfg.setdefault("BLOCK_D", max(16, triton.next_power_of_2(d)))
    meta = {key: cfg.pop(key) for key in ("num_warps", "num_stages")}
    mstr = (0, 0, 0, 0) if mask is None else mask.expand(bsz, hq, sq, sk).stride()
    attention_kernel[attention_grid(bsz, hq, sq, cfg)](
        q, k, v, q if mask is None else mask, o,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *mstr, o.stride(0), o.stride(1), o.stride(2),
        hq, hq // hkv, sq, sk, *scales(scale, softcap),
        HEAD_DIM=d, IS_CAUSAL=bool(is_causal), HAS_MASK=mask is not None, SOFTCAP=bool(softcap),
        ZERO_NAN_ROWS=bool(zero_nan_rows), **cfg, **meta,
    )
    return o
