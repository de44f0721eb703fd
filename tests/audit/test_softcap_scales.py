"""Soft-capped attention folds only the scale factors it can fold exactly.

`bench_mutants.py` found it: Q·1.001 (a scale factor on Q) and ×2 on the scores, then
cap·tanh(s/cap), folded into one scale 2.002 on Q·Kᵀ, was 2e4 off on ±1e4 inputs. The original
rounds Q·1.001 before the product, which moves each score by an ulp of its terms; where the
terms cancel that is no longer small next to the cap, and the tanh makes it a whole other weight.
A power of two on Q or K scales exactly, so it still folds; any other factor there stays outside
the fused op (which then still fuses, with the factor on the scores as its scale).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from fusegraph.patterns import all_rules
from fusegraph.verify import run
from fusegraph.verify.testing import assert_rewrites, make_model, node, op_counts

F = np.float32


def softcapped(q_factor: float, k_divisor: float = 1e-5) -> onnx.ModelProto:
    nodes = [
        node("Mul", ["q", "q_scale"], ["qs"]),
        node("Div", ["k", "k_div"], ["kd"]),  # a K 1e5 times larger: scores of 1e13 that cancel
        node("Transpose", ["kd"], ["kt"], perm=[0, 1, 3, 2]),
        node("MatMul", ["qs", "kt"], ["s"]),
        node("Mul", ["s", "s_scale"], ["ss"]),
        node("Div", ["ss", "cap"], ["sc"]), node("Tanh", ["sc"], ["t"]), node("Mul", ["t", "cap"], ["capped"]),
        node("Softmax", ["capped"], ["p"], axis=-1),
        node("MatMul", ["p", "v"], ["y"]),
    ]
    shape = [1, 2, 3, 4]
    return make_model(nodes, {"q": (F, shape), "k": (F, shape), "v": (F, shape)}, {"y": (F, shape)},
                      {"q_scale": np.array(q_factor, F), "k_div": np.array(k_divisor, F),
                       "s_scale": np.array(2.0, F), "cap": np.array(5.0, F)})


def _signs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: np.where(rng.standard_normal((1, 2, 3, 4)) < 0, -1e4, 1e4).astype(F) for n in "qkv"}


@pytest.mark.parametrize("q_factor", [1.001, 0.3, 3.0])
def test_a_factor_on_q_that_is_no_power_of_two_stays_outside_under_a_soft_cap(q_factor):
    model = softcapped(q_factor)
    out = assert_rewrites(model, all_rules(), expect={"fusegraph.Attention": 1, "Softmax": 0, "Tanh": 0})
    assert any(n.op_type == "Mul" and "q_scale" in n.input for n in out.graph.node)  # Q·f computed as before
    for seed in range(8):  # tied signs: the terms of every score cancel or add up exactly
        feeds = _signs(seed)
        np.testing.assert_array_equal(run(out, feeds)["y"], run(model, feeds)["y"])


@pytest.mark.parametrize("q_factor", [0.25, 0.0625, 2.0])
def test_a_power_of_two_on_q_still_folds_into_the_scale(q_factor):
    model = softcapped(q_factor, k_divisor=1.0)
    out = assert_rewrites(model, all_rules(), expect={"fusegraph.Attention": 1, "Softmax": 0})
    assert op_counts(out)["Mul"] == 0  # Q's factor joined the op's scale
    attention = next(n for n in out.graph.node if n.op_type == "Attention")
    scale = next(a.f for a in attention.attribute if a.name == "scale")
    assert scale == np.float32(q_factor * 2.0)
    for seed in range(4):
        feeds = _signs(seed)
        np.testing.assert_array_equal(run(out, feeds)["y"], run(model, feeds)["y"])
