"""Conditions the rule families share: what a captured value's model allows, and what a fused
op can compute. Each returns True or refuses with the reason (`reject`), like every condition.
"""

from __future__ import annotations

import onnx

from fusegraph.rule import reject


def opset(v) -> int:
    """The default-domain opset of the model `v` lives in (what a replacement may emit)."""
    return v.graph.opset.get("", 1)


def overridable(v) -> bool:
    """An initializer that is also a graph input is a default the caller may feed (ONNX IR), not
    a constant: a fused op that absorbed it would ignore the value fed."""
    return v in v.graph.inputs


def computes_in_float32(v, what: str, op: str) -> bool:
    """The fused ops compute in float32 (their bodies Cast to it; the kernels accumulate in it):
    a float64 `v` would lose float64's precision, so a float64 chain stays as it is."""
    return v.dtype != onnx.TensorProto.DOUBLE or reject(f"float64 {what}: the fused {op} would be computed in float32")
