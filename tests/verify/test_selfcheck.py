"""Every library rule (and any added later) passes the self-check; the self-check itself
catches broken rules, covers every branch, and leaves a replayable repro."""

import os

import numpy as np
import onnx
import pytest

from fusegraph import Const, Rule
from fusegraph.cli import main
from fusegraph.verify.instantiate import branch_paths
from fusegraph.patterns import all_rules
from fusegraph.verify.selfcheck import RuleCheckFailure
from fusegraph.verify import verify_rule

RULES = list(all_rules())
#: The random phase per library rule (the branch sweep is complete regardless).
EXAMPLES = 4


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_library_rule_verifies(rule, tmp_path):
    result = verify_rule(rule, repro_dir=str(tmp_path), max_examples=EXAMPLES, max_mutants=0)  # near misses: test_mutants
    assert len(result.covered) == result.paths >= 1
    assert result.instances >= 1
    assert not list(tmp_path.iterdir())  # no failure was saved


def _silu(op, x):
    return op.Mul(x, op.Sigmoid(x))


def test_wrong_replacement_is_caught_with_a_repro(tmp_path):
    def wrong(op, x):  # x * tanh(x) is not x * sigmoid(x)
        return op.Mul(x, op.Tanh(x))
    rule = Rule("wrong_silu", _silu, wrong)
    with pytest.raises(RuleCheckFailure, match="outputs differ") as err:
        verify_rule(rule, repro_dir=str(tmp_path), max_examples=5)
    where = str(err.value).rsplit("repro: ", 1)[1].strip()
    assert os.path.exists(os.path.join(where, "original.onnx"))
    assert "seed=" in open(os.path.join(where, "README.txt")).read()
    # the repro replays with `rewrite verify` and fails there too
    assert main(["verify", os.path.join(where, "original.onnx"), os.path.join(where, "rewritten.onnx"),
                 "--inputs", os.path.join(where, "inputs.npz")]) == 1


def test_invalid_rewrite_is_caught(tmp_path):
    """An axis out of range: the driver's type check refuses the replacement before any model
    is written, so the rule never fires, and the self-check says why."""
    def bad(op, x):
        return op.Softmax(x, axis=5)
    with pytest.raises(RuleCheckFailure, match="never fire(.|\n)*fails ONNX shape inference"):
        verify_rule(Rule("bad_axis", _silu, bad), repro_dir=str(tmp_path), max_examples=2)


def test_dead_alternative_is_reported(tmp_path):
    def pattern(op, x):  # the first option needs a constant that no constant satisfies
        return op.Relu(op.Add(x, Const(7.5, where=lambda a: False))) | op.Relu(op.Neg(x))

    with pytest.raises(RuleCheckFailure, match="never fire"):
        verify_rule(Rule("dead", pattern, lambda op, x: op.Max(x, op.Sub(x, x))), repro_dir=str(tmp_path), max_examples=1)


def test_every_alternative_and_operand_order_is_covered():
    def pattern(op, x):
        return op.Mul(x, op.Sigmoid(x) | op.Tanh(x))
    paths = branch_paths(Rule("p", pattern, lambda op, x: x).outputs)
    # Alt (2 options) and commutative Mul (2 orders): the all-first path plus one deviation each
    assert len(paths) == 3
    seen = {(k, v) for p in paths for k, v in p.items()}
    assert len(seen) == 4


def test_examples_supply_what_the_search_cannot_guess(tmp_path):
    def pattern(op, x):
        return op.Mul(x, Const(name="k"))

    def replacement(op, x, k):
        return op.Add(x, op.Mul(x, op.const(np.array(k.const_value - 1, k.const_value.dtype))))

    def k_is_special(k):
        return bool(np.all(k.const_value == 42))  # not a literal in the condition's source
    k_is_special.__code__ = k_is_special.__code__.replace(co_consts=tuple(
        c for c in k_is_special.__code__.co_consts if c != 42) + (6 * 7,))
    rule = Rule("times_k", pattern, replacement, k_is_special,
                examples=[{"k": np.array(42.0, np.float32)}])
    # (its replacement bakes k in: the near misses, which feed k as a graph input, would catch it)
    result = verify_rule(rule, repro_dir=str(tmp_path), max_examples=3, max_mutants=0)
    assert result.covered and result.instances >= 1


def test_linear_rules_run_in_exact_mode(tmp_path):
    bias_rule = next(r for r in RULES if r.name == "gemm_epilogue.matmul_bias")
    result = verify_rule(bias_rule, repro_dir=str(tmp_path), max_examples=3)
    assert result.exact_instances == result.instances >= 1


def test_repro_model_is_valid_onnx(tmp_path):
    def off_by_a_bit(op, x):  # x / (1.01 + exp(-x))
        one = op.CastLike(op.const(np.array(1.01, np.float32)), x)
        return op.Div(x, op.Add(op.Exp(op.Neg(x)), one))
    with pytest.raises(RuleCheckFailure) as err:
        verify_rule(Rule("near_silu", _silu, off_by_a_bit), repro_dir=str(tmp_path), max_examples=5)
    where = str(err.value).rsplit("repro: ", 1)[1].strip()
    onnx.checker.check_model(onnx.load(os.path.join(where, "original.onnx")), full_check=True)
