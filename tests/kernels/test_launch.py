"""The torch-free launch path (kernels/launch.py).

On any machine: each op's launch description compiles ahead of time for sm_90, and the
argument list we would hand cuLaunchKernel has exactly as many entries as the cubin's
entry point has parameters (the user args that survive specialisation + Triton's two
hidden scratch pointers).  This runs in a subprocess because the interpreter mode that
the other kernel tests use cannot compile.
On a GPU with cuda-python: each op is launched on raw pointers and checked.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("triton", reason="kernels are written in Triton")

pytestmark = pytest.mark.triton

_COMPILE_SCRIPT = r"""
import json
from triton.backends.compiler import GPUTarget
from fusegraph.kernels import launch as L, decode_attention as D
P = 4096  # any 16-byte aligned fake address: compilation never dereferences it
cases = {
    "skip_rms_norm": L.norm_launch(P, P, P, 0, P, P, 100, 4096, 1e-6, "float16", True),
    "layer_norm": L.norm_launch(P, 0, P, P, P, 0, 7, 33, 1e-5, "float32", False),
    "matmul_bias_gelu": L.gemm_launch(P, P, 0, P, 0, P, 1000, 4096, 4096, "Gelu", "bfloat16"),
    "swiglu_ragged": L.gemm_launch(P, P, P, 0, 0, P, 37, 50, 70, "Silu", "float16"),
    "attention_gqa_causal": L.attention_launch(P, P, P, P, 2, 8, 2, 1000, 1000, 128, None,
                                               True, "bfloat16"),
    "attention_masked": L.attention_launch(P, P, P, P, 1, 2, 2, 33, 47, 64, 0.1, False,
                                           "float16", mask_ptr=P, mask_strides=(0, 0, 47, 1)),
    "rope_in_place": L.rope_launch(P, P, P, P, 2, 8, 1000, 128, 64, False, "float16"),
    "rope_interleaved": L.rope_launch(P, P, P, 2 * P, 1, 3, 5, 10, 0, True, "float32"),
    "rope_per_head_tables": L.rope_launch(P, P, P, 2 * P, 2, 4, 9, 96, 32, False, "float16",
                                          cs_strides=(4 * 9 * 32, 9 * 32, 32)),
}
split = D.with_splits(D.decode_config(8, 128, 2), 1, 8, 4096, 132)
direct = D.with_splits(D.decode_config(4, 64, 4), 128, 8, 1000, 132)
assert split["SPLITS"] > 1 and direct["SPLITS"] == 1
cases["decode_split"], cases["decode_combine"] = L.decode_launches(
    P, P, P, P, 2 * P, 3 * P, 1, 64, 8, 4096, 128, None, "bfloat16", split, 4096)
(cases["decode_direct_masked"],) = L.decode_launches(
    P, P, P, P, 0, 0, 128, 32, 8, 1000, 64, 0.1, "float32", direct, 1000, mask_ptr=P,
    mask_strides=(1000, 0, 0, 1))
out = {}
for name, launch in cases.items():
    compiled = launch.compile(GPUTarget("cuda", 90, 32))
    ptx = compiled.asm["ptx"]
    entry = ptx[ptx.index(".entry"):]
    entry = entry[: entry.index(")")]
    out[name] = [entry.count(".param"), len(launch.c_args()), compiled.metadata.num_warps,
                 launch.num_warps]
print(json.dumps(out))
"""


def _compiled_run(script: str) -> dict:
    """Run `script` in a subprocess that compiles for real (no interpreter); its last stdout line
    is JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_launch_arguments_match_compiled_entry_points():
    result = _compiled_run(_COMPILE_SCRIPT)
    assert len(result) == 12
    for name, (n_params, n_args, warps_compiled, warps_launch) in result.items():
        assert n_params == n_args, f"{name}: cubin takes {n_params} params, we pass {n_args}"
        assert warps_compiled == warps_launch, name


def _gpu_ready():
    try:
        import torch
        from cuda.bindings import driver  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU, torch and cuda-python")
def test_launch_on_raw_pointers_matches_reference():
    import torch

    from fusegraph.kernels import launch, reference

    stream = torch.cuda.current_stream().cuda_stream
    rng = np.random.default_rng(0)
    dev = lambda a: torch.from_numpy(a).cuda()  # noqa: E731

    x = rng.standard_normal((37, 300)).astype(np.float16)
    g = rng.standard_normal(300).astype(np.float16)
    y = torch.full(x.shape, float("nan"), dtype=torch.float16, device="cuda")
    xt, gt = dev(x), dev(g)
    launch.launch_rms_norm(xt.data_ptr(), gt.data_ptr(), y.data_ptr(), 37, 300, 1e-6,
                           "float16", stream)
    torch.cuda.synchronize()
    ref = reference.rms_norm(x, g, 1e-6, compute_dtype=np.float64)
    assert np.linalg.norm(y.double().cpu().numpy() - ref) / np.linalg.norm(ref) < 2e-3

    q = rng.standard_normal((1, 4, 65, 64)).astype(np.float16)
    k, v = (rng.standard_normal((1, 2, 65, 64)).astype(np.float16) for _ in range(2))
    qt, kt, vt = dev(q), dev(k), dev(v)
    o = torch.full(q.shape, float("nan"), dtype=torch.float16, device="cuda")
    launch.launch_attention(qt.data_ptr(), kt.data_ptr(), vt.data_ptr(), o.data_ptr(),
                            1, 4, 2, 65, 65, 64, None, True, "float16", stream)
    torch.cuda.synchronize()
    ref = reference.attention(q, k, v, is_causal=True, compute_dtype=np.float64)
    assert np.linalg.norm(o.double().cpu().numpy() - ref) / np.linalg.norm(ref) < 2e-3

    # one query token: the split-KV decode kernels, GQA 8:1, padding mask over the keys
    q = rng.standard_normal((2, 16, 1, 64)).astype(np.float16)
    k, v = (rng.standard_normal((2, 2, 3000, 64)).astype(np.float16) for _ in range(2))
    pad = np.zeros((2, 1, 1, 3000), np.float16)
    pad[1, ..., 1000:] = -np.inf
    qt, kt, vt, mt = dev(q), dev(k), dev(v), dev(pad)
    o = torch.full(q.shape, float("nan"), dtype=torch.float16, device="cuda")
    launch.launch_attention(qt.data_ptr(), kt.data_ptr(), vt.data_ptr(), o.data_ptr(),
                            2, 16, 2, 1, 3000, 64, None, False, "float16", stream,
                            mask_ptr=mt.data_ptr(), mask_strides=(3000, 0, 0, 1))
    torch.cuda.synchronize()
    ref = reference.attention(q, k, v, pad, compute_dtype=np.float64)
    assert np.linalg.norm(o.double().cpu().numpy() - ref) / np.linalg.norm(ref) < 2e-3


# Shared memory (issue 6 round 2: fp32 SwiGLU failed on the H100 with
# CUDA_ERROR_INVALID_VALUE).  The launcher did opt in above 48 KB, but the fp32 GLU tile
# needed 288 KB, above the 227 KB an sm_90 block may opt in to, so cuFuncSetAttribute
# refused it.  This drives `run` against a fake driver (no GPU): what it loads, the
# attribute it sets and the shared bytes it launches with, for an H100-sized limit and a
# smaller one (e.g. sm_86, 99 KB) where the launcher must drop pipeline stages.
_SHARED_SCRIPT = r"""
import json, types
from triton.backends.compiler import GPUTarget
from fusegraph.kernels import launch as L, gemm_epilogue as G

class Fake:
    CUresult = types.SimpleNamespace(CUDA_SUCCESS=0)
    CUfunction_attribute = types.SimpleNamespace(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES="MAXDYN")
    CUdevice_attribute = types.SimpleNamespace(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR="MAJ",
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR="MIN",
        CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN="OPTIN")
    class CUstream(int):
        pass
    def __init__(self, optin):
        self.optin, self.calls = optin, []
    def cuGetErrorString(self, err): return 0, b"fake error"
    def cuInit(self, flags): return (0,)
    def cuCtxGetCurrent(self): return 0, 1
    def cuCtxGetDevice(self): return 0, 0
    def cuDeviceGetAttribute(self, attr, dev): return 0, {"MAJ": 9, "MIN": 0, "OPTIN": self.optin}[attr]
    def cuModuleLoadData(self, cubin): return 0, "module"
    def cuModuleGetFunction(self, module, name): return 0, "func"
    def cuFuncSetAttribute(self, func, attr, value):
        self.calls.append(["set", attr, value])
        return (1 if value > self.optin else 0,)   # the real driver: INVALID_VALUE
    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        self.calls.append(["launch", shared])
        return (0,)

def clear():
    for fn in (L._load, L._target, L._max_shared, L.decode_plan):
        fn.cache_clear()
    L._PREPARED.clear()
    L._LAST.clear()
    L._WORKSPACES.clear()

P = 4096
out = {}
for optin in (232448, 101376):  # H100/H200 opt-in limit; sm_86's
    fake = Fake(optin)
    L._driver = lambda: fake
    clear()
    L.launch_swiglu(P, P, P, 0, 0, P, 111, 96, 64, "Silu", "float32", 0)    # check_plugins_gpu case
    L.launch_rms_norm(P, P, P, 37, 300, 1e-6, "float16", 0)                  # small shared
    L.launch_attention(P, P, P, P, 1, 2, 2, 300, 300, 128, None, True, "float32", 0)
    out[optin] = fake.calls
# the old fp32 GLU tile (fp16-sized config) fits only after dropping stages
old = L.gemm_launch(P, P, P, 0, 0, P, 1111, 96, 64, "Silu", "bfloat16")  # M > 128: large tiles
old_fp32 = L.KernelLaunch(old.kernel, tuple((n, "*fp32" if t.startswith("*") else t, v)
                          for n, t, v in old.args), old.constexprs, old.grid, old.num_warps,
                          old.num_stages)
t = GPUTarget("cuda", 90, 32)
c3 = old_fp32.compile(t)
c, stages = L.compile_fitting(old_fp32, t, 232448)
try:
    L.compile_fitting(old_fp32, t, 1000)
    raised = False
except RuntimeError:
    raised = True
out["old"] = [c3.metadata.shared, c.metadata.shared, stages, raised]
print(json.dumps(out))
"""


def test_launcher_shared_memory_opt_in_and_fit():
    result = _compiled_run(_SHARED_SCRIPT)
    for optin in ("232448", "101376"):
        calls = result[optin]
        launches = [c[1] for c in calls if c[0] == "launch"]
        sets = [c[2] for c in calls if c[0] == "set"]
        assert len(launches) == 3, calls
        # every launch fits the device, and each one above 48 KB opted in with its exact size
        assert all(s <= int(optin) for s in launches), calls
        assert sorted(sets) == sorted(s for s in launches if s > 48 * 1024), calls
        assert launches[1] <= 48 * 1024  # the small norm needs no opt-in
        assert launches[0] > 48 * 1024 and launches[2] > 48 * 1024  # fp32 GLU, fp32 attention
        assert all(c[1] == "MAXDYN" for c in calls if c[0] == "set")
    # on the 99 KB device the fp32 GLU ran with fewer stages, so less shared memory
    first_launch = {o: next(c[1] for c in result[o] if c[0] == "launch") for o in ("232448", "101376")}
    assert first_launch["101376"] < first_launch["232448"]
    old3, fitted, stages, raised = result["old"]
    assert old3 > 232448  # the round-1 fp32 GLU tile: what the H100 refused
    assert fitted <= 232448 and stages < 3
    assert raised  # nothing fits 1000 bytes: a clear error, not a driver failure


# The cached launch path (issue 14: 78.5 us per call when every call rebuilt the launch).
# Against a fake driver: a repeated launch compiles and loads once and writes each call's
# own pointers into the kept argument buffer (read back here from the params array the
# driver receives); a change the compiled code depends on (alignment, in-place aliasing)
# gets its own entry; a decode step with several splits launches split + combine with its
# partials and (max, denominator) pairs in one workspace allocated once per stream.
_CACHE_SCRIPT = r"""
import ctypes, json, types

from fusegraph.kernels import launch as L, decode_attention as D

LEADING_POINTERS = {"norm_kernel": 6, "rope_kernel": 4, "decode_split_kernel": 7,
                    "decode_combine_kernel": 3}

class Fake:
    CUresult = types.SimpleNamespace(CUDA_SUCCESS=0)
    CUfunction_attribute = types.SimpleNamespace(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES="MAXDYN")
    CUdevice_attribute = types.SimpleNamespace(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR="MAJ",
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR="MIN",
        CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN="OPTIN",
        CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT="SMS")
    class CUstream(int):
        pass
    def __init__(self):
        self.loads, self.launches, self.allocs, self.frees = [], [], [], []
    def cuGetErrorString(self, err): return 0, b"fake error"
    def cuInit(self, flags): return (0,)
    def cuCtxGetCurrent(self): return 0, 7
    def cuCtxGetDevice(self): return 0, 0
    def cuDeviceGetAttribute(self, attr, dev):
        return 0, {"MAJ": 9, "MIN": 0, "OPTIN": 232448, "SMS": 132}[attr]
    def cuModuleLoadData(self, cubin):
        self.loads.append(1)
        return 0, "module"
    def cuModuleGetFunction(self, module, name):
        return 0, name.decode().split("_0d")[0]
    def cuFuncSetAttribute(self, func, attr, value): return (0,)
    def cuMemAlloc(self, size):
        self.allocs.append(size)
        return 0, 1 << 40
    def cuStreamSynchronize(self, stream):
        self.frees.append(["sync", int(stream)])
        return (0,)
    def cuMemFree(self, ptr):
        self.frees.append(["free", ptr])
        return (0,)
    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        name = next(n for n in LEADING_POINTERS if f.startswith(n))
        slots = (ctypes.c_void_p * LEADING_POINTERS[name]).from_address(params)
        ptrs = [ctypes.c_uint64.from_address(a).value for a in slots]
        self.launches.append([name, [gx, gy, gz], bx, int(stream), ptrs])
        return (0,)

fake = Fake()
L._driver = lambda: fake
out = {}
A, B, G, Y = 1 << 20, 2 << 20, 3 << 20, 4 << 20
L.launch_rms_norm(A, G, Y, 64, 4096, 1e-6, "bfloat16", 5)
L.launch_rms_norm(B, G + 4096, Y + 8192, 64, 4096, 1e-6, "bfloat16", 6)
L.launch_rms_norm(B + 2, G, Y, 64, 4096, 1e-6, "bfloat16", 6)    # unaligned X: new compile
out["norm"] = [len(fake.loads), fake.launches[:]]
fake.loads.clear(); fake.launches.clear()
L.launch_rotary_embedding(A, G, G + 512, A, 1, 2, 8, 64, 0, False, "float16", 0)  # in place
L.launch_rotary_embedding(A, G, G + 512, B, 1, 2, 8, 64, 0, False, "float16", 0)  # out of place
L.launch_rotary_embedding(B, G, G + 512, B, 1, 2, 8, 64, 0, False, "float16", 0)  # in place
L.launch_rotary_embedding(B, G, G + 512, B, 1, 2, 8, 64, 0, False, "float16", 0)  # same call
L.launch_rotary_embedding(A, G, G + 512, B, 1, 2, 8, 64, 0, False, "float16", 0)  # out of place
out["rope"] = [len(fake.loads), fake.launches[:]]
fake.loads.clear(); fake.launches.clear()
for o in (Y, Y + 65536):
    L.launch_attention(A, B, B + (1 << 19), o, 1, 64, 8, 1, 4096, 128, None, False, "bfloat16", 3)
L.launch_attention(A, B, B + (1 << 19), Y, 128, 32, 8, 1, 1000, 64, None, False, "bfloat16", 3)
cfg, seen, (n_part, n_ml) = L.decode_plan(7, 1, 8, 8, 4096, 128, False, "bfloat16")
out["decode"] = [len(fake.loads), fake.launches[:], fake.allocs[:], fake.frees[:], cfg, n_part, n_ml]
L.launch_attention(A, B, B + (1 << 19), Y, 64, 64, 8, 1, 4096, 128, None, False, "bfloat16", 3)
L.launch_attention(A, B, B + (1 << 19), Y, 64, 64, 8, 1, 4096, 128, None, False, "bfloat16", 9)
out["grow"] = [fake.allocs[:], fake.frees[:]]
fake.launches.clear()
W = 5 << 20  # a caller's workspace (a TensorRT plugin's): used when it holds the partials
for size in (1 << 30, 16):
    L.launch_attention(A, B, B + (1 << 19), Y, 1, 64, 8, 1, 4096, 128, None, False, "bfloat16", 3,
                       workspace=(W, size))
out["given"] = [fake.launches[:], len(fake.allocs)]
print(json.dumps(out))
"""


def test_cached_launches_reuse_compiles_and_write_each_calls_pointers():
    result = _compiled_run(_CACHE_SCRIPT)
    A, B, G, Y = 1 << 20, 2 << 20, 3 << 20, 4 << 20
    loads, launches = result["norm"]
    assert loads == 2  # the unaligned X needs its own compile (no 16-byte hint)
    assert [launch[4] for launch in launches] == [
        [A, A, G, G, Y, Y],                      # absent R/beta/S passed as X/gamma/Y
        [B, B, G + 4096, G + 4096, Y + 8192, Y + 8192],
        [B + 2, B + 2, G, G, Y, Y]]
    assert [launch[3] for launch in launches] == [5, 6, 6]

    loads, launches = result["rope"]
    assert loads == 2  # in place and out of place compile differently; each once
    assert [launch[4] for launch in launches] == [[A, G, G + 512, A], [A, G, G + 512, B],
                                                  [B, G, G + 512, B], [B, G, G + 512, B],
                                                  [A, G, G + 512, B]]

    loads, launches, allocs, frees, cfg, n_part, n_ml = result["decode"]
    names = [launch[0] for launch in launches]
    assert names == ["decode_split_kernel", "decode_combine_kernel"] * 2 + ["decode_split_kernel"]
    assert loads == 3  # split + combine once for the 4k cache; the one-split batch-128 step
    splits = cfg["SPLITS"]
    assert splits > 1 and n_part == 64 * splits * 128 and n_ml == 64 * splits * 2
    assert len(allocs) == 1 and allocs[0] >= 4 * (n_part + n_ml) and not frees
    ws = 1 << 40
    for i, o in enumerate((Y, Y + 65536)):
        split, combine = launches[2 * i], launches[2 * i + 1]
        assert split[1] == [splits, 8, 1] and combine[1] == [64, 1, 1]
        assert split[4] == [A, B, B + (1 << 19), A, ws, ws + 4 * n_part, o]  # no mask: Q
        assert combine[4] == [ws, ws + 4 * n_part, o]
    allocs, frees = result["grow"]
    # batch 64 needs more partials than batch 1: the stream-3 buffer grows once, after the
    # stream's queued work; stream 9 gets its own buffer
    assert len(allocs) == 3 and allocs[1] > allocs[0] and frees == [["sync", 3], ["free", ws]]
    direct = launches[4]
    assert direct[1] == [1, 128 * 8, 1] and direct[4][6] == Y  # writes O itself
    given, n_allocs = result["given"]
    W = 5 << 20
    assert given[0][4][4:6] == [W, W + 4 * n_part] and given[1][4][:2] == [W, W + 4 * n_part]
    assert given[2][4][4:6] == [ws, ws + 4 * n_part]  # 16 bytes hold nothing: its own buffer
    assert n_allocs == 3  # and no allocation for either call
