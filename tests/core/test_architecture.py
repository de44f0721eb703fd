"""The package's dependency direction, read from the source: no import cycle, and each layer
imports only the layers below it (README, "How it works").

Every `import` and `from ... import` of every fusegraph module counts, at module level or
inside a function alike: a deferred import is still a dependency, and the cycle this test was
written against (api -> patterns -> norms -> instantiate -> exact -> verify -> selfcheck -> api)
closed through one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Source folder -> the package it is (pyproject.toml's package-dir).
PACKAGES = {"rewriter": "fusegraph", "patterns": "fusegraph.patterns", "plugins": "fusegraph.plugins",
            "kernels": "fusegraph.kernels"}

CORE = {f"fusegraph.{m}" for m in ("errors", "external_data", "ir", "pattern", "matcher", "rule", "dispatch",
                                   "typecheck", "rewrite", "subgraph_functions", "canonicalize",
                                   "model_io", "serialize")}
#: Modules of the TensorRT side that run the whole pipeline (`rewrite build --rewrite`), so
#: they sit with the command line on top.
TENSORRT_TOOLS = {"fusegraph.plugins.engine", "fusegraph.plugins.engine_cli"}
#: Graph transforms beside the rule library: over the core and the fused ops, below the API.
TRANSFORMS = {"fusegraph.sharding"}
#: What the command line drives over the API: the HTML report and the shard commands.
TOOLS = {"fusegraph.cli", "fusegraph.report", "fusegraph.shard_cli"}


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer(module: str) -> tuple[int, str]:
    """(rank, name) of a module's layer: a module may import its own layer and lower ones."""
    if module == "fusegraph.graph_builder":
        return -1, "builder"  # under everything: the fused-op bodies are built with it
    if module == "fusegraph.ops.lowering":
        return 2, "rules"  # rules over fused ops, run by the driver like the library's
    if in_package(module, "fusegraph.ops"):
        return 0, "ops"
    if module in CORE:
        return 1, "core"
    if in_package(module, "fusegraph.patterns"):
        return 2, "rules"
    if in_package(module, "fusegraph.kernels"):
        return 1, "kernels"
    if module in TENSORRT_TOOLS:
        return 5, "tools"
    if in_package(module, "fusegraph.plugins"):
        return 2, "plugins"
    if module in TRANSFORMS:
        return 2, "rules"
    if module in ("fusegraph", "fusegraph.api", "fusegraph.interop"):
        return 3, "api"
    if in_package(module, "fusegraph.verify"):
        return 4, "verify"
    if module in TOOLS:
        return 5, "tools"
    raise AssertionError(f"{module}: no layer; place it in test_architecture.layer")


#: Layers that must not know each other although neither is above the other.
APART = {("kernels", "core"), ("core", "kernels"), ("plugins", "rules"), ("rules", "plugins")}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported fusegraph module, line) for every import in `path`."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in known else base, node.lineno))
    return [(m, line) for m, line in out if m in known and m != module]


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    found = modules()
    g = nx.DiGraph()
    g.add_nodes_from(found)
    for module, path in found.items():
        for target, line in imports(module, path, set(found)):
            g.add_edge(module, target, where=f"{path.relative_to(ROOT)}:{line}")
    return g


def test_the_graph_sees_every_module(graph):
    assert {"fusegraph.rewrite", "fusegraph.ops.fused_ops", "fusegraph.verify.selfcheck",
            "fusegraph.patterns.norms", "fusegraph.plugins.engine", "fusegraph.kernels.reference"} <= set(graph)
    assert graph.has_edge("fusegraph.rewrite", "fusegraph.matcher")  # a relative import, resolved
    assert graph.has_edge("fusegraph.verify.selfcheck", "fusegraph.api")


def test_no_import_cycle(graph):
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import cycles:\n" + "\n".join(
        " -> ".join(c + c[:1]) + "  (" + ", ".join(graph.edges[a, b]["where"] for a, b in zip(c, c[1:] + c[:1])) + ")"
        for c in cycles)


def test_each_layer_imports_only_below_it(graph):
    wrong = []
    for a, b, data in graph.edges(data=True):
        (ra, la), (rb, lb) = layer(a), layer(b)
        if rb > ra or (la, lb) in APART:
            wrong.append(f"{data['where']}: {a} ({la}) imports {b} ({lb})")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_a_violation_names_the_offending_import(tmp_path):
    """The checks above report the file and line of the import that breaks the rule."""
    path = tmp_path / "rewrite.py"
    path.write_text("import os\n\nfrom .verify import selfcheck\n")
    found = imports("fusegraph.rewrite", path, {"fusegraph.verify", "fusegraph.verify.selfcheck"})
    assert found == [("fusegraph.verify.selfcheck", 3)]
    assert layer("fusegraph.verify.selfcheck")[0] > layer("fusegraph.rewrite")[0]
