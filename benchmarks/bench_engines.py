"""Engine layer counts per exported model: as exported, after fusegraph's rewrite, and after the
rewrite with fusegraph's plugins taking the fused ops. Prints the markdown section of
benchmarks/RESULTS.md ("Engines before and after rewriting"); `--out FILE` writes it too.

    python benchmarks/bench_engines.py [--models tests/data/models] [--gpu-check plugins_gpu.json]

Each model is built for one optimization profile: min 1 on every dynamic axis, opt the
manifest's example shape, max twice it. Build times are wall-clock on this machine (the
builder's own; TensorRT-RTX compiles kernels ahead of time without a GPU, so times are CPU
times). `--gpu-check` adds the table of a benchmarks/check_plugins_gpu.py --json run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from fusegraph.plugins import tensorrt_shim
from fusegraph.plugins.engine import build_engine
from fusegraph.errors import InputError
from fusegraph.verify.testing import manifest_profile

ROOT = Path(__file__).resolve().parents[1]


def build(path: Path, entry: dict, work: str, **kw) -> dict:
    start = time.perf_counter()
    try:
        r = build_engine(path, Path(work) / "m.engine", ranges=manifest_profile(entry), write_report=False, **kw)
    except InputError as e:
        return {"error": str(e).splitlines()[0][:160]}
    kinds: dict[str, int] = {}
    for op in r["fused_ops"]:
        kinds[op["implementation"]] = kinds.get(op["implementation"], 0) + 1
    return {"layers": r["engine_info"]["layer_count"], "network_layers": r["parse"]["network_layers"],
            "build_s": r["engine_info"]["build_seconds"], "total_s": time.perf_counter() - start,
            "attention": len(r["attention"]["layers"]), "decomposable": len(r["attention"]["decomposable"]),
            "fused": kinds, "nodes_after": (r.get("rewrite") or {}).get("nodes_after")}


def cell(r: dict, key: str) -> str:
    return "error" if "error" in r else str(r[key])


def gpu_section(path: Path) -> list[str]:
    results = json.loads(path.read_text())
    passed = sum(r["ok"] for r in results)
    lines = ["", "## Plugin cores on a GPU without TensorRT", "",
             f"`benchmarks/check_plugins_gpu.py` ({path.name}): {passed} of {len(results)} cases within tolerance. "
             "Each plugin core computed output shapes/dtypes and format support as TensorRT would ask, then "
             "`enqueue` launched its Triton kernel through `fusegraph.kernels.launch` (cuda-python, no torch) "
             "on CuPy device pointers; rel err = max|out - ref| / max|ref|.", "",
             "| case | dtype | rel err | reference | first call (s, incl. compile) |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['dtype']} | " + (f"{r['rel_err']:.1e} | {r['reference']} | {r['first_call_s']}"
                                                          if "error" not in r else f"error: {r['error']} | | ") + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=str(ROOT / "tests" / "data" / "models"))
    ap.add_argument("--gpu-check", type=Path, help="JSON from check_plugins_gpu.py --json")
    ap.add_argument("--out", help="also write the markdown section here")
    args = ap.parse_args()
    models = Path(args.models)
    manifest = json.loads((models / "MANIFEST.json").read_text())["models"]
    names = sorted(n for n in manifest if (models / n).is_file())
    b = tensorrt_shim.backend()
    lines = ["# Engines before and after rewriting", "",
             f"{b['flavour']} {b['version']} ({b['module']}), {platform.machine()}, {os.cpu_count()} CPU cores, no GPU. "
             "Engine layers are the builder's own (TensorRT-RTX fuses most of a graph into Myelin kernels, so "
             "they count kernels rather than ONNX ops); network layers are what the parser made. "
             "'+plugins' builds the rewritten model with `--plugins`: fused ops with a fusegraph plugin become "
             "plugin layers. attn = native attention layers (decomposable = marked because no dedicated kernel).", "",
             "| model | nodes | net layers | engine layers | rewritten: nodes | net layers | engine layers | "
             "fused ops | +plugins: engine layers | attn (decomposable) | build s (exported / rewritten) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            entry = manifest[name]
            before = build(models / name, entry, work)
            after = build(models / name, entry, work, rewrite=True)
            plugged = build(models / name, entry, work, rewrite=True, plugins=True)
            fused = ", ".join(f"{v} {k}" for k, v in after.get("fused", {}).items()) or "-"
            attn = "error" if "error" in before else f"{before['attention']} ({before['decomposable']})"
            times = "/".join(f"{r['build_s']:.2f}" if "error" not in r else "err" for r in (before, after))
            lines.append(f"| {name} | {entry['node_count']} | {cell(before, 'network_layers')} | {cell(before, 'layers')} | "
                         f"{cell(after, 'nodes_after')} | {cell(after, 'network_layers')} | {cell(after, 'layers')} | "
                         f"{fused} | {cell(plugged, 'layers')} | {attn} | {times} |")
            print(lines[-1], flush=True)
            for label, r in (("exported", before), ("rewritten", after), ("+plugins", plugged)):
                if "error" in r:
                    print(f"  {label}: {r['error']}", file=sys.stderr)
    if args.gpu_check:
        lines += gpu_section(args.gpu_check)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
