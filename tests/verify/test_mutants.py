"""Near-miss verification: rules that are right on their own pattern but wrong one edit away
fail `verify_rule`, naming the mutant and leaving a repro; correct rules survive every mutant;
and every library rule goes through the mutation check."""

import os

import numpy as np
import onnx
import pytest
from hypothesis import settings
from onnx import helper, numpy_helper

from fusegraph import Rule, reject, rewrite_with_report
from fusegraph.cli import main
from fusegraph.verify.instantiate import Leaf
from fusegraph.verify.mutate import adversarial_feeds, mutants
from fusegraph.patterns import all_rules
from fusegraph.verify.selfcheck import RuleCheckFailure
from fusegraph.verify.testing import make_model
from fusegraph.verify import verify_rule

RULES = list(all_rules())
#: Mutants per library rule: spread over every kind in the quick profile, all in the long one.
LIBRARY_MUTANTS = 150 if settings().max_examples < 1000 else None


def _fails_on(rule: Rule, kind: str, tmp_path, **options) -> str:
    """verify_rule's message, which must name a failing mutant of `kind` and its repro."""
    with pytest.raises(RuleCheckFailure) as err:
        verify_rule(rule, repro_dir=str(tmp_path), max_examples=3, **options)
    message = str(err.value)
    assert f"mutant {kind}" in message, message
    assert err.value.check.failures
    line = next(line for line in message.splitlines() if f"mutant {kind}" in line)
    where = message.split(line, 1)[1].split("repro: ", 1)[1].splitlines()[0].strip()
    readme = open(os.path.join(where, "README.txt")).read()
    assert f"mutant: {kind}" in readme
    onnx.checker.check_model(onnx.load(os.path.join(where, "original.onnx")), full_check=True)
    return message


def test_a_constant_matched_within_0_1_percent_is_caught(tmp_path):
    def pattern(op, x, p):
        return op.Pow(x, p)

    def square(op, x):  # x ** 2.002 is NaN for x < 0; x * x is not
        return op.Mul(x, x)

    def near_two(p):
        v = p.const_value
        return v is not None and bool(np.all(np.abs(v - 2.0) <= 2.5e-3)) or reject("exponent is not 2")
    rule = Rule("square", pattern, square, near_two, examples=[{"p": np.array(2.0, np.float32)}])
    _fails_on(rule, "constant +0.1%", tmp_path)


def test_a_where_fill_taken_for_a_mask_is_caught(tmp_path):
    def pattern(op, keep, s, fill):
        return op.Softmax(op.Where(keep, s, fill), axis=-1)

    def hard_mask(op, keep, s):  # any fill taken as -inf: wrong for 0, -10, -1e4
        return op.Softmax(op.Where(keep, s, op.CastLike(op.const(np.array(-np.inf, np.float32)), s)), axis=-1)

    def fill_is_constant(fill):
        return fill.const_value is not None or reject("fill is not a constant")
    rule = Rule("hard_mask", pattern, hard_mask, fill_is_constant,
                examples=[{"fill": np.array(-np.inf, np.float32), "keep": Leaf(False, 2, "bool")}])
    _fails_on(rule, "mask fill", tmp_path)


def test_a_dropped_attribute_is_caught(tmp_path):
    def pattern(op, x):
        return op.Softmax(x)  # axis not pinned: matches any

    def last_axis(op, x):
        return op.Exp(op.LogSoftmax(x, axis=-1))
    _fails_on(Rule("softmax_any_axis", pattern, last_axis), "attribute axis", tmp_path)


def test_a_conv_rule_that_drops_pads_never_rewrites_a_padded_conv(tmp_path):
    """A user's `Relu(Conv(x, w, b))` rule whose replacement loses the pads (strides,
    dilations) the pattern does not pin: instantiated from Conv's schema, and every mutant that
    sets them changes the output's shape, so the driver's type check refuses it (the mutation
    check sees refusals, not wrong models); a padded Conv is left alone, with the reason."""
    def pattern(op, x, w, b):
        return op.Relu(op.Conv(x, w, b))

    def replacement(op, x, w, b):  # the Conv rebuilt from its inputs alone
        return op.Relu(op.Identity(op.Conv(x, w, b)))
    rule = Rule("conv_relu", pattern, replacement)
    check = verify_rule(rule, repro_dir=str(tmp_path), max_examples=2)
    assert check.mutants and not check.failures
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
                        helper.make_node("Relu", ["c"], ["y"])],
                       {"x": (np.float32, [1, 2, 5, 5])}, {"y": (np.float32, [1, 3, 5, 5])},
                       {"w": np.ones((3, 2, 3, 3), np.float32), "b": np.zeros(3, np.float32)})
    _, report = rewrite_with_report(model, [rule], explain="conv_relu")
    assert not report.fusions
    assert any("shape" in m.reason for m in report.near_misses), report.near_misses


def test_an_attribute_lost_without_changing_shapes_is_caught(tmp_path):
    """Where a lost attribute keeps every type and shape (LeakyRelu's alpha), only the values
    tell, and the mutation check does."""
    def pattern(op, x):
        return op.Neg(op.LeakyRelu(x))

    def default_alpha(op, x):  # LeakyRelu at its default alpha, whatever the node says
        return op.Neg(op.Max(x, op.Mul(x, np.array(0.01, np.float32))))
    _fails_on(Rule("leaky", pattern, default_alpha), "attribute alpha", tmp_path)


def test_an_unconstrained_cast_round_trip_is_caught(tmp_path):
    """Casts through another type and back keep the output type: taking them for no-ops is
    wrong when the middle type is narrower (float16, int32), which only the values show."""
    def pattern(op, x):
        return op.Cast(op.Cast(op.Softmax(x, axis=-1)), to=1)

    def no_cast(op, x):
        return op.Softmax(x, axis=-1)
    _fails_on(Rule("softmax_casts", pattern, no_cast), "Cast", tmp_path)


def test_an_absorbed_broadcast_growing_constant_is_refused(tmp_path):
    """A rule that absorbs a constant of a higher rank (k [1, 1, 1] over x [3, 3]) would change
    the output's shape: the driver's type check refuses the replacement, with the reason."""
    def pattern(op, x, k):  # k a capture, not a Const: the rule alone decides what it absorbs
        return op.Mul(op.Relu(x), k)

    def scalar_k(op, x, k):  # k's shape dropped: relu(x[3, 3]) * k[1, 1, 1] is rank 3
        return op.Relu(op.Mul(x, op.const(np.array(k.const_value.reshape(-1)[0]))))
    rule = Rule("scale", pattern, scalar_k)
    model = make_model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "k"], ["y"])],
                       {"x": (np.float32, [3, 3])}, {"y": (np.float32, [1, 3, 3])},
                       {"k": np.full((1, 1, 1), 2.0, np.float32)})
    _, report = rewrite_with_report(model, [rule], explain="scale")
    assert not report.fusions
    assert any("rank" in m.reason for m in report.near_misses), report.near_misses


def test_a_baked_overridable_initializer_is_caught(tmp_path):
    """An initializer that is also a graph input is a default the caller may override: a rule
    that bakes its value in (here read from the graph's initializers) computes the wrong thing
    when it is fed."""
    def pattern(op, x, k):
        return op.Mul(op.Relu(x), k)

    def baked(op, x, k):
        return op.Relu(op.Mul(x, op.const(numpy_helper.to_array(k.graph.initializers[k.name]))))

    def k_is_a_positive_initializer(k):
        init = k.graph.initializers.get(k.name)
        return init is not None and bool(np.all(numpy_helper.to_array(init) > 0)) \
            or reject("k is no positive initializer")
    rule = Rule("baked", pattern, baked, k_is_a_positive_initializer, examples=[{"k": np.array(0.5, np.float32)}])
    _fails_on(rule, "initializer that is also a graph input", tmp_path)


def test_a_correct_rule_survives_every_mutant(tmp_path):
    def pattern(op, x):
        return op.Mul(x, op.Sigmoid(x))

    def silu(op, x):  # the same product, which the pattern no longer matches
        return op.Mul(x, op.Sigmoid(op.Identity(x)))
    result = verify_rule(Rule("silu_div", pattern, silu), repro_dir=str(tmp_path), max_examples=3)
    assert result.mutants >= 10 and result.rewritten_equal >= 1 and not result.failures
    assert result.mutants == result.refused + result.rewritten_equal + result.discarded
    assert not list(tmp_path.iterdir())


def test_the_failing_repro_replays_with_rewrite_verify(tmp_path):
    def pattern(op, x):
        return op.Softmax(x)

    def last_axis(op, x):
        return op.Exp(op.LogSoftmax(x, axis=-1))
    with pytest.raises(RuleCheckFailure) as err:
        verify_rule(Rule("softmax_any_axis", pattern, last_axis), repro_dir=str(tmp_path), max_examples=2)
    where = str(err.value).split("repro: ", 1)[1].splitlines()[0].strip()
    assert main(["verify", os.path.join(where, "original.onnx"), os.path.join(where, "rewritten.onnx"),
                 "--inputs", os.path.join(where, "inputs.npz")]) == 1


def test_mutants_cover_each_kind_of_near_miss():
    model = make_model(
        [helper.make_node("Where", ["keep", "s", "fill"], ["masked"]),
         helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
         helper.make_node("Cast", ["p"], ["y"], to=onnx.TensorProto.FLOAT)],
        inputs={"keep": (np.bool_, [2, 3]), "s": (np.float32, [2, 3])},
        outputs={"y": (np.float32, [2, 3])}, initializers={"fill": np.array(-np.inf, np.float32)})
    kinds = {m.kind for m in mutants(model)}
    assert {"mask fill", "constant broadcast-growing shape", "initializer that is also a graph input",
            "attribute axis", "Cast target", "Cast round trip", "input dim 1", "dtype"} <= kinds
    labels = [label for label, _ in adversarial_feeds(model)]
    assert {"normal", "x100", "+-1e4", "zeros", "zero-variance rows"} <= set(labels)
    assert "s fully masked row (-inf)" in labels and "keep fully masked row (0)" in labels


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_library_rule_survives_its_near_misses(rule, tmp_path):
    result = verify_rule(rule, repro_dir=str(tmp_path), max_examples=1, own_instances=False,
                         max_mutants=LIBRARY_MUTANTS)
    assert result.mutants >= 1 and not result.failures



#: Relu(op(...)) and, as the replacement, the same with an Identity between (not the pattern).
STANDARD_OPS = {
    "Conv": (lambda op, x, w, b: op.Relu(op.Conv(x, w, b)),
             lambda op, x, w, b: op.Relu(op.Identity(op.Conv(x, w, b)))),
    "MaxPool": (lambda op, x: op.Relu(op.MaxPool(x, kernel_shape=[2])),
                lambda op, x: op.Relu(op.Identity(op.MaxPool(x, kernel_shape=[2])))),
    "AveragePool": (lambda op, x: op.Relu(op.AveragePool(x, kernel_shape=[2, 2])),
                    lambda op, x: op.Relu(op.Identity(op.AveragePool(x, kernel_shape=[2, 2])))),
    "BatchNormalization": (lambda op, x, s, b, m, v: op.Relu(op.BatchNormalization(x, s, b, m, v)),
                           lambda op, x, s, b, m, v: op.Relu(op.Identity(op.BatchNormalization(x, s, b, m, v)))),
    "Gather": (lambda op, x, i: op.Relu(op.Gather(x, i)), lambda op, x, i: op.Relu(op.Identity(op.Gather(x, i)))),
    "Resize": (lambda op, x, r, s: op.Relu(op.Resize(x, r, s)),
               lambda op, x, r, s: op.Relu(op.Identity(op.Resize(x, r, s)))),
    "GlobalAveragePool": (lambda op, x: op.Relu(op.GlobalAveragePool(x)),
                          lambda op, x: op.Relu(op.Identity(op.GlobalAveragePool(x)))),
}


@pytest.mark.parametrize("name", sorted(STANDARD_OPS))
def test_any_standard_op_in_a_user_pattern_is_instantiated(name, tmp_path):
    """Instances come from the op schemas, shape inference and ONNX Runtime, not from a list
    of the library's ops (a Conv wants input and weight of one rank >= 3 and a bias of rank 1,
    BatchNormalization a positive variance, GlobalAveragePool a rank ONNX Runtime runs)."""
    pattern, replacement = STANDARD_OPS[name]
    result = verify_rule(Rule(f"relu_{name}", pattern, replacement), repro_dir=str(tmp_path), max_examples=3,
                         max_mutants=0)
    assert result.instances >= 1
