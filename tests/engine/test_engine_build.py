"""`rewrite build` / `rewrite inspect` on small synthetic models (CPU, TensorRT or TensorRT-RTX)."""

from __future__ import annotations

import json
import os

import pytest
from onnx import TensorProto

from engine_models import (decomposed_attention_model, fused_matmul_model, mlp_model, onnx_attention_model,
                           requires_tensorrt, unparseable_model)
from fusegraph.plugins import tensorrt_shim
from fusegraph.plugins.engine import build_engine, inspect_engine, report_path
from fusegraph.plugins.engine_cli import build_main, inspect_main

pytestmark = [pytest.mark.tensorrt, requires_tensorrt]

def _qkv(which: str, dims: str) -> list[str]:
    return [a for n in "QKV" for a in (f"--{which}", f"{n}:{dims}")]


def test_mlp_builds_and_reports_layers(tmp_path, capsys):
    model = mlp_model(tmp_path / "mlp.onnx")
    out = tmp_path / "mlp.engine"
    rc = build_main([model, "-o", str(out), "--min", "X:1x64", "--opt", "X:8x64", "--max", "X:32x64", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and out.is_file()
    assert report["parse"]["unsupported"] == [] and report["parse"]["onnx_nodes"] == 3
    assert report["inputs"][0]["min"] == [1, 64] and report["inputs"][0]["max"] == [32, 64]
    info = report["engine_info"]
    assert info["size_bytes"] == out.stat().st_size and info["layer_count"] >= 1
    # the builder's layer report names the ONNX nodes each engine layer came from
    metadata = " ".join(l["metadata"] for l in info["layers"])
    assert all(f"[ONNX Layer: {n}]" in metadata for n in ("mm", "bias", "relu"))
    assert json.loads(report_path(out).read_text())["engine_info"]["sha256"] == info["sha256"]


def test_inspect_reads_layers(tmp_path, capsys):
    out = tmp_path / "mlp.engine"
    build_engine(mlp_model(tmp_path / "mlp.onnx"), out, shapes={"X": (4, 64)})
    report = inspect_engine(out)
    built = json.loads(report_path(out).read_text())
    assert report["layers"] == built["engine_info"]["layers"]
    if "deserialize_error" in report:  # CPU-only machine: the build report stands in
        assert report["layer_source"].startswith("build report")
    else:
        assert report["layer_source"] == "engine inspector"
    assert inspect_main([str(out)]) == 0
    assert f"layers: {len(report['layers'])}" in capsys.readouterr().out


def test_inspect_refuses_stale_build_report(tmp_path):
    out = tmp_path / "mlp.engine"
    build_engine(mlp_model(tmp_path / "mlp.onnx"), out, shapes={"X": (4, 64)})
    other = tmp_path / "other.engine"
    build_engine(mlp_model(tmp_path / "other.onnx", n_out=16), other, shapes={"X": (4, 64)})
    report_path(out).write_text(report_path(other).read_text())  # report of another engine
    report = inspect_engine(out)
    if "deserialize_error" in report:
        assert report["layers"] is None and "another engine" in report["layer_source"]


def test_inspect_rejects_non_engine(tmp_path, capsys):
    model = mlp_model(tmp_path / "mlp.onnx")
    assert inspect_main([model]) == 2
    assert "is not a" in capsys.readouterr().err


def test_dynamic_input_without_shape_is_input_error(tmp_path, capsys):
    out = tmp_path / "mlp.engine"
    assert build_main([mlp_model(tmp_path / "mlp.onnx"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rewrite: error: input X has dynamic dimensions") and "--shape X:" in err
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--shape", "Y:4x64"], "no input named Y"),
    (["--shape", "X:4x65"], "does not fit input X"),
    (["--min", "X:8x64", "--max", "X:4x64"], "min <= opt <= max"),
])
def test_bad_shapes_are_input_errors(tmp_path, capsys, args, message):
    assert build_main([mlp_model(tmp_path / "mlp.onnx"), "-o", str(tmp_path / "e.engine"), *args]) == 2
    assert message in capsys.readouterr().err


def test_unparseable_model_names_nodes_and_leaves_no_file(tmp_path, capsys):
    model = unparseable_model(tmp_path / "bad.onnx")
    out = tmp_path / "out" / "bad.engine"
    out.parent.mkdir()  # `-o` into a missing folder is refused before any parse (one rule with `rewrite -o`)
    assert build_main([model, "-o", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("rewrite: error: TensorRT cannot parse") and "mystery_node (FrobnicateTensor)" in err[0]
    assert any(l.strip().startswith("node mystery_node (FrobnicateTensor):") for l in err[1:])
    assert not out.exists() and not report_path(out).exists()
    assert not out.parent.exists() or os.listdir(out.parent) == []


def test_unparseable_model_json_lists_unsupported(tmp_path, capsys):
    model = unparseable_model(tmp_path / "bad.onnx")
    assert build_main([model, "-o", str(tmp_path / "bad.engine"), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert [e["node"] for e in report["unsupported"]] == ["mystery_node"]
    assert report["unsupported"][0]["reason"]


def test_not_onnx_is_input_error(tmp_path, capsys):
    bogus = tmp_path / "x.onnx"
    bogus.write_bytes(b"\x00garbage\xff" * 10)
    assert build_main([str(bogus), "-o", str(tmp_path / "x.engine")]) == 2
    assert "rewrite: error:" in capsys.readouterr().err


def test_decomposed_attention_builds(tmp_path):
    model = decomposed_attention_model(tmp_path / "attn.onnx")
    report = build_engine(model, tmp_path / "attn.engine", shapes={n: (1, 4, 32, 16) for n in "QKV"})
    assert report["attention"]["layers"] == [] and report["engine_info"]["layer_count"] >= 1


def test_attention_without_dedicated_kernel_is_marked_decomposable(tmp_path, capsys):
    model = onnx_attention_model(tmp_path / "attn23.onnx", TensorProto.FLOAT, head_dim=16)
    out = tmp_path / "attn23.engine"
    rc = build_main([model, "-o", str(out), *_qkv("min", "1x4x1x16"), *_qkv("max", "2x4x128x16")])
    text = capsys.readouterr()
    assert rc == 0 and out.is_file()
    assert "native attention layers: attn" in text.out and "marked decomposable: attn" in text.out
    assert "no dedicated kernel" in text.out
    assert "MyelinCheckException" not in text.err  # the retried build's noise is held back


def test_attention_never_decomposable_fails_with_hint(tmp_path, capsys):
    model = onnx_attention_model(tmp_path / "attn23.onnx", TensorProto.FLOAT, head_dim=16)
    out = tmp_path / "attn23.engine"
    rc = build_main([model, "-o", str(out), *_qkv("shape", "1x4x32x16"), "--decomposable-attention", "never"])
    assert rc == 2 and not out.exists()
    assert "--decomposable-attention auto" in capsys.readouterr().err


def test_attention_always_decomposable(tmp_path):
    model = onnx_attention_model(tmp_path / "attn23.onnx", TensorProto.FLOAT, head_dim=16)
    report = build_engine(model, tmp_path / "a.engine", shapes={n: (1, 4, 32, 16) for n in "QKV"},
                          decomposable_attention="always")
    assert report["attention"]["decomposable"] == ["attn"]


def test_attention_with_dedicated_kernel_is_left_alone(tmp_path):
    """fp16 head dim 64 has a fused MHA kernel: 'auto' must not mark it (or lose the kernel)."""
    model = onnx_attention_model(tmp_path / "attn16.onnx", TensorProto.FLOAT16, head_dim=64)
    report = build_engine(model, tmp_path / "a.engine", shapes={n: (1, 4, 128, 64) for n in "QKV"})
    assert report["attention"] == {"layers": ["attn"], "decomposable": [], "reason": None}
    if tensorrt_shim.is_rtx():  # RTX's name for its fused attention kernel
        assert any("mha" in l["name"] for l in report["engine_info"]["layers"])


def test_fused_op_without_plugins_uses_local_function(tmp_path):
    model = fused_matmul_model(tmp_path / "fused.onnx")
    report = build_engine(model, tmp_path / "fused.engine", shapes={"X": (4, 64)})
    [op] = report["fused_ops"]
    assert op["node"] == "fused_mlp" and op["op"] == "MatMulBiasRelu"
    assert op["implementation"] == "inlined local function"
    assert op["network_layer_types"] == {"MATRIX_MULTIPLY": 1, "ELEMENTWISE": 1, "ACTIVATION": 1}
    assert op["engine_layers"], "the engine layers made from the function body name their caller"


def test_precision_flags_follow_the_backend(tmp_path, capsys):
    model = mlp_model(tmp_path / "mlp.onnx")
    rc = build_main([model, "-o", str(tmp_path / "m.engine"), "--shape", "X:4x64", "--fp16"])
    err = capsys.readouterr().err
    if tensorrt_shim.is_rtx():
        assert rc == 2 and "strongly typed" in err
    else:
        assert rc == 0


def test_rewrite_flag_rewrites_first(tmp_path):
    model = mlp_model(tmp_path / "mlp.onnx")
    report = build_engine(model, tmp_path / "m.engine", shapes={"X": (4, 64)}, rewrite=True)
    assert report["rewritten_model"].endswith(".rewritten.onnx")
    assert report["parse"]["unsupported"] == []
