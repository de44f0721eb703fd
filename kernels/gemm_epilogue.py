"""GEMM with bias and activation (``MatMulBias{Act}``) and SwiGLU's act(gate) * up, fused.

Why: the unfused graph writes X@W to memory, reads it back for the bias Add, again for
the activation (and for SwiGLU runs two GEMMs plus a Mul).  Here the bias, the activation
and the gate/up product are applied to the fp32 accumulator in registers, and Y is stored
once in X's dtype.  For SwiGLU one program computes the gate and the up tile from the
same X tile, so X is read once for both.

Tiling: classic output tiles [BLOCK_M, BLOCK_N], K stepped by BLOCK_K with software
pipelining (``num_stages``), programs ordered in groups of GROUP_M row-tiles so
neighbouring programs share W tiles in L2.  Row and column offsets wrap modulo M and N
(the rows loaded past the edge are real data, just never stored), which keeps the inner
loop free of M/N masks; K is masked only when it is not a multiple of BLOCK_K.  SwiGLU's
default (``PAIRED``) loads the gate and up tiles side by side and runs one dot twice as
wide, which the tensor cores do at the plain GEMM's rate; the two-dot loop stays for
weights that are not 16-byte aligned.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .reference import ACTIVATIONS


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _gelu_erf(x):
    """0.5 x (1 + erf(x / sqrt 2)) through erfc's Chebyshev fit (Numerical Recipes' erfcc,
    relative error < 1.2e-7 for all z >= 0): one reciprocal, one exp2 and 10 FMAs, no
    branches, where libdevice's erff branches per element.  With z = |x| / sqrt 2:
    x >= 0: x (1 - erfc(z) / 2);  x < 0: x erfc(z) / 2."""
    z = tl.abs(x) * 0.7071067811865476
    t = 1.0 / (1.0 + 0.5 * z)
    p = 0.17087277
    p = p * t - 0.82215223
    p = p * t + 1.48851587
    p = p * t - 1.13520398
    p = p * t + 0.27886807
    p = p * t - 0.18628806
    p = p * t + 0.09678418
    p = p * t + 0.37409196
    p = p * t + 1.00002368
    p = p * t - 1.26551223
    half_erfc = 0.5 * t * tl.exp2((p - z * z) * 1.4426950408889634)
    return x * tl.where(x >= 0.0, 1.0 - half_erfc, half_erfc)


@triton.jit
def apply_activation(x, ACT: tl.constexpr):
    """The ``fusegraph`` activations on an fp32 tile (tanh written through sigmoid)."""
    if ACT == "Relu":
        x = tl.maximum(x, 0.0)
    elif ACT == "Gelu":
        x = _gelu_erf(x)
    elif ACT == "GeluTanh":
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * _sigmoid(2.0 * inner)  # 0.5 * (1 + tanh(u)) == sigmoid(2u)
    elif ACT == "Sigmoid":
        x = _sigmoid(x)
    elif ACT == "Tanh":
        x = 2.0 * _sigmoid(2.0 * x) - 1.0
    elif ACT == "Silu":
        x = x * _sigmoid(x)
    else:
        tl.static_assert(ACT == "none", "unknown activation")
    return x


@triton.jit
def gemm_kernel(
    x_ptr, w_ptr, wu_ptr, b_ptr, bu_ptr, y_ptr,
    M, N, K, stride_xm, stride_xk, stride_wk, stride_wn, stride_ym,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, GLU: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PAIRED: tl.constexpr = False,
):
    """Y = act(X@W + b), or with GLU: Y = act(X@W + b) * (X@Wu + bu).  W, Wu share strides.
    GLU with PAIRED: the gate and up tiles are loaded side by side as one [BLOCK_K,
    2 BLOCK_N] operand and multiplied in one dot (one wide MMA per A tile instead of two
    narrow ones, so A is read from shared memory once per K step), then split in the
    epilogue."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
    if GLU and PAIRED:
        acc = _paired_glu_mainloop(x_ptrs, w_ptr, wu_ptr, pid_n * BLOCK_N, N, rk, K, stride_xk,
                                   stride_wk, stride_wn, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
        if HAS_BIAS:
            gate += tl.load(b_ptr + rn).to(tl.float32)[None, :]
            up += tl.load(bu_ptr + rn).to(tl.float32)[None, :]
        acc = apply_activation(gate, ACT) * up
    else:
        acc = _mainloop_and_epilogue(x_ptrs, w_ptr, wu_ptr, b_ptr, bu_ptr, rn, rk, K,
                                     stride_xk, stride_wk, stride_wn, ACT, HAS_BIAS, GLU,
                                     EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)

    om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + om.to(tl.int64)[:, None] * stride_ym + on[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(om < M)[:, None] & (on < N)[None, :])


@triton.jit
def _paired_glu_mainloop(x_ptrs, w_ptr, wu_ptr, first_n, N, rk, K, stride_xk, stride_wk,
                         stride_wn, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """X @ [Wg tile | Wu tile] into one [BLOCK_M, 2 BLOCK_N] accumulator.  Column c of the
    wide tile is gate column first_n + c for c < BLOCK_N and up column first_n + c - BLOCK_N
    after: each half is contiguous, so the loads stay 16-byte cp.async copies."""
    cols = tl.arange(0, 2 * BLOCK_N)
    col_n = first_n + cols % BLOCK_N
    # Columns past N are masked rather than wrapped as in the kernel: `% N` on the doubled
    # index hides its contiguity from the compiler (scalar loads, no cp.async pipeline).
    col_ok = (col_n < N)[None, :]
    w_off = rk[:, None] * stride_wk + col_n[None, :] * stride_wn
    # Wu's offset from Wg in elements: a select between two pointer tiles would hide the
    # halves' contiguity and turn the loads into scalars.  Callers pass PAIRED only with
    # 16-byte aligned Wg and Wu, so the offset is a multiple of 16 bytes.
    item_bytes: tl.constexpr = w_ptr.dtype.element_ty.primitive_bitwidth // 8
    up_offset = (wu_ptr.to(tl.int64, bitcast=True) - w_ptr.to(tl.int64, bitcast=True)) // item_bytes
    up_offset = tl.multiple_of(up_offset, 16 // item_bytes)
    w_ptrs = w_ptr + (w_off + (cols >= BLOCK_N).to(tl.int64)[None, :] * up_offset)
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            w = tl.load(w_ptrs, mask=col_ok, other=0.0)
        else:
            k_left = K - k
            a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=(rk[:, None] < k_left) & col_ok, other=0.0)
        acc = tl.dot(a, w, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _mainloop_and_epilogue(x_ptrs, w_ptr, wu_ptr, b_ptr, bu_ptr, rn, rk, K, stride_xk,
                           stride_wk, stride_wn, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           GLU: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """act(X @ W + b) (times X @ Wu + bu with GLU, one dot per operand) in fp32."""
    w_off = rk[:, None] * stride_wk + rn[None, :] * stride_wn
    w_ptrs = w_ptr + w_off
    wu_ptrs = wu_ptr + w_off
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_left = K - k
            a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
        acc = tl.dot(a, w, acc)
        if GLU:
            if EVEN_K:
                wu = tl.load(wu_ptrs)
            else:
                wu = tl.load(wu_ptrs, mask=rk[:, None] < K - k, other=0.0)
            acc_up = tl.dot(a, wu, acc_up)
            wu_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    acc = apply_activation(acc, ACT)
    if GLU:
        if HAS_BIAS:
            acc_up += tl.load(bu_ptr + rn).to(tl.float32)[None, :]
        acc = acc * acc_up
    return acc


# Shared memory a config may plan for: the H100/H200 opt-in limit is 227 KB per block; the
# margin leaves room for the epilogue's layout-conversion scratch.  Only fp32 tiles come
# near it (the bf16/fp16 tiles below use 96-144 KB).
SMEM_BUDGET = 200 * 1024


def gemm_smem_bytes(cfg: dict, glu: bool, itemsize: int) -> int:
    """Shared memory of the pipelined operand buffers: ``num_stages`` copies of the X tile
    and the W (and Wu) tiles.  Matches the compiled kernels' ``shared`` on sm_90."""
    per_stage = cfg["BLOCK_M"] * cfg["BLOCK_K"] + cfg["BLOCK_K"] * cfg["BLOCK_N"] * (2 if glu else 1)
    return cfg["num_stages"] * per_stage * itemsize


def gemm_config(M: int, N: int, K: int, glu: bool, itemsize: int = 2) -> dict:
    """Tiles for an H100-class GPU (from benchmarks/KERNEL_NOTES.md), clipped for small problems.
    ``itemsize`` is the element size of X/W: fp32 tiles are twice as large in shared memory,
    so BLOCK_K (then the stage count) shrinks until the buffers fit ``SMEM_BUDGET``."""
    if glu and M > 64:
        # Paired: one 128 x 256 dot per K step (the plain GEMM's tile) instead of two 128 x
        # 128 dots.  H200 (issue 14, KERNEL_NOTES.md): M8192 N14336 K4096 3.14 -> 2.92 ms;
        # also at M 128 (N11008 K4096: 63.4 -> 49.2 us over the 64-row small-M tile; M 17-64
        # keep that tile, not measured with this one).
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 16, "num_warps": 8,
               "num_stages": 4, "PAIRED": True}
    elif M <= 128:
        cfg = _small_m_config(M, N)
        if glu:
            cfg["PAIRED"] = True
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    cfg["BLOCK_M"] = max(16, min(cfg["BLOCK_M"], triton.next_power_of_2(M)))
    cfg["BLOCK_N"] = max(16, min(cfg["BLOCK_N"], triton.next_power_of_2(N)))
    cfg["BLOCK_K"] = max(16, min(cfg["BLOCK_K"], triton.next_power_of_2(K)))
    while gemm_smem_bytes(cfg, glu, itemsize) > SMEM_BUDGET:
        if cfg["BLOCK_K"] > 32:
            cfg["BLOCK_K"] //= 2
        elif cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        else:
            break  # the launcher checks the compiled size against the device's limit
    return cfg


def _small_m_config(M: int, N: int) -> dict:
    """Decode-to-small-batch M (<= 128): bound by reading W, so the tiles are chosen for
    enough programs to stream it (N / BLOCK_N against 132 SMs) and long K steps.  From the
    H200 sweep at a 7B model's (N, K) (KERNEL_NOTES.md, issue 14): the 128 x 256 tile ran
    M 1-16 at 0.12-0.46 of copy bandwidth, these at 0.36-0.65."""
    wide = N > 4096
    if M <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 128 if wide else 32, "BLOCK_K": 128 if wide else 256,
                "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 64, "BLOCK_N": 128 if wide else 64, "BLOCK_K": 64 if wide else 128,
            "GROUP_M": 8, "num_warps": 4, "num_stages": 4}


def pairable(wg_ptr: int, wu_ptr: int) -> bool:
    """Whether the paired SwiGLU main loop may read Wg and Wu: it addresses Wu as an offset
    from Wg that it declares a multiple of 16 bytes."""
    return wg_ptr % 16 == 0 and wu_ptr % 16 == 0


def gemm_grid(M: int, N: int, cfg: dict) -> tuple:
    return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), 1, 1)


def _run(x, w, wu, b, bu, act, config, out):
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    K = x.shape[-1]
    N = w.shape[1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    glu = wu is not None
    if glu and wu.stride() != w.stride():
        wu = wu.contiguous()
        w = w.contiguous()
    y = x.new_empty((M, N)) if out is None else out.view(M, N)
    cfg = dict(config or gemm_config(M, N, K, glu, x.element_size()))
    meta = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    cfg["PAIRED"] = glu and cfg.get("PAIRED", False) and pairable(w.data_ptr(), wu.data_ptr())
    gemm_kernel[gemm_grid(M, N, cfg)](
        x2, w, w if wu is None else wu, w if b is None else b, w if bu is None else bu, y,
        M, N, K, x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), y.stride(0),
        ACT=act, HAS_BIAS=b is not None, GLU=glu, EVEN_K=K % cfg["BLOCK_K"] == 0, **cfg, **meta,
    )
    return y.reshape(*x.shape[:-1], N)


def matmul_bias_act(x, w, b=None, act="none", config=None, out=None):
    """Torch entry for ``MatMulBias{Act}``: X [..., K] @ W [K, N] (+ b [N]) then act;
    ``out`` (contiguous, X's dtype) receives Y if given."""
    return _run(x, w, None, b, None, act, config, out)


def swiglu(x, wg, wu, bg=None, bu=None, act="Silu", config=None, out=None):
    """Torch entry for act(X@Wg + bg) * (X@Wu + bu); pass both biases or neither."""
    if (bg is None) != (bu is None):
        raise ValueError("swiglu takes both biases or neither")
    return _run(x, wg, wu, bg, bu, act, config, out)
