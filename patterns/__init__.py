"""The fusion library: each module holds one family of rules and lists them in `RULES`."""

from __future__ import annotations

from fusegraph.rule import RuleSet

from . import activations, attention, gemm_epilogue, norms, qkv, rope, rope_cache

MODULES = (attention, qkv, gemm_epilogue, norms, activations, rope, rope_cache)


def all_rules() -> RuleSet:
    return RuleSet(r for m in MODULES for r in m.RULES)
