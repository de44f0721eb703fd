"""fusegraph: declarative pattern matching and fusion for ONNX graphs headed to TensorRT.

    import fusegraph
    from fusegraph import Rule, Const, optional

    def pattern(op, x):
        return op.Mul(x, op.Sigmoid(x))

    def replacement(op, x):
        return op.Silu(x, _domain="my.ops")

    model = fusegraph.rewrite(model, [Rule("silu", pattern, replacement)])
"""

import os
import sys

try:
    from .api import default_rules, rewrite, rewrite_file, rewrite_with_report
    from .errors import InputError
    from .pattern import Attr, Const, Var, any_of, is_op, optional, tagged, wildcard
    from .rule import Rule, RuleSet, reject
    from .sharding import shard
except KeyboardInterrupt:
    # Ctrl-C while the `rewrite` command is still importing onnx and numpy: the command's one
    # line and exit code (see fusegraph.cli), not a traceback. A library import re-raises.
    if os.path.basename(sys.argv[0]) == "rewrite" or "fusegraph.cli" in getattr(sys, "orig_argv", ()):
        print("rewrite: interrupted (SIGINT)", file=sys.stderr)
        raise SystemExit(130) from None
    raise

__all__ = ["Attr", "Const", "InputError", "Rule", "RuleSet", "Var", "any_of", "default_rules", "is_op", "optional",
           "reject", "rewrite", "rewrite_file", "rewrite_with_report", "shard", "tagged", "wildcard"]
