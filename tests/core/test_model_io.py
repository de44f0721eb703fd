"""Saving keeps the input's IR version where ONNX Runtime can load it."""

import numpy as np
import onnx
import pytest

from fusegraph import rewrite_file
from fusegraph.model_io import MAX_IR_VERSION
from fusegraph.testing import make_model, node
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
