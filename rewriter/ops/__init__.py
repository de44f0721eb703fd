"""fusegraph's fused operators: what each op computes, as ONNX local functions per opset, and
how each lowers per target runtime.

`fused_ops` holds the machinery (`FusedOp`, the body builder `Body`, the registry and
`attach_functions`); the op families register themselves when imported, which this package
does, so `fused_ops.REGISTRY` holds every op as soon as anything under `fusegraph.ops` is
imported. `lowering` (rules over fused ops, above the core) is imported by whoever lowers.
"""

from . import activation_ops, attention_op, fused_ops, norm_ops, rope_ops  # noqa: F401  (register the ops)
