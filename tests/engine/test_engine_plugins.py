"""The plugin path through TensorRT's ONNX parser and builder, and the fallback without plugins.

Every build that adds a Python IPluginV3 runs in a subprocess: TensorRT-RTX's parser aborts the
whole process when its plugin lookup fails (plugins/repro_rtx_plugin.py), and an abort must fail
one test, not kill pytest.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine_models import (fused_and_onnx_attention_model, fused_matmul_model, fused_rms_norm_model, fused_rotary_model,
                           requires_tensorrt)
from fusegraph.plugins import tensorrt_shim
from fusegraph.plugins.engine import build_engine

pytestmark = [pytest.mark.tensorrt, requires_tensorrt]

ROOT = Path(__file__).resolve().parents[2]
BUILD = "import sys; from fusegraph.plugins.engine_cli import build_main; sys.exit(build_main(sys.argv[1:]))"


def run_build(*argv: str) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, "-c", BUILD, *argv, "--json"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode >= 0, f"build died with signal {-proc.returncode}: {proc.stderr[-2000:]}"
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}, proc.stderr


def test_fused_matmul_becomes_plugin_layer(tmp_path):
    model = fused_matmul_model(tmp_path / "fused.onnx", op="MatMulBiasGelu")
    rc, report, err = run_build(model, "-o", str(tmp_path / "f.engine"), "--plugins", "--shape", "X:4x64")
    assert rc == 0, err
    [op] = report["fused_ops"]
    assert op["implementation"] == "plugin" and op["network_layer_types"] == {"PLUGIN_V3": 1}
    assert report["routed_to_plugins"] == ["fused_mlp"]
    assert {"name": "MatMulBiasGelu", "version": "1", "namespace": "fusegraph"} in report["plugins_registered"]
    assert op["engine_layers"], "the plugin layer appears in the engine"
    assert (tmp_path / "f.engine").is_file()


def test_same_model_without_plugins_inlines_the_function(tmp_path):
    model = fused_matmul_model(tmp_path / "fused.onnx", op="MatMulBiasGelu")
    report = build_engine(model, tmp_path / "f.engine", shapes={"X": (4, 64)})
    assert report["fused_ops"][0]["implementation"] == "inlined local function"
    assert "PLUGIN_V3" not in report["parse"]["network_layer_types"]


def test_rms_norm_plugin_and_fallback(tmp_path):
    model = fused_rms_norm_model(tmp_path / "rms.onnx")
    rc, report, err = run_build(model, "-o", str(tmp_path / "r.engine"), "--plugins", "--shape", "X:2x8x32")
    assert rc == 0, err
    assert report["fused_ops"][0]["implementation"] == "plugin"
    fallback = build_engine(model, tmp_path / "r2.engine", shapes={"X": (2, 8, 32)})
    assert fallback["fused_ops"][0]["implementation"] == "inlined local function"
    assert fallback["fused_ops"][0]["network_layer_types"].get("REDUCE") == 1


def test_plugin_override_leaves_standard_attention_native(tmp_path):
    """Plugins live in namespace "fusegraph", so ONNX's own Attention stays a native layer."""
    model = fused_and_onnx_attention_model(tmp_path / "attn.onnx")
    rc, report, err = run_build(model, "-o", str(tmp_path / "a.engine"), "--plugins")
    assert rc == 0, err
    assert [(o["node"], o["implementation"]) for o in report["fused_ops"]] == [("fg_attn", "plugin")]
    assert report["attention"]["layers"] == ["onnx_attn"]
    without = build_engine(model, tmp_path / "b.engine")
    assert [(o["node"], o["implementation"]) for o in without["fused_ops"]] == [("fg_attn", "native attention")]
    assert sorted(without["attention"]["layers"]) == ["fg_attn", "onnx_attn"]


def test_fused_op_named_like_an_onnx_op_keeps_its_own_semantics(tmp_path):
    """fusegraph RotaryEmbedding must not reach TensorRT's ONNX-23 RotaryEmbedding importer
    (different cos/sin layout: the build failed on every rewritten Llama before the rename)."""
    model = fused_rotary_model(tmp_path / "rope.onnx")
    report = build_engine(model, tmp_path / "r.engine")
    assert report["renamed_for_parser"] == {"RotaryEmbedding": "RotaryEmbedding_fusegraph"}
    assert report["fused_ops"][0]["implementation"] == "inlined local function"
    rc, plugged, err = run_build(model, "-o", str(tmp_path / "p.engine"), "--plugins")
    assert rc == 0, err
    assert plugged["fused_ops"][0]["implementation"] == "plugin"


ATTRIBUTES = """
import sys, onnx
from fusegraph.plugins import tensorrt_shim as shim
from fusegraph.plugins.engine import _route_to_plugins
from fusegraph.plugins import register_all
trt = shim.load()
register_all()
model = onnx.load(sys.argv[1])
_route_to_plugins(model, {"Attention"})
logger = shim.make_logger()
network = shim.create_network(shim.create_builder(logger))
parser = shim.create_parser(network, logger, plugin_override=True)
assert parser.parse(model.SerializeToString()), shim.parser_errors(parser)
for i in range(network.num_layers):
    layer = network.get_layer(i)
    if layer.type == trt.LayerType.PLUGIN_V3:
        layer.__class__ = trt.IPluginV3Layer
        print(layer.name, type(layer.plugin.core).__name__, layer.plugin.core.attributes)
"""


def test_node_attributes_reach_the_plugin(tmp_path):
    model = fused_and_onnx_attention_model(tmp_path / "attn.onnx", scale=0.25)
    proc = subprocess.run([sys.executable, "-c", ATTRIBUTES, model], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("fg_attn Attention {'scale': 0.25, 'is_causal': 1, 'softcap': 0.0, 'softcapped': 0, "
                                   "'zero_nan_rows': 1}")


def test_plugin_fields_round_trip():
    from fusegraph.plugins.core import CORES
    from fusegraph.plugins.tensorrt_plugin import attributes_to_fields, fields_to_attributes

    core = CORES["RotaryEmbedding"](interleaved=1, rotary_dim=32)
    assert fields_to_attributes(CORES["RotaryEmbedding"], attributes_to_fields(core)) == core.attributes
    core = CORES["SkipRMSNorm"](epsilon=1e-5)
    back = fields_to_attributes(CORES["SkipRMSNorm"], attributes_to_fields(core))
    assert np.isclose(back["epsilon"], 1e-5)


REPRO = ROOT / "plugins" / "repro_rtx_plugin.py"


@pytest.mark.skipif(not tensorrt_shim.available() or not tensorrt_shim.is_rtx(), reason="TensorRT-RTX only")
def test_rtx_python_plugin_aborts_without_the_workaround():
    """Records TensorRT-RTX 1.7's behaviour: a plain import aborts in the parser's plugin lookup.
    If this starts passing the build, RTX fixed it: drop `_load_rtx_libraries` and this test."""
    proc = subprocess.run([sys.executable, str(REPRO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stdout, proc.stderr)
    assert "terminate called without an active exception" in proc.stderr
    assert "plugin constructed" in proc.stdout and "parsed:" not in proc.stdout


def test_python_plugin_builds_through_the_shim():
    proc = subprocess.run([sys.executable, str(REPRO), "--shim"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "layer: repro_node PLUGIN_V3" in proc.stdout and "built: True" in proc.stdout
