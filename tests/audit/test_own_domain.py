"""The `fusegraph` domain is fusegraph's own: each rewrite writes its fused ops' local functions
(`fused_ops.attach_functions` replaces any it finds). A model that defines one of those ops
itself used to be rewritten with its definition replaced, changing its outputs although nothing
fused; it is refused now, while the models fusegraph writes (its own bodies, or a fusion record
of an earlier rewrite) are taken as before."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from fusegraph.cli import main
from fusegraph.ops import fused_ops
from fusegraph.verify import run
from fusegraph.verify.testing import make_model, node

F = np.float32


def _calls_gelu(opset: int = 18) -> onnx.ModelProto:
    model = make_model([node("Gelu", ["x"], ["y"], domain=fused_ops.DOMAIN)], {"x": (F, [2, 4])},
                       {"y": (F, [2, 4])}, opset=opset)
    model.opset_import.append(helper.make_opsetid(fused_ops.DOMAIN, fused_ops.VERSION))
    return model


def _users_gelu() -> onnx.ModelProto:
    """fusegraph.Gelu defined as a Relu: not what fusegraph's Gelu computes."""
    model = _calls_gelu()
    model.functions.append(helper.make_function(fused_ops.DOMAIN, "Gelu", ["X"], ["Y"], [node("Relu", ["X"], ["Y"])],
                                                [helper.make_opsetid("", 18)]))
    return model


def test_a_model_defining_a_fused_op_itself_is_refused(tmp_path, capsys):
    onnx.save(_users_gelu(), tmp_path / "m.onnx")
    before = (tmp_path / "m.onnx").read_bytes()
    assert main([str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fusegraph.Gelu" in err and "another domain" in err, err
    assert not (tmp_path / "o.onnx").exists() and (tmp_path / "m.onnx").read_bytes() == before


@pytest.mark.parametrize("target", fused_ops.TARGETS)
@pytest.mark.parametrize("opset", [14, 18])
def test_a_model_with_fusegraphs_own_bodies_is_taken(tmp_path, capsys, target, opset):
    model = _calls_gelu(opset)
    fused_ops.attach_functions(model, lambda n: onnx.TensorProto.FLOAT, target)
    assert all(fused_ops.writes(f, opset) for f in model.functions)
    onnx.save(model, tmp_path / "m.onnx")
    assert main([str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx")]) == 0, capsys.readouterr().err


def test_a_body_of_another_opset_or_type_is_not_fusegraphs(tmp_path):
    model = _calls_gelu(14)
    fused_ops.attach_functions(model, lambda n: onnx.TensorProto.FLOAT)
    (f,) = model.functions
    assert fused_ops.writes(f, 14) and not fused_ops.writes(f, 13)
    f.overload = "float16"
    assert not fused_ops.writes(f, 14)


def test_a_rewritten_models_record_keeps_the_upgrade_path(tmp_path, capsys):
    """A model a fusegraph rewrite wrote (its fusion record) has its bodies replaced by this
    version's, by design: an older fusegraph's body is not refused."""
    model = _users_gelu()
    helper.set_model_props(model, {"fusegraph.fusions": "[]"})
    onnx.save(model, tmp_path / "m.onnx")
    assert main([str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx")]) == 0, capsys.readouterr().err
    out = onnx.load(tmp_path / "o.onnx")
    x = np.linspace(-3, 3, 8, dtype=F).reshape(2, 4)
    y = run(out, {"x": x})["y"]
    assert np.all(y[x < 0] < 0)  # fusegraph's Gelu, not the Relu the model defined
