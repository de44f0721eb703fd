"""Activation chains -> one op: GELU (erf, tanh), SiLU, QuickGELU, and gated MLPs.

Exporters decompose GELU into 6-9 elementwise ops (torch's `gelu` below opset 20, HF's
`gelu_new`/`NewGELUActivation` always), each a pass over the activation. GELU becomes opset 20's
`Gelu` with `approximate` set to match, or `fusegraph.Gelu`/`GeluTanh` in older models; SiLU
(x * Sigmoid(x)) and QuickGELU (x * Sigmoid(1.702 x)) become fusegraph ops.

Every spelling seen in exports is matched: the 0.5 applied to x, to (1 + ...) or last; x/sqrt 2
or x * (1/sqrt 2); x^3 as Pow(x, 3) or x*x*x; the tanh argument expanded, sqrt(2/pi) (x +
0.044715 x^3), or factored, (sqrt(2/pi) x)(1 + 0.044715 x x). The structural constants are
written at their canonical values (the matcher compares them to the dtype's rounding), and each
is captured so `constants_keep_shape` can check what the fused op absorbs: a constant that
broadcasts x to a bigger shape ([2, 1, 1, 1] over [1, ...]) or that a caller may feed (an
initializer that is also a graph input) is part of what the graph computes, not of GELU.

Priorities (`priorities`): gated MLPs (act(X @ Wg) * (X @ Wu), Llama's SwiGLU, T5's GeGLU) go
first, before the GEMM epilogues would take the gate's MatMul alone; then the GEMM epilogues,
which take an activation right after a MatMul (+ bias) - the patterns here are theirs too; then
the standalone activations.
"""

from __future__ import annotations

import math

from fusegraph.ops.activation_ops import GATED
from fusegraph.ops.fused_ops import ACTIVATIONS, DOMAIN
from fusegraph.pattern import Const, Pattern, PatternOps
from fusegraph.rule import Rule, reject

from .conditions import opset, overridable
from .priorities import ACTIVATION, GATED_MLP

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


#: Names under which the activation patterns capture their structural constants (one name per
#: position: two positions may hold two different initializers of one value).
STRUCTURAL_CONSTANTS = ("k_half", "k_one", "k_root2", "k_cube", "k_coef", "k_scale", "k_one_inner", "alpha")


def half_x_times(op: PatternOps, x: Pattern, one_plus: Pattern) -> Pattern:
    """0.5 * x * one_plus, in any association."""
    half = Const(0.5, name="k_half")
    return (op.Mul(op.Mul(x, half), one_plus) | op.Mul(op.Mul(x, one_plus), half)
            | op.Mul(x, op.Mul(one_plus, half)))


def gelu_erf_decomposed(op: PatternOps, x: Pattern) -> Pattern:
    """0.5 * x * (1 + erf(x / sqrt(2))), with the division as Mul by 1/sqrt(2) too."""
    scaled = op.Div(x, Const(SQRT2, name="k_root2")) | op.Mul(x, Const(1 / SQRT2, name="k_root2"))
    return half_x_times(op, x, op.Add(op.Erf(scaled), Const(1.0, name="k_one")))


def cube(op: PatternOps, x: Pattern) -> Pattern:
    return op.Pow(x, Const(3.0, name="k_cube")) | op.Mul(op.Mul(x, x), x)


def tanh_argument(op: PatternOps, x: Pattern) -> Pattern:
    """sqrt(2/pi) (x + 0.044715 x^3), or factored as (sqrt(2/pi) x)(1 + (0.044715 x) x)."""
    coef, scale = Const(0.044715, name="k_coef"), Const(SQRT_2_OVER_PI, name="k_scale")
    expanded = op.Mul(op.Add(x, op.Mul(cube(op, x), coef)), scale)
    factored = op.Mul(op.Mul(x, scale), op.Add(op.Mul(op.Mul(x, coef), x), Const(1.0, name="k_one_inner")))
    return expanded | factored


def gelu_tanh_decomposed(op: PatternOps, x: Pattern) -> Pattern:
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))."""
    return half_x_times(op, x, op.Add(op.Tanh(tanh_argument(op, x)), Const(1.0, name="k_one")))


def gelu_erf(op: PatternOps, x: Pattern) -> Pattern:
    """GELU (erf) in any form: decomposed, opset-20 `Gelu`, or already `fusegraph.Gelu`."""
    return gelu_erf_decomposed(op, x) | op.Gelu(x, approximate="none") | op.Gelu(x, _domain=DOMAIN)


def gelu_tanh(op: PatternOps, x: Pattern) -> Pattern:
    return gelu_tanh_decomposed(op, x) | op.Gelu(x, approximate="tanh") | op.GeluTanh(x, _domain=DOMAIN)


def silu(op: PatternOps, x: Pattern) -> Pattern:
    return op.Mul(x, op.Sigmoid(x)) | op.Silu(x, _domain=DOMAIN)


#: Every form of each activation of the fused ops' enum (`fused_ops.ACTIVATIONS`, the identity
#: aside), in the order a tagged alternative tries them.
ACTIVATION_PATTERNS = {
    "Relu": lambda op, x: op.Relu(x),
    "Sigmoid": lambda op, x: op.Sigmoid(x),
    "Tanh": lambda op, x: op.Tanh(x),
    "Silu": silu,
    "Gelu": gelu_erf,
    "GeluTanh": gelu_tanh,
}
assert set(ACTIVATION_PATTERNS) == set(ACTIVATIONS) - {""}, "an activation of the enum without its patterns"


# -- conditions shared with the GEMM epilogues -------------------------------------------------
def unabsorbable(c, rank: int | None) -> str | None:
    """Why the constant `c`, applied elementwise to a value of rank `rank`, can't be absorbed by
    a fused op (which keeps that value's shape and reads no such input), or None."""
    if overridable(c):
        return f"{c.name!r} is a graph input's default: a caller may feed another value"
    if c.shape == ():  # a rank-0 scalar keeps any shape, even one of unknown rank
        return None
    if c.shape is None or rank is None:
        return f"the rank of {c.name!r} or of the value it applies to is unknown"
    if len(c.shape) > rank or any(d != 1 for d in c.shape):
        return f"{c.name!r} of shape {list(c.shape)} broadcasts a rank-{rank} value to another shape"
    return None


def structural_constants_fit(rank: int | None, captures: dict, names=STRUCTURAL_CONSTANTS) -> bool:
    """Every structural constant the pattern captured (under `names`) can be absorbed
    (`unabsorbable`)."""
    for name in names:
        c = captures.get(name)
        why = None if c is None else unabsorbable(c, rank)
        if why:
            return reject(why)
    return True


def matmul_rank(x) -> int | None:
    """The rank of X @ W for a 2-D W: X's, or 1 for a vector X."""
    return None if x.rank is None else max(x.rank, 1)


def constants_keep_shape(x, **captures) -> bool:
    return structural_constants_fit(x.rank, captures)


def gate_constants_keep_shape(x, **captures) -> bool:
    return structural_constants_fit(matmul_rank(x), captures)


# -- standalone activations -----------------------------------------------------------------
def _gelu_rule(name: str, decomposed, approximate: str, fused: str) -> Rule:
    def pattern(op, x):
        return decomposed(op, x)

    def replacement(op, x):
        if opset(x) >= 20:
            return op.Gelu(x, approximate=approximate)
        return getattr(op, fused)(x, _domain=DOMAIN)
    replacement.__doc__ = f"decomposed GELU ({approximate}) -> Gelu (opset 20) or fusegraph.{fused}"
    return Rule(name, pattern, replacement, constants_keep_shape, priority=ACTIVATION)


def silu_pattern(op, x):
    return op.Mul(x, op.Sigmoid(x))


def silu_replacement(op, x):
    """x * Sigmoid(x) -> fusegraph.Silu"""
    return op.Silu(x, _domain=DOMAIN)


def quick_gelu_pattern(op, x):
    return op.Mul(x, op.Sigmoid(op.Mul(x, Const(name="alpha"))))


def quick_gelu_replacement(op, x, alpha):
    """x * Sigmoid(1.702 x) -> fusegraph.QuickGelu"""
    return op.QuickGelu(x, _domain=DOMAIN, alpha=float(alpha.const_value.reshape(-1)[0]))


def alpha_is_quick_gelu(alpha) -> bool:
    """CLIP's QuickGELU constant (1.702 within 0.1%: the op takes the captured value itself, so
    the rewrite is exact for any alpha; the window only names the unit); another scale is some
    other sigmoid-gated unit."""
    v = alpha.const_value
    ok = (v is not None and v.size == 1 and v.dtype.kind == "f"
          and abs(float(v.reshape(-1)[0]) - 1.702) < 1e-3 * 1.702)
    return ok or reject("scale is not a float 1.702")


# -- gated MLPs -----------------------------------------------------------------------------
def _gated_rule(op_name: str) -> Rule:
    act = ACTIVATION_PATTERNS[GATED[op_name]]

    def pattern(op, x, wg, wu):
        return op.Mul(act(op, op.MatMul(x, wg)), op.MatMul(x, wu))

    def replacement(op, x, wg, wu):
        return getattr(op, op_name)(x, wg, wu, _domain=DOMAIN)
    replacement.__doc__ = f"act(X @ Wg) * (X @ Wu) -> fusegraph.{op_name}"
    return Rule(f"activations.{op_name}", pattern, replacement, [weights_are_matrices, gate_constants_keep_shape],
                GATED_MLP)


def weights_are_matrices(wg, wu) -> bool:
    """The gated kernel takes two [K, N] weights of one shape."""
    if wg.rank != 2 or wu.rank != 2:
        return reject(f"weights have ranks {wg.rank}, {wu.rank}, not 2")
    return wg.shape == wu.shape or reject(f"weight shapes {wg.shape} and {wu.shape} differ")


RULES = [_gated_rule(name) for name in GATED] + [
    _gelu_rule("activations.gelu_erf", gelu_erf_decomposed, "none", "Gelu"),
    _gelu_rule("activations.gelu_tanh", gelu_tanh_decomposed, "tanh", "GeluTanh"),
    Rule("activations.quick_gelu", quick_gelu_pattern, quick_gelu_replacement,
         [alpha_is_quick_gelu, constants_keep_shape], ACTIVATION),
    Rule("activations.silu", silu_pattern, silu_replacement, priority=ACTIVATION - 1),
]
