"""Saving keeps the input's IR version where ONNX Runtime can load it, refuses one onnx does not
know, and writes a weights file only for weights."""

import os

import numpy as np
import onnx
import pytest

from fusegraph import rewrite_file
from fusegraph.model_io import MAX_IR_VERSION
from fusegraph.verify.testing import make_model, node
from fusegraph.verify import verify_models

F = np.float32


@pytest.mark.parametrize("opset,ir_in,ir_out", [
    (17, 7, 8), (17, 10, 10), (17, 14, MAX_IR_VERSION),
    (13, 7, 10),  # below opset 15 fused ops' bodies are per type, told apart by `overload` (IR 10)
])
def test_ir_version_kept_raised_for_functions_or_capped_for_onnxruntime(tmp_path, opset, ir_in, ir_out):
    model = make_model([node("MatMul", ["x", "w"], ["m"]), node("Relu", ["m"], ["y"])],
                       {"x": (F, [2, 3])}, {"y": (F, [2, 3])}, {"w": np.eye(3, dtype=F)}, opset=opset)
    model.ir_version = ir_in
    src, dst = str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx")
    onnx.save(model, src)
    rewrite_file(src, dst)
    out = onnx.load(dst)
    assert out.ir_version == ir_out
    assert [f.name for f in out.functions] == ["MatMulRelu"]
    if ir_in <= MAX_IR_VERSION:
        assert all(d.ok for d in verify_models(src, dst))


def test_no_weights_file_when_nothing_is_left_on_disk(tmp_path):
    """An output in another folder gets OUT.data only if some tensor still lives on disk."""
    from fusegraph.model_io import save_model
    model = make_model([node("Relu", ["x"], ["y"])], {"x": (F, [2])}, {"y": (F, [2])}, {"unused": np.ones(2, F)})
    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    assert save_model(model, str(tmp_path / "out" / "m.onnx"), source_dir=str(tmp_path / "src"))
    assert sorted(os.listdir(tmp_path / "out")) == ["m.onnx"]


def test_ir_version_newer_than_onnx_knows_is_refused_not_rewritten(tmp_path):
    from fusegraph import InputError
    model = make_model([node("Relu", ["x"], ["y"])], {"x": (F, [2])}, {"y": (F, [2])})
    model.ir_version = onnx.IR_VERSION + 1
    onnx.save(model, str(tmp_path / "in.onnx"))
    with pytest.raises(InputError, match=f"IR version {onnx.IR_VERSION + 1} is newer"):
        rewrite_file(str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"))
    assert not (tmp_path / "out.onnx").exists()


def test_stale_temporary_files_of_dead_processes_are_removed_others_kept(tmp_path):
    import subprocess
    import sys

    from fusegraph.model_io import TEMP_PREFIX, remove_stale_temps
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    names = {"dead": f"{TEMP_PREFIX}{dead}-0a1b2c.onnx", "dead_data": f"{TEMP_PREFIX}{dead}-0a1b2d.data",
             "live": f"{TEMP_PREFIX}{os.getppid()}-0a1b2c.onnx", "mine": f"{TEMP_PREFIX}{os.getpid()}-0a1b2c.onnx",
             "not_ours": f"{TEMP_PREFIX}{dead}-notes.txt", "user": "model.onnx"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    assert sorted(remove_stale_temps(str(tmp_path))) == sorted([names["dead"], names["dead_data"]])
    assert sorted(os.listdir(tmp_path)) == sorted(v for k, v in names.items() if not k.startswith("dead"))
