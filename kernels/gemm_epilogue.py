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
loop free of M/N masks; K is masked only when it is not a multiple of BLOCK_K.
"""

from __future__ import annotations

import triton
import triton.language as tl

ACTIVATIONS = ("none", "Relu", "Gelu", "GeluTanh", "Sigmoid", "Tanh", "Silu")


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def apply_activation(x, ACT: tl.constexpr):
    """The ``fusegraph`` activations on an fp32 tile (tanh written through sigmoid)."""
    if ACT == "Relu":
        x = tl.maximum(x, 0.0)
    elif ACT == "Gelu":
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
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
):
    """Y = act(X@W + b), or with GLU: Y = act(X@W + b) * (X@Wu + bu).  W, Wu share strides."""
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

    om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + om.to(tl.int64)[:, None] * stride_ym + on[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(om < M)[:, None] & (on < N)[None, :])


def gemm_config(M: int, N: int, K: int, glu: bool) -> dict:
    """Tiles for an H100-class GPU (from benchmarks/KERNEL_NOTES.md), clipped for small problems."""
    if glu:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    cfg["BLOCK_M"] = max(16, min(cfg["BLOCK_M"], triton.next_power_of_2(M)))
    cfg["BLOCK_N"] = max(16, min(cfg["BLOCK_N"], triton.next_power_of_2(N)))
    cfg["BLOCK_K"] = max(16, min(cfg["BLOCK_K"], triton.next_power_of_2(K)))
    return cfg


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
    cfg = dict(config or gemm_config(M, N, K, glu))
    meta = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
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
