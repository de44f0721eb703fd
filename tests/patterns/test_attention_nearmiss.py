"""Attention near misses: graphs that look like an attention but differ in meaning, or are valid
but unusual, generated as mutants of one base graph. Each must either stay as it is, or be
rewritten into a model that passes the full checker, runs in ONNX Runtime and equals the
original on adversarial inputs: normal, x100, masks of -inf / -1e9 / finfo.min, fully masked
rows. A few mutants are pinned to their one right answer (refused, or fused a certain way).

Mutated: the Where fill (0, -10, -1e4, -1e9, the dtype's lowest, -inf; boolean and
masked_fill forms), constant triangles (finite or hard, square or offset), the Casts around
Softmax (bool, int64, float16, bfloat16, int32 scores), the mask's shape ([B,1,1,Sk], [Sk],
[Sq,1], [Sq,Sk], scalar), query length 1 against 8 keys, the scale's shape, the heads (Q with
one head against four), float16 Q/K/V with a float32 mask, the NaN guard, and the opset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import pytest

from fusegraph.api import rewrite_with_report
from fusegraph.patterns import attention
from fusegraph.graph_builder import GraphBuilder
from fusegraph.verify.testing import make_model, node, op_counts
from fusegraph.verify import run

RULES = attention.RULES
TP = onnx.TensorProto
ATTENTION_OPS = ("Attention", "fusegraph.Attention", "fusegraph.MaskedAttention")
BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class Spec:
    """One attention-like graph: softmax(Q K^T * scale (mask)) V with the given variations."""
    dtype: type = np.float32
    b: int = 2
    hq: int = 2
    hkv: int = 2
    sq: int = 4
    sk: int = 4
    d: int = 8
    scale_shape: tuple = ()
    #: None, ("add", shape, dtype), ("keep" | "drop", shape, fill), ("const", array),
    #: ("keep_const", bool array, fill), ("bias_then", "input" | Where fill), ("add_where", fill)
    mask: tuple | None = None
    scores_to: int | None = None
    masked_to: int | None = None
    probs_to: tuple = ()
    guard: bool = False
    opset: int = 18
    softmax_axis: int = -1
    perm: tuple = (0, 1, 3, 2)
    #: constants ("scale", "fill", "mask") that are also graph inputs: defaults a caller may feed
    overridable: tuple = ()

    @property
    def score_dtype(self):
        return _np(self.scores_to) if self.scores_to in (TP.FLOAT, TP.FLOAT16) else np.dtype(self.dtype)


def _np(t: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t))


def build(s: Spec) -> onnx.ModelProto:
    g = GraphBuilder(s.dtype)
    op = g.op

    def const(value, dtype, role=None):
        name = g.const(value, dtype)
        if role in s.overridable:  # a default the caller may feed
            g.input(name, list(np.shape(value)), dtype)
        return name

    dt = np.dtype(s.dtype)
    g.input("q", [s.b, s.hq, s.sq, s.d], dt)
    g.input("k", [s.b, s.hkv, s.sk, s.d], dt)
    g.input("v", [s.b, s.hkv, s.sk, s.d], dt)
    scale = np.full(s.scale_shape, 1 / np.sqrt(s.d))
    scores = op("Mul", op("MatMul", "q", op("Transpose", "k", perm=list(s.perm))), const(scale, dt, "scale"))
    if s.scores_to is not None:
        scores = op("Cast", scores, to=s.scores_to)
    sdt = s.score_dtype
    if s.mask is not None:
        kind = s.mask[0]
        if kind == "add":
            g.input("mask", list(s.mask[1]), s.mask[2])
            scores = op("Add", scores, "mask")
        elif kind == "bias_then":  # T5: (scores + position bias) + a mask given as an input or Where(keep, 0, fill)
            scores = op("Add", scores, const(np.linspace(-3, 3, s.sq * s.sk).reshape(1, 1, s.sq, s.sk), sdt))
            if s.mask[1] == "input":
                g.input("mask", [s.b, 1, 1, s.sk], sdt)
                scores = op("Add", scores, "mask")
            else:
                g.input("sel", [s.b, 1, 1, s.sk], np.bool_)
                scores = op("Add", scores, op("Where", "sel", const(0.0, sdt), const(s.mask[1], sdt)))
        elif kind == "add_where":  # HF's additive mask: Where(keep, 0, fill) of a boolean input
            g.input("sel", [s.b, 1, s.sq, s.sk], np.bool_)
            scores = op("Add", scores, op("Where", "sel", const(0.0, sdt), const(s.mask[1], sdt)))
        elif kind == "const":
            scores = op("Add", scores, const(s.mask[1], sdt, "mask"))
        elif kind == "keep_const":
            scores = op("Where", const(s.mask[1], np.bool_), scores, const(s.mask[2], sdt, "fill"))
        else:
            g.input("sel", list(s.mask[1]), np.bool_)
            fill = const(s.mask[2], sdt, "fill")
            scores = op("Where", "sel", scores, fill) if kind == "keep" else op("Where", "sel", fill, scores)
    if s.masked_to is not None:
        scores = op("Cast", scores, to=s.masked_to)
    probs = op("Softmax", scores, axis=s.softmax_axis)
    for t in s.probs_to:
        probs = op("Cast", probs, to=t)
    if s.guard:
        probs = op("Where", op("IsNaN", probs), const(0.0, dt), probs)
    out = op("MatMul", probs, "v")
    out_shape = [1] * (len(s.scale_shape) - 4) + [s.b, max(s.hq, s.hkv), s.sq, s.d]
    return g.model({}, {out: (dt, out_shape)}, s.opset)


# -- adversarial inputs ----------------------------------------------------------------------
def feeds(model: onnx.ModelProto, seed: int) -> list[dict[str, np.ndarray]]:
    """Normal and x100 Q/K/V, each with the mask's worst cases: whole rows masked (by -inf,
    -1e9 and finfo.min in an additive mask; every key dropped in a boolean one) and none."""
    rng = np.random.default_rng(seed)
    shapes = {i.name: ([d.dim_value for d in i.type.tensor_type.shape.dim],
                       _np(i.type.tensor_type.elem_type)) for i in model.graph.input}
    defaults = {t.name for t in model.graph.initializer}
    fed = {n: np.zeros(shp, dt) for n, (shp, dt) in shapes.items() if n in defaults}  # not the default
    out = []
    for magnitude in (1.0, 100.0):
        qkv = {n: (rng.standard_normal(shp) * magnitude).astype(dt) for n, (shp, dt) in shapes.items()
               if n in ("q", "k", "v")}
        qkv.update(fed)
        if "mask" in shapes:
            shp, dt = shapes["mask"]
            finite = -1e9 if dt == np.float32 else -1e4  # a large finite value the type holds
            for value in (-np.inf, finite, ml_dtypes.finfo(dt).min):
                m = np.where(rng.random(shp) < 0.4, value, 0).astype(dt)
                if m.ndim:
                    m[(0,) * (m.ndim - 1)] = value  # a fully masked row (all keys of one query)
                out.append({**qkv, "mask": m})
            out.append({**qkv, "mask": np.zeros(shp, dt)})
        elif "sel" in shapes:
            shp, _ = shapes["sel"]
            keep = rng.random(shp) < 0.6
            whole = keep.copy()
            if keep.ndim:
                whole[(0,) * (keep.ndim - 1)] = False  # a query that keeps no key
            some = keep.copy()
            if keep.ndim:
                some[..., 0] = True
            for k in (whole, some):  # and inverted, for the forms where True drops the key
                out += [{**qkv, "sel": k}, {**qkv, "sel": ~k}]
        else:
            out.append(qkv)
    return out + _nan_in_q(out[0], shapes)


def _nan_in_q(normal: dict[str, np.ndarray], shapes: dict) -> list[dict[str, np.ndarray]]:
    """A NaN in one row of Q (an upstream op's NaN, not the mask's): the original's softmax row
    is NaN, zeros after SDPA's guard, so the fused op must know which graph it replaced. Under
    a boolean mask the Where would drop a masked NaN score, which an additive mask does not:
    those graphs get no NaN (a known limit of the additive form, `patterns.attention`)."""
    if "sel" in shapes:
        return []
    x = {n: a.copy() for n, a in normal.items()}
    x["q"][(0,) * (x["q"].ndim - 2) + (-1, 0)] = np.nan
    if "mask" in x:
        x["mask"] = np.zeros_like(x["mask"])
    return [x]


TOL = {np.dtype(np.float32): 2e-3, np.dtype(np.float16): 3e-2}


def check_exact_or_refused(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto | None:
    """The property: no fusion, or a valid rewrite equal to the original on every adversarial
    input. Returns the rewritten model, or None if the rules left it alone."""
    onnx.checker.check_model(model, full_check=True)
    out, report = rewrite_with_report(model, RULES)
    if not report.fusions:
        assert op_counts(out) == op_counts(model)
        return None
    onnx.checker.check_model(out, full_check=True)
    out_dtype = _np(model.graph.output[0].type.tensor_type.elem_type)
    tol = TOL[out_dtype]
    for x in feeds(model, seed):
        want, got = output(run(model, x)), output(run(out, x))
        assert_same(want, got, tol, {k: v.shape for k, v in x.items()})
    return out


def assert_same(want: np.ndarray, got: np.ndarray, tol: float, what) -> None:
    """NaN exactly where the original has NaN; elsewhere equal within `tol` of the output's
    magnitude (x100 inputs give outputs of 100)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, what)
    nan = np.isnan(want)
    assert (np.isnan(got) == nan).all(), f"NaN rows differ: {np.isnan(got).sum()} vs {nan.sum()} ({what})"
    w, g = want[~nan].astype(np.float64), got[~nan].astype(np.float64)
    scale = max(1.0, float(np.abs(w).max(initial=0.0)))
    err = float(np.abs(w - g).max(initial=0.0))
    assert err <= tol * scale, f"max abs diff {err:.3g} > {tol * scale:.3g} ({what})"


def output(results: dict[str, np.ndarray]) -> np.ndarray:
    return next(iter(results.values()))


def fused_node(model) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type in ("Attention", "MaskedAttention"))


def attrs(n) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}


# -- the mutants -----------------------------------------------------------------------------
BASE = Spec()
F32_LOW, F16_LOW = float(np.finfo(np.float32).min), float(np.finfo(np.float16).min)
TRIANGLE = np.triu(np.ones((4, 4), bool), k=1)


def _mutants() -> dict[str, Spec]:
    m: dict[str, Spec] = {}
    for opset in (13, 14, 18, 23):
        m[f"plain-opset{opset}"] = dataclasses.replace(BASE, opset=opset)
        m[f"additive-opset{opset}"] = dataclasses.replace(BASE, opset=opset, mask=("add", (2, 1, 4, 4), np.float32))
    for kind in ("keep", "drop"):
        for fill in (0.0, -10.0, -1e4, -1e9, F32_LOW, -np.inf):
            for guard in (False, True):
                m[f"{kind}-fill{fill:g}-guard{int(guard)}"] = dataclasses.replace(
                    BASE, mask=(kind, (2, 1, 4, 4), fill), guard=guard)
        for fill in (-1e4, F16_LOW, -np.inf):
            m[f"{kind}-fp16-fill{fill:g}"] = dataclasses.replace(BASE, dtype=np.float16, mask=(kind, (2, 1, 4, 4), fill))
    for fill in (-1e4, -1e9, F32_LOW, -np.inf):
        tri = np.where(TRIANGLE, fill, 0).astype(np.float32)
        for opset in (18, 23):
            m[f"triangle{fill:g}-opset{opset}"] = dataclasses.replace(BASE, mask=("const", tri[None, None]), opset=opset)
        m[f"triangle{fill:g}-q1-k4"] = dataclasses.replace(BASE, sq=1, mask=("const", tri[None, None, :1]))
        m[f"triangle{fill:g}-keep"] = dataclasses.replace(BASE, mask=("keep_const", ~TRIANGLE, fill))
        m[f"triangle{fill:g}-keep-q1-k4"] = dataclasses.replace(BASE, sq=1, mask=("keep_const", ~TRIANGLE[:1], fill))
    m["zero-mask-q1-k8"] = dataclasses.replace(BASE, sq=1, sk=8, mask=("const", np.zeros((1, 1, 1, 1), np.float32)))
    for opset in (18, 23):
        m[f"zero-mask-q1-k1-opset{opset}"] = dataclasses.replace(BASE, sq=1, sk=1, opset=opset,
                                                                 mask=("const", np.zeros((1, 1, 1, 1), np.float32)))
    m["const-mask-row-of-neg-inf"] = dataclasses.replace(
        BASE, mask=("const", np.where(np.arange(4)[:, None] == 0, -np.inf, 0).astype(np.float32)[None, None]))
    for t in (TP.BOOL, TP.INT64, TP.FLOAT16, TP.BFLOAT16, TP.INT32):
        m[f"probs-via-{TP.DataType.Name(t)}"] = dataclasses.replace(BASE, probs_to=(t, TP.FLOAT))
    m["scores-via-INT32"] = dataclasses.replace(BASE, scores_to=TP.INT32, masked_to=TP.FLOAT)
    m["scores-to-FLOAT16"] = dataclasses.replace(BASE, scores_to=TP.FLOAT16, masked_to=TP.FLOAT)
    m["fp16-softmax-fp32"] = dataclasses.replace(BASE, dtype=np.float16, scores_to=TP.FLOAT, probs_to=(TP.FLOAT16,))
    m["fp16-softmax-fp32-double-cast"] = dataclasses.replace(BASE, dtype=np.float16, masked_to=TP.FLOAT,
                                                             probs_to=(TP.FLOAT, TP.FLOAT16))
    for opset in (18, 23):
        m[f"fp16-fp32-mask-opset{opset}"] = dataclasses.replace(
            BASE, dtype=np.float16, scores_to=TP.FLOAT, probs_to=(TP.FLOAT16,), opset=opset,
            mask=("add", (2, 1, 4, 4), np.float32))
        m[f"fp16-fp16-mask-opset{opset}"] = dataclasses.replace(BASE, dtype=np.float16, opset=opset,
                                                                mask=("add", (2, 1, 4, 4), np.float16))
    for shape in ((2, 1, 1, 4), (4,), (4, 1), (4, 4), (), (1, 1, 1, 1), (2, 2, 4, 4)):
        for opset in (18, 23):
            for guard in (False, True):
                m[f"mask{shape}-opset{opset}-guard{int(guard)}"] = dataclasses.replace(
                    BASE, mask=("add", shape, np.float32), opset=opset, guard=guard)
    for opset in (18, 23):
        m[f"q1-k8-mask-opset{opset}"] = dataclasses.replace(BASE, sq=1, sk=8, mask=("add", (2, 1, 1, 8), np.float32),
                                                            opset=opset)
        m[f"q1-k8-opset{opset}"] = dataclasses.replace(BASE, sq=1, sk=8, opset=opset)
        m[f"q-heads1-kv-heads4-opset{opset}"] = dataclasses.replace(BASE, hq=1, hkv=4, opset=opset)
        m[f"q-heads4-kv-heads1-opset{opset}"] = dataclasses.replace(BASE, hq=4, hkv=1, opset=opset)
        m[f"scale-rank5-opset{opset}"] = dataclasses.replace(BASE, scale_shape=(1, 1, 1, 1, 1), opset=opset)
        m[f"scale-rank4-opset{opset}"] = dataclasses.replace(BASE, scale_shape=(1, 1, 1, 1), opset=opset)
    for fill in (-1e9, F32_LOW, -np.inf):
        for guard in (False, True):
            m[f"add-where{fill:g}-guard{int(guard)}"] = dataclasses.replace(BASE, mask=("add_where", fill), guard=guard)
    for then in ("input", -1e9, -1e4, F32_LOW, -np.inf):
        m[f"bias-then-{then}"] = dataclasses.replace(BASE, mask=("bias_then", then))
    for axis in (-2, 0, 1, 2, 3):
        m[f"softmax-axis{axis}"] = dataclasses.replace(BASE, softmax_axis=axis)
    m["k-not-transposed-square"] = dataclasses.replace(BASE, d=4, perm=(0, 1, 2, 3))
    m["scale-is-a-graph-input"] = dataclasses.replace(BASE, overridable=("scale",))
    m["fill-is-a-graph-input"] = dataclasses.replace(BASE, mask=("keep", (2, 1, 4, 4), F32_LOW), overridable=("fill",))
    m["triangle-is-a-graph-input"] = dataclasses.replace(
        BASE, mask=("const", np.where(TRIANGLE, -np.inf, 0).astype(np.float32)[None, None]), overridable=("mask",))
    return m


MUTANTS = _mutants()


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_refused_or_exact(name):
    check_exact_or_refused(build(MUTANTS[name]))


# -- the mutants that have one right answer --------------------------------------------------
def _refused(name):
    assert check_exact_or_refused(build(MUTANTS[name])) is None, f"{name} fused"


def _fused(name) -> onnx.NodeProto:
    out = check_exact_or_refused(build(MUTANTS[name]))
    assert out is not None, f"{name} was not fused"
    counts = op_counts(out)
    assert sum(counts[o] for o in ATTENTION_OPS) == 1 and counts["Softmax"] == 0, dict(counts)
    return fused_node(out)


@pytest.mark.parametrize("fill", [0.0, -10.0, -1e4, -1e9])
@pytest.mark.parametrize("kind", ["keep", "drop"])
def test_a_finite_where_fill_is_a_score_not_a_mask(kind, fill):
    """Where(keep, s, 0) replaces masked scores by 0, which no additive mask computes."""
    for guard in (0, 1):
        _refused(f"{kind}-fill{fill:g}-guard{guard}")
    if fill in (-1e4, -1e9):
        _refused(f"triangle{fill:g}-keep")


@pytest.mark.parametrize("kind", ["keep", "drop"])
def test_hard_where_fills_fuse(kind):
    for fill in (F32_LOW, -np.inf):
        for guard in (0, 1):
            assert len(_fused(f"{kind}-fill{fill:g}-guard{guard}").input) == 4
    _fused(f"{kind}-fp16-fill{F16_LOW:g}")
    _refused(f"{kind}-fp16-fill{-1e4:g}")


@pytest.mark.parametrize("fill", [-1e4, -1e9])
def test_a_finite_triangle_is_an_additive_mask_not_is_causal(fill):
    for opset in (18, 23):
        n = _fused(f"triangle{fill:g}-opset{opset}")
        assert attrs(n)["is_causal"] == 0 and len(n.input) == 4 and n.domain == "fusegraph"


@pytest.mark.parametrize("fill", [F32_LOW, -np.inf])
def test_a_hard_square_triangle_is_causal(fill):
    n = _fused(f"triangle{fill:g}-opset18")
    assert attrs(n)["is_causal"] == 1 and len(n.input) == 3 and n.op_type == "Attention"
    n = _fused(f"triangle{fill:g}-opset23")
    assert n.domain == "" and attrs(n)["is_causal"] == 1 and len(n.input) == 3
    assert attrs(_fused(f"triangle{fill:g}-keep"))["is_causal"] == 1


def test_offset_queries_are_not_causal():
    """One query against four (or eight) keys is a decoding step with an offset, and an
    all-zero [1, 1, 1, 1] mask is no triangle."""
    for fill in (-1e4, F32_LOW, -np.inf):
        assert attrs(_fused(f"triangle{fill:g}-q1-k4"))["is_causal"] == 0
    for fill in (F32_LOW, -np.inf):
        assert attrs(_fused(f"triangle{fill:g}-keep-q1-k4"))["is_causal"] == 0
    assert attrs(_fused("zero-mask-q1-k8"))["is_causal"] == 0


@pytest.mark.parametrize("t", [TP.BOOL, TP.INT64, TP.FLOAT16, TP.BFLOAT16, TP.INT32])
def test_probabilities_through_a_lossy_cast_are_refused(t):
    _refused(f"probs-via-{TP.DataType.Name(t)}")


def test_lossy_score_casts_are_refused_and_widening_ones_fuse():
    _refused("scores-via-INT32")
    _refused("scores-to-FLOAT16")
    _fused("fp16-softmax-fp32")
    _fused("fp16-softmax-fp32-double-cast")


def test_q_with_fewer_heads_than_kv_is_refused():
    for opset in (18, 23):
        _refused(f"q-heads1-kv-heads4-opset{opset}")
        assert _fused(f"q-heads4-kv-heads1-opset{opset}").domain == "fusegraph"  # MQA: grouped


def test_a_scale_that_grows_the_rank_is_refused():
    for opset in (18, 23):
        _refused(f"scale-rank5-opset{opset}")
        _fused(f"scale-rank4-opset{opset}")


def test_a_bias_joins_only_masks_it_adds_to_exactly():
    """(scores + bias) + mask is fused as scores + (bias + mask): equal only for masks of 0 and
    absorbing values (T5's Where(keep, 0, min)); -1e9 would round differently."""
    for then in ("input", -1e9, -1e4):
        _refused(f"bias-then-{then}")
    for then in (F32_LOW, -np.inf):
        assert _fused(f"bias-then-{then}").op_type == "MaskedAttention"


def test_softmax_over_another_axis_or_k_not_transposed_is_refused():
    for axis in (-2, 0, 1, 2):
        _refused(f"softmax-axis{axis}")
    _fused("softmax-axis3")
    _refused("k-not-transposed-square")


def test_constants_a_caller_can_feed_are_not_baked_in():
    """An initializer that is also a graph input is a default: the scale and the fill stay
    in the graph; a triangle fed at run time is a mask, not is_causal."""
    _refused("scale-is-a-graph-input")
    _refused("fill-is-a-graph-input")
    n = _fused("triangle-is-a-graph-input")
    assert attrs(n)["is_causal"] == 0 and len(n.input) == 4


def test_old_opsets_fuse_float32():
    for opset in (13, 14):
        assert _fused(f"plain-opset{opset}").domain == "fusegraph"
        assert _fused(f"additive-opset{opset}").op_type == "MaskedAttention"


def test_old_opsets_refuse_half_precision():
    for dtype in (np.float16, BF16):
        _refused_model(build(dataclasses.replace(BASE, dtype=dtype, opset=14)))


def _refused_model(model):
    out, report = rewrite_with_report(model, RULES)
    assert not report.fusions


def test_unguarded_rows_of_neg_inf_stay_nan():
    """Without the IsNaN guard a row masked by -inf throughout is NaN in the original: the
    rewrite keeps it NaN (and the guarded graph's 0 where there is a guard)."""
    for guard in (0, 1):
        model = build(MUTANTS[f"keep-fill-inf-guard{guard}"])
        out = check_exact_or_refused(model)
        x = feeds(model, 0)[0]
        row = output(run(out, x))[0, :, 0]
        assert np.isnan(row).all() if not guard else (row == 0).all()
    _fused("const-mask-row-of-neg-inf")
    for name in ("add-where-inf-guard0", "add-where-3.40282e+38-guard0", "add-where-inf-guard1"):
        assert attrs(_fused(name))["zero_nan_rows"] == name.endswith("guard1"), name


@pytest.mark.parametrize("guard", [False, True])
@pytest.mark.parametrize("mask", [None, ("add", (2, 1, 4, 4), np.float32)])
def test_nan_from_the_inputs_follows_the_guard(guard, mask):
    """A NaN row that Q brings (no mask involved) stays NaN in an eager original and is zeros
    under SDPA's guard: the fused op's `zero_nan_rows` says which, and ONNX Attention (eager)
    is not emitted for a guarded graph."""
    for opset in (18, 23):
        model = build(dataclasses.replace(BASE, mask=mask, guard=guard, opset=opset))
        x = feeds(model, 0)[-1]
        assert np.isnan(x["q"]).any()
        out = check_exact_or_refused(model)  # the NaN feed is among the checked ones
        row = output(run(out, x))[0, 0, -1]
        assert (row == 0).all() if guard else np.isnan(row).all()
        if guard or mask is not None:
            assert fused_node(out).domain == "fusegraph" and attrs(fused_node(out))["zero_nan_rows"] == int(guard)

def test_rows_masked_by_finfo_min_stay_uniform():
    """Softmax over a row of equal finfo.min scores is uniform: the original gives mean(V) and
    so must the rewrite (ONNX Runtime's Attention answers 0 there, so it is not emitted)."""
    model = build(MUTANTS["mask(2, 1, 1, 4)-opset23-guard0"])
    out = check_exact_or_refused(model)
    x = feeds(model, 0)[2]
    assert np.isclose(x["mask"][0, 0, 0], F32_LOW).all()
    np.testing.assert_allclose(output(run(out, x))[0, :, 0], x["v"][0].mean(axis=1), rtol=1e-5, atol=1e-5)
    assert fused_node(out).domain == "fusegraph"


def test_onnx_attention_only_without_mask_in_float32():
    assert _fused("plain-opset23").domain == ""
    for name in ("additive-opset23", "fp16-fp32-mask-opset23", "fp16-fp16-mask-opset23", "q1-k8-mask-opset23",
                 "mask(4,)-opset23-guard0", "mask(4, 1)-opset23-guard1"):
        n = _fused(name)
        assert n.domain == "fusegraph", name
    for n in (_fused("plain-opset23"), _fused("triangle-inf-opset23")):
        assert "softmax_precision" not in attrs(n)


def test_every_mutant_family_has_fusions_and_refusals():
    """The suite is not vacuous: a good share of the mutants fuse, a good share are refused."""
    fused = sum(check_exact_or_refused(build(s)) is not None for s in MUTANTS.values())
    assert 0.4 * len(MUTANTS) < fused < len(MUTANTS)


@pytest.mark.parametrize("q_factor, fused", [(1e-5, False), (2e4, False), (1e-4, True), (1 / 64, True), (1.0, True)])
def test_float32_scale_factors_far_from_one_are_refused(q_factor, fused):
    """Q·c then the scores ·1/(c·sqrt(D)): one folded scale of 1/sqrt(D) either way, but the
    original rounds Q·c and the scaled scores in turn; beyond 1e-4..1e4 that rounding moves tied
    scores to another key on large inputs (a mutation run), so those factors are refused."""
    d = 8
    s = 1 / (q_factor * np.sqrt(d))
    nodes = [node("Mul", ["q", "cq"], ["qs"]), node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             node("MatMul", ["qs", "kt"], ["qk"]), node("Mul", ["qk", "cs"], ["scores"]),
             node("Softmax", ["scores"], ["p"], axis=-1), node("MatMul", ["p", "v"], ["y"])]
    shape = [1, 2, 4, d]
    model = make_model(nodes, {n: (np.float32, shape) for n in "qkv"}, {"y": (np.float32, shape)},
                       {"cq": np.array(q_factor, np.float32), "cs": np.array(s, np.float32)}, opset=18)
    out, report = rewrite_with_report(model)
    assert (op_counts(out).get("fusegraph.Attention", 0) == 1) == fused, report
