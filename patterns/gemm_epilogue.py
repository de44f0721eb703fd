"""MatMul (+ bias Add) (+ activation) -> one fused GEMM-epilogue op.

The activation runs in the GEMM kernel's registers before the single store
(`fusegraph.kernels`), so the MatMul's output never makes a round trip through memory. Each
activation is matched in the forms exporters emit: Relu, Sigmoid and Tanh as single ops; GELU
as opset-20 `Gelu` (either `approximate`) or its erf and tanh decompositions; SiLU as
`x * Sigmoid(x)` (the patterns of `fusegraph.patterns.activations`). The bias must be a constant vector over the output features, which is what a
GEMM epilogue can broadcast.
"""

from __future__ import annotations

from fusegraph.fused_ops import DOMAIN, matmul_epilogue_name
from fusegraph.patterns.activations import gelu_erf, gelu_tanh, silu
from fusegraph.rule import Rule, reject

ACTIVATION_PATTERNS = {
    "Relu": lambda op, x: op.Relu(x),
    "Sigmoid": lambda op, x: op.Sigmoid(x),
    "Tanh": lambda op, x: op.Tanh(x),
    "Silu": silu,
    "Gelu": gelu_erf,
    "GeluTanh": gelu_tanh,
}


def bias_is_vector(w, b) -> bool:
    """A GEMM epilogue broadcasts a bias over the output features: b is [N] (or [1, N])."""
    if not b.is_constant:
        return reject("bias is not a constant")
    n = w.shape[-1] if w.shape else None
    bshape = b.shape
    if bshape is None or any(d != 1 for d in bshape[:-1]) or (n is not None and bshape[-1] != n):
        return reject(f"bias shape {bshape} is not [N] with N = {n}")
    return True


def weight_is_matrix(w) -> bool:
    return w.rank == 2 or reject(f"weight has rank {w.rank}, the epilogue op takes a 2-D weight")


def _make_rule(bias: bool, activation: str) -> Rule:
    op_name = matmul_epilogue_name(bias, activation)
    act = ACTIVATION_PATTERNS.get(activation)

    def pattern(op, x, w, b):
        y = op.MatMul(x, w)
        if bias:
            y = op.Add(y, b)
        return act(op, y) if act else y

    def replacement(op, x, w, b):
        return getattr(op, op_name)(*((x, w, b) if bias else (x, w)), _domain=DOMAIN)
    replacement.__doc__ = f"MatMul{' + bias' if bias else ''}{' + ' + activation if activation else ''} -> fusegraph.{op_name}"

    conditions = [weight_is_matrix] + ([bias_is_vector] if bias else [])
    # Longer chains first, so MatMul+Add+Relu is never split into MatMul+Add, Relu.
    priority = 100 + (10 if activation else 0) + (5 if bias else 0)
    return Rule(f"gemm_epilogue.{op_name}", pattern, replacement, conditions, priority)


RULES = [_make_rule(bias, act) for act in ACTIVATION_PATTERNS for bias in (True, False)] + [_make_rule(True, "")]
