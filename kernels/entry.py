"""Torch entry points that take the cached launcher where it can take the call.

`launch.py` builds each kernel's launch from the kernel modules (norms, attention, decode
attention, ...), so those modules cannot reach up to it; this module sits above both. Dense
tensors on the current CUDA device go through `launch` (host cost per call a fraction of
Triton's JIT launcher's, issue 14); anything else — CPU tensors under TRITON_INTERPRET, an
explicit `config` sweep — goes to the kernel module's own JIT entry. Same signatures and
results as those entries (`norms.rms_norm`, `norms.layer_norm`, `decode_attention.decode_attention`).
"""

from __future__ import annotations

from . import attention as _attention
from . import decode_attention as _decode
from . import launch, norms


def _norm(x, residual, gamma, beta, eps, rms, out, residual_out):
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols)
    r2 = x2 if residual is None else residual.reshape(-1, cols)
    y = x.new_empty(x2.shape) if out is None else out.view(x2.shape)
    s = x2 if residual is None else (x.new_empty(x2.shape) if residual_out is None
                                     else residual_out.view(x2.shape))
    dense = x2.stride(-1) == 1 and r2.is_contiguous()
    if not (x2.shape[0] and dense and launch.takes_tensors(x2, r2, gamma, beta, y, s)):
        entry = norms.rms_norm if rms else norms.layer_norm
        extra = {} if rms else {"beta": beta}
        return entry(x, gamma, eps=eps, residual=residual, out=out, residual_out=residual_out, **extra)
    launch.launch_norm(x2.data_ptr(), r2.data_ptr() if residual is not None else 0,
                       gamma.data_ptr(), 0 if beta is None else beta.data_ptr(), y.data_ptr(),
                       s.data_ptr() if residual is not None else 0, x2.shape[0], cols, float(eps),
                       launch.dtype_name(x), rms, launch.current_stream(x))
    y = y.reshape(x.shape)
    return y if residual is None else (y, s.reshape(x.shape))


def rms_norm(x, gamma, eps=1e-6, residual=None, out=None, residual_out=None):
    """`norms.rms_norm` through the cached launcher where it takes the call."""
    return _norm(x, residual, gamma, None, eps, True, out, residual_out)


def layer_norm(x, gamma, beta=None, eps=1e-5, residual=None, out=None, residual_out=None):
    """`norms.layer_norm` through the cached launcher where it takes the call."""
    return _norm(x, residual, gamma, beta, eps, False, out, residual_out)


def decode_attention(q, k, v, mask=None, scale=None, is_causal=False, config=None, out=None, zero_nan_rows=True):
    """`decode_attention.decode_attention` through the cached launcher (its own workspace)
    where it takes the call; a `config` sweep always goes to the JIT entry."""
    bsz, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    dense = all(t.stride(-1) == 1 for t in (q, k, v))
    o = q.new_empty(q.shape) if out is None else out
    if not (config is None and sq == 1 and dense and hq % hkv == 0
            and launch.takes_tensors(q, k, v, o)
            and (mask is None or launch.dtype_name(mask) in launch.DTYPES)):
        return _decode.decode_attention(q, k, v, mask, scale, is_causal, config, out, zero_nan_rows)
    strides = (0, 0, 0, 0) if mask is None else mask.expand(bsz, hq, 1, sk).stride()
    launch.launch_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), bsz, hq, hkv, 1, sk,
                            d, scale, bool(is_causal), launch.dtype_name(q), launch.current_stream(q),
                            mask_ptr=0 if mask is None else mask.data_ptr(), mask_strides=strides,
                            mask_dtype=None if mask is None else launch.dtype_name(mask),
                            zero_nan_rows=zero_nan_rows)
    return o


def attention(q, k, v, mask=None, scale=None, is_causal=False, softcap=0.0, zero_nan_rows=True, config=None,
              out=None):
    """`attention.attention`, with one query token (no `config` or soft cap) sent to
    `decode_attention` above, so a decode step takes the cached launcher too."""
    if config is None and _decode.takes(q.shape[2], softcap):
        return decode_attention(q, k, v, mask, scale, is_causal, out=out, zero_nan_rows=zero_nan_rows)
    return _attention.attention(q, k, v, mask, scale, is_causal, softcap=softcap, zero_nan_rows=zero_nan_rows,
                                config=config, out=out)
