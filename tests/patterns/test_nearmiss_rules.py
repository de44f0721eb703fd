"""Near-miss mutants of every non-attention rule family: refused, or rewritten right.

Each family (LayerNorm, RMSNorm, GELU erf/tanh/factored tanh, QuickGELU, MatMul/Gemm epilogues,
RoPE rotate-half/interleaved/partial, QKV) has a base instance the rules fuse. Mutants are
derived from it programmatically: every structural constant moved by +-1 ulp, +-0.1%, +-1% and
its sign; constants whose broadcast grows the output; initializers that are also graph inputs
(fed another value); attributes (axis, keepdims, noop_with_empty_axes, approximate, Concat axis,
Gemm's alpha/beta/trans); Cast targets; dtypes float64/float32/float16/int32; opsets 13..23.

Every mutant must be a valid model, and then either no rule fuses it (the graph is unchanged),
or the rewrite passes the full checker, runs in ONNX Runtime and equals the original on
adversarial inputs: normal, x100, +-1e4, zeros, negatives, and rows constant along the last
axis (zero variance). Equivalent spellings (issue 9 class 12) must fuse.

Float16 inputs stop at +-200: past 256 a float16 x^2 overflows, so a norm whose statistics the
export computes in float16 gives inf, where the fused op, computing them in float32 as every
norm op does, is finite.
"""

from __future__ import annotations

import math
import re

import numpy as np
import onnx
import pytest
from onnx import helper

from fusegraph.api import rewrite_with_report
from fusegraph.patterns import all_rules
from fusegraph.verify.testing import op_counts
from fusegraph.verify import compare, run
from graph_builder import Builder

RULES = all_rules()
F16, F32, F64, I32 = np.float16, np.float32, np.float64, np.int32
BIG = 2**63 - 1
OPSETS = range(13, 24)
#: (atol, rtol) per dtype: tighter than the self-check's float32 0.1%, so that a constant off
#: by 0.1% (GELU's 0.5005) is a difference, not noise.
TOLERANCE = {np.dtype(F64): (1e-9, 1e-7), np.dtype(F32): (1e-5, 1e-4), np.dtype(F16): (1e-2, 1e-2),
             np.dtype(I32): (0, 0)}
PERTURBATIONS = ("+1ulp", "-1ulp", "+0.1%", "-0.1%", "+1%", "-1%", "sign")


def perturb(value: float, how: str, dtype) -> float:
    v = np.asarray(value, dtype)
    if how.endswith("ulp"):
        return float(np.nextafter(v, np.asarray(np.inf if how[0] == "+" else -np.inf, dtype)))
    if how == "sign":
        return -float(v)
    return float(v) * (1 + float(how[:-1]) / 100)


# -- the harness --------------------------------------------------------------------------------
def finish(model: onnx.ModelProto, exposed=()) -> onnx.ModelProto:
    """Make initializers `exposed` graph inputs too (overridable defaults, ONNX IR), and type
    the outputs (built without a shape) by inference."""
    inits = {t.name: t for t in model.graph.initializer}
    for name in exposed:
        t = inits[name]
        model.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    outputs = onnx.shape_inference.infer_shapes(model).graph.output
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    return model


def adversarial_feeds(model: onnx.ModelProto, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """One feed per input kind; an exposed initializer is fed another value (1.5 v + 0.25)."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    specs = []
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        shape = tuple(d.dim_value for d in tt.shape.dim)
        specs.append((vi.name, shape, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    out = []
    for kind in ("normal", "x100", "1e4", "zeros", "negative", "flat_rows"):
        feeds = {}
        for name, shape, dtype in specs:
            if name in inits:
                fed = inits[name] * 1.5 + 0.25 if dtype.kind == "f" else inits[name] + 1
                feeds[name] = np.asarray(fed).astype(dtype)
                continue
            base = rng.uniform(-1.0, 1.0, shape)
            huge = 200.0 if dtype == np.float16 else 1e4
            value = {"normal": base, "x100": 100 * base, "1e4": np.where(base < 0, -huge, huge),
                     "zeros": np.zeros(shape), "negative": -np.abs(base) - 0.5,
                     "flat_rows": np.broadcast_to(rng.integers(-3, 4, shape[:-1] + (1,)), shape) if shape else base,
                     }[kind]
            feeds[name] = np.asarray(np.round(value * 3) if dtype.kind == "i" else value).astype(dtype)
        out.append(feeds)
    return out


def refused_or_equal(model: onnx.ModelProto) -> bool:
    """Assert the mutant is refused (unchanged) or rewritten into a valid, equal model; return
    whether it fused."""
    onnx.checker.check_model(model, full_check=True)
    feeds = adversarial_feeds(model)
    expected = [run(model, f) for f in feeds]  # the mutant itself is a valid, runnable model
    out, report = rewrite_with_report(model, RULES)
    if not report.fusions:
        assert op_counts(out) == op_counts(model)
        return False
    onnx.checker.check_model(out, full_check=True)
    for f, want in zip(feeds, expected):
        got = run(out, f)
        for d in compare(want, got, *TOLERANCE[np.dtype(next(iter(want.values())).dtype)]):
            assert d.ok, f"{dict(report.per_rule)} differs on {sorted(f)}: {d}"
    return True


def assert_refused(model: onnx.ModelProto, rule: str, reason: str) -> None:
    """`rule` refuses, --explain names `reason` among its near-misses, and whatever other rule
    fuses instead (SiLU without its gated MLP) is valid and equal."""
    refused_or_equal(model)
    _, report = rewrite_with_report(model, RULES, explain=rule)
    assert rule not in report.per_rule
    reasons = [m.reason for m in report.near_misses]
    found = [r for r in reasons if (reason.search(r) if isinstance(reason, re.Pattern) else reason in r)]
    assert found, reasons


#: The refusal of a constant that grows the output or that a caller can feed comes from the
#: matcher (`Const` operands must be shape-neutral constants) or, where the pattern captures
#: the value, from the rule's own condition: either reason is the refusal.
BROADCASTS = "broadcasts a rank-{rank} value|would raise the output's rank|would broadcast dim|is a graph input or initializer"
FED = re.compile("graph input's default|is not a constant|is a graph input")


# -- norms --------------------------------------------------------------------------------------
NORM = dict(kind="rms", dtype=F32, opset=23, shape=[2, 3, 8], stats=None, back=None, square="pow",
            divide="div", axis=-1, keepdims=1, noop=None, two=2.0, eps=1e-5, one=1.0, minus_half=-0.5,
            eps_shape=(), gamma_shape=None, beta_shape=None, exposed=())


def norm(s: dict) -> onnx.ModelProto:
    """LayerNorm (kind "layer") or RMSNorm over the last axis, spelled as `s` says."""
    rng = np.random.default_rng(0)
    b = Builder(s["dtype"])
    sd = s["stats"] or s["dtype"]
    named = {}

    def k(key):
        named[key] = b.const(np.full(s.get(key + "_shape", ()), s[key]), sd)
        return named[key]

    def mean(v):
        axes = [] if s["noop"] else [s["axis"]]
        attrs = {"keepdims": s["keepdims"], **({"noop_with_empty_axes": s["noop"]} if s["noop"] else {})}
        if s["opset"] >= 18:
            return b.op("ReduceMean", v, b.const(axes, np.int64), **attrs)
        return b.op("ReduceMean", v, axes=axes, **attrs)

    xs = b.cast("x", s["stats"]) if s["stats"] else "x"
    d = b.op("Sub", xs, mean(xs)) if s["kind"] == "layer" else xs
    sq = b.op("Pow", d, k("two")) if s["square"] == "pow" else b.op("Mul", d, d)
    shifted = b.op("Add", mean(sq), k("eps"))
    n = {"div": lambda: b.op("Div", d, b.op("Sqrt", shifted)),
         "reciprocal": lambda: b.op("Mul", d, b.op("Reciprocal", b.op("Sqrt", shifted))),
         "one_over": lambda: b.op("Mul", d, b.op("Div", k("one"), b.op("Sqrt", shifted))),
         "pow": lambda: b.op("Mul", d, b.op("Pow", shifted, k("minus_half")))}[s["divide"]]()
    if s["back"]:
        n = b.cast(n, s["back"])
    out_type = s["back"] or sd
    h = s["shape"][-1]
    named["gamma"] = b.weight(rng.uniform(0.5, 1.5, s["gamma_shape"] or [h]), out_type)
    y = b.op("Mul", n, named["gamma"])
    if s["kind"] == "layer":
        named["beta"] = b.weight(rng.standard_normal(s["beta_shape"] or [h]), out_type)
        y = b.op("Add", y, named["beta"])
    m = b.model({"x": s["shape"]}, {y: (out_type, None)}, s["opset"])
    return finish(m, [named[e] for e in s["exposed"]])


def norm_mutants():
    for kind in ("layer", "rms"):
        base = {**NORM, "kind": kind, "opset": 23 if kind == "rms" else 17}
        consts = ("two", "eps", "one", "minus_half")
        for key in consts:
            spelled = {"one": {"divide": "one_over"}, "minus_half": {"divide": "pow"}}.get(key, {})
            for how in PERTURBATIONS:
                yield f"{kind}-{key}{how}", {**base, **spelled, key: perturb(base[key], how, F32)}
        for name, change in {
            "eps[1,1,1,1]": {"eps_shape": (1, 1, 1, 1)}, "eps[1,1,1]": {"eps_shape": (1, 1, 1)},
            "gamma[1,1,1,8]": {"gamma_shape": [1, 1, 1, 8]}, "gamma[1]": {"gamma_shape": [1]},
            "gamma[3,8]": {"gamma_shape": [3, 8]}, "beta[4,1,1,8]": {"beta_shape": [4, 1, 1, 8]},
            "eps-input": {"exposed": ("eps",)}, "two-input": {"exposed": ("two",)},
            "gamma-input": {"exposed": ("gamma",)}, "minus_half-input": {"divide": "pow", "exposed": ("minus_half",)},
            "axis0": {"axis": 0}, "axis1": {"axis": 1}, "axis2": {"axis": 2},
            "keepdims0": {"shape": [8, 8], "keepdims": 0}, "noop-empty-axes": {"noop": 1, "opset": 18},
            "float64": {"dtype": F64}, "float16": {"dtype": F16},
            "float16-float32-stats": {"dtype": F16, "stats": F32, "back": F16},
            "float32-float16-stats": {"stats": F16, "back": F32},
            "float32-float64-stats": {"stats": F64, "back": F32},
            "float16-float32-stats-no-cast-back": {"dtype": F16, "stats": F32},
            "float16-float32-stats-cast-to-float64": {"dtype": F16, "stats": F32, "back": F64},
            "int32-float32-stats": {"dtype": I32, "stats": F32, "back": I32},
            **{f"opset{o}": {"opset": o} for o in OPSETS},
        }.items():
            yield f"{kind}-{name}", {**base, **change}


@pytest.mark.parametrize("spec", [s for _, s in norm_mutants()], ids=[i for i, _ in norm_mutants()])
def test_norm_mutant_is_refused_or_equal(spec):
    refused_or_equal(norm(spec))


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("divide", ["div", "reciprocal", "one_over", "pow"])
def test_norm_spellings_fuse(kind, divide):
    """x * Pow(var + eps, -0.5) is RMSNorm/LayerNorm like the Sqrt spellings (issue 9 class 12)."""
    assert refused_or_equal(norm({**NORM, "kind": kind, "divide": divide}))


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("change, reason", [
    ({"stats": F16, "back": F32}, "the statistics are computed in type 10"),
    ({"dtype": I32, "stats": F32, "back": I32}, "is not float16, bfloat16 or float32"),
    ({"eps_shape": (1, 1, 1, 1)}, re.compile(BROADCASTS.format(rank=3))),
    ({"exposed": ("eps",)}, FED),
    ({"exposed": ("two",)}, FED),
    ({"divide": "one_over", "one_shape": (1, 1, 1, 1)}, re.compile(BROADCASTS.format(rank=3))),
    ({"dtype": F16, "stats": F32, "back": F64}, "not cast back to X's type"),
])
def test_norm_near_miss_reason(kind, change, reason):
    """fp16 statistics of fp32 X, an int32 "norm", an eps that grows the rank or can be fed, a
    result cast to another type: each refused by the rule's own condition, with its reason."""
    assert_refused(norm({**NORM, "kind": kind, "opset": 23, **change}), f"norms.{kind}_norm", reason)


# -- GELU, QuickGELU ------------------------------------------------------------------------------
GELU = dict(kind="erf", dtype=F32, opset=17, shape=[2, 8], half=0.5, one=1.0, root2=math.sqrt(2),
            cube=3.0, coef=0.044715, scale=math.sqrt(2 / math.pi), one_inner=1.0, alpha=1.702,
            half_shape=(), alpha_shape=(), exposed=(), gated=False, up_width=8)
GELU_CONSTANTS = {"erf": ("half", "one", "root2"), "tanh": ("half", "one", "cube", "coef", "scale"),
                  "factored": ("half", "one", "coef", "scale", "one_inner"), "quick": ("alpha",)}


def gelu(s: dict) -> onnx.ModelProto:
    """The activation of x, or (`gated`) act(x @ Wg) * (x @ Wu), a gated MLP."""
    rng = np.random.default_rng(3)
    b = Builder(s["dtype"])
    named = {}

    def k(key):
        named[key] = b.const(np.full(s.get(key + "_shape", ()), s[key]))
        return named[key]

    x = b.op("MatMul", "x", b.weight(rng.standard_normal((s["shape"][-1], 8)) / 3)) if s["gated"] else "x"
    if s["kind"] == "silu":
        y = b.op("Mul", x, b.op("Sigmoid", x))
    elif s["kind"] == "quick":
        y = b.op("Mul", x, b.op("Sigmoid", b.op("Mul", x, k("alpha"))))
    else:
        if s["kind"] == "erf":
            inner = b.op("Erf", b.op("Div", x, k("root2")))
        elif s["kind"] == "tanh":
            cubed = b.op("Pow", x, k("cube"))
            inner = b.op("Tanh", b.op("Mul", b.op("Add", x, b.op("Mul", cubed, k("coef"))), k("scale")))
        else:
            poly = b.op("Add", k("one_inner"), b.op("Mul", b.op("Mul", x, k("coef")), x))
            inner = b.op("Tanh", b.op("Mul", b.op("Mul", x, k("scale")), poly))
        y = b.op("Mul", b.op("Mul", x, k("half")), b.op("Add", k("one"), inner))
    if s["gated"]:
        y = b.op("Mul", y, b.op("MatMul", "x", b.weight(rng.standard_normal((s["shape"][-1], s["up_width"])) / 3)))
    m = b.model({"x": s["shape"]}, {y: (s["dtype"], None)}, s["opset"])
    return finish(m, [named[e] for e in s["exposed"]])


def gelu_mutants():
    for kind, consts in GELU_CONSTANTS.items():
        base = {**GELU, "kind": kind}
        for key in consts:
            for how in PERTURBATIONS:
                yield f"{kind}-{key}{how}", {**base, key: perturb(base[key], how, F32)}
        grow = "alpha" if kind == "quick" else "half"
        for name, change in {
            f"{grow}[1,1,1,1,1]": {f"{grow}_shape": (1, 1, 1, 1, 1)},
            f"{grow}[2,1]-over-batch-1": {f"{grow}_shape": (2, 1), "shape": [1, 8]},
            f"{grow}-input": {"exposed": (grow,)},
            "float16": {"dtype": F16}, **({} if kind == "erf" else {"float64": {"dtype": F64}}),
            **{f"opset{o}": {"opset": o} for o in OPSETS},
        }.items():
            yield f"{kind}-{name}", {**base, **change}


def gated_mutants():
    for kind in ("erf", "tanh", "silu"):
        base = {**GELU, "kind": kind, "gated": True}
        changes = {"base": {}, "up[8,1]": {"up_width": 1}, "float16": {"dtype": F16},
                   **{f"opset{o}": {"opset": o} for o in (13, 17, 20, 23)}}
        if kind != "silu":
            changes |= {"half[1,1,1]": {"half_shape": (1, 1, 1)},
                        "half[2,1]-over-batch-1": {"half_shape": (2, 1), "shape": [1, 8]},
                        "half-input": {"exposed": ("half",)}, "half+1%": {"half": 0.505}}
        for name, change in changes.items():
            yield f"gated-{kind}-{name}", {**base, **change}


@pytest.mark.parametrize("spec", [s for _, s in gated_mutants()], ids=[i for i, _ in gated_mutants()])
def test_gated_mlp_mutant_is_refused_or_equal(spec):
    refused_or_equal(gelu(spec))


@pytest.mark.parametrize("kind, change, reason", [
    ("erf", {"half_shape": (1, 1, 1)}, re.compile(BROADCASTS.format(rank=2))),
    ("tanh", {"exposed": ("half",)}, FED),
    ("silu", {"up_width": 1}, "differ"),
])
def test_gated_mlp_near_miss_reason(kind, change, reason):
    rule = {"erf": "activations.GeGLU", "tanh": "activations.GeGLUTanh", "silu": "activations.SwiGLU"}[kind]
    assert_refused(gelu({**GELU, "kind": kind, "gated": True, **change}), rule, reason)


@pytest.mark.parametrize("spec", [s for _, s in gelu_mutants()], ids=[i for i, _ in gelu_mutants()])
def test_gelu_mutant_is_refused_or_equal(spec):
    refused_or_equal(gelu(spec))


@pytest.mark.parametrize("kind", list(GELU_CONSTANTS))
def test_gelu_spellings_fuse(kind):
    """Erf, tanh, the factored tanh (x 0.5 (1 + tanh((x c)(1 + (x a) x))), issue 11 item 10) and
    QuickGELU all fuse at their canonical constants."""
    assert refused_or_equal(gelu({**GELU, "kind": kind}))


@pytest.mark.parametrize("kind, change, reason", [
    ("erf", {"half_shape": (1, 1, 1, 1, 1)}, re.compile(BROADCASTS.format(rank=2))),
    ("factored", {"half_shape": (2, 1), "shape": [1, 8]}, re.compile(BROADCASTS.format(rank=2))),
    ("quick", {"alpha_shape": (1, 1, 1)}, re.compile(BROADCASTS.format(rank=2))),
    ("tanh", {"exposed": ("half",)}, FED),
])
def test_gelu_near_miss_reason(kind, change, reason):
    """Refused by the rule's own condition even where the matcher would take the constant."""
    rule = {"erf": "activations.gelu_erf", "quick": "activations.quick_gelu"}.get(kind, "activations.gelu_tanh")
    assert_refused(gelu({**GELU, "kind": kind, **change}), rule, reason)


# -- MatMul / Gemm epilogues ----------------------------------------------------------------------
EPILOGUE = dict(gemm=False, dtype=F32, opset=17, act="Relu", bias_shape=(4,), alpha=1.0, beta=1.0,
                trans_a=0, trans_b=0, approximate=None, exposed=())


def epilogue(s: dict) -> onnx.ModelProto:
    """x [3, 8] (MatMul: [2, 3, 8]) times w [8, 4], plus a bias, then the activation."""
    rng = np.random.default_rng(1)
    b = Builder(s["dtype"])
    w = b.weight(rng.standard_normal((4, 8) if s["trans_b"] else (8, 4)) / 3)
    named = {"w": w}
    bias = named["bias"] = b.weight(rng.standard_normal(s["bias_shape"])) if s["bias_shape"] is not None else None
    if s["gemm"]:
        x_shape = [8, 3] if s["trans_a"] else [3, 8]
        y = b.op("Gemm", "x", w, *([bias] if bias else []), alpha=s["alpha"], beta=s["beta"],
                 transA=s["trans_a"], transB=s["trans_b"])
    else:
        x_shape = [2, 3, 8]
        y = b.op("MatMul", "x", w)
        y = b.op("Add", y, bias) if bias else y
    if s["act"] == "Gelu":
        y = b.op("Gelu", y, **({"approximate": s["approximate"]} if s["approximate"] else {}))
    elif s["act"]:
        y = b.op(s["act"], y)
    m = b.model({"x": x_shape}, {y: (s["dtype"], None)}, s["opset"])
    return finish(m, [named[e] for e in s["exposed"]])


def epilogue_mutants():
    for gemm in (False, True):
        base = {**EPILOGUE, "gemm": gemm}
        tag = "gemm" if gemm else "matmul"
        shapes = {"scalar": (), "[1]": (1,), "[1,4]": (1, 4), "[1,1,1,4]": (1, 1, 1, 4), "[3,1]": (3, 1),
                  "[3,4]": (3, 4)}
        for name, shape in shapes.items():
            for act in ("Relu", None):
                if gemm and (act is None or len(shape) > 2):
                    continue  # a bare Gemm is already one op; Gemm's C broadcasts to [M, N] only
                yield f"{tag}-bias{name}-{act}", {**base, "bias_shape": shape, "act": act}
        changes = {"bias-input": {"exposed": ("bias",)}, "weight-input": {"exposed": ("w",)},
                   "gelu-none": {"act": "Gelu", "opset": 20},
                   "gelu-tanh": {"act": "Gelu", "approximate": "tanh", "opset": 20},
                   "float64": {"dtype": F64}, "float16": {"dtype": F16},
                   **{f"opset{o}": {"opset": o} for o in OPSETS}}
        if gemm:
            changes |= {"alpha0.5": {"alpha": 0.5}, "beta2": {"beta": 2.0}, "transA": {"trans_a": 1},
                        "transB": {"trans_b": 1}}
        else:
            changes |= {"int32": {"dtype": I32}}
        for name, change in changes.items():
            yield f"{tag}-{name}", {**base, **change}


@pytest.mark.parametrize("spec", [s for _, s in epilogue_mutants()], ids=[i for i, _ in epilogue_mutants()])
def test_epilogue_mutant_is_refused_or_equal(spec):
    refused_or_equal(epilogue(spec))


@pytest.mark.parametrize("gemm, act", [(False, "Relu"), (False, None), (True, "Relu")])
def test_scalar_bias_is_refused_with_a_reason(gemm, act):
    """A rank-0 bias (MatMul + Add(0.5), Gemm with a scalar C) used to raise IndexError."""
    rule = f"gemm_epilogue.{'gemm_act' if gemm else 'matmul_act' if act else 'matmul_bias'}"
    assert_refused(epilogue({**EPILOGUE, "gemm": gemm, "act": act, "bias_shape": ()}), rule, "is not [N]")


# -- RoPE ---------------------------------------------------------------------------------------
ROPE = dict(kind="half", dtype=F32, opset=17, x_shape=[2, 2, 3, 8], table_shape=None, rd=None, halves_axis=-1,
            hi=(4, BIG), lo=(0, 4), target=None, pair_axis=-1, unsqueeze_axis=-1)


def rope(s: dict) -> onnx.ModelProto:
    """x * cos + rotate(x) * sin over the whole head, or its first `rd` channels (partial)."""
    b = Builder(s["dtype"])
    d = s["x_shape"][-1]
    rd = s["rd"] or d

    def sl(v, start, end, step=1):
        return b.op("Slice", v, *(b.const([i], np.int64) for i in (start, end, -1, step)))

    xr = sl("x", 0, rd) if rd != d else "x"
    if s["kind"] == "interleaved":
        ax = b.const([s["unsqueeze_axis"]], np.int64)
        pair = b.op("Concat", b.op("Unsqueeze", b.op("Neg", sl(xr, 1, BIG, 2)), ax),
                    b.op("Unsqueeze", sl(xr, 0, BIG, 2), ax), axis=s["pair_axis"])
        rot = b.op("Reshape", pair, b.const(s["target"] or s["x_shape"][:-1] + [rd], np.int64))
    else:
        rot = b.op("Concat", b.op("Neg", sl(xr, *s["hi"])), sl(xr, *s["lo"]), axis=s["halves_axis"])
    y = b.op("Add", b.op("Mul", xr, "cos"), b.op("Mul", rot, "sin"))
    if rd != d:
        y = b.op("Concat", y, sl("x", rd, BIG), axis=-1)
    table = s["table_shape"] if s["table_shape"] is not None else [s["x_shape"][2], rd]
    return finish(b.model({"x": s["x_shape"], "cos": table, "sin": table}, {y: (s["dtype"], None)}, s["opset"]))


def rope_mutants():
    for kind, extra in (("half", {}), ("interleaved", {"kind": "interleaved"}),
                        ("partial", {"rd": 4, "hi": (2, BIG), "lo": (0, 2)})):
        base = {**ROPE, **extra}
        changes = {
            "tables-scalar": {"table_shape": []}, "x-batch-1": {"x_shape": [1, 2, 3, 8]},
            "tables-[3,1]": {"table_shape": [3, 1]},
            "float64": {"dtype": F64}, "float16": {"dtype": F16}, "int32": {"dtype": I32},
            **{f"opset{o}": {"opset": o} for o in OPSETS},
        }
        if kind != "partial":  # (growing the partial rotation's batch breaks the original's own Concat)
            changes |= {"tables-[2,1,3,8]-over-batch-1": {"x_shape": [1, 2, 3, 8], "table_shape": [2, 1, 3, 8]},
                        "tables-rank-5": {"table_shape": [1, 1, 1, 3, 8]}}
        if kind == "interleaved":
            changes |= {"target-[1,2,3,8]-over-[2,1,3,8]": {"x_shape": [2, 1, 3, 8], "target": [1, 2, 3, 8]},
                        "target-[0,0,0,-1]": {"target": [0, 0, 0, -1]}, "target-[-1,2,3,8]": {"target": [-1, 2, 3, 8]},
                        "target-[2,2,-1,8]": {"target": [2, 2, -1, 8]}, "target-[2,-1,3,8]": {"target": [2, -1, 3, 8]},
                        "pair-axis-4": {"pair_axis": 4}, "unsqueeze-axis-4": {"unsqueeze_axis": 4}}
        else:
            half = (base["rd"] or 8) // 2
            changes |= {"concat-axis-3": {"halves_axis": 3}, "swapped-halves": {"hi": (0, half), "lo": (half, BIG)},
                        "hi-negative-start": {"hi": (-half, BIG)}, "lo-negative-end": {"lo": (0, -half)},
                        "split-off-half": {"hi": (half - 1, BIG), "lo": (0, half - 1)}}
        for name, change in changes.items():
            yield f"{kind}-{name}", {**base, **change}


@pytest.mark.parametrize("spec", [s for _, s in rope_mutants()], ids=[i for i, _ in rope_mutants()])
def test_rope_mutant_is_refused_or_equal(spec):
    refused_or_equal(rope(spec))


@pytest.mark.parametrize("change", [{}, {"halves_axis": 3}, {"hi": (-4, BIG)}, {"hi": (-4, 8), "lo": (-8, -4)},
                                    {"kind": "interleaved"}, {"kind": "interleaved", "pair_axis": 4},
                                    {"kind": "interleaved", "target": [0, 0, 0, -1]}],
                         ids=["base", "concat-axis-3", "start--4", "all-negative", "interleaved",
                              "interleaved-pair-axis-4", "interleaved-target-0-0-0--1"])
def test_rope_spellings_fuse(change):
    """rotate_half with Concat(axis=3) on rank 4 and with x[..., -4:] (issue 9 class 12) fuse."""
    assert refused_or_equal(rope({**ROPE, **change}))


@pytest.mark.parametrize("change, reason", [
    ({"table_shape": []}, "not [.., 8]"),
    ({"x_shape": [1, 2, 3, 8], "table_shape": [2, 1, 3, 8]}, "would grow x's shape"),
    ({"kind": "interleaved", "x_shape": [2, 1, 3, 8], "target": [1, 2, 3, 8]}, "not back to x's shape"),
])
def test_rope_near_miss_reason(change, reason):
    """Scalar tables (which raised IndexError), tables that grow x's batch, an interleaved
    Reshape to another shape with x's last dim."""
    assert_refused(rope({**ROPE, **change}), f"rope.{'interleaved' if 'kind' in change else 'rotate_half'}", reason)


# -- QKV ----------------------------------------------------------------------------------------
QKV = dict(dtype=F32, opset=17, bias=True, bq_shape=(8,), exposed=())


def qkv(s: dict) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    b = Builder(s["dtype"])
    named, outs = {}, {}
    for c, n in zip("qkv", (8, 4, 4)):
        named[f"w{c}"] = b.weight(rng.standard_normal((8, n)) / 3)
        y = b.op("MatMul", "x", named[f"w{c}"])
        if s["bias"]:
            named[f"b{c}"] = b.weight(rng.standard_normal(s["bq_shape"] if c == "q" else (n,)))
            y = b.op("Add", y, named[f"b{c}"])
        outs[b.op("Relu", y)] = (s["dtype"], None)
    m = b.model({"x": [2, 3, 8]}, outs, s["opset"])
    return finish(m, [named[e] for e in s["exposed"]])


QKV_MUTANTS = {"base": {}, "bare": {"bias": False}, "wk-input": {"exposed": ("wk",)},
               "bare-wv-input": {"bias": False, "exposed": ("wv",)}, "bq-input": {"exposed": ("bq",)},
               "bq-scalar": {"bq_shape": ()}, "bq-[1,1,1,8]": {"bq_shape": (1, 1, 1, 8)},
               "float64": {"dtype": F64}, "float16": {"dtype": F16}, "int32": {"dtype": I32},
               **{f"opset{o}": {"opset": o} for o in OPSETS}}


@pytest.mark.parametrize("change", list(QKV_MUTANTS.values()), ids=list(QKV_MUTANTS))
def test_qkv_mutant_is_refused_or_equal(change):
    refused_or_equal(qkv({**QKV, **change}))


def test_qkv_weight_that_is_a_graph_input_is_not_baked_in():
    """Fed another Wk, the original computes with it: concatenating the default would not."""
    out, report = rewrite_with_report(qkv({**QKV, "exposed": ("wk",)}), RULES)
    assert "qkv.projections_bias" not in report.per_rule


# -- unknown shapes -----------------------------------------------------------------------------
def behind_reshape(model: onnx.ModelProto, known_rank: bool) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`model` with its input x read through a Reshape to a fed target, so x has no static dims
    (symbolic ones, or not even a rank when the target's length is symbolic too); and feeds
    that reshape it to its old shape."""
    (x,) = [i for i in model.graph.input if i.name == "x"]
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
    x.name = "x_in"
    length = len(shape) if known_rank else "n"
    model.graph.input.append(helper.make_tensor_value_info("target", onnx.TensorProto.INT64, [length]))
    model.graph.node.insert(0, helper.make_node("Reshape", ["x_in", "target"], ["x"]))
    dtype = helper.tensor_dtype_to_np_dtype(x.type.tensor_type.elem_type)
    feeds = {i.name: np.random.default_rng(4).uniform(-1, 1, [d.dim_value for d in i.type.tensor_type.shape.dim])
             .astype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
             for i in model.graph.input if i.name not in ("x_in", "target")}
    feeds |= {"x_in": np.random.default_rng(5).uniform(-1, 1, shape).astype(dtype), "target": np.array(shape, np.int64)}
    return model, feeds


@pytest.mark.parametrize("known_rank", [True, False], ids=["symbolic-dims", "unknown-rank"])
@pytest.mark.parametrize("build, spec", [
    (norm, NORM), (norm, {**NORM, "kind": "layer"}), (gelu, GELU), (gelu, {**GELU, "kind": "quick"}),
    (gelu, {**GELU, "kind": "tanh", "gated": True}), (epilogue, EPILOGUE), (rope, ROPE),
    (rope, {**ROPE, "kind": "interleaved"}), (rope, {**ROPE, "rd": 4, "hi": (2, BIG), "lo": (0, 2)}),
], ids=["rms", "layer", "gelu", "quick", "gated", "epilogue", "rope", "interleaved", "partial"])
def test_unknown_shape_is_refused_or_fused_right(build, spec, known_rank):
    """Conditions over an x of symbolic dims or unknown rank refuse with a reason (or prove what
    they need), never raise; what fuses is valid and equal."""
    model, feeds = behind_reshape(build(spec), known_rank)
    onnx.checker.check_model(model, full_check=True)
    out, report = rewrite_with_report(model, RULES)
    if report.fusions:
        onnx.checker.check_model(out, full_check=True)
        want = run(model, feeds)
        assert all(d.ok for d in compare(want, run(out, feeds), *TOLERANCE[np.dtype(F32)]))
    else:
        assert op_counts(out) == op_counts(model)
