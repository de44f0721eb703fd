"""Every fused op's local function is valid in every opset a rule emits it into, and computes
the numpy reference (`fusegraph.kernels.reference`) for fp32, fp16 and bf16.

Per op x opset (from the op's `min_opset`, 9 or 12, to 23) x element type (bf16 from opset
13): a one-node model passes the full checker and strict shape inference (which types the
outputs through the body), and ONNX Runtime's CPU provider runs it equal to the reference.
Where that provider has no kernel for a body op at the type, and for bf16 (ONNX Runtime's
Python API exchanges no bf16 arrays; the session must still load), `onnx.reference` runs it
instead; any other ONNX Runtime error fails. Below opset 15 the body is specialised to the
element type (`overload`, see `fusegraph.ops.fused_ops`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from fused_op_cases import CASES, DTYPES, dtypes, opsets
from fusegraph.ops.fused_ops import DOMAIN, POLYMORPHIC_OPSET, attach_functions, overload
from fusegraph.verify.testing import assert_rewrites, make_model, node

TOLERANCE = {"float32": (1e-5, 1e-4), "float16": (1e-2, 1e-2), "bfloat16": (6e-2, 6e-2)}

PARAMS = [pytest.param(case, opset, dtype, id=f"{case.id}-op{opset}-{dtype}")
          for case in CASES for opset in opsets(case) for dtype in dtypes(opset)]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:
        if "NOT_IMPLEMENTED" not in str(e):  # anything but a missing CPU kernel is the body's fault
            raise
        session = None
    if session is None or any(a.dtype == DTYPES["bfloat16"] for a in feeds.values()):
        return ReferenceEvaluator(model).run(None, feeds)
    return session.run(None, feeds)


@pytest.mark.parametrize("case, opset, dtype", PARAMS)
def test_body_is_valid_and_computes_the_reference(case, opset, dtype):
    model = case.model(opset, DTYPES[dtype])
    onnx.checker.check_model(model, full_check=True)
    untyped = onnx.ModelProto()
    untyped.CopyFrom(model)
    for o in untyped.graph.output:
        o.ClearField("type")
    inferred = onnx.shape_inference.infer_shapes(untyped, check_type=True, strict_mode=True)
    for got, declared in zip(inferred.graph.output, model.graph.output):
        # the body's element type and rank always; dims where inference can follow the body
        # (RoPE's Gather and attention's head repeat leave some symbolic)
        got, declared = got.type.tensor_type, declared.type.tensor_type
        assert got.elem_type == declared.elem_type and len(got.shape.dim) == len(declared.shape.dim)
        assert all(g.dim_value in (0, d.dim_value) for g, d in zip(got.shape.dim, declared.shape.dim))
    [node] = model.graph.node
    [function] = model.functions
    assert function.overload == node.overload == ("" if opset >= POLYMORPHIC_OPSET else overload(
        onnx.helper.np_dtype_to_tensor_dtype(np.dtype(DTYPES[dtype]))))
    assert function.opset_import[0].version == opset

    feeds = case.inputs(DTYPES[dtype])
    atol, rtol = TOLERANCE[dtype]
    for name, got, want in zip([o.name for o in model.graph.output], _run(model, feeds), case.expected(feeds)):
        assert got.dtype == want.dtype, name
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), atol=atol, rtol=rtol,
                                   err_msg=f"{case.id} output {name} at opset {opset}, {dtype}")



def test_one_op_at_two_element_types_below_opset_15():
    """Each node calls the overload of its element type, in one model (ONNX Runtime picks by
    overload; TensorRT needs `build_engine`'s renaming, tests/engine/test_emitted_forms.py)."""
    [case] = [c for c in CASES if c.op == "RMSNorm"]
    types = {"32": np.float32, "16": np.float16}
    nodes, inputs, outputs, feeds = [], [], [], {}
    for suffix, dtype in types.items():
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        nodes.append(onnx.helper.make_node("RMSNorm", [f"X{suffix}", f"gamma{suffix}"], [f"Y{suffix}"],
                                           domain=DOMAIN, name=f"norm{suffix}", epsilon=1e-5))
        inputs += [onnx.helper.make_tensor_value_info(f"{n}{suffix}", elem, shape) for n, shape in case.shapes.items()]
        outputs.append(onnx.helper.make_tensor_value_info(f"Y{suffix}", elem, case.shapes["X"]))
        feeds.update({f"{n}{suffix}": a for n, a in case.inputs(dtype).items()})
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "mixed", inputs, outputs), ir_version=8,
                                   opset_imports=[onnx.helper.make_opsetid("", POLYMORPHIC_OPSET - 1),
                                                  onnx.helper.make_opsetid(DOMAIN, 1)])
    attach_functions(model)
    assert sorted(f.overload for f in model.functions) == ["float", "float16"]
    onnx.checker.check_model(model, full_check=True)
    for got, dtype in zip(_run(model, feeds), types.values()):
        [want] = case.expected(case.inputs(dtype))
        atol, rtol = TOLERANCE[np.dtype(dtype).name]
        assert got.dtype == dtype
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), atol=atol, rtol=rtol)


@pytest.mark.parametrize("opset", [12, 13, 14])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_old_opset_block_rewrites_into_a_valid_model(opset, dtype):
    """A GELU (tanh) MLP into a written-out LayerNorm and a written-out RMSNorm, fused at the old
    opsets users still pin: every fused op's body valid there, ONNX Runtime equal to the original."""
    def c(value):
        return np.asarray(value, dtype)
    h = 8
    rng = np.random.default_rng(0)
    nodes = [node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["a"]),
             node("Mul", ["a", "a"], ["a2"]), node("Mul", ["a2", "a"], ["a3"]), node("Mul", ["a3", "k"], ["ka3"]),
             node("Add", ["a", "ka3"], ["inner"]), node("Mul", ["inner", "s"], ["si"]), node("Tanh", ["si"], ["t"]),
             node("Add", ["t", "one"], ["t1"]), node("Mul", ["a", "half"], ["ha"]), node("Mul", ["ha", "t1"], ["g"]),
             node("ReduceMean", ["g"], ["mu"], axes=[-1]), node("Sub", ["g", "mu"], ["d"]),
             node("Mul", ["d", "d"], ["d2"]), node("ReduceMean", ["d2"], ["var"], axes=[-1]),
             node("Add", ["var", "eps"], ["ve"]), node("Sqrt", ["ve"], ["sd"]), node("Div", ["d", "sd"], ["n"]),
             node("Mul", ["n", "gamma"], ["ng"]), node("Add", ["ng", "beta"], ["ln"]),
             node("Mul", ["ln", "ln"], ["l2"]), node("ReduceMean", ["l2"], ["ms"], axes=[-1]),
             node("Add", ["ms", "eps"], ["mse"]), node("Sqrt", ["mse"], ["rms"]), node("Div", ["ln", "rms"], ["r"]),
             node("Mul", ["r", "gamma"], ["y"])]
    inits = {"w": c(rng.uniform(-1, 1, (h, h))), "b": c(rng.uniform(-1, 1, h)), "k": c(0.044715),
             "s": c(np.sqrt(2 / np.pi)), "one": c(1.0), "half": c(0.5), "eps": c(1e-5),
             "gamma": c(rng.uniform(0.5, 1.5, h)), "beta": c(rng.uniform(-1, 1, h))}
    model = make_model(nodes, {"x": (dtype, ["n", h])}, {"y": (dtype, ["n", h])}, inits, opset=opset)
    out = assert_rewrites(model, expect={"fusegraph.MatMulBiasGeluTanh": 1, "fusegraph.LayerNorm": 1,
                                         "fusegraph.RMSNorm": 1}, shapes={"x": (4, h)})
    per_type = overload(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    assert {f.overload for f in out.functions} == {"" if opset >= POLYMORPHIC_OPSET else per_type}
