"""The TensorRT shim without TensorRT: the error a user without it sees (runs everywhere)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from engine_models import mlp_model

MISSING_TENSORRT = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorrt", "tensorrt_rtx_bindings", "tensorrt_rtx_libs"):
                raise ImportError(f"blocked {name}")
    sys.meta_path.insert(0, Block())
    from fusegraph.plugins.engine_cli import build_main
    sys.exit(build_main(sys.argv[1:]))
""")


def test_missing_tensorrt_names_both_install_routes(tmp_path):
    model = mlp_model(tmp_path / "mlp.onnx")
    proc = subprocess.run([sys.executable, "-c", MISSING_TENSORRT, model, "-o", str(tmp_path / "m.engine")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("rewrite: error: TensorRT is not available") and "\n" not in line
    assert "pip install tensorrt`" in line and "pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs" in line
    assert not (tmp_path / "m.engine").exists()
