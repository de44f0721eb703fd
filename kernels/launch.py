"""Launch the fused-op kernels without torch, for the TensorRT plugins' ``enqueue``.

A plugin gets raw device pointers and a CUDA stream, not tensors, so the Triton JIT's
launcher (which wants torch tensors and its own C stub) is no use there.  Instead each
``launch_*`` function below

1. describes one launch (``KernelLaunch``): the Triton kernel, its constexprs and tiles
   (from the same ``*_config`` functions the torch entries use), and the runtime
   arguments with their Triton types;
2. compiles it ahead of time for the current GPU with ``triton.compile(ASTSource(...))``
   (cached per signature; the JIT's specialisation is mirrored: pointers and ints that
   are multiples of 16 get the ``tt.divisibility`` hint, which enables 16-byte accesses);
3. loads the cubin with ``cuModuleLoadData`` (cached per CUDA context) and launches it
   with ``cuLaunchKernel`` on the given stream.

Steps 1-3 and the ctypes argument buffer are built once per (op, shape, dtype, pointer
pattern, context) and kept (``enqueue_cached``); a repeated call writes its pointers into
the kept buffer and launches, a few microseconds of host time (issue 14: ``run`` rebuilt
everything per call, 78.5 us on the H200 machine's host).

One query token (``Attention`` with Sq = 1) launches the split-KV decode kernels
(``decode_attention.py``); their fp32 partials live in the caller's workspace when it passes
one large enough (a TensorRT plugin's, sized by ``decode_attention.workspace_bound_bytes``),
else in a buffer this module allocates per (context, stream) and keeps.

Kernel ABI (read from triton/backends/nvidia/driver.py, Triton 3.6-3.9): the cubin's
entry takes every non-constexpr argument in declaration order, then two hidden pointers,
``global_scratch`` and ``profile_scratch``.  Our kernels need neither (this module
refuses a kernel that does), so both are passed as 0.  The block is 32 x num_warps
threads, and the dynamic shared memory is the compiled kernel's ``shared`` size.

Shared memory: a block may use more than 48 KB of dynamic shared memory only after
``cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)``, and never more than the device's
opt-in limit (227 KB on sm_90); asking for more fails with CUDA_ERROR_INVALID_VALUE.  The
tile configs plan for the element size (fp32 tiles are twice as large), and the launcher checks
the compiled size against the device's limit, recompiling with fewer pipeline stages when a
kernel does not fit (e.g. on a GPU with less shared memory than an H100).

Callers pass contiguous row-major buffers, dtype names "float16", "bfloat16" or
"float32", and a stream handle (an int ``cudaStream_t`` / ``CUstream``; 0 = legacy).
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import attention, decode_attention, gemm_epilogue, norms, rope

_TRITON_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
DTYPES = tuple(_TRITON_DTYPES)
_CTYPES = {"i32": ctypes.c_int32, "i64": ctypes.c_int64, "fp32": ctypes.c_float}


def _elem(dtype: str) -> str:
    try:
        return _TRITON_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_TRITON_DTYPES)}, got {dtype!r}") from None


def _itemsize(dtype: str) -> int:
    return 4 if _elem(dtype) == "fp32" else 2


def _int_type(value: int) -> str:
    return "i32" if -(2**31) <= value < 2**31 else "i64"


@dataclass(frozen=True)
class KernelLaunch:
    """Everything one launch needs; ``args`` are (name, triton type, value) in kernel order."""

    kernel: object
    args: tuple
    constexprs: tuple
    grid: tuple
    num_warps: int
    num_stages: int

    def runtime_args(self) -> tuple:
        """Args passed at launch: ints equal to 1 become constexprs, as the JIT specialises
        them (a unit stride known at compile time is what makes loads vectorise)."""
        return tuple(a for a in self.args if not (a[1] in ("i32", "i64") and a[2] == 1))

    def all_constexprs(self) -> tuple:
        ones = tuple((name, 1) for name, ty, value in self.args
                     if ty in ("i32", "i64") and value == 1)
        return self.constexprs + ones

    def signature(self) -> dict:
        sig = {name: ty for name, ty, _ in self.runtime_args()}
        sig.update({name: "constexpr" for name, _ in self.all_constexprs()})
        return {name: sig[name] for name in self.kernel.arg_names}

    def hints(self) -> tuple:
        """Indices of args that are multiples of 16 (pointers and ints), as the JIT would mark."""
        names = self.kernel.arg_names
        return tuple(names.index(name) for name, ty, value in self.runtime_args()
                     if ty != "fp32" and value % 16 == 0 and value != 0)

    def compile(self, target: GPUTarget):
        return _compile(self.kernel, tuple(self.signature().items()), self.all_constexprs(),
                        self.hints(), self.num_warps, self.num_stages, target)

    def pointer_values(self) -> tuple:
        return tuple(value for _, ty, value in self.runtime_args() if ty.startswith("*"))

    def c_args(self) -> list:
        """ctypes values of the runtime args plus the two hidden scratch pointers."""
        vals = [ctypes.c_uint64(value) if ty.startswith("*") else _CTYPES[ty](value)
                for _, ty, value in self.runtime_args()]
        return vals + [ctypes.c_uint64(0), ctypes.c_uint64(0)]


@functools.lru_cache(maxsize=None)
def _compile(kernel, signature, constexprs, hints, num_warps, num_stages, target):
    src = ASTSource(fn=kernel, signature=dict(signature), constexprs=dict(constexprs),
                    attrs={(i,): [["tt.divisibility", 16]] for i in hints})
    compiled = triton.compile(src, target=target,
                              options={"num_warps": num_warps, "num_stages": num_stages})
    md = compiled.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise RuntimeError(f"{kernel.__name__} needs Triton scratch memory, which the "
                           "torch-free launcher does not allocate")
    return compiled


# --- CUDA driver side (cuda-python) -------------------------------------------------------

def _driver():
    from cuda.bindings import driver  # imported lazily: compiling needs no GPU

    return driver


def _check(result):
    """Unwrap a cuda.bindings (err, *values) tuple, raising on any error."""
    drv = _driver()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != drv.CUresult.CUDA_SUCCESS:
        _, msg = drv.cuGetErrorString(err)
        raise RuntimeError(f"CUDA driver error {err}: {msg.decode() if msg else '?'}")
    return values[0] if len(values) == 1 else values


def _current_context():
    """The caller's current context (TensorRT's, or the primary one, retained if none is)."""
    drv = _driver()
    _check(drv.cuInit(0))
    ctx = _check(drv.cuCtxGetCurrent())
    if int(ctx) == 0:
        ctx = _check(drv.cuDevicePrimaryCtxRetain(_check(drv.cuDeviceGet(0))))
        _check(drv.cuCtxSetCurrent(ctx))
    return ctx


@functools.lru_cache(maxsize=None)
def _target(device: int) -> GPUTarget:
    drv = _driver()
    attr = drv.CUdevice_attribute
    major = _check(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device))
    minor = _check(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device))
    return GPUTarget("cuda", major * 10 + minor, 32)


@functools.lru_cache(maxsize=None)
def _max_shared(device: int) -> int:
    """The most dynamic shared memory one block may opt in to on ``device``."""
    drv = _driver()
    attr = drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    return int(_check(drv.cuDeviceGetAttribute(attr, device)))


DEFAULT_SHARED_LIMIT = 48 * 1024  # more than this needs the opt-in attribute


def compile_fitting(launch: KernelLaunch, target: GPUTarget, max_shared: int):
    """Compile ``launch``; if its shared memory exceeds ``max_shared``, recompile with fewer
    pipeline stages (same tiles, same results) until it fits.  Returns (compiled, stages)."""
    for stages in range(launch.num_stages, 0, -1):
        compiled = _compile(launch.kernel, tuple(launch.signature().items()),
                            launch.all_constexprs(), launch.hints(), launch.num_warps, stages,
                            target)
        if compiled.metadata.shared <= max_shared:
            return compiled, stages
    raise RuntimeError(f"{launch.kernel.__name__} needs {compiled.metadata.shared} bytes of shared "
                       f"memory even with 1 stage; the device allows {max_shared} per block")


@functools.lru_cache(maxsize=None)
def _load(compiled, ctx_handle: int):
    """Load a cubin into the current context once; returns (CUfunction, shared bytes).
    Above 48 KB of dynamic shared memory the function must opt in first."""
    drv = _driver()
    module = _check(drv.cuModuleLoadData(compiled.asm["cubin"]))
    func = _check(drv.cuModuleGetFunction(module, compiled.metadata.name.encode()))
    shared = compiled.metadata.shared
    if shared > DEFAULT_SHARED_LIMIT:
        _check(drv.cuFuncSetAttribute(
            func, drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared))
    return func, shared


class PreparedLaunch:
    """One compiled, loaded launch with its argument buffer, for repeated enqueues.

    The ctypes argument buffer is built once; each enqueue only writes the caller's device
    pointers into their slots and calls ``cuLaunchKernel`` (the driver copies the arguments
    at launch, so the buffer is free again when it returns; a lock keeps two host threads
    from interleaving their writes)."""

    def __init__(self, launch: KernelLaunch, pointers: tuple, ctx: int):
        drv = _driver()
        device = int(_check(drv.cuCtxGetDevice()))
        compiled, _ = compile_fitting(launch, _target(device), _max_shared(device))
        self.func, self.shared = _load(compiled, ctx)
        self.launch_fn = drv.cuLaunchKernel
        self.success = drv.CUresult.CUDA_SUCCESS
        self.grid = launch.grid
        self.threads = 32 * launch.num_warps
        self.values = launch.c_args()
        self.params = (ctypes.c_void_p * len(self.values))(
            *[ctypes.addressof(v) for v in self.values])
        self.params_addr = ctypes.addressof(self.params)
        # Which caller pointer feeds each pointer argument (an absent optional pointer is
        # passed as another one, e.g. r_ptr or x_ptr); the key's pointer pattern makes this
        # mapping the same for every call that reaches this entry.
        runtime = launch.runtime_args()
        self.slots = tuple((self.values[i], pointers.index(value))
                           for i, (_, ty, value) in enumerate(runtime) if ty.startswith("*"))
        self.lock = threading.Lock()

    def enqueue(self, pointers: tuple, stream) -> None:
        """``stream``: an int handle or a ``CUstream``.  cuda.bindings' ``cuLaunchKernel``
        (Cython) measured 4.9-6.5 us per call on the H200 machine's host, a ctypes call
        straight into libcuda 7.4-8.7 us (issue 14), so the launch stays on cuda.bindings."""
        gx, gy, gz = self.grid
        with self.lock:
            for slot, index in self.slots:
                slot.value = pointers[index]
            result = self.launch_fn(self.func, gx, gy, gz, self.threads, 1, 1, self.shared,
                                    stream, self.params_addr, 0)
        if result[0] != self.success:
            _check(result)


_PREPARED: dict = {}  # full key -> PreparedLaunch
_LAST: dict = {}      # key -> (pointers, context, PreparedLaunch) of its latest call
MAX_PREPARED = 4096  # distinct (op, shape, dtype, pointer pattern, context) entries kept


def _context_handle() -> int:
    """The current context as an int (the primary one made current if there is none)."""
    drv = _driver()
    err, ctx = drv.cuCtxGetCurrent()
    if err == drv.CUresult.CUDA_SUCCESS and int(ctx):
        return int(ctx)
    return int(_current_context())


def _pointer_pattern(pointers: tuple) -> tuple:
    """What the compiled code and the argument mapping depend on in the pointers: which are
    16-byte aligned (the divisibility hint) or absent (0), and which are equal (in-place
    calls alias X and Y)."""
    return tuple([p & 15 if p else -1 for p in pointers]), tuple(map(pointers.index, pointers))


def enqueue_cached(key: tuple, pointers: tuple, stream, describe) -> None:
    """Enqueue the launch ``describe()`` returns, building it only on ``key``'s first call.

    ``key`` holds every non-pointer argument the launch depends on (shapes, dtype, flags);
    ``pointers`` the device pointers of this call.  Per call this costs a context query,
    a dict lookup, the pointer writes and ``cuLaunchKernel``: the description, the compile
    and the module load are paid once (issue 14: 78.5 us per call before, on the H200
    machine's host).  A call with the same pointers as the key's previous one (an engine
    reuses its buffers) skips even the pointer pattern."""
    ctx = _context_handle()
    last = _LAST.get(key)
    if last is not None and last[0] == pointers and last[1] == ctx:
        prepared = last[2]
    else:
        full_key = (key, ctx, _pointer_pattern(pointers))
        prepared = _PREPARED.get(full_key)
        if prepared is None:
            if len(_PREPARED) >= MAX_PREPARED:
                _PREPARED.clear()
                _LAST.clear()
            prepared = _PREPARED[full_key] = PreparedLaunch(describe(), pointers, ctx)
        _LAST[key] = (pointers, ctx, prepared)
    prepared.enqueue(pointers, stream)


# --- The torch entries' way in (tensors are only inspected, never imported from here) -------

def takes_tensors(*tensors) -> bool:
    """Whether this launcher can run these torch tensors (None = absent): dense, of one
    launcher dtype, on the current CUDA device.  The torch entries then prefer it to
    Triton's JIT launcher, which cost 53.7 us of host time per call on the H200 machine's
    host (issue 14), more than a 1024-column norm's kernel takes."""
    first = tensors[0]
    if not first.is_cuda or dtype_name(first) not in DTYPES:
        return False
    import torch

    return first.device.index == torch.cuda.current_device() and all(
        t is None or (t.dtype == first.dtype and t.is_contiguous()) for t in tensors)


def dtype_name(tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def current_stream(tensor) -> int:
    import torch

    return torch.cuda.current_stream(tensor.device).cuda_stream


# --- Launch descriptions, one per fused op ----------------------------------------------

def _ptr(name: str, dtype: str, value: int) -> tuple:
    return (name, "*" + _elem(dtype), int(value))


def _ints(**values) -> list:
    return [(name, _int_type(int(v)), int(v)) for name, v in values.items()]


def norm_launch(x_ptr, r_ptr, gamma_ptr, beta_ptr, y_ptr, s_ptr, rows, cols, eps, dtype,
                rms: bool, cfg: dict | None = None) -> KernelLaunch:
    """RMS/LayerNorm, with the residual when ``r_ptr`` is nonzero, beta when ``beta_ptr`` is;
    ``cfg`` (BLOCK_R, BLOCK_C, num_warps) overrides ``norms.norm_config``."""
    cfg = cfg or norms.norm_config(rows, cols, _itemsize(dtype))
    has_res, has_beta = bool(r_ptr), bool(beta_ptr)
    args = [_ptr("x_ptr", dtype, x_ptr), _ptr("r_ptr", dtype, r_ptr or x_ptr),
            _ptr("gamma_ptr", dtype, gamma_ptr), _ptr("beta_ptr", dtype, beta_ptr or gamma_ptr),
            _ptr("y_ptr", dtype, y_ptr), _ptr("s_ptr", dtype, s_ptr or y_ptr),
            *_ints(rows=rows, cols=cols, stride_x=cols, stride_r=cols, stride_y=cols, stride_s=cols),
            ("eps", "fp32", float(eps))]
    const = (("BLOCK_R", cfg["BLOCK_R"]), ("BLOCK_C", cfg["BLOCK_C"]), ("RMS", rms),
             ("HAS_RESIDUAL", has_res), ("HAS_BETA", has_beta))
    return KernelLaunch(norms.norm_kernel, tuple(args), const, norms.norm_grid(rows, cfg),
                        cfg["num_warps"], 1)


def launch_norm(x_ptr, r_ptr, gamma_ptr, beta_ptr, y_ptr, s_ptr, rows, cols, eps, dtype, rms,
                stream) -> None:
    """Any of the four norms: RMS or Layer, with the residual (and S) when ``r_ptr`` is
    nonzero, beta when ``beta_ptr`` is."""
    pointers = (x_ptr, r_ptr, gamma_ptr, beta_ptr, y_ptr, s_ptr)
    enqueue_cached(("norm", rows, cols, eps, dtype, rms), pointers, stream,
                   lambda: norm_launch(*pointers, rows, cols, eps, dtype, rms))


def launch_rms_norm(x_ptr, gamma_ptr, y_ptr, rows, cols, eps, dtype, stream) -> None:
    """``RMSNorm`` on a [rows, cols] buffer; gamma [cols] in the same dtype."""
    launch_norm(x_ptr, 0, gamma_ptr, 0, y_ptr, 0, rows, cols, eps, dtype, True, stream)


def launch_skip_rms_norm(x_ptr, r_ptr, gamma_ptr, y_ptr, s_ptr, rows, cols, eps, dtype,
                         stream) -> None:
    """``SkipRMSNorm``: S = X + R and Y = RMSNorm(S), both [rows, cols]."""
    launch_norm(x_ptr, r_ptr, gamma_ptr, 0, y_ptr, s_ptr, rows, cols, eps, dtype, True, stream)


def launch_layer_norm(x_ptr, gamma_ptr, beta_ptr, y_ptr, rows, cols, eps, dtype, stream) -> None:
    """``LayerNorm``; ``beta_ptr`` 0 means no beta."""
    launch_norm(x_ptr, 0, gamma_ptr, beta_ptr, y_ptr, 0, rows, cols, eps, dtype, False, stream)


def launch_skip_layer_norm(x_ptr, r_ptr, gamma_ptr, beta_ptr, y_ptr, s_ptr, rows, cols, eps,
                           dtype, stream) -> None:
    """``SkipLayerNorm``: S = X + R and Y = LayerNorm(S); ``beta_ptr`` 0 means no beta."""
    launch_norm(x_ptr, r_ptr, gamma_ptr, beta_ptr, y_ptr, s_ptr, rows, cols, eps, dtype, False, stream)


def gemm_launch(x_ptr, w_ptr, wu_ptr, b_ptr, bu_ptr, y_ptr, M, N, K, act, dtype) -> KernelLaunch:
    """X [M, K] @ W [K, N] (+ b) -> act, times (X @ Wu + bu) when ``wu_ptr`` is nonzero."""
    if act not in gemm_epilogue.ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {gemm_epilogue.ACTIVATIONS}")
    glu = bool(wu_ptr)
    cfg = gemm_epilogue.gemm_config(M, N, K, glu, _itemsize(dtype))
    args = [_ptr("x_ptr", dtype, x_ptr), _ptr("w_ptr", dtype, w_ptr),
            _ptr("wu_ptr", dtype, wu_ptr or w_ptr), _ptr("b_ptr", dtype, b_ptr or w_ptr),
            _ptr("bu_ptr", dtype, bu_ptr or b_ptr or w_ptr), _ptr("y_ptr", dtype, y_ptr),
            *_ints(M=M, N=N, K=K, stride_xm=K, stride_xk=1, stride_wk=N, stride_wn=1, stride_ym=N)]
    paired = glu and cfg.get("PAIRED", False) and gemm_epilogue.pairable(w_ptr, wu_ptr)
    const = (("ACT", act), ("HAS_BIAS", bool(b_ptr)), ("GLU", glu),
             ("EVEN_K", K % cfg["BLOCK_K"] == 0), ("BLOCK_M", cfg["BLOCK_M"]),
             ("BLOCK_N", cfg["BLOCK_N"]), ("BLOCK_K", cfg["BLOCK_K"]), ("GROUP_M", cfg["GROUP_M"]),
             ("PAIRED", paired))
    return KernelLaunch(gemm_epilogue.gemm_kernel, tuple(args), const,
                        gemm_epilogue.gemm_grid(M, N, cfg), cfg["num_warps"], cfg["num_stages"])


def launch_matmul_bias_act(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, act, dtype, stream) -> None:
    """``MatMulBias{Act}``: Y [M, N] = act(X [M, K] @ W [K, N] + b [N]); ``b_ptr`` 0 = no bias.
    ``act`` is one of "none", "Relu", "Gelu", "GeluTanh", "Sigmoid", "Tanh", "Silu"."""
    pointers = (x_ptr, w_ptr, 0, b_ptr, 0, y_ptr)
    enqueue_cached(("gemm", M, N, K, act, dtype), pointers, stream,
                   lambda: gemm_launch(*pointers, M, N, K, act, dtype))


def launch_swiglu(x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, y_ptr, M, N, K, act, dtype,
                  stream) -> None:
    """Y = act(X @ Wg + bg) * (X @ Wu + bu); ``act`` "Silu" or "Gelu"; biases both 0 or both set."""
    if bool(bg_ptr) != bool(bu_ptr):
        raise ValueError("swiglu takes both biases or neither")
    pointers = (x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, y_ptr)
    enqueue_cached(("gemm", M, N, K, act, dtype), pointers, stream,
                   lambda: gemm_launch(*pointers, M, N, K, act, dtype))


def attention_launch(q_ptr, k_ptr, v_ptr, o_ptr, batch, heads_q, heads_kv, seq_q, seq_k,
                     head_dim, scale, is_causal, dtype, mask_ptr=0, mask_strides=(0, 0, 0, 0),
                     mask_dtype=None, softcap=0.0, zero_nan_rows=True) -> KernelLaunch:
    """Contiguous Q [B, Hq, Sq, D], K/V [B, Hkv, Sk, D], O like Q; mask strides in elements;
    ``softcap`` and ``zero_nan_rows`` as in ``reference.attention``."""
    if heads_q % heads_kv:
        raise ValueError(f"query heads {heads_q} must be a multiple of kv heads {heads_kv}")
    cfg = attention.attention_config(head_dim, seq_q, bool(is_causal), _itemsize(dtype))
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    D = head_dim
    args = [_ptr("q_ptr", dtype, q_ptr), _ptr("k_ptr", dtype, k_ptr), _ptr("v_ptr", dtype, v_ptr),
            _ptr("mask_ptr", mask_dtype or dtype, mask_ptr or q_ptr), _ptr("o_ptr", dtype, o_ptr),
            *_ints(sqb=heads_q * seq_q * D, sqh=seq_q * D, sqm=D,
                   skb=heads_kv * seq_k * D, skh=seq_k * D, skn=D,
                   svb=heads_kv * seq_k * D, svh=seq_k * D, svn=D,
                   smb=mask_strides[0], smh=mask_strides[1], smm=mask_strides[2],
                   smn=mask_strides[3],
                   sob=heads_q * seq_q * D, soh=seq_q * D, som=D,
                   HQ=heads_q, GROUP=heads_q // heads_kv, SQ=seq_q, SK=seq_k),
            *zip(("qk_scale", "cap_log2"), ("fp32", "fp32"), attention.scales(scale, softcap))]
    const = (("HEAD_DIM", D), ("BLOCK_D", cfg["BLOCK_D"]), ("BLOCK_M", cfg["BLOCK_M"]),
             ("BLOCK_N", cfg["BLOCK_N"]), ("IS_CAUSAL", bool(is_causal)),
             ("HAS_MASK", bool(mask_ptr)), ("SOFTCAP", bool(softcap)), ("ZERO_NAN_ROWS", bool(zero_nan_rows)))
    return KernelLaunch(attention.attention_kernel, tuple(args), const,
                        attention.attention_grid(batch, heads_q, seq_q, cfg),
                        cfg["num_warps"], cfg["num_stages"])


def launch_attention(q_ptr, k_ptr, v_ptr, o_ptr, batch, heads_q, heads_kv, seq_q, seq_k,
                     head_dim, scale, is_causal, dtype, stream, mask_ptr=0,
                     mask_strides=(0, 0, 0, 0), mask_dtype=None, softcap=0.0, zero_nan_rows=True,
                     workspace=(0, 0)) -> None:
    """``Attention``; ``scale`` None = 1/sqrt(D).  An additive mask broadcastable to
    [B, Hq, Sq, Sk] is passed as ``mask_ptr`` with its (b, h, q, k) element strides, 0 on
    broadcast axes (e.g. a contiguous [Sq, Sk] mask: (0, 0, Sk, 1)).  One query token
    (Sq = 1, a decode step) without a soft cap goes to the split-KV decode kernels, whose
    partials go to ``workspace`` (device pointer, bytes) when it holds them."""
    if decode_attention.takes(seq_q, softcap):
        _decode(q_ptr, k_ptr, v_ptr, o_ptr, batch, heads_q, heads_kv, seq_k, head_dim, scale,
                is_causal, dtype, stream, mask_ptr, mask_strides, mask_dtype, zero_nan_rows,
                workspace)
        return
    pointers = (q_ptr, k_ptr, v_ptr, o_ptr, mask_ptr)
    enqueue_cached(("attention", batch, heads_q, heads_kv, seq_q, seq_k, head_dim, scale,
                    is_causal, dtype, tuple(mask_strides), mask_dtype, float(softcap),
                    bool(zero_nan_rows)), pointers, stream,
                   lambda: attention_launch(q_ptr, k_ptr, v_ptr, o_ptr, batch, heads_q, heads_kv,
                                            seq_q, seq_k, head_dim, scale, is_causal, dtype,
                                            mask_ptr, mask_strides, mask_dtype, softcap,
                                            zero_nan_rows))


@functools.lru_cache(maxsize=64)
def _sm_count(ctx: int) -> int:
    """Multiprocessors of context ``ctx``'s device (``ctx`` is current)."""
    drv = _driver()
    device = int(_check(drv.cuCtxGetDevice()))
    return int(_check(drv.cuDeviceGetAttribute(
        drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device)))


@functools.lru_cache(maxsize=1024)
def decode_plan(ctx: int, batch: int, heads_kv: int, group: int, seq_k: int, head_dim: int,
                is_causal: bool, dtype: str) -> tuple:
    """(config with the split, keys seen, fp32 workspace elements (partials, pairs)) of one
    decode step on ``ctx``'s device: the split count depends on its SM count."""
    sms = _sm_count(ctx)
    seen = min(seq_k, 1) if is_causal else seq_k  # upper-left causal: the query sees key 0
    cfg = decode_attention.with_splits(
        decode_attention.decode_config(group, head_dim, _itemsize(dtype)),
        batch, heads_kv, seen, sms)
    return cfg, seen, decode_attention.workspace_elems(batch, heads_kv * group, cfg, head_dim)


def decode_launches(q_ptr, k_ptr, v_ptr, o_ptr, part_ptr, ml_ptr, batch, heads_q, heads_kv, seq_k,
                    head_dim, scale, dtype, cfg, seen, mask_ptr=0, mask_strides=(0, 0, 0, 0),
                    mask_dtype=None, zero_nan_rows=True) -> list:
    """The split kernel's launch and, with more than one split, the combine kernel's, for
    contiguous Q/O [B, Hq, 1, D], K/V [B, Hkv, Sk, D]; with more than one split, fp32
    workspaces for the partial outputs (``part_ptr``) and the (max, denominator) pairs
    (``ml_ptr``), of ``decode_attention.workspace_elems`` elements."""
    D = head_dim
    group = heads_q // heads_kv
    splits = cfg["SPLITS"]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    part_ptr, ml_ptr = (part_ptr, ml_ptr) if splits > 1 else (o_ptr, o_ptr)  # unused
    args = [_ptr("q_ptr", dtype, q_ptr), _ptr("k_ptr", dtype, k_ptr), _ptr("v_ptr", dtype, v_ptr),
            _ptr("mask_ptr", mask_dtype or dtype, mask_ptr or q_ptr),
            _ptr("part_ptr", "float32", part_ptr), _ptr("ml_ptr", "float32", ml_ptr),
            _ptr("o_ptr", dtype, o_ptr),
            *_ints(sqb=heads_q * D, sqh=D, skb=heads_kv * seq_k * D, skh=seq_k * D, skn=D,
                   svb=heads_kv * seq_k * D, svh=seq_k * D, svn=D, smb=mask_strides[0],
                   smh=mask_strides[1], smn=mask_strides[3], sob=heads_q * D, soh=D,
                   HKV=heads_kv, SK=seen, SPLIT_LEN=cfg["SPLIT_LEN"], SPLITS=splits),
            ("qk_scale", "fp32", float(scale) * decode_attention.LOG2E)]
    const = (("GROUP", group), ("BLOCK_G", cfg["BLOCK_G"]), ("HEAD_DIM", D),
             ("BLOCK_D", cfg["BLOCK_D"]), ("BLOCK_N", cfg["BLOCK_N"]),
             ("HAS_MASK", bool(mask_ptr)), ("DIRECT", splits == 1), ("ZERO_NAN_ROWS", bool(zero_nan_rows)))
    launches = [KernelLaunch(decode_attention.decode_split_kernel, tuple(args), const,
                             (splits, batch * heads_kv, 1), cfg["num_warps"], cfg["num_stages"])]
    if splits > 1:
        args = [_ptr("part_ptr", "float32", part_ptr), _ptr("ml_ptr", "float32", ml_ptr),
                _ptr("o_ptr", dtype, o_ptr),
                *_ints(sob=heads_q * D, soh=D, HQ=heads_q, SPLITS=splits)]
        const = (("HEAD_DIM", D), ("BLOCK_D", cfg["BLOCK_D"]),
                 ("BLOCK_S", triton.next_power_of_2(splits)), ("ZERO_NAN_ROWS", bool(zero_nan_rows)))
        launches.append(KernelLaunch(decode_attention.decode_combine_kernel, tuple(args), const,
                                     (batch * heads_q, 1, 1),
                                     decode_attention.combine_warps(cfg["BLOCK_D"]), 1))
    return launches


_WORKSPACES: dict = {}  # (context, stream) -> (device pointer, bytes)


def _workspace(ctx: int, stream, nbytes: int) -> int:
    """A device buffer of at least ``nbytes`` for work queued on ``stream``; kept and reused
    (kernels on one stream run in order, so one buffer per stream is never used twice at
    once).  Grown in powers of two, so rarely: the old buffer is freed once the work already
    queued on the stream is done."""
    key = (ctx, int(stream))
    have = _WORKSPACES.get(key)
    if have is not None and have[1] >= nbytes:
        return have[0]
    drv = _driver()
    if have is not None:
        _check(drv.cuStreamSynchronize(stream if isinstance(stream, drv.CUstream)
                                       else drv.CUstream(int(stream))))
        _check(drv.cuMemFree(have[0]))
    size = triton.next_power_of_2(nbytes)
    ptr = int(_check(drv.cuMemAlloc(size)))
    _WORKSPACES[key] = (ptr, size)
    return ptr


def _decode(q_ptr, k_ptr, v_ptr, o_ptr, batch, heads_q, heads_kv, seq_k, head_dim, scale,
            is_causal, dtype, stream, mask_ptr, mask_strides, mask_dtype, zero_nan_rows=True,
            workspace=(0, 0)) -> None:
    if heads_q % heads_kv:
        raise ValueError(f"query heads {heads_q} must be a multiple of kv heads {heads_kv}")
    ctx = _context_handle()
    cfg, seen, (n_part, n_ml) = decode_plan(ctx, batch, heads_kv, heads_q // heads_kv, seq_k,
                                            head_dim, bool(is_causal), dtype)
    need = 4 * (n_part + n_ml)
    if not n_part:
        part_ptr = 0
    elif workspace[0] and workspace[1] >= need:
        part_ptr = workspace[0]
    else:
        part_ptr = _workspace(ctx, stream, need)
    ml_ptr = part_ptr + 4 * n_part if n_part else 0
    pointers = (q_ptr, k_ptr, v_ptr, o_ptr, part_ptr, ml_ptr, mask_ptr)
    key = ("decode", batch, heads_q, heads_kv, seq_k, head_dim, scale, is_causal, dtype,
           tuple(mask_strides), mask_dtype, bool(zero_nan_rows))
    describe = functools.partial(decode_launches, q_ptr, k_ptr, v_ptr, o_ptr, part_ptr, ml_ptr,
                                 batch, heads_q, heads_kv, seq_k, head_dim, scale, dtype, cfg,
                                 seen, mask_ptr, mask_strides, mask_dtype, zero_nan_rows)
    enqueue_cached(key + (0,), pointers, stream, lambda: describe()[0])
    if cfg["SPLITS"] > 1:
        enqueue_cached(key + (1,), pointers, stream, lambda: describe()[1])


def rope_launch(x_ptr, cos_ptr, sin_ptr, y_ptr, batch, heads, seq, head_dim, rotary_dim,
                interleaved, dtype, cs_strides=None) -> KernelLaunch:
    """X, Y contiguous [B, H, S, D]; cos/sin share (b, h, s) element strides ``cs_strides``
    (default: contiguous [S, rotary_dim], i.e. (0, 0, rotary_dim))."""
    rd = rotary_dim or head_dim
    in_place = x_ptr == y_ptr
    cb, ch, cs = cs_strides or (0, 0, rd)
    shared = cb == ch == 0
    cfg = rope.rope_config(batch * heads, seq, head_dim, rd, _itemsize(dtype),
                           in_place, shared)
    args = [_ptr("x_ptr", dtype, x_ptr), _ptr("cos_ptr", dtype, cos_ptr),
            _ptr("sin_ptr", dtype, sin_ptr), _ptr("y_ptr", dtype, y_ptr),
            *_ints(BH=batch * heads, H=heads, S=seq,
                   sxb=heads * seq * head_dim, sxh=seq * head_dim, sxs=head_dim,
                   syb=heads * seq * head_dim, syh=seq * head_dim, sys=head_dim,
                   scb=cb, sch=ch, scs=cs, ssb=cb, ssh=ch, sss=cs)]
    const = (("HEAD_DIM", head_dim), ("ROT_DIM", rd), ("BLOCK_S", cfg["BLOCK_S"]),
             ("BH_PER_PROG", cfg["BH_PER_PROG"]), ("BLOCK_H", cfg["BLOCK_H"]),
             ("BLOCK_P", cfg["BLOCK_P"]), ("INTERLEAVED", bool(interleaved)),
             ("IN_PLACE", in_place), ("CS_SHARED", shared))
    return KernelLaunch(rope.rope_kernel, tuple(args), const,
                        rope.rope_grid(batch * heads, seq, cfg), cfg["num_warps"], 1)


def launch_rotary_embedding(x_ptr, cos_ptr, sin_ptr, y_ptr, batch, heads, seq, head_dim,
                            rotary_dim, interleaved, dtype, stream, cs_strides=None) -> None:
    """``RotaryEmbedding``; ``y_ptr == x_ptr`` rotates in place.  See ``rope_launch``."""
    pointers = (x_ptr, cos_ptr, sin_ptr, y_ptr)
    enqueue_cached(("rope", batch, heads, seq, head_dim, rotary_dim, interleaved, dtype,
                    cs_strides and tuple(cs_strides)), pointers, stream,
                   lambda: rope_launch(*pointers, batch, heads, seq, head_dim, rotary_dim,
                                       interleaved, dtype, cs_strides))
