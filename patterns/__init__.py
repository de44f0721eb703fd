"""The fusion library: each module holds one family of rules and lists them in `RULES`."""

from __future__ import annotations

from fusegraph.rule import RuleSet

from . import attention, gemm_epilogue, norms

MODULES = (attention, gemm_epilogue, norms)


def all_rules() -> RuleSet:
    return RuleSet(r for m in MODULES for r in m.RULES)
