"""`rewrite --report`: the page's content, checked without a browser (test_report_browser.py
opens it in Chromium): one self-contained HTML file, a drawing pair per fusion shape, every
rule's refusals with `--explain`'s reason, the same data under `--json`, the run unchanged by
the tracing, bad report paths refused, and a 128-layer model rendered in under 2 s."""

from __future__ import annotations

import json
import os
import stat
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest

from fusegraph import cli
from fusegraph.api import default_rules, rewrite_with_report
from fusegraph.report import MAX_REFUSALS, render_html, report_data
from fusegraph.verify.testing import make_model, node

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_report import llama_like  # noqa: E402

DATA = ROOT / "tests" / "data"
LLAMA = DATA / "models" / "llama-eager-torchscript-dynamic.onnx"
DEMO = DATA / "explain_demo.onnx"


class Page(HTMLParser):
    """What the checks need of a page: tags with their attributes and classes, and the text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def with_class(self, tag: str, cls: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag and cls in (a.get("class") or "").split()]

    @property
    def all_text(self) -> str:
        return "".join(self.text)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_report_of_a_real_export_is_one_page_with_drawings_and_refusals(tmp_path, capsys):
    report = tmp_path / "report.html"
    code, out, _ = run_cli(capsys, LLAMA, "-o", tmp_path / "out.onnx", "--report", report, "--no-progress")
    assert code == 0 and f"wrote report {report}" in out
    page = Page(report.read_text(encoding="utf-8"))
    # Self-contained: nothing fetched (no external script, stylesheet, image or font).
    assert not [a for t, a in page.tags if t in ("link", "img", "iframe", "object", "embed")]
    assert not [a for t, a in page.tags if t == "script" and "src" in a]
    assert "http://" not in page.all_text.replace("http://www.w3.org/2000/svg", "")
    code, out, _ = run_cli(capsys, LLAMA, "--json", "--report", tmp_path / "again.html", "--no-progress")
    data = json.loads(out)["report"]
    shapes = sum(len(r["shapes"]) for r in data["rules"])
    assert len(page.with_class("svg", "drawing")) == 2 * shapes  # matched beside fused, per shape
    assert len(page.with_class("div", "shape")) == shapes
    # Every fusion is listed by node name; every fused rule has a section.
    fused = {r["rule"]: r["fusions"] for r in data["rules"] if r["fusions"]}
    plain = run_cli(capsys, LLAMA, "-o", tmp_path / "plain.onnx", "--json", "--no-progress")[1]
    assert fused == json.loads(plain)["fusions"]
    assert sum(len(s["instances"]) for r in data["rules"] for s in r["shapes"]) == sum(fused.values())
    for rule in fused:
        assert rule in page.all_text
    # Hover text: each drawn op names its node and types.
    titles = page.all_text
    first = data["rules"][[r["rule"] for r in data["rules"]].index("norms.rms_norm")]["shapes"][0]["matched"][0]
    assert first["name"] in titles and first["outputs"][0][1] in titles
    assert page.with_class("ol", "refusal-list")
    assert [a for t, a in page.tags if t == "input" and a.get("id") == "search"]


def test_refusals_carry_the_explain_reason_for_every_rule(tmp_path, capsys):
    report = tmp_path / "demo.html"
    code, out, _ = run_cli(capsys, DEMO, "--report", report, "--rules", "gemm_epilogue.*", "--json",
                           "--explain", "gemm_epilogue.matmul_act")
    summary = json.loads(out)
    rules = {r["rule"]: r for r in summary["report"]["rules"]}
    # The rules the run held, each explained (not only --explain's).
    assert set(rules) == {"gemm_epilogue.matmul_act", "gemm_epilogue.gemm_act", "gemm_epilogue.matmul_bias"}
    explained = summary["explain"]["refused"]
    assert [(m["node"], m["reason"]) for m in rules["gemm_epilogue.matmul_act"]["refusals"]] == \
        [(m["root"], m["reason"]) for m in explained]
    assert rules["gemm_epilogue.matmul_bias"]["refused"] > 0
    text = Page(report.read_text(encoding="utf-8")).all_text
    assert "bias shape (2, 3) is not [N] with N = 3" in text
    assert "expected Add, found Sub" in text


def test_refusals_are_capped_per_rule_and_counted(tmp_path):
    names = [r.name for r in default_rules().by_priority()]
    _, report = rewrite_with_report(llama_like(8), explain=names, trace=True)
    data = report_data(report, names)
    big = max(data["rules"], key=lambda r: r["refused"])
    assert big["refused"] > MAX_REFUSALS and len(big["refusals"]) == MAX_REFUSALS
    depths = [m["depth"] for m in big["refusals"]]
    assert depths == sorted(depths, reverse=True)
    assert f"… {big['refused'] - MAX_REFUSALS} more" in render_html(data)
    # A candidate refused by one rule and fused by another says so (by name: never for "").
    fused_nodes = {name: f.rule for f in report.fusions for name in f.matched}
    notes = [(m["node"], m["fused_by"]) for r in data["rules"] for m in r["refusals"] if m["fused_by"]]
    assert notes and all(fused_nodes[node.split(" ", 1)[1].strip("'")] == rule for node, rule in notes)


def test_tracing_and_explaining_every_rule_change_no_fusion():
    model = onnx.load(LLAMA)
    names = [r.name for r in default_rules().by_priority()]
    plain, plain_report = rewrite_with_report(model)
    traced, traced_report = rewrite_with_report(model, explain=names, trace=True)
    assert plain.SerializeToString() == traced.SerializeToString()
    assert [(f.rule, f.matched) for f in plain_report.fusions] == [(f.rule, f.matched) for f in traced_report.fusions]
    assert all(f.nodes is None for f in plain_report.fusions) and not plain_report.near_misses
    assert all(f.nodes["matched"] and f.nodes["created"] for f in traced_report.fusions)


def test_stages_are_timed(tmp_path, capsys):
    code, out, _ = run_cli(capsys, LLAMA, "-o", tmp_path / "o.onnx", "--json", "--no-progress")
    summary = json.loads(out)
    stages = summary["stages"]
    assert list(stages) == ["load", "canonicalize", "match", "write"]
    assert all(v > 0 for v in stages.values())
    assert sum(stages.values()) <= summary["total_seconds"] + 1e-3


def test_a_128_layer_model_report_is_grouped():
    # Its render time is a benchmark figure (benchmarks/bench_report.py, RESULTS §8), not asserted here.
    names = [r.name for r in default_rules().by_priority()]
    _, report = rewrite_with_report(llama_like(128), explain=names, trace=True)
    page = render_html(report_data(report, names, source="llama_like(128)"))
    parsed = Page(page)
    # Grouped: each rule's fusions of the 128 layers share one shape, so one drawing pair each
    # (two for the residual norm: the last layer's sum is read by no further layer).
    data = report_data(report, names)
    fused = [r for r in data["rules"] if r["fusions"]]
    assert all(sum(s["count"] for s in r["shapes"]) == r["fusions"] for r in fused)
    assert {r["rule"]: len(r["shapes"]) for r in fused if len(r["shapes"]) > 1} == {"norms.skip_rms_norm": 2}
    assert {r["rule"]: r["fusions"] for r in fused} == {
        "attention.fusegraph": 128, "activations.SwiGLU": 128, "qkv.projections": 128, "rope.rotate_half": 256,
        "norms.rms_norm": 257, "norms.skip_rms_norm": 256}
    assert len(parsed.with_class("svg", "drawing")) == 2 * (len(fused) + 1)
    assert len(parsed.with_class("li", "item")) >= len(report.fusions)


def test_unnamed_nodes_are_told_by_what_they_compute():
    model = make_model([node("MatMul", ["x", "w"], ["m"]), node("Relu", ["m"], ["y"])],
                       {"x": (np.float32, [2, 4])}, {"y": (np.float32, [2, 3])}, {"w": np.ones((4, 3), np.float32)})
    for n in model.graph.node:
        n.name = ""
    names = [r.name for r in default_rules().by_priority()]
    _, report = rewrite_with_report(model, explain=names, trace=True)
    data = report_data(report, names)
    instance = next(r for r in data["rules"] if r["fusions"])["shapes"][0]["instances"][0]
    assert instance["matched"] == ["MatMul -> m", "Relu -> y"]
    assert all(m["fused_by"] is None for r in data["rules"] for m in r["refusals"])


def test_names_are_escaped_not_markup(tmp_path, capsys):
    hostile = '<img src=x onerror="alert(1)">'
    model = make_model([node("MatMul", ["x", "w"], ["m"], name=hostile), node("Relu", ["m"], ["y"], name="r")],
                       {"x": (np.float32, [2, 4])}, {"y": (np.float32, [2, 3])},
                       {"w": np.ones((4, 3), np.float32)})
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    report = tmp_path / "r.html"
    assert run_cli(capsys, src, "-o", tmp_path / "o.onnx", "--report", report)[0] == 0
    text = report.read_text(encoding="utf-8")
    page = Page(text)
    assert not [a for t, a in page.tags if t == "img"]
    assert hostile in page.all_text  # shown as text, in the instance list and the hover titles


@pytest.mark.parametrize("where", ["missing-folder", "folder", "the-input", "the-output", "a-fifo"])
def test_a_bad_report_path_is_bad_input(tmp_path, capsys, where):
    src = tmp_path / "in.onnx"
    src.write_bytes(LLAMA.read_bytes())
    out = tmp_path / "out.onnx"
    report = {"missing-folder": tmp_path / "nope" / "r.html", "folder": tmp_path, "the-input": src,
              "the-output": out, "a-fifo": tmp_path / "fifo"}[where]
    if where == "a-fifo":  # never renamed over, nor written through (a device such as /dev/null alike)
        os.mkfifo(report)
    before = sorted(os.listdir(tmp_path))
    code, _, err = run_cli(capsys, src, "-o", out, "--report", report, "--no-progress")
    assert code == 2 and err.startswith("rewrite: error: --report") and len(err.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, the input untouched
    assert src.read_bytes() == LLAMA.read_bytes()
    if where == "a-fifo":
        assert stat.S_ISFIFO(os.stat(report).st_mode)


def test_without_networkx_the_report_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "networkx", None)  # an import of it fails, as when not installed
    monkeypatch.delitem(sys.modules, "fusegraph.report")
    code, _, err = run_cli(capsys, DEMO, "--report", tmp_path / "r.html")
    assert code == 2 and err == "rewrite: error: --report needs networkx (pip install 'fusegraph[report]')\n"
    assert not (tmp_path / "r.html").exists()
