"""`fusegraph.rewrite` takes what the ecosystem passes around and gives back the same kind: an
onnx.ModelProto, a path (file to file), an onnx_graphsurgeon.Graph, an onnx_ir.Model, and the
ONNXProgram of `torch.onnx.export(..., dynamo=True)`. Each round trip fuses, leaves the argument
as it was, and computes what the original computes in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import fusegraph
from fusegraph.errors import InputError
from fusegraph.verify.testing import make_model, node, op_counts

X = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)


def silu_model() -> onnx.ModelProto:
    """MatMul + bias + SiLU: one fusegraph.MatMulBiasSilu."""
    rng = np.random.default_rng(1)
    return make_model([node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["h"]),
                       node("Sigmoid", ["h"], ["s"]), node("Mul", ["h", "s"], ["y"])],
                      {"x": (np.float32, [2, 4])}, {"y": (np.float32, [2, 3])},
                      {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": np.ones(3, np.float32)})


def run(model: onnx.ModelProto) -> np.ndarray:
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]


def assert_fused(model: onnx.ModelProto) -> None:
    assert op_counts(model) == {"fusegraph.MatMulBiasSilu": 1}
    np.testing.assert_allclose(run(model), run(silu_model()), rtol=1e-5, atol=1e-6)


def test_model_proto_in_model_proto_out():
    model = silu_model()
    before = model.SerializeToString()
    out = fusegraph.rewrite(model)
    assert isinstance(out, onnx.ModelProto) and out is not model
    assert model.SerializeToString() == before
    assert_fused(out)


@pytest.mark.parametrize("kind", [str, Path])
def test_path_in_path_out(tmp_path, kind):
    src = tmp_path / "in.onnx"
    onnx.save(silu_model(), src)
    out = fusegraph.rewrite(kind(src), output=kind(tmp_path / "out.onnx"))
    assert isinstance(out, kind) and Path(out) == tmp_path / "out.onnx"
    assert_fused(onnx.load(out))
    assert onnx.load(src) == silu_model()


def test_a_path_needs_an_output_and_a_model_none(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(silu_model(), src)
    with pytest.raises(InputError, match="output="):
        fusegraph.rewrite(str(src))
    with pytest.raises(InputError, match="output= is for a path"):
        fusegraph.rewrite(silu_model(), output=str(tmp_path / "o.onnx"))
    with pytest.raises(InputError, match="cannot rewrite a builtins.dict"):
        fusegraph.rewrite({"graph": None})


def test_graphsurgeon_graph_in_graph_out():
    gs = pytest.importorskip("onnx_graphsurgeon")
    graph = gs.import_onnx(silu_model())
    out = fusegraph.rewrite(graph)
    assert isinstance(out, gs.Graph) and out is not graph
    assert [n.op for n in graph.nodes] == ["MatMul", "Add", "Sigmoid", "Mul"]  # the argument is untouched
    assert_fused(gs.export_onnx(out))


def test_onnx_ir_model_in_model_out():
    ir = pytest.importorskip("onnx_ir")
    model = ir.serde.deserialize_model(silu_model())
    out = fusegraph.rewrite(model)
    assert isinstance(out, ir.Model) and out is not model
    assert [n.op_type for n in model.graph] == ["MatMul", "Add", "Sigmoid", "Mul"]
    assert_fused(ir.serde.serialize_model(out))


def test_torch_onnx_program_in_program_out():
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x):
            h = self.linear(x)
            return h * torch.sigmoid(h)

    module = Block().eval()
    x = torch.from_numpy(X)
    program = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
    ops_before = [n.op_type for n in program.model.graph]
    out = fusegraph.rewrite(program)
    assert isinstance(out, torch.onnx.ONNXProgram) and out is not program
    assert out.exported_program is program.exported_program
    assert [n.op_type for n in program.model.graph] == ops_before
    assert "MatMulBiasSilu" in [n.op_type for n in out.model.graph]
    onnx.checker.check_model(out.model_proto, full_check=True)
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(out(x)[0].numpy(), expected, rtol=1e-5, atol=1e-6)
