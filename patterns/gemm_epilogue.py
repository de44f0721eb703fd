"""MatMul (+ bias Add) (+ activation), and Gemm (+ activation) -> one fused GEMM-epilogue op.

The activation runs in the GEMM kernel's registers before the single store
(`fusegraph.kernels`), so the MatMul's output never makes a round trip through memory. Each
activation is matched in the forms exporters emit: Relu, Sigmoid and Tanh as single ops; GELU
as opset-20 `Gelu` (either `approximate`) or its erf and tanh decompositions; SiLU as
`x * Sigmoid(x)` (the patterns of `fusegraph.patterns.activations`). The bias must be a constant vector over the output features, which is what a
GEMM epilogue can broadcast; TorchScript shares equal biases (all zeros in a fresh model) as
Identity nodes of one initializer, which count as constants.

`Gemm` (alpha = beta = 1, transA = 0) is how exporters write a 2-D Linear: BERT's and ViT's
pooler `Gemm -> Tanh` (transB = 1), GPT-2's Conv1D `Reshape -> Gemm -> Reshape -> GELU`
(transB = 0). A Reshape between the Gemm and the activation is taken along: an elementwise
activation commutes with it, so act(Reshape(Gemm(x))) = Reshape(act(Gemm(x))) exactly, and the
replacement keeps the Reshape after the fused op. transB = 1 feeds the fused op a `Transpose` of
the weight, which TensorRT and ONNX Runtime fold into a constant when they build. A Gemm with
no activation is left alone: it already is one op with its bias.

Three rules, not one per (op, bias, activation): the activation is a tagged alternative whose
label names the fused op (`matmul_epilogue_name`), and the bias an optional Add (or Gemm's
optional C), so the library's dispatch sees one rule per shape of chain.
"""

from __future__ import annotations

from fusegraph.ops.fused_ops import DOMAIN, matmul_epilogue_name
from fusegraph.pattern import Attr, optional, tagged
from fusegraph.patterns.activations import ACTIVATION_PATTERNS, matmul_rank, structural_constants_fit
from fusegraph.rule import Rule, reject

from .conditions import overridable
from .priorities import GEMM_ACTIVATION, GEMM_BIAS


def constant_source(v):
    """The constant behind an Identity node, else `v` itself."""
    p = v.producer
    return p.inputs[0] if p is not None and p.op_type == "Identity" and not p.domain else v


def _bias_over(b, n, rank: int | None) -> bool:
    """A GEMM epilogue broadcasts a bias over the N output features of a rank-`rank` product: b
    is [N] (or [1, N]). A scalar is not refused for being wrong but for being another op's input
    form; a bias of higher rank than the product would grow the output's rank."""
    source = constant_source(b)
    if not source.is_constant or overridable(source):
        return reject("bias is not a constant")
    bshape = b.shape
    if bshape is None or not bshape or any(d != 1 for d in bshape[:-1]) or bshape[-1] != n:
        return reject(f"bias shape {bshape} is not [N] with N = {n}")
    if len(bshape) > 1 and (rank is None or len(bshape) > rank):  # (a product has rank >= 1)
        return reject(f"bias shape {bshape} would change the rank of the rank-{rank} product")
    return True


def bias_is_vector(x, w, b) -> bool:
    return _bias_over(b, w.shape[-1], matmul_rank(x))


def gemm_bias_is_vector(w, b, trans_b) -> bool:
    return _bias_over(b, w.shape[0 if trans_b else 1], 2)


def weight_is_matrix(w) -> bool:
    """A 2-D weight with a static output width (the bias and the epilogue's tile are sized by it)."""
    if w.rank != 2:
        return reject(f"weight has rank {w.rank}, the epilogue op takes a 2-D weight")
    return all(isinstance(d, int) for d in w.shape) or reject(f"weight shape {w.shape} is not static")


def matmul_constants_keep_shape(x, **captures) -> bool:
    """The activation's constants (GELU's 0.5, ...) keep the product's shape."""
    return structural_constants_fit(matmul_rank(x), captures)


def gemm_constants_keep_shape(shape=None, **captures) -> bool:
    """As above, over the Gemm's 2-D output or the Reshape of it (the target's length) that the
    activation reads."""
    if shape is None:
        rank = 2
    else:
        rank = shape.shape[0] if shape.shape and isinstance(shape.shape[0], int) else None
    return structural_constants_fit(rank, captures)


def bias_fits_matmul(x, w, b) -> bool:
    """No bias (the optional Add is absent), or one the epilogue can broadcast."""
    return b is None or bias_is_vector(x, w, b)


def bias_fits_gemm(w, b, trans_b) -> bool:
    return b is None or gemm_bias_is_vector(w, b, trans_b)


def activation_of(op, y):
    """Any epilogue activation of `y`, its name (a key of ACTIVATION_PATTERNS) bound as `activation`."""
    return tagged("activation", {name: act(op, y) for name, act in ACTIVATION_PATTERNS.items()})


ACTIVATION_NAMES = "|".join(ACTIVATION_PATTERNS)


def matmul_act_pattern(op, x, w, b):
    return activation_of(op, optional(op.Add(op.MatMul(x, w), b)))


def matmul_act_replacement(op, x, w, b, activation):
    return getattr(op, matmul_epilogue_name(b is not None, activation))(
        *((x, w) if b is None else (x, w, b)), _domain=DOMAIN)


matmul_act_replacement.__doc__ = f"MatMul (+ bias) + {ACTIVATION_NAMES} -> fusegraph.MatMul[Bias]{{activation}}"


def matmul_bias_pattern(op, x, w, b):
    return op.Add(op.MatMul(x, w), b)


def matmul_bias_replacement(op, x, w, b):
    """MatMul + bias -> fusegraph.MatMulBias"""
    return op.MatMulBias(x, w, b, _domain=DOMAIN)


def gemm_act_pattern(op, x, w, b, shape):
    attrs = dict(alpha=1.0, beta=1.0, transA=0, transB=Attr("trans_b"))
    y = op.Gemm(x, w, b, **attrs) | op.Gemm(x, w, **attrs)
    return activation_of(op, optional(op.Reshape(y, shape, allowzero=Attr("allowzero"))))


def gemm_act_replacement(op, x, w, b, shape, trans_b, allowzero, activation):
    w = op.Transpose(w, perm=[1, 0]) if trans_b else w
    y = getattr(op, matmul_epilogue_name(b is not None, activation))(
        *((x, w) if b is None else (x, w, b)), _domain=DOMAIN)
    if shape is None:
        return y
    return op.Reshape(y, shape, **({} if allowzero is None else {"allowzero": allowzero}))


gemm_act_replacement.__doc__ = (f"Gemm (+ bias) (+ Reshape) + {ACTIVATION_NAMES} -> "
                                "fusegraph.MatMul[Bias]{activation}")

# Chains with an activation first, so MatMul+Add+Relu is never split into MatMul+Add, Relu.
RULES = [
    Rule("gemm_epilogue.matmul_act", matmul_act_pattern, matmul_act_replacement,
         [weight_is_matrix, bias_fits_matmul, matmul_constants_keep_shape], GEMM_ACTIVATION),
    Rule("gemm_epilogue.gemm_act", gemm_act_pattern, gemm_act_replacement,
         [weight_is_matrix, bias_fits_gemm, gemm_constants_keep_shape], GEMM_ACTIVATION),
    Rule("gemm_epilogue.matmul_bias", matmul_bias_pattern, matmul_bias_replacement,
         [weight_is_matrix, bias_is_vector], GEMM_BIAS),
]
