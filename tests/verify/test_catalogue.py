"""The fused-op catalogue (`fusegraph.ops.fused_ops.REGISTRY`) is the one declaration of each op:
what else describes an op reads it from there, so these checks hold by construction and fail
where someone spells an op a second time."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

import fusegraph.ops  # noqa: F401  (registers every op)
from fusegraph.kernels import reference
from fusegraph.ops.activation_ops import GATED
from fusegraph.ops.fused_ops import ACTIVATIONS, DOMAIN, MATMUL_EPILOGUES, REGISTRY, matmul_epilogue_name
from fusegraph.plugins.core import CORES


def test_every_op_names_its_numpy_reference():
    missing = {op.name: op.reference for op in REGISTRY.values() if not callable(getattr(reference, op.reference, None))}
    assert not missing, f"ops whose reference is not a function of fusegraph.kernels.reference: {missing}"


def test_activations_are_the_catalogue_enum():
    assert reference.ACTIVATIONS == tuple(a or "none" for a in ACTIVATIONS)
    assert set(MATMUL_EPILOGUES) == {matmul_epilogue_name(b, a) for b in (False, True) for a in ACTIVATIONS if b or a}
    for name in MATMUL_EPILOGUES:
        assert REGISTRY[name].activation in ACTIVATIONS and name.endswith(REGISTRY[name].activation)
    for name, act in GATED.items():
        assert REGISTRY[name].activation == act and CORES[name].spec is REGISTRY[name]


def test_plugin_defaults_are_the_catalogue_defaults():
    for name, core in CORES.items():
        assert core().attributes == {a.name: a.default for a in REGISTRY[name].attrs}, name


def test_quick_gelu_reference_is_the_body():
    """QuickGelu's reference was the one the catalogue lacked: it must compute the op's body."""
    op = REGISTRY["QuickGelu"]
    assert op.reference == "quick_gelu"
    node = helper.make_node("QuickGelu", ["X"], ["Y"], domain=DOMAIN, alpha=1.5)
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 5])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                              functions=[op.function(18)])
    x = np.random.default_rng(0).uniform(-4, 4, (3, 5)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    np.testing.assert_allclose(got, reference.quick_gelu(x, 1.5), rtol=1e-5, atol=1e-6)
