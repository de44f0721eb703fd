"""benchmarks/plot_results.py: RESULTS.md's tables parsed and drawn (one PNG per figure)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import plot_results  # noqa: E402


def test_tables_are_read_as_the_benchmarks_recorded_them():
    found = plot_results.tables((ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8"))
    speed = next(rows for _, header, rows in found if header[:2] == ["tool", "nodes"])
    assert {row[0] for row in speed} >= {"fusegraph", "onnxscript"}
    assert any(h[:3] == ["model", "nodes", "expected a/n/g/r"] for _, h, _ in found)
    assert any("of ceiling" in h for _, h, _ in found)
    assert plot_results._counts("2/5/0*/1") == [2, 5, 0, 1] and plot_results._counts("ERROR") == [0, 0, 0, 0]


def test_figures_are_drawn(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install -e '.[bench]')")
    plot_results.main(["--out", str(tmp_path)])
    for name in ("rewrite_time.png", "coverage.png", "kernels_roofline.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
