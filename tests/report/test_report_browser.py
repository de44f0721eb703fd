"""The report in a real browser: headless Chromium (Debian's `chromium`, which `.ci/run`
installs) opens each page from a file:// URL; the tests read the rendered DOM and every console
error and uncaught exception over the DevTools protocol (`browser.py`). Without Chromium they
skip with the reason; test_report.py checks the same pages' content without a browser."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest

from fusegraph import cli
from fusegraph.api import default_rules, rewrite_with_report
from fusegraph.report import render_html, report_data

import browser
import corpus

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_report import llama_like  # noqa: E402

LLAMA = ROOT / "tests" / "data" / "models" / "llama-eager-torchscript-dynamic.onnx"

EXECUTABLE = browser.find_chromium()
pytestmark = pytest.mark.skipif(EXECUTABLE is None, reason="chromium not installed (Debian: apt-get install "
                                "chromium, as .ci/run does; or set FUSEGRAPH_CHROMIUM)")


@pytest.fixture(scope="module")
def chromium():
    with browser.Browser(EXECUTABLE) as b:
        yield b


def open_report(chromium, path: Path):
    return chromium.open(path.resolve().as_uri())


def assert_renders(page, *, drawings: int, refusal_lists: int) -> None:
    assert page.errors() == []
    assert page.evaluate("document.querySelectorAll('svg.drawing').length") == drawings
    # Drawn, not just present: each drawing has boxes laid out with a size.
    assert page.evaluate("Array.from(document.querySelectorAll('svg.drawing')).every("
                         "s => s.querySelectorAll('g.op').length > 0 && s.getBBox().width > 0)")
    assert page.evaluate("document.querySelectorAll('ol.refusal-list').length") == refusal_lists


def counts(data: dict) -> dict:
    return {"drawings": 2 * sum(len(r["shapes"]) for r in data["rules"]),
            "refusal_lists": sum(1 for r in data["rules"] if r["refused"])}


def test_console_errors_are_caught(chromium, tmp_path):
    """The check below could fail: a page that logs an error and throws is reported."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><p>x</p><script>console.error('boom'); missing();</script>")
    page = open_report(chromium, bad)
    errors = page.errors()
    page.close()
    assert any("boom" in e for e in errors) and any("missing is not defined" in e for e in errors)


def test_report_opens_without_errors_and_search_filters(chromium, tmp_path, capsys):
    report = tmp_path / "llama.html"
    assert cli.main([str(LLAMA), "-o", str(tmp_path / "o.onnx"), "--report", str(report), "--no-progress"]) == 0
    names = [r.name for r in default_rules().by_priority()]
    _, rep = rewrite_with_report(onnx.load(LLAMA), explain=names, trace=True)
    data = report_data(rep, names)
    page = open_report(chromium, report)
    assert_renders(page, **counts(data))
    # The search box: a section stays shown exactly when it mentions the query (its name, or a
    # line such as "fused by rope.rotate_half"), and within the others only matching lines show.
    sections = page.evaluate("""(() => {
        const box = document.getElementById('search');
        box.value = 'ROPE.rotate_half'; box.dispatchEvent(new Event('input'));
        return Array.from(document.querySelectorAll('details.rule')).map(d => ({
            name: d.querySelector('.name').textContent,
            shown: !d.classList.contains('hidden'),
            mentions: d.textContent.toLowerCase().includes('rope.rotate_half'),
            strays: Array.from(d.querySelectorAll('li.item')).filter(li => !li.classList.contains('hidden')
                && !li.textContent.toLowerCase().includes('rope.rotate_half')).length}));
    })()""")
    assert all(s["shown"] == s["mentions"] for s in sections)
    assert {s["name"] for s in sections if s["shown"]} >= {"rope.rotate_half", "rope.rotate_half_partial"}
    assert all(s["strays"] == 0 for s in sections if s["shown"] and not s["name"].startswith("rope.rotate_half"))
    assert len([s for s in sections if not s["shown"]]) > 0
    # A node name opens the instance list that holds it.
    attention = next(r for r in data["rules"] if r["rule"] == "attention.fusegraph")
    node = attention["shapes"][0]["instances"][0]["matched"][0]
    opened = page.evaluate(f"""(() => {{
        const box = document.getElementById('search');
        box.value = {node!r}; box.dispatchEvent(new Event('input'));
        return Array.from(document.querySelectorAll('details.instances'))
            .filter(d => d.open && !d.closest('.hidden')).length;
    }})()""")
    assert opened >= 1
    assert page.errors() == []
    page.close()


def test_a_128_layer_report_opens_without_errors(chromium, tmp_path):
    names = [r.name for r in default_rules().by_priority()]
    _, rep = rewrite_with_report(llama_like(128), explain=names, trace=True)
    data = report_data(rep, names, source="llama_like(128)")
    report = tmp_path / "llama128.html"
    report.write_text(render_html(data), encoding="utf-8")
    page = open_report(chromium, report)
    assert_renders(page, **counts(data))
    assert page.evaluate("document.querySelectorAll('details.instances li').length") == len(rep.fusions)
    page.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.name for p in corpus.MODELS.glob("*.onnx")))
def test_report_opens_for_every_corpus_model(chromium, tmp_path, capsys, name):
    report = tmp_path / "report.html"
    assert cli.main([str(corpus.MODELS / name), "--report", str(report), "--json", "--no-progress"]) == 0
    data = json.loads(capsys.readouterr().out)["report"]
    page = open_report(chromium, report)
    assert_renders(page, **counts(data))
    page.close()
