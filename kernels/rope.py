"""Rotary position embedding (rotate-half or interleaved, partial rotary dims), in or out of place.

Why one kernel: the unfused graph slices X, negates, concatenates, multiplies by cos and
sin and adds (5-7 passes over X).  Here each element is read once and written once.

The rotation pairs channel j with j + rotary_dim/2 (rotate-half) or 2j with 2j + 1
(interleaved).  Both partners are loaded as contiguous tiles so loads stay 16 bytes wide:
rotate-half loads the two halves as two [rows, half] tiles; interleaved loads the
contiguous [rows, rotary_dim] span and de-interleaves it in registers (reshape + split,
and join + reshape back before the store).  v1 instead gathered x[partner(c)], which
broke vectorisation: 18% of copy bandwidth interleaved (see benchmarks/KERNEL_NOTES.md).
Channels past ``rotary_dim`` are copied when out of place and not touched when in place.

X is [B, H, S, D] with any strides; cos/sin are indexed with (b, h, s) strides so any
broadcast of [..., S, rotary_dim] (stride 0 on broadcast axes) is read without expansion.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pair_tile(ptr, row_off, row_ok, BLOCK_H: tl.constexpr, HALF: tl.constexpr,
               INTERLEAVED: tl.constexpr):
    """The two rotation partners of a [rows, rotary_dim] span, each [rows, BLOCK_H], in fp32."""
    if INTERLEAVED:
        c = tl.arange(0, 2 * BLOCK_H)
        t = tl.load(ptr + row_off + c[None, :], mask=row_ok[:, None] & (c < 2 * HALF)[None, :],
                    other=0.0).to(tl.float32)
        first, second = tl.split(tl.reshape(t, [t.shape[0], BLOCK_H, 2]))
    else:
        j = tl.arange(0, BLOCK_H)
        m = row_ok[:, None] & (j < HALF)[None, :]
        first = tl.load(ptr + row_off + j[None, :], mask=m, other=0.0).to(tl.float32)
        second = tl.load(ptr + row_off + HALF + j[None, :], mask=m, other=0.0).to(tl.float32)
    return first, second


@triton.jit
def rope_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr,
    BH, H, S,
    sxb, sxh, sxs, syb, syh, sys, scb, sch, scs, ssb, ssh, sss,
    HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BH_PER_PROG: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, IN_PLACE: tl.constexpr, CS_SHARED: tl.constexpr,
):
    """BLOCK_S positions x BH_PER_PROG (batch, head) pairs per program.

    With CS_SHARED (cos/sin broadcast over batch and heads, the usual case) the cos/sin
    tile is loaded once and reused for every (b, h) of the program: without that reuse,
    each element of X cost two extra cache loads and the kernel ran at ~72% of copy
    bandwidth (v2 in KERNEL_NOTES.md).
    """
    HALF: tl.constexpr = ROT_DIM // 2
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < S
    s64 = s.to(tl.int64)
    if CS_SHARED:
        c1, c2 = _pair_tile(cos_ptr, (s64 * scs)[:, None], s_ok, BLOCK_H, HALF, INTERLEAVED)
        s1, s2 = _pair_tile(sin_ptr, (s64 * sss)[:, None], s_ok, BLOCK_H, HALF, INTERLEAVED)
    for i in range(BH_PER_PROG):
        bh = tl.program_id(1) * BH_PER_PROG + i
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        row_ok = s < tl.where(bh < BH, S, 0)  # (a scalar & block mask trips the interpreter)
        x_row = (b * sxb + h * sxh + s64 * sxs)[:, None]
        y_row = (b * syb + h * syh + s64 * sys)[:, None]
        if not CS_SHARED:
            c1, c2 = _pair_tile(cos_ptr, (b * scb + h * sch + s64 * scs)[:, None], row_ok, BLOCK_H,
                                HALF, INTERLEAVED)
            s1, s2 = _pair_tile(sin_ptr, (b * ssb + h * ssh + s64 * sss)[:, None], row_ok, BLOCK_H,
                                HALF, INTERLEAVED)
        x1, x2 = _pair_tile(x_ptr, x_row, row_ok, BLOCK_H, HALF, INTERLEAVED)
        y1 = (x1 * c1 - x2 * s1).to(y_ptr.dtype.element_ty)
        y2 = (x2 * c2 + x1 * s2).to(y_ptr.dtype.element_ty)
        if INTERLEAVED:
            c = tl.arange(0, 2 * BLOCK_H)
            tl.store(y_ptr + y_row + c[None, :], tl.reshape(tl.join(y1, y2), [BLOCK_S, 2 * BLOCK_H]),
                     mask=row_ok[:, None] & (c < ROT_DIM)[None, :])
        else:
            j = tl.arange(0, BLOCK_H)
            m = row_ok[:, None] & (j < HALF)[None, :]
            tl.store(y_ptr + y_row + j[None, :], y1, mask=m)
            tl.store(y_ptr + y_row + HALF + j[None, :], y2, mask=m)
        if not IN_PLACE and ROT_DIM < HEAD_DIM:
            p = ROT_DIM + tl.arange(0, BLOCK_P)
            m = row_ok[:, None] & (p < HEAD_DIM)[None, :]
            tl.store(y_ptr + y_row + p[None, :], tl.load(x_ptr + x_row + p[None, :], mask=m), mask=m)


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def rope_config(bh: int, seq: int, head_dim: int, rot_dim: int, itemsize: int, in_place: bool,
                cs_shared: bool) -> dict:
    """About 16 KB of X per loop step; 8 (b, h) pairs per program when cos/sin are shared."""
    if rot_dim % 2 or not 0 < rot_dim <= head_dim:
        raise ValueError(f"rotary_dim must be even and in (0, {head_dim}], got {rot_dim}")
    block_h = triton.next_power_of_2(rot_dim // 2)
    block_p = triton.next_power_of_2(max(head_dim - rot_dim, 1))
    width = 2 * block_h + (0 if in_place or rot_dim == head_dim else block_p)
    block_s = min(triton.next_power_of_2(max(seq, 1)), max(1, 16384 // itemsize // width))
    num_warps = min(8, _pow2_floor(block_s * width * itemsize // 2048))
    return {"BLOCK_S": block_s, "BH_PER_PROG": min(8, bh) if cs_shared else 1,
            "BLOCK_H": block_h, "BLOCK_P": block_p, "num_warps": num_warps}


def rope_grid(bh: int, seq: int, cfg: dict) -> tuple:
    return (triton.cdiv(seq, cfg["BLOCK_S"]), triton.cdiv(bh, cfg["BH_PER_PROG"]), 1)


def _bhs_strides(t, shape):
    """(b, h, s) element strides of ``t`` broadcast to ``shape`` [B, H, S, rot]; last axis unit."""
    t = t.expand(*shape)
    return t.stride(0), t.stride(1), t.stride(2)


def rotary_embedding(x, cos, sin, interleaved=False, rotary_dim=0, out=None):
    """Torch entry: X [B, H, S, D]; cos/sin broadcastable to [B, H, S, rotary_dim].

    ``out=x`` rotates in place; ``out=None`` allocates the output.
    """
    bsz, heads, seq, head_dim = x.shape
    rd = rotary_dim or head_dim
    in_place = out is not None and out.data_ptr() == x.data_ptr()
    y = x.new_empty(x.shape) if out is None else out
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    if x.stride(-1) != 1 or y.stride(-1) != 1:
        raise ValueError("rotary_embedding needs unit stride on the head dim")
    shape = (bsz, heads, seq, rd)
    cs = (*_bhs_strides(cos, shape), *_bhs_strides(sin, shape))
    # b and h offsets are dropped when shared: fine for stride 0 or an axis of size 1
    shared = all(st == 0 or n == 1 for st, n in zip(cs[:2] + cs[3:5], (bsz, heads) * 2))
    cfg = rope_config(bsz * heads, seq, head_dim, rd, x.element_size(), in_place, shared)
    meta = {"num_warps": cfg.pop("num_warps")}
    rope_kernel[rope_grid(bsz * heads, seq, cfg)](
        x, cos, sin, y, bsz * heads, heads, seq,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2), *cs,
        HEAD_DIM=head_dim, ROT_DIM=rd, INTERLEAVED=bool(interleaved), IN_PLACE=in_place,
        CS_SHARED=shared, **cfg, **meta,
    )
    return y
