"""RMSNorm and LayerNorm over the last axis, each optionally with the residual Add fused.

Why fused: the unfused graph reads X and R, writes S, reads S back, and does the norm in
several passes (pow, mean, add, sqrt, div, mul); here each row is read once, normalised in
fp32 registers, and S and Y are written once, so the kernel moves the floor of bytes:
(2 inputs + 2 outputs) x rows x cols x itemsize with the residual, 2 without.

One program handles a [BLOCK_R, BLOCK_C] tile: BLOCK_C covers a whole row (rows up to
``MAX_COLS`` wide), and BLOCK_R stacks rows when they are short so a program still moves
enough bytes to hide memory latency.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_COLS = 65536
SHORT_ROW = 1024  # rows up to this many columns get the short-row tiles (norm_config)


@triton.jit
def norm_kernel(
    x_ptr, r_ptr, gamma_ptr, beta_ptr, y_ptr, s_ptr,
    rows, cols, stride_x, stride_r, stride_y, stride_s, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BETA: tl.constexpr,
):
    """Y = norm(X [+ R]) * gamma [+ beta]; with a residual also S = X + R (X's dtype)."""
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.arange(0, BLOCK_C)
    col_ok = col < cols
    mask = (row < rows)[:, None] & col_ok[None, :]
    row = row.to(tl.int64)[:, None]
    x = tl.load(x_ptr + row * stride_x + col[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + col[None, :], mask=mask, other=0.0)
        # S is rounded to X's dtype before the norm sees it, as the unfused graph does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(s_ptr + row * stride_s + col[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    if RMS:
        y = xf * tl.math.rsqrt(tl.sum(xf * xf, axis=1) / cols + eps)[:, None]
    else:
        centred = tl.where(mask, xf - (tl.sum(xf, axis=1) / cols)[:, None], 0.0)
        y = centred * tl.math.rsqrt(tl.sum(centred * centred, axis=1) / cols + eps)[:, None]
    y = y * tl.load(gamma_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BETA:
        y = y + tl.load(beta_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + row * stride_y + col[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def norm_config(rows: int, cols: int, itemsize: int) -> dict:
    """Tile and warps for a (rows, cols) problem: about 16 KB of input per program, 2048
    elements for short rows."""
    if cols > MAX_COLS:
        raise ValueError(f"norm kernels take rows of at most {MAX_COLS} elements, got {cols}")
    block_c = triton.next_power_of_2(cols)
    if block_c <= SHORT_ROW:
        # H200 sweep at 512 and 1024 columns (KERNEL_NOTES.md, issue 14): 2048-element
        # tiles with 4 bf16 warps beat the 16 KB tiles by ~6% at 1024 columns
        elems, bytes_per_warp = max(block_c, 2048), 1024
    else:
        elems, bytes_per_warp = max(block_c, 16384 // itemsize), 2048
    block_r = min(triton.next_power_of_2(max(rows, 1)), max(1, elems // block_c))
    num_warps = min(16, max(1, block_r * block_c * itemsize // bytes_per_warp))
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": num_warps}


def norm_grid(rows: int, cfg: dict) -> tuple:
    return (triton.cdiv(rows, cfg["BLOCK_R"]), 1, 1)


def _launch(x, residual, gamma, beta, eps, rms, out, residual_out):
    """Torch entry through Triton's JIT launcher (tests, benchmark): returns Y, or (Y, S)
    when a residual is given. ``entry.py`` takes the cached launcher (``launch.py``) instead
    where it can: its host cost per call is a fraction of the JIT's (issue 14)."""
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = x.new_empty(x2.shape) if out is None else out.view(x2.shape)
    r2 = s = x2
    if residual is not None:
        r2 = residual.reshape(-1, cols).contiguous()
        s = x.new_empty(x2.shape) if residual_out is None else residual_out.view(x2.shape)
    cfg = norm_config(rows, cols, x.element_size())
    norm_kernel[norm_grid(rows, cfg)](
        x2, r2, gamma.contiguous(), gamma if beta is None else beta.contiguous(), y, s,
        rows, cols, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), float(eps),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], RMS=rms,
        HAS_RESIDUAL=residual is not None, HAS_BETA=beta is not None,
        num_warps=cfg["num_warps"],
    )
    y = y.reshape(x.shape)
    return y if residual is None else (y, s.reshape(x.shape))


def rms_norm(x, gamma, eps=1e-6, residual=None, out=None, residual_out=None):
    """RMSNorm(X) or, with ``residual``, SkipRMSNorm -> (Y, S); torch tensors on one device.
    ``out`` / ``residual_out`` (contiguous) receive Y / S if given."""
    return _launch(x, residual, gamma, None, eps, True, out, residual_out)


def layer_norm(x, gamma, beta=None, eps=1e-5, residual=None, out=None, residual_out=None):
    """LayerNorm(X) or, with ``residual``, SkipLayerNorm -> (Y, S); torch tensors."""
    return _launch(x, residual, gamma, beta, eps, False, out, residual_out)
