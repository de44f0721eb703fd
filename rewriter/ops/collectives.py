"""Collective ops in the `fusegraph` domain: what a tensor-parallel rank model calls where its
ranks exchange data (`fusegraph.shard` inserts them).

    AllReduce(X) -> Y          attrs group_size, reduction ("sum" | "max" | "min" | "prod")
    AllGather(X) -> Y          attrs group_size, axis: the ranks' X concatenated along axis, rank order
    ReduceScatter(X) -> Y      attrs group_size, reduction, axis: the reduction's piece `rank` along axis

A collective has no ONNX body: its result depends on the other ranks' tensors, which one model
cannot see. ONNX Runtime therefore runs a rank model only through `fusegraph.lockstep` (segments
between collectives in ORT, the collectives in numpy across the ranks), and TensorRT through the
NCCL plugins in `fusegraph.plugins.collectives` (op type = plugin name, namespace `fusegraph`).
Each op's semantics over the ranks' inputs is `reference`, the one definition both of those
follow. The rank comes from the process (RANK), never from the model: the rank models differ only
in their weights and rank-dependent constants.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

DOMAIN = "fusegraph"
OPS = ("AllReduce", "AllGather", "ReduceScatter")
REDUCTIONS = {"sum": np.add, "max": np.maximum, "min": np.minimum, "prod": np.multiply}


def is_collective(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type in OPS


def make_node(op_type: str, x: str, y: str, group_size: int, *, name: str, axis: int | None = None,
              reduction: str = "sum") -> onnx.NodeProto:
    """One collective node; `axis` (AllGather, ReduceScatter) is non-negative, in X's rank."""
    if op_type not in OPS:
        raise ValueError(f"{op_type} is not a collective ({', '.join(OPS)})")
    attrs: dict = {"group_size": group_size}
    if op_type != "AllGather":
        attrs["reduction"] = reduction
    if op_type != "AllReduce":
        attrs["axis"] = axis
    return helper.make_node(op_type, [x], [y], name=name, domain=DOMAIN, **attrs)


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def reference(node: onnx.NodeProto, per_rank: list[np.ndarray]) -> list[np.ndarray]:
    """Each rank's output, given each rank's input (in rank order), as NCCL computes it."""
    attrs = attributes(node)
    group = attrs.get("group_size", len(per_rank))
    if group != len(per_rank):
        raise ValueError(f"{node.op_type} {node.name!r}: group_size {group}, but {len(per_rank)} ranks ran it")
    if node.op_type == "AllGather":
        gathered = np.concatenate(per_rank, axis=_axis(attrs, per_rank[0]))
        return [gathered] * group
    reduction = attrs.get("reduction", "sum")
    if isinstance(reduction, bytes):
        reduction = reduction.decode()
    if reduction not in REDUCTIONS:
        raise ValueError(f"{node.op_type} {node.name!r}: unknown reduction {reduction!r}")
    # NCCL reduces in the tensor's own type; so does numpy's ufunc.reduce over the stacked inputs.
    reduced = REDUCTIONS[reduction].reduce(np.stack(per_rank), axis=0).astype(per_rank[0].dtype)
    if node.op_type == "AllReduce":
        return [reduced] * group
    axis = _axis(attrs, reduced)
    if reduced.shape[axis] % group:
        raise ValueError(f"ReduceScatter {node.name!r}: axis {axis} of {reduced.shape} does not divide by {group}")
    return list(np.split(reduced, group, axis=axis))


def _axis(attrs: dict, x: np.ndarray) -> int:
    axis = attrs.get("axis", 0)
    return axis + x.ndim if axis < 0 else axis
