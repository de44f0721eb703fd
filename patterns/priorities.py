"""The rule families' order, in one table (`Rule.priority`: the driver runs higher priorities over
the whole graph first, and at one priority tries the rules in list order).

A family goes before another when its pattern holds something the other would take on its own
and so break up: attention holds MatMuls and a Softmax, a gated MLP holds a GEMM + activation,
the Q/K/V trio holds three MatMul + bias chains, a GEMM epilogue holds an activation. Within a
family, the larger form goes first for the same reason (the biased Q/K/V trio, a partial
rotation, a GEMM chain with its activation). The residual norms go last: they wrap a norm op,
whether the model exported it or `norms` fused it.
"""

#: BMM-Softmax-BMM: before anything that would take its MatMuls or Softmax. The opset-23
#: `Attention` form first, so a block that the standard op can express becomes it.
ATTENTION_ONNX = 210
ATTENTION = 200
#: act(X @ Wg) * (X @ Wu): before the GEMM epilogues take the gate's MatMul + activation alone.
GATED_MLP = 130
#: Three projections of one input: after attention (which starts at the projected Q, K, V) and
#: the gated MLPs, before the epilogues take each MatMul + bias alone; the biased trio one above.
QKV = 120
#: MatMul / Gemm (+ bias) + activation, before MatMul + bias alone, so MatMul+Add+Relu is never
#: split into MatMul+Add, Relu.
GEMM_ACTIVATION = 115
GEMM_BIAS = 105
#: Standalone activations: after the epilogues took those right after a GEMM. SiLU one below:
#: `x * Sigmoid(...)` roots QuickGELU too, and the more specific form goes first.
ACTIVATION = 90
#: A legalization of the exported opset-23 RotaryEmbedding, which no other family makes or reads:
#: its place among them does not matter.
ROPE_CACHE = 85
#: Rotary embeddings; a partial rotation one above, since it holds the full rotation's pattern
#: over its rotated channels.
ROPE = 80
#: Norms, then the residual Add + norm around them.
NORM = 60
SKIP_NORM = 50
