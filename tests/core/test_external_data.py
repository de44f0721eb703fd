"""Models whose weights live in external data files are rewritten without reading the weights:
the output keeps them external, beside it, and computes the same thing."""

import os
import subprocess
import sys

import numpy as np
import onnx

from fusegraph import rewrite_file
from fusegraph.testing import make_model, node, op_counts
from fusegraph.verify import verify_models

F = np.float32


def save_external(model, path):
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=os.path.basename(path) + ".data", size_threshold=0)


def mlp(k, n):
    rng = np.random.default_rng(0)
    return make_model([node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["a"]), node("Relu", ["a"], ["y"])],
                      {"x": (F, [2, k])}, {"y": (F, [2, n])},
                      {"w": rng.standard_normal((k, n)).astype(F), "b": rng.standard_normal(n).astype(F)})


def test_external_weights_stay_external_and_are_copied_beside_the_output(tmp_path):
    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    dst_dir.mkdir()
    src = str(src_dir / "m.onnx")
    save_external(mlp(64, 32), src)
    data_before = open(src + ".data", "rb").read()
    report = rewrite_file(src, str(dst_dir / "m.onnx"))
    assert dict(report.per_rule) == {"gemm_epilogue.matmul_act": 1}
    out = onnx.load(str(dst_dir / "m.onnx"), load_external_data=False)
    assert op_counts(out) == {"fusegraph.MatMulBiasRelu": 1}
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in out.graph.initializer)
    assert open(dst_dir / "m.onnx.data", "rb").read() == data_before
    assert open(src + ".data", "rb").read() == data_before
    diffs = verify_models(src, str(dst_dir / "m.onnx"))
    assert all(d.ok for d in diffs), diffs


def test_weights_are_not_read_into_memory(tmp_path):
    """A 256 MB weight: rewriting must not grow the process by anything like it."""
    src = str(tmp_path / "big.onnx")
    save_external(mlp(8192, 8192), src)
    script = (
        "import resource, sys; from fusegraph import rewrite_file;"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        f"r = rewrite_file({src!r}, {str(tmp_path / 'out.onnx')!r});"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "print(dict(r.per_rule), (after - before) // 1024)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    fusions, grown_mb = proc.stdout.rsplit(" ", 1)
    assert "gemm_epilogue.matmul_act" in fusions
    assert int(grown_mb) < 64, f"process grew by {grown_mb} MB for a 256 MB weight"
