"""The collective plugins' NCCL core on real GPUs: correctness against the CPU reference and
all-reduce bus bandwidth beside torch.distributed's NCCL all-reduce, one process per GPU.

    python benchmarks/bench_collectives.py [--gpus 2] [--out results.json]

Each process sets RANK / WORLD_SIZE and NCCL_NVLS_ENABLE=0 (never NVLink multicast), builds the
communicator exactly as the TensorRT plugin does (`fusegraph.plugins.collectives.NcclGroup`, the
unique id shared through a file) and calls `CollectiveCore.enqueue` — the code path the
plugin's `enqueue` runs — on raw device pointers and the current stream.

1. Correctness: AllReduce (sum, max), AllGather and ReduceScatter along axis 0 and an inner axis,
   float32 / float16 / int32, against `fusegraph.ops.collectives.reference` over every rank's input.
2. Bandwidth: out-of-place all-reduce of float32 buffers from 1 MB to 1 GB, the plugin core and
   `torch.distributed.all_reduce` alternated in 3 trials (median), CUDA events around a loop of
   calls; bus bandwidth = bytes / time * 2 (n - 1) / n (nccl-tests' definition).
3. Launch overhead: host microseconds per call (Python into NCCL, no sync) and the device time of
   an 8-byte all-reduce, for both.

Only torch, numpy, nccl4py and cuda-python are needed there; the two fusegraph modules are loaded
from their files, so nothing has to be installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = [1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(rank: int, world: int, id_file: str, store: str, out: str | None) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    plugin = _load("fusegraph_plugin_collectives", ROOT / "plugins" / "collectives.py")
    reference = _load("fusegraph_collectives", ROOT / "rewriter" / "collectives.py")
    torch.cuda.set_device(rank)
    t0 = time.perf_counter()
    group = plugin.NcclGroup(rank, world, id_file)
    init_s = time.perf_counter() - t0
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    stream = torch.cuda.current_stream().cuda_stream
    np_to_torch = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32}

    # 1. correctness
    cases = [("AllReduce", "sum", 0, (4, 33, 64), "float32"), ("AllReduce", "max", 0, (1001,), "int32"),
             ("AllReduce", "sum", 0, (2, 16, 64), "float16"), ("AllGather", "sum", 0, (3, 5, 8), "float32"),
             ("AllGather", "sum", 2, (3, 5, 8), "float32"), ("AllGather", "sum", 1, (2, 7, 3), "float16"),
             ("ReduceScatter", "sum", 0, (4 * world, 6), "float32"), ("ReduceScatter", "sum", 2, (3, 5, 8 * world), "float32")]
    checks = []
    for op, reduction, axis, shape, dtype in cases:
        inputs = [(np.random.default_rng(100 + r).standard_normal(shape) * (50 if dtype == "int32" else 1)).astype(dtype)
                  for r in range(world)]
        node = reference.make_node(op, "x", "y", world, name=op, axis=axis if op != "AllReduce" else None,
                                   reduction=reduction)
        expected = reference.reference(node, inputs)[rank]
        core = plugin.CollectiveCore(op, world, reduction, axis, group=group)
        x = torch.from_numpy(inputs[rank]).cuda()
        y = torch.empty(core.output_shape(shape), dtype=np_to_torch[dtype], device="cuda")
        ws = torch.empty(max(core.workspace_bytes(shape, dtype), 1), dtype=torch.uint8, device="cuda")
        core.enqueue(shape, dtype, x.data_ptr(), y.data_ptr(), ws.data_ptr(), stream)
        torch.cuda.synchronize()
        got = y.cpu().numpy()
        err = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)))) if got.shape == expected.shape else float("inf")
        tol = 1e-2 if dtype == "float16" else 1e-5
        checks.append({"op": op, "reduction": reduction, "axis": axis, "shape": list(shape), "dtype": dtype,
                       "max_abs_err": err, "ok": err <= tol})

    # 2. bandwidth
    def timed(fn, iters):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters / 1e3  # seconds per call

    core = plugin.CollectiveCore("AllReduce", world, "sum", group=group)
    rows = []
    factor = 2 * (world - 1) / world
    for size in SIZES:
        n = size // 4
        x = torch.ones(n, device="cuda")
        y = torch.empty(n, device="cuda")
        t = torch.ones(n, device="cuda")
        iters = 50 if size <= 16 << 20 else (20 if size <= 256 << 20 else 10)
        ours, theirs = [], []
        for _ in range(3):
            ours.append(timed(lambda: core.enqueue((n,), "float32", x.data_ptr(), y.data_ptr(), 0, stream), iters))
            theirs.append(timed(lambda: dist.all_reduce(t), iters))
        torch.cuda.synchronize()
        ok = bool(torch.all(y == world).item())
        o, th = statistics.median(ours), statistics.median(theirs)
        rows.append({"bytes": size, "plugin_s": o, "torch_s": th, "plugin_busbw_GBs": size / o * factor / 1e9,
                     "torch_busbw_GBs": size / th * factor / 1e9, "ratio": th / o, "sum_ok": ok})
        del x, y, t

    # 3. launch overhead
    x = torch.ones(2, device="cuda")
    y = torch.empty(2, device="cuda")
    calls = 2000
    torch.cuda.synchronize()
    dist.barrier()
    h0 = time.perf_counter()
    for _ in range(calls):
        core.enqueue((2,), "float32", x.data_ptr(), y.data_ptr(), 0, stream)
    host_ours = (time.perf_counter() - h0) / calls
    torch.cuda.synchronize()
    dist.barrier()
    h0 = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(x)
    host_torch = (time.perf_counter() - h0) / calls
    torch.cuda.synchronize()
    small_ours = timed(lambda: core.enqueue((2,), "float32", x.data_ptr(), y.data_ptr(), 0, stream), 200)
    small_torch = timed(lambda: dist.all_reduce(x), 200)
    launch = {"host_us_per_call_plugin": host_ours * 1e6, "host_us_per_call_torch": host_torch * 1e6,
              "device_us_8B_plugin": small_ours * 1e6, "device_us_8B_torch": small_torch * 1e6,
              "comm_init_s": init_s}

    if rank == 0:
        import nccl.core
        result = {"world_size": world, "device": torch.cuda.get_device_name(0),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())), "torch": torch.__version__,
                  "nccl4py": getattr(nccl.core, "__version__", "?"),
                  "nvls": os.environ.get("NCCL_NVLS_ENABLE"), "correctness": checks, "allreduce": rows, "launch": launch}
        print(json.dumps(result, indent=1))
        print(f"{'size':>8} {'plugin GB/s':>12} {'torch GB/s':>11} {'ratio':>6}")
        for r in rows:
            print(f"{r['bytes'] >> 20:>6}MB {r['plugin_busbw_GBs']:>12.1f} {r['torch_busbw_GBs']:>11.1f} {r['ratio']:>6.3f}")
        print("correctness:", all(c["ok"] for c in checks), "launch:", launch)
        if out:
            Path(out).write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--out")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--id-file", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        worker(args.worker, args.gpus, args.id_file, args.store, args.out)
        return 0
    folder = tempfile.mkdtemp(prefix="fusegraph-nccl-")
    procs = []
    for rank in range(args.gpus):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(args.gpus), LOCAL_RANK=str(rank), NCCL_NVLS_ENABLE="0",
                   TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, __file__, "--gpus", str(args.gpus), "--worker", str(rank),
               "--id-file", os.path.join(folder, "nccl.id"), "--store", os.path.join(folder, "store")]
        if args.out:
            cmd += ["--out", args.out]
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    return max(codes)


if __name__ == "__main__":
    raise SystemExit(main())
