"""Every rank model parses and builds in TensorRT(-RTX) with the collective plugins: each
AllReduce / AllGather becomes a plugin layer (namespace fusegraph), as exported and fused.

Builds run in a subprocess (`rewrite build --plugins`), as tests/engine's plugin tests do: a
Python plugin that TensorRT-RTX cannot load aborts the process, which must fail one test only.
The plugins' NCCL path needs GPUs and runs in benchmarks/bench_collectives.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

import fusegraph
from fusegraph.ops import collectives
from fusegraph.plugins import tensorrt_shim
from llama_like import Config, build

pytestmark = [pytest.mark.tensorrt, pytest.mark.skipif(
    not tensorrt_shim.available(),
    reason="needs tensorrt or tensorrt_rtx_bindings (pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs)")]

BUILD = "import sys; from fusegraph.plugins.engine_cli import build_main; sys.exit(build_main(sys.argv[1:]))"


def run_build(*argv: str) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, "-c", BUILD, *argv, "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode >= 0, f"build died with signal {-proc.returncode}: {proc.stderr[-2000:]}"
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}, proc.stderr


@pytest.mark.parametrize("fused", [False, True], ids=["export", "fused"])
def test_rank_models_build_with_collective_plugins(tmp_path, fused):
    model = build(Config(layers=1, heads=4, kv_heads=2, ffn=32, vocab=32))
    if fused:
        model = fusegraph.rewrite(model)
    for rank, rank_model in enumerate(fusegraph.shard(model, tp=2)):
        path = tmp_path / f"rank{rank}.onnx"
        onnx.save(rank_model, path)
        calls = sorted(n.name for n in rank_model.graph.node if collectives.is_collective(n))
        rc, report, err = run_build(str(path), "-o", str(tmp_path / f"rank{rank}.engine"), "--plugins")
        assert rc == 0, err[-3000:]
        assert len(calls) == 4  # the embedding's, o_proj's and down_proj's AllReduce, the LM head's AllGather
        assert set(calls) <= set(report["routed_to_plugins"])
        fused_plugins = len(report["routed_to_plugins"]) - len(calls)  # SwiGLU, RMSNorm, ... when fused
        assert report["parse"]["network_layer_types"]["PLUGIN_V3"] == len(calls) + fused_plugins
        assert (tmp_path / f"rank{rank}.engine").stat().st_size > 0


def test_collective_plugin_fields_round_trip():
    """What the engine stores (group size, reduction, axis) recreates the same core (the
    field arrays outlive the call: TensorRT reads them after it returns)."""
    code = ("from fusegraph.plugins.collectives import plugin_classes, CollectiveCore; from fusegraph.plugins import tensorrt_shim;"
            "tensorrt_shim.load(); P, C = plugin_classes(); c = C('AllGather');"
            "import gc; fields = P(CollectiveCore('AllGather', 4, 'max', 2)).get_fields_to_serialize(); gc.collect();"
            "p = c.create_plugin('x', fields, None);"
            "print(p.core.op, p.core.group_size, p.core.reduction, p.core.axis)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["AllGather", "4", "max", "2"]
