"""Decomposed LayerNorm and RMSNorm -> one norm op; residual Add + norm -> one Skip*Norm op.

Exporters spell a norm as a chain of ReduceMean/Sub/Pow/Sqrt/Div (T5, Llama and any custom
module; torch's own layer_norm already exports as `LayerNormalization`). Each chain reads and
writes the activation several times; one norm op reads it once. The forms matched are the ones
exporters emit: x*x or Pow(x, 2), Div by the root or Mul by its Reciprocal (or 1/root, or
Pow(var + eps, -0.5)), Casts to float32 around the statistics, ReduceMean's axes as attribute
(opset < 18) or input.

Targets: opset 17's `LayerNormalization` (stash_type float32), so LayerNorm is fused only in
models of opset 17 or newer (older ones have no standard op for it and TensorRT parses the
decomposition fine); opset 23's `RMSNormalization`, or `fusegraph.RMSNorm` below opset 23.
All of them take X in float16, bfloat16 or float32, compute the statistics in float32 and
return X's type, so a decomposition is fused only if it does the same (`float32_statistics`):
float64 norms would lose float64's precision, a Cast of float32 X to float16 for the statistics
rounds them coarser than the fused op would, and an integer "norm" is no norm op at all. Its
epsilon becomes an attribute, so it must be a constant nobody can feed that keeps the shape.

A transformer block adds its output to the residual stream and normalizes the sum, and the
next block adds to that same sum: `fusegraph.SkipLayerNorm`/`SkipRMSNorm` compute both, S = X + R
and Y = norm(S), in one pass (`fusegraph.ops.norm_ops`). They run after the norm rules, so they see
the norm ops whether exported or fused here (`fusegraph.LayerNorm` below opset 17 included:
SkipLayerNorm's body is written out there too).
"""

from __future__ import annotations

import onnx

from fusegraph.ops import norm_ops  # noqa: F401  (registers the fused ops)
from fusegraph.ops.fused_ops import DOMAIN, opset_refusal
from fusegraph.pattern import Attr, Const, Pattern, PatternOps
from fusegraph.patterns.activations import structural_constants_fit, unabsorbable
from fusegraph.rule import Leaf, Rule, reject

from .conditions import computes_in_float32, opset, overridable
from .priorities import NORM, SKIP_NORM


def mean_last(op: PatternOps, x: Pattern, axes: str) -> Pattern:
    """ReduceMean keeping dims; its axes (attribute or input) are captured as `axes`."""
    return op.ReduceMean(x, axes=Attr(axes), keepdims=1) | op.ReduceMean(x, Const(name=axes), keepdims=1)


def normalize(op: PatternOps, d: Pattern, var: Pattern) -> Pattern:
    """d / sqrt(var + eps), as a Div or a Mul by the reciprocal, or d * (var + eps)^-0.5."""
    shifted = op.Add(var, Const(name="eps"))
    root = op.Sqrt(shifted)
    return (op.Div(d, root) | op.Mul(d, op.Reciprocal(root)) | op.Mul(d, op.Div(Const(1.0, name="k_one"), root))
            | op.Mul(d, op.Pow(shifted, Const(-0.5, name="k_minus_half"))))


def square(op: PatternOps, x: Pattern) -> Pattern:
    return op.Pow(x, Const(2.0, name="k_two")) | op.Mul(x, x)


#: The structural constants the patterns capture, besides eps (`constants_keep_shape`).
NORM_CONSTANTS = ("k_two", "k_one", "k_minus_half")


def statistics_input(op: PatternOps, x: Pattern) -> Pattern:
    """X, or X cast for the statistics (the target type checked by `float32_statistics`)."""
    return op.Cast(x, to=Attr("stats_type")) | x


def scaled(op: PatternOps, n: Pattern, gamma: Pattern) -> Pattern:
    """gamma * n, with n cast back (to the type checked by `float32_statistics`)."""
    return op.Mul(op.Cast(n, to=Attr("out_type")) | n, gamma)


def layer_norm_pattern(op, x, gamma, beta):
    xs = statistics_input(op, x)
    d = op.Sub(xs, mean_last(op, xs, "mean_axes"))
    n = normalize(op, d, mean_last(op, square(op, d), "var_axes"))
    return op.Add(scaled(op, n, gamma), beta)


def layer_norm_replacement(op, x, gamma, beta, eps):
    """decomposed LayerNorm -> LayerNormalization (opset 17) or fusegraph.LayerNorm"""
    if opset(x) >= norm_ops.LAYER_NORMALIZATION_OPSET:
        return op.LayerNormalization(x, gamma, beta, axis=-1, epsilon=epsilon(eps), stash_type=1)
    return op.LayerNorm(x, gamma, beta, _domain=DOMAIN, epsilon=epsilon(eps))


def rms_norm_pattern(op, x, gamma):
    xs = statistics_input(op, x)
    n = normalize(op, xs, mean_last(op, square(op, xs), "var_axes"))
    return scaled(op, n, gamma)


def rms_norm_replacement(op, x, gamma, eps):
    """decomposed RMSNorm -> RMSNormalization (opset 23) or fusegraph.RMSNorm"""
    if opset(x) >= 23:
        return op.RMSNormalization(x, gamma, axis=-1, epsilon=epsilon(eps), stash_type=1)
    return op.RMSNorm(x, gamma, _domain=DOMAIN, epsilon=epsilon(eps))


def epsilon(eps) -> float:
    return float(eps.const_value.reshape(-1)[0])


# -- conditions ------------------------------------------------------------------------------
def axes_list(axes) -> list[int] | None:
    """Axes captured from an attribute (a list) or an input (a constant Value)."""
    if axes is None:
        return None
    if hasattr(axes, "const_value"):
        arr = None if overridable(axes) else axes.const_value
        return None if arr is None else [int(a) for a in arr.reshape(-1)]
    return [int(a) for a in axes]


def is_last_axis(x, axes) -> bool:
    got = axes_list(axes)
    return got is not None and len(got) == 1 and (got[0] == -1 or (x.rank is not None and got[0] == x.rank - 1))


def means_over_last_axis(x, mean_axes, var_axes) -> bool:
    """Both means run over the last axis only: -1 (whatever X's rank, if it has one: a scalar
    has no axis), or rank-1 where the rank is known."""
    if x.rank == 0:
        return reject(f"X has rank {x.rank}: no last axis to normalize over")
    for axes in (mean_axes, var_axes):
        if not is_last_axis(x, axes):
            return reject(f"mean over axes {axes_list(axes)}, not over the last axis only")
    return True


def mean_over_last_axis(x, var_axes) -> bool:
    if x.rank == 0:
        return reject(f"X has rank {x.rank}: no last axis to normalize over")
    return is_last_axis(x, var_axes) or reject(f"mean over axes {axes_list(var_axes)}, not the last axis only")


def eps_is_scalar(x, eps) -> bool:
    """A small non-negative float the fused op takes as its `epsilon` attribute: a single
    element that keeps the variance's shape (rank <= X's) and that no caller can feed."""
    v = eps.const_value
    ok = v is not None and v.size == 1 and v.dtype.kind == "f" and 0 <= float(v.reshape(-1)[0]) < 1
    if not ok:
        return reject("epsilon is not a small non-negative float scalar")
    why = unabsorbable(eps, x.rank)
    return why is None or reject(why)


def constants_keep_shape(x, **captures) -> bool:
    """The exponents and the 1 of 1/root are the norm's only if they keep the shape and nobody
    can feed them (an initializer that is also a graph input)."""
    return structural_constants_fit(x.rank, captures, NORM_CONSTANTS)


def affine_is_vector(x, gamma, beta) -> bool:
    """The norm ops take gamma (and beta) over the last axis only, in X's element type: a vector
    as long as that axis (a shorter one would broadcast, a longer one grow the output). Where the
    graph does not say how long the last axis is (TorchScript exports below opset 14 carry no
    ranks), a gamma of N > 1 elements is taken to be as long: any other length makes the original
    fail to broadcast, except a last axis of 1, over which no model normalizes."""
    last = x.shape[-1] if x.shape else None
    for p in (gamma, beta):
        if p is None:
            continue
        if p.shape is None or len(p.shape) != 1:
            return reject(f"{p.name!r} has shape {p.shape}, not a vector")
        n = p.shape[0]
        if (isinstance(last, int) and n != last) or not isinstance(n, int) or (not isinstance(last, int) and n < 2):
            return reject(f"{p.name!r} has {n} elements, the last axis has {last}")
        if p.dtype is None or p.dtype != x.dtype:
            return reject(f"{p.name!r} is not of X's element type")
    return True


def stats_fit_float32(x) -> bool:
    """The fused ops compute the statistics in float32 (stash_type 1, `norm_ops`' bodies); a
    float64 decomposition computes them in float64, and the results would differ by float32
    rounding (~1e-8), far beyond float64's."""
    return computes_in_float32(x, "input", "norm")


FUSED_NORM_TYPES = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
                    onnx.TensorProto.FLOAT: "float32"}


def float32_statistics(x, stats_type, out_type) -> bool:
    """X is a float type the fused ops take, its statistics are computed in float32 or in X's
    own type (float16 statistics of a float16 X, which the fused op's float32 ones match to
    float16's rounding, and where float16's x^2 overflows, |x| > 256, are finite where the
    original's are not), and the result comes back in X's type.

    A Cast of X to float16 (or bfloat16) before the statistics rounds them coarser than the
    float32 the fused op uses; a Cast of the result to another type changes the output's type."""
    if x.dtype not in FUSED_NORM_TYPES:
        return reject(f"X's element type {x.dtype} is not float16, bfloat16 or float32")
    stats = x.dtype if stats_type is None else stats_type
    if stats not in (onnx.TensorProto.FLOAT, x.dtype):
        return reject(f"the statistics are computed in type {stats}, the fused norm computes them in float32")
    if (out_type or stats) != x.dtype:
        return reject(f"the result is in type {out_type or stats}, not cast back to X's type")
    return True


def has_layer_normalization(x) -> bool:
    """LayerNormalization exists from opset 17; fusegraph.LayerNorm stands in below, down to
    the oldest opset its body is written for."""
    if opset(x) >= norm_ops.LAYER_NORMALIZATION_OPSET:
        return True
    reason = opset_refusal(norm_ops.LAYER_NORM.name, opset(x))
    return reason is None or reject(reason)


# -- residual Add + norm ---------------------------------------------------------------------
def summed(op: PatternOps, x: Pattern, r: Pattern) -> Pattern:
    """S = X + R as the norm reads it: the Add, or a Cast of it that changes nothing (torch's
    `.to(float32)` of a float32 tensor, which the next residual Add then reads too)."""
    s = op.Add(x, r)
    return op.Cast(s, to=Attr("cast_to")) | s


def skip_layer_norm_pattern(op, x, r, gamma, beta):
    read = summed(op, x, r)
    norm = (op.LayerNormalization(read, gamma, beta, axis=Attr("axis"), epsilon=Attr("epsilon"), stash_type=1)
            | op.LayerNorm(read, gamma, beta, _domain=DOMAIN, epsilon=Attr("epsilon")))
    return norm, read


def skip_layer_norm_replacement(op, x, r, gamma, beta, epsilon):
    """residual Add + LayerNorm -> fusegraph.SkipLayerNorm (Y, S)"""
    return op.SkipLayerNorm(x, r, gamma, beta, _domain=DOMAIN, _outputs=2, epsilon=epsilon)


def skip_rms_norm_pattern(op, x, r, gamma):
    read = summed(op, x, r)
    norm = (op.RMSNormalization(read, gamma, axis=Attr("axis"), epsilon=Attr("epsilon"), stash_type=1)
            | op.RMSNorm(read, gamma, _domain=DOMAIN, epsilon=Attr("epsilon")))
    return norm, read


def skip_rms_norm_replacement(op, x, r, gamma, epsilon):
    """residual Add + RMSNorm -> fusegraph.SkipRMSNorm (Y, S)"""
    return op.SkipRMSNorm(x, r, gamma, _domain=DOMAIN, _outputs=2, epsilon=epsilon)


def is_residual(x, r, cast_to) -> bool:
    """Both summands are activations of one shape (no broadcast: the kernel reads two [rows,
    cols] buffers; a constant summand is a bias, not a residual), and a Cast in between
    keeps the type (else S would change type)."""
    if x.is_constant or r.is_constant:
        return reject("a summand is a constant (a bias, not a residual)")
    if cast_to is not None and (x.dtype is None or cast_to != x.dtype):
        return reject("the Cast between the Add and the norm changes the type")
    if x.shape is None or r.shape is None or len(x.shape) != len(r.shape):
        return reject(f"summand shapes {x.shape} and {r.shape} are not known to be equal")
    for a, b in zip(x.shape, r.shape):
        if (isinstance(a, int) and isinstance(b, int) and a != b) or (a == 1) != (b == 1):
            return reject(f"summand shapes {x.shape} and {r.shape} broadcast")
    return True


def norm_over_last_axis(x, axis) -> bool:
    return axis is None or axis == -1 or (x.rank is not None and axis == x.rank - 1) or reject(
        f"norm over axis {axis}, not the last")


#: Self-check instances: the optional Casts take the instance's float type (the instantiator's
#: default for a Cast; a generic attribute value would not be a type).
CASTS_TO_X_TYPE = {"stats_type": None, "out_type": None}

RULES = [
    Rule("norms.layer_norm", layer_norm_pattern, layer_norm_replacement,
         [has_layer_normalization, means_over_last_axis, stats_fit_float32, float32_statistics, eps_is_scalar,
          constants_keep_shape, affine_is_vector], NORM,
         examples=[{"gamma": Leaf(True, 1), "beta": Leaf(True, 1)} | CASTS_TO_X_TYPE]),
    Rule("norms.rms_norm", rms_norm_pattern, rms_norm_replacement,
         [mean_over_last_axis, stats_fit_float32, float32_statistics, eps_is_scalar, constants_keep_shape,
          affine_is_vector],
         NORM, examples=[CASTS_TO_X_TYPE]),
    Rule("norms.skip_layer_norm", skip_layer_norm_pattern, skip_layer_norm_replacement,
         [is_residual, norm_over_last_axis], SKIP_NORM),
    Rule("norms.skip_rms_norm", skip_rms_norm_pattern, skip_rms_norm_replacement,
         [is_residual, norm_over_last_axis, stats_fit_float32], SKIP_NORM),
]
