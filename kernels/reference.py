"""NumPy references for the fused ``fusegraph`` ops, computed in float64 (or float32).

These are the semantics of the fused ONNX ops (domain ``fusegraph``) whose local-function
bodies the rewriter emits; every GPU kernel in this package is checked against them, so
they are written for clarity, not speed.  Results are cast to the dtype the op returns;
``compute_dtype`` lets a test keep them in float64 to measure a kernel's error.
"""

from __future__ import annotations

import math

import numpy as np

from fusegraph.ops import fused_ops

#: The fused ops' activations (`fusegraph.ops.fused_ops.ACTIVATIONS`), identity named "none".
ACTIVATIONS = tuple(act or "none" for act in fused_ops.ACTIVATIONS)


def _erf(x: np.ndarray) -> np.ndarray:
    # numpy has no erf; math.erf is exact to double precision, vectorised here.
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def activation(x: np.ndarray, act: str) -> np.ndarray:
    """Apply one of ``ACTIVATIONS`` elementwise (in ``x``'s float dtype)."""
    if act == "none":
        return x
    if act == "Relu":
        return np.maximum(x, 0)
    if act == "Gelu":
        return 0.5 * x * (1 + _erf(x / math.sqrt(2.0)))
    if act == "GeluTanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if act == "Sigmoid":
        return 1 / (1 + np.exp(-x))
    if act == "Tanh":
        return np.tanh(x)
    if act == "Silu":
        return x / (1 + np.exp(-x))
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def quick_gelu(x, alpha=1.702, compute_dtype=None):
    """``QuickGelu``: Y = X * Sigmoid(alpha X)."""
    xf = x.astype(compute_dtype or np.float64)
    return _out(xf / (1 + np.exp(-alpha * xf)), x, compute_dtype)


def _out(y: np.ndarray, like: np.ndarray, compute_dtype) -> np.ndarray:
    return y if compute_dtype is not None else y.astype(like.dtype)


def matmul_bias_act(x, w, b=None, act="none", compute_dtype=None):
    """``MatMulBias{Act}``: Y = act(X @ W + B); X [..., K], W [K, N], B [N] or None."""
    cd = compute_dtype or np.float64
    y = x.astype(cd) @ w.astype(cd)
    if b is not None:
        y = y + b.astype(cd)
    return _out(activation(y, act), x, compute_dtype)


def swiglu(x, wg, wu, bg=None, bu=None, act="Silu", compute_dtype=None):
    """Y = act(X @ Wg + bg) * (X @ Wu + bu), act Silu or Gelu."""
    gate = matmul_bias_act(x, wg, bg, act, compute_dtype=compute_dtype or np.float64)
    up = matmul_bias_act(x, wu, bu, "none", compute_dtype=compute_dtype or np.float64)
    return _out(gate * up, x, compute_dtype)


def attention(q, k, v, mask=None, scale=None, is_causal=False, softcap=0.0, zero_nan_rows=True,
              compute_dtype=None):
    """``Attention``: softmax(softcap(Q K^T * scale) + mask [+ causal]) V with grouped KV heads.

    Q [B, Hq, Sq, D]; K, V [B, Hkv, Sk, D]; query head h reads kv head h // (Hq // Hkv).
    ``softcap`` > 0 caps the scaled scores as softcap * tanh(s / softcap) before the mask.
    ``mask`` is additive and broadcastable to [B, Hq, Sq, Sk].  Causal is upper-left
    aligned (query i sees keys j <= i).  A row whose softmax is NaN (every score -inf, or a
    NaN or +inf score) yields 0 with ``zero_nan_rows`` (SDPA's guard), else NaN (eager).
    """
    cd = compute_dtype or np.float64
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    assert hq % hkv == 0, "query heads must be a multiple of kv heads"
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = hq // hkv
    kk = np.repeat(k.astype(cd), group, axis=1)
    vv = np.repeat(v.astype(cd), group, axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        s = np.einsum("bhqd,bhkd->bhqk", q.astype(cd), kk) * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        if mask is not None:
            s = s + np.broadcast_to(mask.astype(cd), s.shape)
        if is_causal:
            allowed = np.arange(sk)[None, :] <= np.arange(sq)[:, None]
            s = np.where(allowed, s, -np.inf)
        row_max = s.max(axis=-1, keepdims=True)  # NaN where a score is NaN
        nan_row = np.isneginf(row_max) | np.isnan(row_max) | np.isposinf(row_max)
        p = np.exp(s - np.where(nan_row, 0, row_max))
        p = np.where(nan_row, 0 if zero_nan_rows else np.nan, p / p.sum(axis=-1, keepdims=True))
        o = np.einsum("bhqk,bhkd->bhqd", p, vv)
    return _out(o, q, compute_dtype)


def rms_norm(x, gamma, eps=1e-6, compute_dtype=None):
    """``RMSNorm``: X / sqrt(mean(X^2, last axis) + eps) * gamma, math in float32 or wider."""
    cd = compute_dtype or np.float32
    xf = x.astype(cd)
    y = xf / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + eps) * gamma.astype(cd)
    return _out(y, x, compute_dtype)


def layer_norm(x, gamma, beta=None, eps=1e-5, compute_dtype=None):
    """``LayerNorm`` over the last axis (ONNX LayerNormalization, float32 stash)."""
    cd = compute_dtype or np.float32
    xf = x.astype(cd)
    mean = xf.mean(axis=-1, keepdims=True)
    var = ((xf - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (xf - mean) / np.sqrt(var + eps) * gamma.astype(cd)
    if beta is not None:
        y = y + beta.astype(cd)
    return _out(y, x, compute_dtype)


def skip_rms_norm(x, r, gamma, eps=1e-6, compute_dtype=None):
    """``SkipRMSNorm``: S = X + R rounded to X's dtype; returns (RMSNorm(S), S)."""
    s = (x.astype(np.float64) + r.astype(np.float64)).astype(x.dtype)
    return rms_norm(s, gamma, eps, compute_dtype), s


def skip_layer_norm(x, r, gamma, beta=None, eps=1e-5, compute_dtype=None):
    """``SkipLayerNorm``: S = X + R rounded to X's dtype; returns (LayerNorm(S), S)."""
    s = (x.astype(np.float64) + r.astype(np.float64)).astype(x.dtype)
    return layer_norm(s, gamma, beta, eps, compute_dtype), s


def rotate(x: np.ndarray, interleaved: bool) -> np.ndarray:
    """rotate_half (concat(-x2, x1)) or its interleaved form (x0, x1, ...) -> (-x1, x0, ...)."""
    if interleaved:
        out = np.empty_like(x)
        out[..., 0::2] = -x[..., 1::2]
        out[..., 1::2] = x[..., 0::2]
        return out
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotary_embedding(x, cos, sin, interleaved=False, rotary_dim=0, compute_dtype=None):
    """``RotaryEmbedding``: X [B, H, S, D]; cos, sin broadcastable to [B, H, S, rotary_dim].

    The first ``rotary_dim`` channels (0 = all) become x*cos + rotate(x)*sin; the rest pass.
    """
    cd = compute_dtype or np.float32
    rd = rotary_dim or x.shape[-1]
    assert rd % 2 == 0 and rd <= x.shape[-1], "rotary_dim must be even and <= head dim"
    xf = x.astype(cd)
    xr = xf[..., :rd]
    c = np.broadcast_to(cos.astype(cd), xr.shape)
    s = np.broadcast_to(sin.astype(cd), xr.shape)
    y = np.concatenate([xr * c + rotate(xr, interleaved) * s, xf[..., rd:]], axis=-1)
    return _out(y, x, compute_dtype)
