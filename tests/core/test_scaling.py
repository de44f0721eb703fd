"""Matching work grows linearly with the graph: counted in matcher steps, not seconds (speed
figures live in benchmarks/RESULTS.md)."""

import sys
from pathlib import Path

import pytest

from fusegraph import rewrite_with_report
from fusegraph.matcher import Matcher

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from synthetic import transformer_like  # noqa: E402


def matcher_steps(nodes: int, monkeypatch) -> tuple[int, int]:
    calls = [0]
    original = Matcher.match

    def counting(self, p, v, env):
        calls[0] += 1
        return original(self, p, v, env)
    monkeypatch.setattr(Matcher, "match", counting)
    _, report = rewrite_with_report(transformer_like(nodes))
    monkeypatch.setattr(Matcher, "match", original)
    return calls[0], sum(report.per_rule.values())


@pytest.mark.parametrize("small", [2000])
def test_all_rules_do_linear_work(small, monkeypatch):
    steps_1, fused_1 = matcher_steps(small, monkeypatch)
    steps_8, fused_8 = matcher_steps(8 * small, monkeypatch)
    assert fused_8 == 8 * fused_1 > 0
    assert steps_8 <= 8.2 * steps_1, (steps_1, steps_8)
