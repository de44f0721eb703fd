"""Every form a fused op is emitted in parses in TensorRT(-RTX) with no unsupported node and builds.

A form is one case of `fused_op_cases` (every registered fused op, RoPE in both rotations,
attention with a mask and causal) as a one-node model with the local function the rewriter
attaches, at the opsets where bodies differ: 12 (the oldest for ops with attributes; Squeeze's
axes an attribute), 13 (bodies specialised to the element type, per overload), 15 (the first
polymorphic one, CastLike; norms decomposed), 17 (SkipLayerNorm's body is
`LayerNormalization`) and 23 (ReduceMean's axes as an input; RotaryEmbedding shares its name
with an ONNX op), in float32 and float16, and bfloat16 at 13 and 23. Every form is built, not
only parsed: one-node models with static shapes take ~0.1 s each with TensorRT-RTX on the CPU,
20 s for the file on an idle 2-core machine (50 s measured with the cores shared).
"""

from __future__ import annotations

import onnx
import pytest
from onnx import helper

from engine_models import requires_tensorrt
from fused_op_cases import CASES, DTYPES, opsets
from fusegraph.plugins.engine import build_engine
from fusegraph.ops.fused_ops import DOMAIN, POLYMORPHIC_OPSET, attach_functions

pytestmark = [pytest.mark.tensorrt, requires_tensorrt]

FORMS = [pytest.param(case, opset, dtype, id=f"{case.id}-op{opset}-{dtype}")
         for case in CASES for opset in (12, 13, 15, 17, 23) if opset in opsets(case)
         for dtype in ("float32", "float16", "bfloat16") if dtype != "bfloat16" or opset in (13, 23)]


@pytest.mark.parametrize("case, opset, dtype", FORMS)
def test_form_parses_and_builds(tmp_path, case, opset, dtype):
    path = tmp_path / "form.onnx"
    onnx.save(case.model(opset, DTYPES[dtype]), str(path))
    report = build_engine(path, tmp_path / "form.engine", write_report=False)
    assert report["parse"]["unsupported"] == []
    [fused] = report["fused_ops"]
    assert fused["implementation"] in ("inlined local function", "native attention", "native normalization")
    assert report["engine_info"]["layer_count"] >= 1 and (tmp_path / "form.engine").stat().st_size > 0


def test_one_op_at_two_element_types_below_opset_15(tmp_path):
    """Two overloads of one op in one model: TensorRT's parser finds local functions by name
    alone, so `build_engine` must give each overload its own before parsing."""
    nodes, inputs, outputs = [], [], []
    for dtype in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        x, y = f"X{dtype}", f"Y{dtype}"
        nodes.append(helper.make_node("GeluTanh", [x], [y], domain=DOMAIN, name=f"gelu{dtype}"))
        inputs.append(helper.make_tensor_value_info(x, dtype, [2, 8]))
        outputs.append(helper.make_tensor_value_info(y, dtype, [2, 8]))
    model = helper.make_model(helper.make_graph(nodes, "mixed", inputs, outputs), ir_version=8,
                              opset_imports=[helper.make_opsetid("", POLYMORPHIC_OPSET - 1),
                                             helper.make_opsetid(DOMAIN, 1)])
    attach_functions(model)
    assert sorted(f.overload for f in model.functions) == ["float", "float16"]
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(tmp_path / "mixed.onnx"))
    report = build_engine(tmp_path / "mixed.onnx", tmp_path / "mixed.engine", write_report=False)
    assert report["parse"]["unsupported"] == []
    assert [f["implementation"] for f in report["fused_ops"]] == ["inlined local function"] * 2
    assert {i["dtype"] for i in report["inputs"]} == {"FLOAT", "HALF"}
