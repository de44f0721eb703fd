"""Verification: is a rewritten model, or a rule, right? Above the core and the rule library.

- `differential`: the original and the rewritten model in ONNX Runtime on the same inputs
  (`rewrite --verify`, `rewrite verify`); its names are this package's (`verify_models`, ...).
- `selfcheck` (`verify_rule`): a rule checked on graphs built from its own pattern
  (`instantiate`), compared exactly where the graph is linear (`exact`), and on near-miss
  mutants of each graph (`mutate`).
- `fuzz`: random valid ONNX graphs with planted pattern instances (a hypothesis strategy).
- `testing`: the assertions rule tests use (`assert_rewrites`, `assert_unchanged`).

Nothing below this package imports it: the rules declare their examples in the core's
vocabulary (`fusegraph.rule.Leaf`), and the self-check reads them.
"""

from .differential import (DEFAULT_DIM, TOLERANCES, OutputDiff, add_comparison_options, compare, diff_lines,
                           graph_inputs, make_inputs, outputs, parse_shapes, run, session, verify_models)


def verify_rule(rule, **options):
    """Self-check a rule on graphs built from its own pattern (see `fusegraph.verify.selfcheck`):
    raises `selfcheck.RuleCheckFailure` (an AssertionError naming a saved repro) on a
    violation, returns a `selfcheck.RuleCheck` of what it covered. Imported when called: the
    self-check pulls in the rule library, which `rewrite --verify` does not need."""
    from .selfcheck import verify_rule as check
    return check(rule, **options)


__all__ = ["DEFAULT_DIM", "OutputDiff", "TOLERANCES", "compare", "graph_inputs", "make_inputs", "outputs",
           "parse_shapes", "run", "session", "verify_models", "verify_rule", "add_comparison_options",
           "diff_lines"]
