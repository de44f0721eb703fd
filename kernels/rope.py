"""Rotary position embedding (rotate-half or interleaved, partial rotary dims), in or out of place.

Why one kernel: the unfused graph slices X, negates, concatenates, multiplies by cos and
sin and adds (5-7 passes over X).  Here each element is written once as
``x[c] * cos[c] + sign(c) * x[partner(c)] * sin[c]``: the partner is the element in the
other half (rotate-half) or the neighbour (interleaved), loaded a second time from the
same row, which costs cache traffic but no extra DRAM bytes.  Channels past
``rotary_dim`` are copied when out of place and not touched when in place.

X is [B, H, S, D] with any strides; cos/sin are indexed with (b, h, s) strides so any
broadcast of [..., S, rotary_dim] (stride 0 on broadcast axes) is read without expansion.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rope_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr,
    n_rows, H, S,
    sxb, sxh, sxs, syb, syh, sys, scb, sch, scs, ssb, ssh, sss,
    HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERLEAVED: tl.constexpr, IN_PLACE: tl.constexpr,
):
    """One [BLOCK_R rows of (b, h, s), BLOCK_D channels] tile per program."""
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < n_rows
    row = row.to(tl.int64)
    s = row % S
    h = (row // S) % H
    b = row // (S * H)
    c = tl.arange(0, BLOCK_D)
    if INTERLEAVED:
        partner = c ^ 1
        sign = tl.where(c % 2 == 0, -1.0, 1.0)
    else:
        half: tl.constexpr = ROT_DIM // 2
        partner = tl.where(c < half, c + half, c - half)
        sign = tl.where(c < half, -1.0, 1.0)
    rot = row_ok[:, None] & (c < ROT_DIM)[None, :]
    x_row = (b * sxb + h * sxh + s * sxs)[:, None]
    cos = tl.load(cos_ptr + (b * scb + h * sch + s * scs)[:, None] + c[None, :], mask=rot, other=0.0)
    sin = tl.load(sin_ptr + (b * ssb + h * ssh + s * sss)[:, None] + c[None, :], mask=rot, other=0.0)
    xp = tl.load(x_ptr + x_row + partner[None, :], mask=rot, other=0.0).to(tl.float32)
    if IN_PLACE:
        x = tl.load(x_ptr + x_row + c[None, :], mask=rot, other=0.0).to(tl.float32)
        out_mask = rot
    else:
        out_mask = row_ok[:, None] & (c < HEAD_DIM)[None, :]
        x = tl.load(x_ptr + x_row + c[None, :], mask=out_mask, other=0.0).to(tl.float32)
    y = tl.where(rot, x * cos.to(tl.float32) + sign[None, :] * xp * sin.to(tl.float32), x)
    y_row = (b * syb + h * syh + s * sys)[:, None]
    tl.store(y_ptr + y_row + c[None, :], y.to(y_ptr.dtype.element_ty), mask=out_mask)


def rope_config(n_rows: int, head_dim: int, rot_dim: int, itemsize: int, in_place: bool) -> dict:
    """Tile and warps: about 16 KB of X per program."""
    if rot_dim % 2 or not 0 < rot_dim <= head_dim:
        raise ValueError(f"rotary_dim must be even and in (0, {head_dim}], got {rot_dim}")
    block_d = triton.next_power_of_2(rot_dim if in_place else head_dim)
    block_r = min(triton.next_power_of_2(max(n_rows, 1)), max(1, 16384 // itemsize // block_d))
    num_warps = min(8, max(1, block_r * block_d * itemsize // 2048))
    return {"BLOCK_R": block_r, "BLOCK_D": block_d, "num_warps": num_warps}


def rope_grid(n_rows: int, cfg: dict) -> tuple:
    return (triton.cdiv(n_rows, cfg["BLOCK_R"]), 1, 1)


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
    n_rows = bsz * heads * seq
    cfg = rope_config(n_rows, head_dim, rd, x.element_size(), in_place)
    shape = (bsz, heads, seq, rd)
    rope_kernel[rope_grid(n_rows, cfg)](
        x, cos, sin, y, n_rows, heads, seq,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        *_bhs_strides(cos, shape), *_bhs_strides(sin, shape),
        HEAD_DIM=head_dim, ROT_DIM=rd, BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"],
        INTERLEAVED=bool(interleaved), IN_PLACE=in_place, num_warps=cfg["num_warps"],
    )
    return y
