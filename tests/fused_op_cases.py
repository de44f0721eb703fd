"""One-node models of every fused op, as the rewriter emits them, with inputs and numpy references.

Shared by tests/verify/test_fused_op_bodies.py (checker, inference, ONNX Runtime against
`fusegraph.kernels.reference`) and tests/engine/test_emitted_forms.py (TensorRT parse and build).
Importable from both because tests/ holds the root conftest.py (pytest puts it on sys.path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

import fusegraph
from fusegraph.ops.activation_ops import GATED
from fusegraph.ops.fused_ops import ACTIVATIONS, DOMAIN, REGISTRY, attach_functions, matmul_epilogue_name
from fusegraph.kernels import reference as ref

fusegraph.default_rules()  # registers the fused ops of every rule module (attention's among them)

OPSETS = range(9, 24)
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
#: Add, Mul and most arithmetic take bfloat16 from opset 13: no older model has bf16 to fuse.
BFLOAT16_OPSET = 13
Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Case:
    """One form of a fused op: its inputs' shapes (all of X's element type), its attributes,
    and its reference (float64 math on the inputs -> the outputs, in the op's order)."""
    op: str
    variant: str
    shapes: dict[str, tuple[int, ...]]
    reference: Callable[[Arrays], list[np.ndarray]]
    attrs: dict[str, float | int] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.op}-{self.variant}" if self.variant else self.op

    def inputs(self, dtype, seed: int = 0) -> Arrays:
        rng = np.random.default_rng(seed)
        return {n: rng.uniform(-2, 2, s).astype(dtype) for n, s in self.shapes.items()}

    def model(self, opset: int, dtype) -> onnx.ModelProto:
        """The op as one node in a model of default-domain `opset`, with its local function."""
        fused = REGISTRY[self.op]
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        outs = self.reference(self.inputs(np.float64))
        graph = helper.make_graph(
            [helper.make_node(self.op, list(self.shapes), list(fused.outputs), domain=DOMAIN,
                              name=f"fused_{self.op}", **self.attrs)],
            self.id, [helper.make_tensor_value_info(n, elem, s) for n, s in self.shapes.items()],
            [helper.make_tensor_value_info(n, elem, o.shape) for n, o in zip(fused.outputs, outs)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                        helper.make_opsetid(DOMAIN, 1)], ir_version=8)
        attach_functions(model)
        return model

    def expected(self, feeds: Arrays) -> list[np.ndarray]:
        dtype = next(iter(feeds.values())).dtype
        return [o.astype(dtype) for o in self.reference({n: a.astype(np.float64) for n, a in feeds.items()})]


def _mm(act: str) -> Callable[[Arrays], list[np.ndarray]]:
    return lambda a: [ref.matmul_bias_act(a["X"], a["W"], a.get("B"), act or "none")]


def _quick_gelu(a: Arrays) -> list[np.ndarray]:
    x = a["X"]
    return [x / (1 + np.exp(-1.702 * x))]


def _rope(interleaved: bool):
    return lambda a: [ref.rotary_embedding(a["X"], a["cos"], a["sin"], interleaved, 4, compute_dtype=np.float64)]


X = (2, 3, 8)
CASES: list[Case] = []
for _bias in (False, True):
    for _act in ACTIVATIONS:
        if _bias or _act:
            CASES.append(Case(matmul_epilogue_name(_bias, _act), "",
                              {"X": X, "W": (8, 4), **({"B": (4,)} if _bias else {})}, _mm(_act)))
for _act in ("Gelu", "GeluTanh", "Silu"):
    CASES.append(Case(_act, "", {"X": X}, lambda a, act=_act: [ref.activation(a["X"], act)]))
CASES.append(Case("QuickGelu", "", {"X": X}, _quick_gelu, {"alpha": 1.702}))
for _name, _act in GATED.items():
    CASES.append(Case(_name, "", {"X": X, "Wg": (8, 4), "Wu": (8, 4)},
                      lambda a, act=_act: [ref.swiglu(a["X"], a["Wg"], a["Wu"], act=act)]))
_QKV = {"Q": (1, 4, 3, 8), "K": (1, 2, 5, 8), "V": (1, 2, 5, 8)}
CASES += [
    Case("Attention", "causal", _QKV, lambda a: [ref.attention(a["Q"], a["K"], a["V"], None, 0.35, True)],
         {"scale": 0.35, "is_causal": 1, "softcap": 0.0, "softcapped": 0, "zero_nan_rows": 1}),
    Case("MaskedAttention", "", {**_QKV, "Mask": (1, 1, 3, 5)},
         lambda a: [ref.attention(a["Q"], a["K"], a["V"], a["Mask"], 0.35, False)],
         {"scale": 0.35, "is_causal": 0, "softcap": 0.0, "softcapped": 0, "zero_nan_rows": 1}),
    Case("Attention", "softcap", _QKV,
         lambda a: [ref.attention(a["Q"], a["K"], a["V"], None, 3.0, False, softcap=0.5)],
         {"scale": 3.0, "is_causal": 0, "softcap": 0.5, "softcapped": 1, "zero_nan_rows": 1}),
    Case("MaskedAttention", "eager", {**_QKV, "Mask": (1, 1, 3, 5)},
         lambda a: [ref.attention(a["Q"], a["K"], a["V"], a["Mask"], 0.35, True, zero_nan_rows=False)],
         {"scale": 0.35, "is_causal": 1, "softcap": 0.0, "softcapped": 0, "zero_nan_rows": 0}),
    Case("RMSNorm", "", {"X": X, "gamma": (8,)}, lambda a: [ref.rms_norm(a["X"], a["gamma"], 1e-5, np.float64)],
         {"epsilon": 1e-5}),
    Case("SkipRMSNorm", "", {"X": X, "R": X, "gamma": (8,)},
         lambda a: list(ref.skip_rms_norm(a["X"], a["R"], a["gamma"], 1e-5, np.float64)), {"epsilon": 1e-5}),
    Case("LayerNorm", "", {"X": X, "gamma": (8,), "beta": (8,)},
         lambda a: [ref.layer_norm(a["X"], a["gamma"], a["beta"], 1e-5, np.float64)], {"epsilon": 1e-5}),
    Case("SkipLayerNorm", "", {"X": X, "R": X, "gamma": (8,), "beta": (8,)},
         lambda a: list(ref.skip_layer_norm(a["X"], a["R"], a["gamma"], a["beta"], 1e-5, np.float64)),
         {"epsilon": 1e-5}),
    # partial rotary (4 of 8 channels), cos/sin broadcast over batch and heads
    Case("RotaryEmbedding", "half", {"X": (1, 2, 3, 8), "cos": (1, 1, 3, 4), "sin": (1, 1, 3, 4)},
         _rope(False), {"interleaved": 0, "rotary_dim": 4}),
    Case("RotaryEmbedding", "interleaved", {"X": (1, 2, 3, 8), "cos": (1, 1, 3, 4), "sin": (1, 1, 3, 4)},
         _rope(True), {"interleaved": 1, "rotary_dim": 4}),
]


def opsets(case: Case) -> list[int]:
    """The opsets a rule may emit the op into: from its body's oldest (the attention rules'
    floor, `attention_op.MIN_OPSET`, where it is newer) to 23."""
    from fusegraph.ops import attention_op

    floor = REGISTRY[case.op].min_opset
    if case.op in (attention_op.ATTENTION.name, attention_op.MASKED_ATTENTION.name):
        floor = max(floor, getattr(attention_op, "MIN_OPSET", floor))
    return [o for o in OPSETS if o >= floor]


def dtypes(opset: int) -> list[str]:
    return [d for d in DTYPES if d != "bfloat16" or opset >= BFLOAT16_OPSET]


assert {c.op for c in CASES} == set(REGISTRY), f"fused ops without a case: {set(REGISTRY) - {c.op for c in CASES}}"
