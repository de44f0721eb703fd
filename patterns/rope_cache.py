"""Opset-23 RotaryEmbedding whose cos/sin cache has batch 1 over a batch that isn't: broadcast it.

torch.onnx's dynamo exporter (opset 23) turns HF's RoPE into `RotaryEmbedding(x, cos, sin)` with
caches computed for the traced batch of 1, while `x` keeps a dynamic batch. ONNX requires the
cache's batch to equal the input's (there is no position_ids input to index it), so ONNX Runtime
fails at any batch but 1 and TensorRT(-RTX) refuses to parse the node ("cosCache has batch size 1
but must have the same batch size as input"). What the model means is torch's broadcast: expand
the caches to x's batch. At batch 1 the rewrite computes exactly what the export computes; at other
batches it computes what the PyTorch model does, where the export had no defined result.

The native op stays (TensorRT maps it to its rotary layer); only its cache inputs change.
"""

from __future__ import annotations

import numpy as np

from fusegraph.pattern import Attr
from fusegraph.rule import Rule, reject

from .priorities import ROPE_CACHE


def pattern(op, x, cos, sin):
    return op.RotaryEmbedding(x, cos, sin, interleaved=Attr("interleaved"), num_heads=Attr("num_heads"),
                              rotary_embedding_dim=Attr("rotary_embedding_dim"))


def replacement(op, x, cos, sin, interleaved, num_heads, rotary_embedding_dim):
    """RotaryEmbedding(x, Expand(cos), Expand(sin)) with the caches broadcast to x's batch."""
    shape = op.Concat(op.Shape(x, start=0, end=1), op.Shape(cos, start=1), axis=0)
    # 0 is the schema's "absent" for both: leave them out rather than write an explicit 0.
    return op.RotaryEmbedding(x, op.Expand(cos, shape), op.Expand(sin, shape), interleaved=interleaved,
                              num_heads=num_heads or None, rotary_embedding_dim=rotary_embedding_dim or None)


def cache_batch_is_one_but_input_batch_is_not(x, cos, sin) -> bool:
    for cache in (cos, sin):
        if cache.shape is None or len(cache.shape) != 3 or cache.shape[0] != 1:
            return reject(f"{cache.name!r} is not a [1, S, R] cache")
    if x.shape is None or not x.shape or x.shape[0] == 1:
        return reject("the input's batch is 1: nothing to broadcast")
    return True


def example() -> dict:
    """x [batch, 2, 3, 4] with a [1, 3, 2] cache: what the dynamo exporter writes."""
    angles = np.linspace(0.0, 3.0, 6, dtype=np.float32).reshape(1, 3, 2)
    return {"x": (("batch", 2, 3, 4), "float32"), "cos": np.cos(angles), "sin": np.sin(angles),
            "interleaved": 0, "num_heads": 0, "rotary_embedding_dim": 0}


RULES = [Rule("rope_cache.broadcast_batch", pattern, replacement, cache_batch_is_one_but_input_batch_is_not,
              priority=ROPE_CACHE, examples=[example()])]
