"""The fusion library: each module holds one family of rules and lists them in `RULES`.

Every module of this package that defines `RULES` is a family, found by name: a new family is a
new module here (and its tests), nothing else to register. The order the rules run in is their
priority (`priorities`), not the modules' order.
"""

from __future__ import annotations

import importlib
import pkgutil

from fusegraph.rule import RuleSet

MODULES = tuple(m for m in (importlib.import_module(f"{__name__}.{info.name}")
                            for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name))
                if hasattr(m, "RULES"))


def all_rules() -> RuleSet:
    return RuleSet(r for m in MODULES for r in m.RULES)
