"""Correctness and speed of the fusegraph Triton kernels on an NVIDIA GPU, in one run.

    python benchmarks/bench_kernels.py [--out DIR] [--quick]

For each fused op: random inputs, outputs poisoned with NaN, relative error
||out - ref|| / ||ref|| against a float32 (or float64) torch reference; then median time
over device events (triton.testing.do_bench, which also flushes L2 between runs) for the
fused kernel, torch's own fused op where one exists, and the unfused op-by-op sequence
the rewrite pattern replaces.  The two ceilings (one 8192^3 bf16 matmul, one large
device-to-device copy) are measured in the same run and every figure is reported as a
fraction of them.  Then each op is launched once through the torch-free cuda-python path
(kernels/launch.py) and checked.  Results: a table on stdout and results.json in --out.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from fusegraph.kernels import attention, decode_attention, entry, gemm_epilogue, launch, norms, rope

DEV = "cuda"
BF16 = torch.bfloat16
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-3}
SWEEP = True  # tile sweeps of decode, short-row norms, 7B-shape GEMMs (--no-sweep: off)
ROWS: list[dict] = []
CHECKS: list[dict] = []


def bench(fn) -> float:
    """Median milliseconds of ``fn`` over device events, after warm-up."""
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def check(name, out, ref, dtype):
    err = rel_err(out, ref)
    ok = err < TOL[dtype]
    CHECKS.append({"name": name, "rel_err": err, "tol": TOL[dtype], "ok": ok})
    print(f"  check {name:55s} rel_err {err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    return ok


def poison(t):
    return t.fill_(float("nan"))


def row(op, shape, impl, ms, flops=None, nbytes=None, ceil=None):
    r = {"op": op, "shape": shape, "impl": impl, "ms": ms}
    if flops:
        r["tflops"] = flops / ms / 1e9
        r["frac"] = r["tflops"] / ceil["tflops"]
    if nbytes:
        r["gbs"] = nbytes / ms / 1e6
        r["frac"] = r["gbs"] / ceil["gbs"]
    ROWS.append(r)
    perf = f"{r['tflops']:7.1f} TFLOP/s" if flops else f"{r['gbs']:7.0f} GB/s"
    print(f"  {op:14s} {shape:30s} {impl:34s} {ms:8.3f} ms {perf}  {r['frac']:.2f} of ceiling",
          flush=True)
    return ms


def ceilings() -> dict:
    a = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    b = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    ms = bench(lambda: a @ b)
    src = torch.randn(2 * 1024**3 // 4, device=DEV)  # 2 GiB
    dst = torch.empty_like(src)
    ms_copy = bench(lambda: dst.copy_(src))
    c = {"tflops": 2 * 8192**3 / ms / 1e9, "gbs": 2 * src.numel() * 4 / ms_copy / 1e6,
         "matmul_ms": ms, "copy_ms": ms_copy}
    print(f"ceilings: bf16 matmul 8192^3 {c['tflops']:.0f} TFLOP/s, "
          f"d2d copy {c['gbs']:.0f} GB/s (read+write)", flush=True)
    return c


# --- attention -----------------------------------------------------------------------------

def ref_attention(q, k, v, mask=None, causal=False):
    """float32 math reference (GQA by repeat); fully -inf rows are 0 as the op defines."""
    g = q.shape[1] // k.shape[1]
    qf, kf, vf = q.float(), k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s + mask.float()
    if causal:
        sq, sk = s.shape[-2:]
        s = s.masked_fill(torch.ones(sq, sk, device=DEV, dtype=torch.bool).triu(1), float("-inf"))
    return torch.nan_to_num(torch.softmax(s, -1), nan=0.0) @ vf


def unfused_attention(q, k, v, causal, causal_mask):
    """The op-by-op graph the Attention pattern replaces: MatMul, Mul, Add mask, Softmax, MatMul."""
    s = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]))
    if causal:
        s = s + causal_mask
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


ATTN_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
]


def sdpa_backends():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return {name: (lambda b=b: sdpa_kernel(b)) for name, b in
            (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION))}


def bench_attention(ceil, quick):
    for d in ((128,) if quick else (128, 64)):
        attention_at(ceil, quick, d)


def attention_at(ceil, quick, d):
    heads = 16
    print(f"attention (bf16, D={d}, B*S=16k tokens, {heads} heads)", flush=True)
    seqs = [4096] if quick else [1024, 2048, 4096, 8192, 16384]
    # correctness first: ragged lengths, GQA 4:1, additive mask with fully masked rows
    q = torch.randn(2, 8, 1000, d, device=DEV, dtype=BF16)
    k, v = (torch.randn(2, 2, 1037, d, device=DEV, dtype=BF16) for _ in range(2))
    mask = torch.randn(2, 1, 1000, 1037, device=DEV, dtype=BF16)
    mask[:, :, 5] = float("-inf")
    for causal in (False, True):
        for m in (None, mask):
            o = poison(torch.empty_like(q))
            attention.attention(q, k, v, m, is_causal=causal, out=o)
            check(f"attention gqa4 ragged causal={causal} mask={m is not None}", o,
                  ref_attention(q, k, v, m, causal), BF16)
    best_cfg = {}
    for causal in (False, True):
        # tile sweep at 4k: the winner is used for every length
        s = 4096
        b = 16384 // s
        q, k, v = (torch.randn(b, heads, s, d, device=DEV, dtype=BF16) for _ in range(3))
        times = []
        for cfg in ATTN_CONFIGS:
            try:
                cfg = dict(cfg, BLOCK_D=d)
                times.append((bench(lambda: attention.attention(q, k, v, is_causal=causal,
                                                                config=cfg)), cfg))
            except Exception as exc:  # e.g. out of shared memory for a tile
                print(f"  config {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
        times.sort(key=lambda t: t[0])
        flops = 4 * b * heads * s * s * d / (2 if causal else 1)
        for ms, cfg in times:
            print(f"    sweep causal={causal} {cfg}: {ms:.3f} ms "
                  f"{flops / ms / 1e9:.0f} TFLOP/s", flush=True)
        best_cfg[causal] = times[0][1]
    for s in seqs:
        b = 16384 // s
        q, k, v = (torch.randn(b, heads, s, d, device=DEV, dtype=BF16) for _ in range(3))
        for causal in (False, True):
            shape = f"B{b} H{heads} S{s} D{d} {'causal' if causal else 'full'}"
            flops = 4 * b * heads * s * s * d / (2 if causal else 1)
            o = poison(torch.empty_like(q))
            cfg = best_cfg[causal]
            attention.attention(q, k, v, is_causal=causal, config=cfg, out=o)
            check(f"attention {shape}", o, ref_attention(q, k, v, None, causal), BF16)
            row("attention", shape, f"fused triton {cfg['BLOCK_M']}x{cfg['BLOCK_N']}"
                f"w{cfg['num_warps']}s{cfg['num_stages']}",
                bench(lambda: attention.attention(q, k, v, is_causal=causal, config=cfg, out=o)),
                flops=flops, ceil=ceil)
            row("attention", shape, "fused triton default config",
                bench(lambda: attention.attention(q, k, v, is_causal=causal, out=o)),
                flops=flops, ceil=ceil)
            for name, ctx in sdpa_backends().items():
                try:
                    with ctx():
                        F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                    row("attention", shape, f"torch sdpa {name}", ms, flops=flops, ceil=ceil)
                except Exception as exc:
                    print(f"  sdpa {name} unavailable: {type(exc).__name__}: {str(exc)[:100]}")
            if s <= 4096:
                cm = torch.full((s, s), float("-inf"), device=DEV, dtype=BF16).triu(1)
                row("attention", shape, "unfused op-by-op",
                    bench(lambda: unfused_attention(q, k, v, causal, cm)), flops=flops, ceil=ceil)
        torch.cuda.empty_cache()


# --- decode attention (one query token vs a KV cache) -------------------------------------------

DECODE_GQA = ((32, 4), (32, 8))  # (query heads, kv heads): 8:1 and 4:1
DECODE_SHAPES = ((1, 1024), (1, 16384), (1, 131072), (8, 4096), (8, 32768), (8, 131072),
                 (16, 131072), (64, 1024), (64, 8192), (64, 32768))
DECODE_SWEEP_SHAPES = ((1, 32, 4, 16384), (1, 32, 4, 131072), (8, 32, 8, 32768), (64, 32, 8, 4096))


def decode_sweep_configs():
    return [{"BLOCK_N": n, "num_warps": w, "num_stages": st, "programs_per_sm": pps}
            for n in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4) for pps in (1, 2, 4)]


def sdpa_decode_rows(op, shape, q, k, v, nbytes, ceil):
    """torch SDPA with enable_gqa under each backend that takes it (and the default choice)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    best = float("inf")
    for name, backend in (("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            if backend is None:
                fn()
                ms = bench(fn)
            else:
                with sdpa_kernel(backend):
                    fn()
                    ms = bench(fn)
        except Exception as exc:
            print(f"  sdpa {name} unavailable: {type(exc).__name__}: {str(exc)[:100]}")
            continue
        best = min(best, row(op, shape, f"torch sdpa {name} (enable_gqa)", ms, nbytes=nbytes,
                             ceil=ceil))
    return best


def _decode_case(b, hq, hkv, sk, d):
    """One decode shape: Q, K, V, a poisoned output, its label, the K/V bytes, enough K/V copies
    to pass 256 MiB (L2-cold graph replays) and torch SDPA's answer."""
    q = torch.randn(b, hq, 1, d, device=DEV, dtype=BF16)
    k, v = (torch.randn(b, hkv, sk, d, device=DEV, dtype=BF16) for _ in range(2))
    o = poison(torch.empty_like(q))
    nbytes = 2 * k.numel() * k.element_size()
    copies = max(1, min(32, -(-256 * 2**20 // nbytes)))
    kvs = [(k, v)] + [(k.clone(), v.clone()) for _ in range(copies - 1)]
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).float()
    return q, k, v, o, f"B{b} {hq}:{hkv} Sk{sk}", nbytes, kvs, want


def bench_decode(ceil, quick):
    print("decode attention (bf16, D=128, one query token; GB/s over the K/V read)", flush=True)
    d = 128
    # correctness: ragged caches, GQA 8:1 and 4:1, padding mask, causal, one split and many
    for b, hq, hkv, sk, dd in ((3, 32, 4, 5000, 128), (2, 32, 8, 777, 64), (64, 32, 8, 1000, 128),
                               (1, 8, 8, 100003, 128)):
        q = torch.randn(b, hq, 1, dd, device=DEV, dtype=BF16)
        k, v = (torch.randn(b, hkv, sk, dd, device=DEV, dtype=BF16) for _ in range(2))
        pad = torch.zeros(b, 1, 1, sk, device=DEV, dtype=BF16)
        pad[0, ..., sk // 3:] = float("-inf")
        for causal, m in ((False, None), (False, pad), (True, None)):
            o = poison(torch.empty_like(q))
            entry.attention(q, k, v, m, is_causal=causal, out=o)
            check(f"decode B{b} {hq}:{hkv} Sk{sk} D{dd} causal={causal} mask={m is not None}", o,
                  ref_attention(q, k, v, m, causal), BF16)
    # sweep (tiles, warps, stages, split programs per SM) on four caches
    times = {}
    for b, hq, hkv, sk in (DECODE_SWEEP_SHAPES if SWEEP else []):
        q = torch.randn(b, hq, 1, d, device=DEV, dtype=BF16)
        k, v = (torch.randn(b, hkv, sk, d, device=DEV, dtype=BF16) for _ in range(2))
        o = torch.empty_like(q)
        for i, cfg in enumerate(decode_sweep_configs()):
            try:
                times[(b, hq, hkv, sk, i)] = bench(
                    lambda: decode_attention.decode_attention(q, k, v, config=cfg, out=o))
            except Exception as exc:
                print(f"  decode config {cfg} failed: {type(exc).__name__}: {str(exc)[:100]}")
        del q, k, v
        torch.cuda.empty_cache()
    best_cfg = None
    if times:
        shapes = DECODE_SWEEP_SHAPES
        per_shape = {sh: min(t for key, t in times.items() if key[:4] == sh) for sh in shapes}
        scores = []
        for i, cfg in enumerate(decode_sweep_configs()):
            if all(sh + (i,) in times for sh in shapes):
                worst = max(times[sh + (i,)] / per_shape[sh] for sh in shapes)
                scores.append((worst, i, cfg))
        scores.sort(key=lambda t: t[0])
        for worst, i, cfg in scores[:10]:
            detail = " ".join(f"{times[sh + (i,)] * 1e3:.1f}" for sh in shapes)
            print(f"    sweep decode {cfg}: worst {worst:.3f}x of per-shape best; us {detail}",
                  flush=True)
        best_cfg = scores[0][2]
        print(f"  decode per-shape best us: {[round(per_shape[sh] * 1e3, 1) for sh in shapes]}")
    for hq, hkv in DECODE_GQA:
        for b, sk in (DECODE_SHAPES[:4] if quick else DECODE_SHAPES):
            q, k, v, o, shape, nbytes, kvs, want = _decode_case(b, hq, hkv, sk, d)
            entry.attention(q, k, v, out=o)
            check(f"decode {shape} vs torch sdpa", o, want, BF16)
            fused = row("decode", shape, "fused triton split-KV (torch entry, cached launcher)",
                        bench(lambda: entry.attention(q, k, v, out=o)), nbytes=nbytes, ceil=ceil)
            if best_cfg is not None:
                row("decode", shape, "fused triton split-KV (JIT launch, best of sweep)",
                    bench(lambda: decode_attention.decode_attention(q, k, v, config=best_cfg, out=o)),
                    nbytes=nbytes, ceil=ceil)
            if sk <= 16384 and SWEEP:
                row("decode", shape, "fused triton prefill kernel (Sq=1)",
                    bench(lambda: entry.attention(q, k, v, out=o, config=attention.attention_config(
                        d, 1, False))), nbytes=nbytes, ceil=ceil)
            torch_best = sdpa_decode_rows("decode", shape, q, k, v, nbytes, ceil)
            # device time alone: CUDA graphs of calls over rotating K/V copies (L2-cold)
            g_fused = graph_ms([lambda kk=kk, vv=vv: entry.attention(q, kk, vv, out=o)
                                for kk, vv in kvs])
            g_torch = graph_ms([lambda kk=kk, vv=vv: F.scaled_dot_product_attention(
                q, kk, vv, enable_gqa=True) for kk, vv in kvs])
            row("decode", shape, "fused triton split-KV, CUDA graph (device time)", g_fused,
                nbytes=nbytes, ceil=ceil)
            row("decode", shape, "torch sdpa default, CUDA graph (device time)", g_torch,
                nbytes=nbytes, ceil=ceil)
            DECODE_RATIOS.append({"shape": shape, "host_incl": torch_best / fused,
                                  "device": g_torch / g_fused})
            print(f"    decode {shape}: fused {torch_best / fused:.2f}x best torch sdpa "
                  f"(host incl.), {g_torch / g_fused:.2f}x sdpa default (CUDA graph)", flush=True)
            del q, k, v, kvs
            torch.cuda.empty_cache()


DECODE_RATIOS: list = []
DECODE_SMALL_SHAPES = ((64, 32, 4, 1024), (64, 32, 8, 1024), (8, 32, 4, 4096), (1, 32, 4, 16384),
                       (1, 32, 8, 1024))


def bench_decode_splits(ceil, quick):
    """Split programs per SM (1, 2, 4) at the default tile on every decode shape, CUDA-graph
    device time over rotating K/V copies: which split rule the caches want."""
    print("decode attention, programs per SM on every shape (CUDA graph device time)", flush=True)
    d = 128
    for hq, hkv in DECODE_GQA:
        for b, sk in (DECODE_SHAPES[:4] if quick else DECODE_SHAPES):
            q, k, v, o, shape, nbytes, kvs, want = _decode_case(b, hq, hkv, sk, d)
            line = []
            for pps in (1, 2, 4):
                cfg = {"programs_per_sm": pps}
                poison(o)
                decode_attention.decode_attention(q, k, v, config=cfg, out=o)
                if check(f"decode {shape} {pps} programs per SM", o, want, BF16):
                    ms = row("decode", shape, f"fused triton {pps} programs per SM (CUDA graph)",
                             graph_ms([lambda kk=kk, vv=vv, cfg=cfg: decode_attention.decode_attention(
                                 q, kk, vv, config=cfg, out=o) for kk, vv in kvs]),
                             nbytes=nbytes, ceil=ceil)
                    line.append(f"{pps}/SM {ms * 1e3:.1f}")
            ms = row("decode", shape, "torch sdpa default (CUDA graph)", graph_ms(
                [lambda kk=kk, vv=vv: F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)
                 for kk, vv in kvs]), nbytes=nbytes, ceil=ceil)
            print(f"    splits {shape}: {', '.join(line)}, sdpa {ms * 1e3:.1f} us", flush=True)
            del q, k, v, kvs
            torch.cuda.empty_cache()


def bench_decode_small(ceil, quick):
    """Small batch or short cache, where the split count and tile decide (device time,
    CUDA graphs over rotating K/V copies): split programs per SM x BLOCK_N x stages."""
    print("decode attention, split/tile sweep on short caches (CUDA graph device time)", flush=True)
    d = 128
    configs = [{"BLOCK_N": n, "num_warps": 4, "num_stages": st, "programs_per_sm": pps}
               for n in (32, 64) for st in (3, 4) for pps in (1, 2, 4, 8)]
    for b, hq, hkv, sk in DECODE_SMALL_SHAPES:
        q, k, v, o, shape, nbytes, kvs, want = _decode_case(b, hq, hkv, sk, d)
        results = []
        for cfg in configs:
            poison(o)
            decode_attention.decode_attention(q, k, v, config=cfg, out=o)
            if not check(f"decode {shape} {cfg}", o, want, BF16):
                continue
            results.append((graph_ms([lambda kk=kk, vv=vv, cfg=cfg: decode_attention.decode_attention(
                q, kk, vv, config=cfg, out=o) for kk, vv in kvs]), cfg))
        results.sort(key=lambda t: t[0])
        for ms, cfg in results[:6]:
            print(f"    sweep decode {shape} {cfg}: {ms * 1e3:.1f} us", flush=True)
        row("decode", shape, "fused triton default (CUDA graph)", graph_ms(
            [lambda kk=kk, vv=vv: entry.attention(q, kk, vv, out=o) for kk, vv in kvs]),
            nbytes=nbytes, ceil=ceil)
        row("decode", shape, f"fused triton best of sweep {results[0][1]} (CUDA graph)",
            results[0][0], nbytes=nbytes, ceil=ceil)
        row("decode", shape, "torch sdpa default (CUDA graph)", graph_ms(
            [lambda kk=kk, vv=vv: F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)
             for kk, vv in kvs]), nbytes=nbytes, ceil=ceil)
        del q, k, v, kvs
        torch.cuda.empty_cache()


def graph_ms(fns, reps=10) -> float:
    """Median milliseconds per call of a CUDA graph that runs each of ``fns`` in turn
    (device time: no host launch cost), warmed up and captured on one side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for fn in fns:
                fn()
        graph.replay()
        stream.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            graph.replay()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / len(fns))
    torch.cuda.current_stream().wait_stream(stream)
    return sorted(times)[len(times) // 2]


# --- GEMM + epilogue -------------------------------------------------------------------------

TORCH_ACTS = {"none": lambda y: y, "Relu": F.relu, "Gelu": F.gelu,
              "GeluTanh": lambda y: F.gelu(y, approximate="tanh"), "Sigmoid": torch.sigmoid,
              "Tanh": torch.tanh, "Silu": F.silu}

GEMM_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
]


def sweep(label, fn, configs, flops):
    times = []
    for cfg in configs:
        try:
            times.append((bench(lambda: fn(cfg)), cfg))
        except Exception as exc:
            print(f"  config {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
    times.sort(key=lambda t: t[0])
    for ms, cfg in times:
        print(f"    sweep {label} {cfg}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
    return times[0][1]


def bench_gemm(ceil, quick):
    print("GEMM + bias + activation (bf16)", flush=True)
    # correctness at ragged sizes, every activation
    x = torch.randn(1000, 777, device=DEV, dtype=BF16)
    w = torch.randn(777, 1234, device=DEV, dtype=BF16) / 28
    bias = torch.randn(1234, device=DEV, dtype=BF16)
    for act, fn in TORCH_ACTS.items():
        y = poison(torch.empty(1000, 1234, device=DEV, dtype=BF16))
        gemm_epilogue.matmul_bias_act(x, w, bias, act, out=y)
        check(f"matmul_bias_act ragged {act}", y, fn(x.float() @ w.float() + bias.float()), BF16)
    m = n = k = 8192
    shape = f"M{m} N{n} K{k}"
    x = torch.randn(m, k, device=DEV, dtype=BF16)
    w = torch.randn(k, n, device=DEV, dtype=BF16) / 90
    bias = torch.randn(n, device=DEV, dtype=BF16)
    y = torch.empty(m, n, device=DEV, dtype=BF16)
    flops = 2 * m * n * k
    cfg = sweep("gemm Gelu", lambda c: gemm_epilogue.matmul_bias_act(x, w, bias, "Gelu", config=c,
                                                                     out=y),
                GEMM_CONFIGS[:2] if quick else GEMM_CONFIGS, flops)
    row("matmul", shape, "torch.matmul alone", bench(lambda: x @ w), flops=flops, ceil=ceil)
    for act in (["Gelu"] if quick else list(TORCH_ACTS)):
        poison(y)
        gemm_epilogue.matmul_bias_act(x, w, bias, act, config=cfg, out=y)
        check(f"matmul_bias_act {shape} {act}", y,
              TORCH_ACTS[act](x.float() @ w.float() + bias.float()), BF16)
        row("matmul+bias+act", f"{shape} {act}", "fused triton (swept tile)",
            bench(lambda: gemm_epilogue.matmul_bias_act(x, w, bias, act, config=cfg, out=y)),
            flops=flops, ceil=ceil)
        row("matmul+bias+act", f"{shape} {act}", "fused triton default config",
            bench(lambda: gemm_epilogue.matmul_bias_act(x, w, bias, act, out=y)),
            flops=flops, ceil=ceil)
        row("matmul+bias+act", f"{shape} {act}", "torch matmul, +bias, act (unfused)",
            bench(lambda: TORCH_ACTS[act](x @ w + bias)), flops=flops, ceil=ceil)
        row("matmul+bias+act", f"{shape} {act}", "torch addmm, act",
            bench(lambda: TORCH_ACTS[act](torch.addmm(bias, x, w))), flops=flops, ceil=ceil)
    torch.cuda.empty_cache()
    return cfg


SWIGLU_CONFIGS = [  # two-dot (128 x 128 twice; the default before issue 14's run F) and paired
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    *[{"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": bk, "GROUP_M": g, "num_warps": 8, "num_stages": st,
       "PAIRED": True} for bk, g, st in ((64, 16, 4), (64, 8, 4), (64, 32, 4), (64, 16, 3), (128, 16, 2))],
]


RAGGED_SWIGLU = (77, 1001, 300)
SWIGLU_SHAPES = ((8192, 14336, 4096), *[(m, 11008, 4096) for m in (1, 16, 128, 2048)])  # M, N, K


def cfg_name(cfg) -> str:
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}w{cfg['num_warps']}"
            f"s{cfg['num_stages']}g{cfg['GROUP_M']}{' paired' if cfg.get('PAIRED') else ''}")


def bench_swiglu(ceil, quick):
    """SwiGLU at the Llama MLP shape (M 8192) and at a 7B model's up projection for decode
    to prefill M; each fused variant and the torch sequences timed in interleaved rounds."""
    print("SwiGLU act(X Wg) * (X Wu) (bf16)", flush=True)
    m, n, k = RAGGED_SWIGLU
    x = torch.randn(m, k, device=DEV, dtype=BF16)
    wcat = torch.randn(k, 2 * n + 8, device=DEV, dtype=BF16) / 17
    wg, wu = wcat[:, :n], wcat[:, n:2 * n]  # one packed weight, as an exporter may leave it
    for cfg in (None, *SWIGLU_CONFIGS[:3]):
        y = poison(torch.empty(m, n, device=DEV, dtype=BF16))
        gemm_epilogue.swiglu(x, wg, wu, config=cfg, out=y)
        check(f"swiglu ragged {cfg and cfg_name(cfg)}", y,
              F.silu(x.float() @ wg.float()) * (x.float() @ wu.float()), BF16)
    best = None
    for m, n, k in SWIGLU_SHAPES:
        if quick and m not in (8192, 16):
            continue
        shape = f"M{m} N{n} K{k}"
        x = torch.randn(m, k, device=DEV, dtype=BF16)
        wg, wu = (torch.randn(k, n, device=DEV, dtype=BF16) / 64 for _ in range(2))
        wcat = torch.cat([wg, wu], 1)
        y = poison(torch.empty(m, n, device=DEV, dtype=BF16))
        flops, nbytes = 4 * m * n * k, (m * k + 2 * k * n + m * n) * 2
        perf = {"nbytes": nbytes} if m <= 16 else {"flops": flops}
        ref = F.silu(x.float() @ wg.float()) * (x.float() @ wu.float())
        configs = SWIGLU_CONFIGS if m > 128 else [
            dict(c, PAIRED=p) for c in (gemm_epilogue.gemm_config(m, n, k, True),) for p in (False, True)]
        fns = {"fused triton default config": lambda: gemm_epilogue.swiglu(x, wg, wu, out=y)}
        for cfg in configs:
            poison(y)
            try:
                gemm_epilogue.swiglu(x, wg, wu, config=cfg, out=y)
            except Exception as exc:
                print(f"  config {cfg_name(cfg)} failed: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            if check(f"swiglu {shape} {cfg_name(cfg)}", y, ref, BF16):
                fns[f"fused triton {cfg_name(cfg)}"] = (
                    lambda cfg=cfg: gemm_epilogue.swiglu(x, wg, wu, config=cfg, out=y))
        fns["torch matmul [K,2N] alone"] = lambda: x @ wcat
        fns["torch 2 matmuls, silu, mul (unfused)"] = lambda: F.silu(x @ wg) * (x @ wu)
        times = {name: [] for name in fns}
        for _ in range(2):  # interleaved rounds: the spread between them is the noise
            for name, fn in fns.items():
                times[name].append(bench(fn))
        for name, ts in times.items():
            row("swiglu", shape, name, min(ts), ceil=ceil, **perf)
            print(f"    rounds {name}: {', '.join(f'{t:.4f}' for t in ts)}", flush=True)
        if m <= 2048:  # device time without host launch cost
            for name in ("fused triton default config", "torch matmul [K,2N] alone",
                         "torch 2 matmuls, silu, mul (unfused)"):
                row("swiglu", shape, f"{name} (CUDA graph)", graph_ms([fns[name]] * 20),
                    ceil=ceil, **perf)
        if m == 8192:
            best = min((min(ts), name) for name, ts in times.items() if name.startswith("fused"))
        del x, wg, wu, wcat, y
        torch.cuda.empty_cache()
    return best


LLM_NK = ((4096, 4096), (12288, 4096), (11008, 4096), (4096, 11008))  # 7B: o/qkv/up/down
LLM_M = (1, 16, 128, 2048)
SMALL_M_CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "GROUP_M": 1, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 1, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
]


def bench_gemm_llm(ceil, quick):
    """MatMul + bias + Silu at a 7B model's (N, K) for decode-to-prefill M; memory-bound
    (weights) at small M, so GB/s over X, W, Y there."""
    print("GEMM + bias + Silu at 7B-model shapes (bf16)", flush=True)
    for n, k in (LLM_NK[:1] if quick else LLM_NK):
        w = torch.randn(k, n, device=DEV, dtype=BF16) / math.sqrt(k)
        bias = torch.randn(n, device=DEV, dtype=BF16)
        for m in LLM_M:
            x = torch.randn(m, k, device=DEV, dtype=BF16)
            y = poison(torch.empty(m, n, device=DEV, dtype=BF16))
            shape = f"M{m} N{n} K{k}"
            flops, nbytes = 2 * m * n * k, (m * k + k * n + m * n) * 2
            perf = {"nbytes": nbytes} if m <= 16 else {"flops": flops}
            gemm_epilogue.matmul_bias_act(x, w, bias, "Silu", out=y)
            check(f"matmul_bias_act {shape} Silu", y, F.silu(x.float() @ w.float() + bias.float()),
                  BF16)
            row("mm+bias+silu", shape, "fused triton default config",
                bench(lambda: gemm_epilogue.matmul_bias_act(x, w, bias, "Silu", out=y)),
                ceil=ceil, **perf)
            if SWEEP:
                configs = SMALL_M_CONFIGS if m <= 128 else GEMM_CONFIGS[:4]
                cfg = sweep(f"gemm {shape}", lambda c: gemm_epilogue.matmul_bias_act(
                    x, w, bias, "Silu", config=c, out=y), configs, flops)
                row("mm+bias+silu", shape, f"fused triton best of sweep {cfg['BLOCK_M']}x"
                    f"{cfg['BLOCK_N']}x{cfg['BLOCK_K']}w{cfg['num_warps']}s{cfg['num_stages']}",
                    bench(lambda: gemm_epilogue.matmul_bias_act(x, w, bias, "Silu", config=cfg,
                                                                out=y)), ceil=ceil, **perf)
            row("mm+bias+silu", shape, "torch addmm, silu",
                bench(lambda: F.silu(torch.addmm(bias, x, w))), ceil=ceil, **perf)
            row("mm+bias+silu", shape, "torch matmul alone", bench(lambda: x @ w), ceil=ceil, **perf)
            if m <= 128:  # 10-50 us kernels: device time without the host's launch noise
                row("mm+bias+silu", shape, "fused triton default config (CUDA graph)",
                    graph_ms([lambda: gemm_epilogue.matmul_bias_act(x, w, bias, "Silu", out=y)] * 20),
                    ceil=ceil, **perf)
                row("mm+bias+silu", shape, "torch addmm, silu (CUDA graph)",
                    graph_ms([lambda: F.silu(torch.addmm(bias, x, w))] * 20), ceil=ceil, **perf)
        del w
        torch.cuda.empty_cache()


def _tile(bm, bn, bk, w, st, g=1, **extra):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, num_warps=w, num_stages=st, **extra)


SMALL_M_DEVICE_CONFIGS = {  # tried in device time (the do_bench sweep above is host-bound)
    16: [_tile(16, 32, 256, 4, 4), _tile(16, 64, 128, 4, 4), _tile(16, 128, 128, 4, 4),
         _tile(16, 32, 128, 4, 6), _tile(16, 64, 256, 4, 3), _tile(16, 128, 64, 4, 6),
         _tile(16, 256, 64, 8, 4), _tile(16, 32, 256, 2, 4), _tile(16, 64, 128, 8, 4)],
    128: [_tile(64, 64, 128, 4, 4, 8), _tile(64, 128, 64, 4, 4, 8), _tile(128, 64, 64, 4, 4, 8),
          _tile(128, 128, 64, 8, 4, 8), _tile(64, 64, 64, 4, 5, 8), _tile(128, 64, 128, 8, 3, 8),
          _tile(64, 256, 64, 8, 3, 8)],
}


def bench_small_m(ceil, quick):
    """Small-M MatMul + bias + Silu and SwiGLU tiles in device time: CUDA graphs that rotate
    over enough weight copies to exceed the L2 (small M streams the weights).  M 1 and 16
    share the M <= 16 tiles, M 128 the M <= 128 ones."""
    print("small-M GEMM and SwiGLU tiles (CUDA graph device time, L2-cold weights)", flush=True)
    for n, k in LLM_NK:
        copies = max(2, -(-256 * 2**20 // (k * n * 2)))
        ws = [torch.randn(k, n, device=DEV, dtype=BF16) / math.sqrt(k) for _ in range(copies)]
        wus = [torch.randn(k, n, device=DEV, dtype=BF16) / math.sqrt(k) for _ in range(copies)]
        bias = torch.randn(n, device=DEV, dtype=BF16)
        for m in (1, 16, 128):
            x = torch.randn(m, k, device=DEV, dtype=BF16)
            y = poison(torch.empty(m, n, device=DEV, dtype=BF16))
            shape = f"M{m} N{n} K{k}"
            w, wu = ws[0], wus[0]
            ref = F.silu(x.float() @ w.float() + bias.float())
            glu_ref = F.silu(x.float() @ w.float()) * (x.float() @ wu.float())

            def gemm(cfg=None):
                return [lambda w=w: gemm_epilogue.matmul_bias_act(x, w, bias, "Silu", config=cfg, out=y)
                        for w in ws]

            def glu(cfg=None):
                return [lambda w=w, wu=wu: gemm_epilogue.swiglu(x, w, wu, config=cfg, out=y)
                        for w, wu in zip(ws, wus)]

            res = {}
            for cfg in SMALL_M_DEVICE_CONFIGS[16 if m <= 16 else 128]:
                for is_glu in ((False, True) if n == 11008 else (False,)):
                    c = dict(cfg, PAIRED=True) if is_glu else cfg
                    calls = glu(c) if is_glu else gemm(c)
                    poison(y)
                    try:
                        calls[0]()
                    except Exception as exc:
                        print(f"  config {cfg_name(cfg)} failed: {type(exc).__name__}: {str(exc)[:100]}")
                        continue
                    if check(f"{'swiglu' if is_glu else 'gemm'} {shape} {cfg_name(cfg)}", y,
                             glu_ref if is_glu else ref, BF16):
                        res.setdefault(is_glu, []).append((graph_ms(calls), cfg_name(cfg)))
            for is_glu, times in res.items():
                times.sort()
                default = graph_ms(glu() if is_glu else gemm())
                torch_calls = ([lambda w=w, wu=wu: F.silu(x @ w) * (x @ wu) for w, wu in zip(ws, wus)]
                               if is_glu else [lambda w=w: F.silu(torch.addmm(bias, x, w)) for w in ws])
                torch_ms = graph_ms(torch_calls)
                what = "swiglu" if is_glu else "gemm+silu"
                row(f"small-M {what}", shape, "fused triton default (CUDA graph, L2-cold)", default,
                    nbytes=(m * k + k * n * (2 if is_glu else 1) + m * n) * 2, ceil=ceil)
                print(f"    small-M {what} {shape}: default {default * 1e3:.1f} us, torch "
                      f"{torch_ms * 1e3:.1f} us; best " +
                      ", ".join(f"{name} {t * 1e3:.1f}" for t, name in times[:4]), flush=True)
        del ws, wus
        torch.cuda.empty_cache()


# --- norms and RoPE --------------------------------------------------------------------------

def unfused_rms(x, r, g, eps):
    s = x + r
    var = s.float().pow(2).mean(-1, keepdim=True)
    return (s.float() * torch.rsqrt(var + eps)).to(x.dtype) * g, s


def unfused_ln(x, r, g, b, eps):
    s = x + r
    sf = s.float()
    mean = sf.mean(-1, keepdim=True)
    var = (sf - mean).pow(2).mean(-1, keepdim=True)
    return ((sf - mean) / torch.sqrt(var + eps) * g.float() + b.float()).to(x.dtype), s


NORM_SWEEP_WIDTHS = (512, 1024)


def norm_sweep(x, r, g, y, s_out, cols, eps):
    """Tiles for short rows through the launcher: every (rows per program, warps) with at most
    32k elements per program; returns {(skip,): (ms, cfg)} best per variant."""
    st = torch.cuda.current_stream().cuda_stream
    rows = x.shape[0]
    p = lambda t: t.data_ptr()  # noqa: E731
    ctx = launch._context_handle()
    best = {}
    for skip in (False, True):
        ptrs = (p(x), p(r) if skip else 0, p(g), 0, p(y), p(s_out) if skip else 0)
        times = []
        for block_r in (1, 2, 4, 8, 16, 32):
            for warps in (2, 4, 8):
                if block_r * cols > 32768 or block_r * cols < 32 * warps * 8:
                    continue
                cfg = {"BLOCK_R": block_r, "BLOCK_C": cols, "num_warps": warps}
                kl = launch.norm_launch(*ptrs, rows, cols, eps, "bfloat16", True, cfg)
                prepared = launch.PreparedLaunch(kl, kl.pointer_values(), ctx)
                vals = kl.pointer_values()
                times.append((bench(lambda: prepared.enqueue(vals, st)), cfg))
        times.sort(key=lambda t: t[0])
        for ms, cfg in times[:6]:
            print(f"    sweep {'skip_' if skip else ''}rms_norm {rows}x{cols} {cfg}: {ms * 1e3:.1f} us",
                  flush=True)
        best[skip] = times[0]
    return best


def jit_norm(x, r, g, b, y, s, eps, rms):
    """The norm kernel through Triton's JIT launcher (the torch entries' path before issue 14)."""
    rows, cols = x.shape
    cfg = norms.norm_config(rows, cols, x.element_size())
    norms.norm_kernel[norms.norm_grid(rows, cfg)](
        x, x if r is None else r, g, g if b is None else b, y, s, rows, cols, cols, cols, cols,
        cols, eps, BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], RMS=rms,
        HAS_RESIDUAL=r is not None, HAS_BETA=b is not None, num_warps=cfg["num_warps"])


def bench_norms(ceil, quick):
    print("RMSNorm / LayerNorm (bf16, 16384 rows)", flush=True)
    eps = 1e-6
    st = torch.cuda.current_stream().cuda_stream
    p = lambda t: t.data_ptr()  # noqa: E731
    for cols in ([1024, 4096] if quick else [512, 1024, 2048, 4096, 8192]):
        rows = 16384
        x, r = (torch.randn(rows, cols, device=DEV, dtype=BF16) for _ in range(2))
        g, b = (torch.randn(cols, device=DEV, dtype=BF16) for _ in range(2))
        y, s = (torch.empty_like(x) for _ in range(2))
        item = x.element_size()
        plain, skip = 2 * rows * cols * item, 4 * rows * cols * item
        shape = f"{rows}x{cols}"
        # correctness (poisoned outputs), torch entries and the launcher
        poison(y)
        entry.rms_norm(x, g, eps, out=y)
        check(f"rms_norm {shape}", y, F.rms_norm(x.float(), (cols,), g.float(), eps), BF16)
        poison(y)
        launch.launch_rms_norm(p(x), p(g), p(y), rows, cols, eps, "bfloat16", st)
        check(f"launch rms_norm {shape}", y, F.rms_norm(x.float(), (cols,), g.float(), eps), BF16)
        poison(y), poison(s)
        entry.rms_norm(x, g, eps, residual=r, out=y, residual_out=s)
        check(f"skip_rms_norm {shape} Y", y,
              F.rms_norm((x + r).float(), (cols,), g.float(), eps), BF16)
        check(f"skip_rms_norm {shape} S", s, (x.float() + r.float()), BF16)
        poison(y), poison(s)
        entry.layer_norm(x, g, b, eps, residual=r, out=y, residual_out=s)
        check(f"skip_layer_norm {shape} Y", y,
              F.layer_norm((x + r).float(), (cols,), g.float(), b.float(), eps), BF16)
        row("copy", shape, "torch y.copy_(x) (same bytes as a plain norm)",
            bench(lambda: y.copy_(x)), nbytes=plain, ceil=ceil)
        for op, nb, fused, jit, ref_name, ref in (
            ("rms_norm", plain, lambda: entry.rms_norm(x, g, eps, out=y),
             lambda: jit_norm(x, None, g, None, y, y, eps, True),
             "torch F.rms_norm", lambda: F.rms_norm(x, (cols,), g, eps)),
            ("skip_rms_norm", skip,
             lambda: entry.rms_norm(x, g, eps, residual=r, out=y, residual_out=s),
             lambda: jit_norm(x, r, g, None, y, s, eps, True),
             "torch add + F.rms_norm", lambda: F.rms_norm(x + r, (cols,), g, eps)),
            ("layer_norm", plain, lambda: entry.layer_norm(x, g, b, eps, out=y),
             lambda: jit_norm(x, None, g, b, y, y, eps, False),
             "torch F.layer_norm", lambda: F.layer_norm(x, (cols,), g, b, eps)),
            ("skip_layer_norm", skip,
             lambda: entry.layer_norm(x, g, b, eps, residual=r, out=y, residual_out=s),
             lambda: jit_norm(x, r, g, b, y, s, eps, False),
             "torch add + F.layer_norm", lambda: F.layer_norm(x + r, (cols,), g, b, eps)),
        ):
            row(op, shape, "fused triton (torch entry, cached launcher)", bench(fused), nbytes=nb,
                ceil=ceil)
            row(op, shape, "fused triton (Triton JIT launch)", bench(jit), nbytes=nb, ceil=ceil)
            row(op, shape, ref_name, bench(ref), nbytes=nb, ceil=ceil)
        row("skip_rms_norm", shape, "unfused op-by-op",
            bench(lambda: unfused_rms(x, r, g, eps)), nbytes=skip, ceil=ceil)
        row("skip_layer_norm", shape, "unfused op-by-op",
            bench(lambda: unfused_ln(x, r, g, b, eps)), nbytes=skip, ceil=ceil)
        if cols in NORM_SWEEP_WIDTHS and SWEEP:
            for skip_flag, (ms, cfg) in norm_sweep(x, r, g, y, s, cols, eps).items():
                row("skip_rms_norm" if skip_flag else "rms_norm", shape,
                    f"fused triton (launcher, best of sweep: R{cfg['BLOCK_R']} w{cfg['num_warps']})",
                    ms, nbytes=skip if skip_flag else plain, ceil=ceil)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def unfused_rope(x, cos, sin, rd):
    xr, xp = x[..., :rd], x[..., rd:]
    return torch.cat((xr * cos + rotate_half(xr) * sin, xp), -1)


def rope_tables(seq, rd, interleaved):
    """Real cos/sin tables (HF layout), so repeated in-place rotation keeps X's magnitude."""
    theta = torch.arange(seq, device=DEV)[:, None] * 10000.0 ** (
        -torch.arange(0, rd, 2, device=DEV) / rd)
    theta = theta.repeat_interleave(2, -1) if interleaved else torch.cat((theta, theta), -1)
    return theta.cos().to(BF16), theta.sin().to(BF16)


def bench_rope(ceil, quick):
    print("RoPE (bf16, [8, 32, 2048, 128])", flush=True)
    b, h, s, d = 8, 32, 2048, 128
    x = torch.randn(b, h, s, d, device=DEV, dtype=BF16)
    y = torch.empty_like(x)
    nbytes = 2 * x.numel() * x.element_size()
    for rd, inter in ((128, False), (64, False), (128, True)):
        cos, sin = rope_tables(s, rd, inter)
        shape = f"{b}x{h}x{s}x{d} rd{rd}{' inter' if inter else ''}"
        poison(y)
        rope.rotary_embedding(x, cos, sin, inter, rd, out=y)
        xr = x.float()[..., :rd]
        rot = (torch.stack((-xr[..., 1::2], xr[..., 0::2]), -1).flatten(-2) if inter
               else rotate_half(xr))
        ref = torch.cat((xr * cos.float() + rot * sin.float(), x.float()[..., rd:]), -1)
        check(f"rope {shape}", y, ref, BF16)
        row("rope", shape, "fused triton out of place",
            bench(lambda: rope.rotary_embedding(x, cos, sin, inter, rd, out=y)),
            nbytes=nbytes, ceil=ceil)
        xi = x.clone()
        row("rope", shape, "fused triton in place",
            bench(lambda: rope.rotary_embedding(xi, cos, sin, inter, rd, out=xi)),
            nbytes=nbytes * rd // d, ceil=ceil)
        if not inter:
            row("rope", shape, "unfused op-by-op (HF rotate_half)",
                bench(lambda: unfused_rope(x, cos, sin, rd)), nbytes=nbytes, ceil=ceil)


# --- torch-free launch path ------------------------------------------------------------------

def check_launch_path():
    print("torch-free launch path (cuda-python)", flush=True)
    st = torch.cuda.current_stream().cuda_stream
    p = lambda t: t.data_ptr()  # noqa: E731
    rows, cols = 999, 4096
    x, r = (torch.randn(rows, cols, device=DEV, dtype=BF16) for _ in range(2))
    g, bb = (torch.randn(cols, device=DEV, dtype=BF16) for _ in range(2))
    y, s = (poison(torch.empty_like(x)) for _ in range(2))
    launch.launch_rms_norm(p(x), p(g), p(y), rows, cols, 1e-6, "bfloat16", st)
    torch.cuda.synchronize()
    check("launch rms_norm", y, F.rms_norm(x.float(), (cols,), g.float(), 1e-6), BF16)
    poison(y)
    launch.launch_skip_rms_norm(p(x), p(r), p(g), p(y), p(s), rows, cols, 1e-6, "bfloat16", st)
    torch.cuda.synchronize()
    check("launch skip_rms_norm Y", y, F.rms_norm((x + r).float(), (cols,), g.float(), 1e-6), BF16)
    check("launch skip_rms_norm S", s, x.float() + r.float(), BF16)
    poison(y)
    launch.launch_layer_norm(p(x), p(g), p(bb), p(y), rows, cols, 1e-5, "bfloat16", st)
    torch.cuda.synchronize()
    check("launch layer_norm", y, F.layer_norm(x.float(), (cols,), g.float(), bb.float(), 1e-5), BF16)
    poison(y), poison(s)
    launch.launch_skip_layer_norm(p(x), p(r), p(g), p(bb), p(y), p(s), rows, cols, 1e-5,
                                  "bfloat16", st)
    torch.cuda.synchronize()
    check("launch skip_layer_norm Y", y,
          F.layer_norm((x + r).float(), (cols,), g.float(), bb.float(), 1e-5), BF16)

    m, n, k = 1000, 1536, 1024
    xa = torch.randn(m, k, device=DEV, dtype=torch.float16)
    w, wu = (torch.randn(k, n, device=DEV, dtype=torch.float16) / 32 for _ in range(2))
    bias, bu = (torch.randn(n, device=DEV, dtype=torch.float16) for _ in range(2))
    ya = poison(torch.empty(m, n, device=DEV, dtype=torch.float16))
    launch.launch_matmul_bias_act(p(xa), p(w), p(bias), p(ya), m, n, k, "GeluTanh", "float16", st)
    torch.cuda.synchronize()
    check("launch matmul_bias_act GeluTanh", ya,
          F.gelu(xa.float() @ w.float() + bias.float(), approximate="tanh"), torch.float16)
    poison(ya)
    launch.launch_swiglu(p(xa), p(w), p(wu), p(bias), p(bu), p(ya), m, n, k, "Silu", "float16", st)
    torch.cuda.synchronize()
    check("launch swiglu", ya, F.silu(xa.float() @ w.float() + bias.float())
          * (xa.float() @ wu.float() + bu.float()), torch.float16)

    q = torch.randn(2, 8, 777, 128, device=DEV, dtype=BF16)
    kk, vv = (torch.randn(2, 2, 801, 128, device=DEV, dtype=BF16) for _ in range(2))
    mask = torch.randn(777, 801, device=DEV, dtype=BF16)
    o = poison(torch.empty_like(q))
    launch.launch_attention(p(q), p(kk), p(vv), p(o), 2, 8, 2, 777, 801, 128, None, True,
                            "bfloat16", st, mask_ptr=p(mask), mask_strides=(0, 0, 801, 1))
    torch.cuda.synchronize()
    check("launch attention gqa causal mask", o, ref_attention(q, kk, vv, mask, True), BF16)

    xr = torch.randn(2, 4, 300, 128, device=DEV, dtype=BF16)
    cos, sin = (torch.randn(300, 64, device=DEV, dtype=BF16) for _ in range(2))
    ref = unfused_rope(xr.float(), cos.float(), sin.float(), 64)
    launch.launch_rotary_embedding(p(xr), p(cos), p(sin), p(xr), 2, 4, 300, 128, 64, False,
                                   "bfloat16", st)
    torch.cuda.synchronize()
    check("launch rope in place rd64", xr, ref, BF16)

    for b, sk in ((1, 4096), (64, 1000)):  # several splits; one split written directly
        q = torch.randn(b, 32, 1, 128, device=DEV, dtype=BF16)
        kk, vv = (torch.randn(b, 8, sk, 128, device=DEV, dtype=BF16) for _ in range(2))
        pad = torch.zeros(b, 1, 1, sk, device=DEV, dtype=BF16)
        pad[..., sk // 2:] = float("-inf")
        o = poison(torch.empty_like(q))
        launch.launch_attention(p(q), p(kk), p(vv), p(o), b, 32, 8, 1, sk, 128, None, False,
                                "bfloat16", st, mask_ptr=p(pad), mask_strides=(sk, 0, 0, 1))
        torch.cuda.synchronize()
        check(f"launch decode B{b} Sk{sk} mask", o, ref_attention(q, kk, vv, pad), BF16)
    launch_overhead(st)


def host_us(fn, n=2000) -> float:
    """Host microseconds per call of ``fn`` (enqueue only: the GPU drains the queue after)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


LAUNCH_US: dict = {}


def launch_overhead(st):
    """Host cost per launch of a tiny RMSNorm (8 x 1024) by each path; the kernel itself
    runs in ~2-3 us, so a host path slower than that is what a caller waits on."""
    p = lambda t: t.data_ptr()  # noqa: E731
    rows, cols = 8, 1024
    x = torch.randn(rows, cols, device=DEV, dtype=BF16)
    g = torch.randn(cols, device=DEV, dtype=BF16)
    y = torch.empty_like(x)
    ptrs = (p(x), 0, p(g), 0, p(y), 0)
    kl = launch.norm_launch(*ptrs, rows, cols, 1e-6, "bfloat16", True)
    prepared = launch.PreparedLaunch(kl, kl.pointer_values(), launch._context_handle())
    vals = kl.pointer_values()
    drv = launch._driver()
    stream = drv.CUstream(st)
    bindings_args = (prepared.func, *prepared.grid, prepared.threads, 1, 1, prepared.shared,
                     stream, prepared.params_addr, 0)
    libcuda = ctypes.CDLL("libcuda.so.1")
    libcuda.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
        ctypes.c_void_p] * 3
    ctypes_args = (int(prepared.func), *prepared.grid, prepared.threads, 1, 1, prepared.shared,
                   st, prepared.params_addr, None)
    q = torch.randn(1, 32, 1, 128, device=DEV, dtype=BF16)
    kk, vv = (torch.randn(1, 8, 4096, 128, device=DEV, dtype=BF16) for _ in range(2))
    o = torch.empty_like(q)
    paths = {
        "cuLaunchKernel alone, ctypes into libcuda (prepared arguments)":
            lambda: libcuda.cuLaunchKernel(*ctypes_args),
        "cuLaunchKernel alone, cuda.bindings (prepared arguments)":
            lambda: drv.cuLaunchKernel(*bindings_args),
        "launch_rms_norm (cached launcher)":
            lambda: launch.launch_rms_norm(p(x), p(g), p(y), rows, cols, 1e-6, "bfloat16", st),
        "launch_rms_norm (cached launcher, CUstream object)":
            lambda: launch.launch_rms_norm(p(x), p(g), p(y), rows, cols, 1e-6, "bfloat16", stream),
        "uncached: describe + prepare per call (the old path)":
            lambda: launch.PreparedLaunch(launch.norm_launch(*ptrs, rows, cols, 1e-6, "bfloat16",
                                                             True), vals,
                                          launch._context_handle()).enqueue(vals, st),
        "launch_attention Sq=1 (decode: split + combine, 2 launches)":
            lambda: launch.launch_attention(p(q), p(kk), p(vv), p(o), 1, 32, 8, 1, 4096, 128,
                                            None, False, "bfloat16", st),
        "entry.rms_norm torch entry (cached launcher)": lambda: entry.rms_norm(x, g, 1e-6, out=y),
        "Triton JIT launch of the same kernel": lambda: jit_norm(x, None, g, None, y, y, 1e-6, True),
        "torch F.rms_norm": lambda: F.rms_norm(x, (cols,), g, 1e-6),
    }
    for name, fn in paths.items():
        LAUNCH_US[name] = host_us(fn, 300 if "uncached" in name else 2000)
        print(f"  host per call  {LAUNCH_US[name]:7.1f} us  {name}", flush=True)


def write_markdown(path, info, ceil, rows, checks):
    """Results table: each row's time over the best fused kernel's at the same op and shape."""
    best = {}
    for r in rows:
        if r["impl"].startswith("fused"):
            key = (r["op"], r["shape"])
            best[key] = min(best.get(key, float("inf")), r["ms"])
    lines = [f"Machine: {info['gpu']} ({info['sms']} SMs), torch {info['torch']}, "
             f"triton {info['triton']}, CUDA {info['cuda']}; {info['date']}.",
             f"Ceilings measured in the same run: bf16 matmul 8192^3 {ceil['tflops']:.0f} TFLOP/s; "
             f"device-to-device copy {ceil['gbs']:.0f} GB/s (read + write).", "",
             "| op | shape | implementation | ms | TFLOP/s or GB/s | of ceiling | time / best fused |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        perf = f"{r['tflops']:.0f} TFLOP/s" if "tflops" in r else f"{r['gbs']:.0f} GB/s"
        ratio = r["ms"] / best[(r["op"], r["shape"])] if (r["op"], r["shape"]) in best else float("nan")
        lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {r['ms']:.3f} | {perf} | "
                     f"{r['frac']:.0%} | {ratio:.2f}x |")
    bad = [c for c in checks if not c["ok"]]
    lines += ["", f"Correctness: {len(checks) - len(bad)}/{len(checks)} checks passed "
              f"(worst relative error {max((c['rel_err'] for c in checks), default=0):.1e})."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="one size per op, fewer tile sweeps")
    ap.add_argument("--only", default="launch,norms,decode,gemm_llm,gemm,swiglu,attention,rope")
    ap.add_argument("--no-sweep", action="store_true",
                    help="skip the decode, short-row norm and 7B-shape GEMM tile sweeps")
    args = ap.parse_args()
    global SWEEP
    SWEEP = not (args.quick or args.no_sweep)
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    info = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda,
            "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(info), flush=True)
    ceil = ceilings()
    tuned = {}
    sections = {"attention": lambda: bench_attention(ceil, args.quick),
                "gemm": lambda: tuned.update(gemm=bench_gemm(ceil, args.quick)),
                "swiglu": lambda: tuned.update(swiglu=bench_swiglu(ceil, args.quick)),
                "norms": lambda: bench_norms(ceil, args.quick),
                "rope": lambda: bench_rope(ceil, args.quick),
                "decode": lambda: bench_decode(ceil, args.quick),
                "decode_small": lambda: bench_decode_small(ceil, args.quick),
                "decode_splits": lambda: bench_decode_splits(ceil, args.quick),
                "gemm_llm": lambda: bench_gemm_llm(ceil, args.quick),
                "small_m": lambda: bench_small_m(ceil, args.quick),
                "launch": check_launch_path}
    failed = []
    for name in args.only.split(","):
        try:
            sections[name]()
        except Exception:
            failed.append(name)
            traceback.print_exc()
        torch.cuda.empty_cache()
    bad = [c for c in CHECKS if not c["ok"]]
    write_markdown(os.path.join(args.out, "results.md"), info, ceil, ROWS, CHECKS)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"info": info, "ceilings": ceil, "rows": ROWS, "checks": CHECKS,
                   "tuned": tuned, "launch_host_us": LAUNCH_US, "decode_ratios": DECODE_RATIOS,
                   "failed_sections": failed},
                  f, indent=1)
    print(f"\n{len(CHECKS) - len(bad)}/{len(CHECKS)} checks passed; failed sections: {failed}")
    for c in bad:
        print(f"  FAILED {c['name']}: {c['rel_err']:.2e}")
    sys.exit(1 if bad or failed else 0)


if __name__ == "__main__":
    main()
