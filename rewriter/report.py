"""The HTML report of a rewrite (`rewrite IN -o OUT --report report.html`): what fused, drawn.

Contract. `report_data(report, rules)` turns a `RewriteReport` of a traced and explained run
(`rewrite_with_report(..., trace=True, explain=<every rule>)`) into plain JSON-able data: nodes
and ops before and after, seconds per stage, and per rule its fusions and its refusals with the
deepest reason (`--explain`'s, for every rule, the deepest `MAX_REFUSALS` kept per rule).
`render_html(data)` makes one self-contained page of it: no network, no CDN, the drawings inline
SVG, a few lines of script for the search box; `--json` prints the same data.

Readability at scale. A 128-layer model fuses the same block 128 times, so fusions are grouped
by rule, then by *shape*: the op types, wiring and tensor types of what matched and of what
replaced it. Each shape is drawn once — the matched subgraph beside the nodes that replaced it,
laid out in layers by `networkx` (topological generations, each ordered by its parents'
positions) — and lists every instance by node name in a collapsed list. Hovering a drawn node
shows its name, op and the types of its inputs and outputs (an SVG `<title>`).

Cost. Grouping is linear in the traced nodes; one drawing per shape, so rendering a 128-layer
Llama-like model takes well under a second (`benchmarks/bench_report.py`). The page holds every
instance's node names, searchable.
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import stat
import tempfile
from collections import Counter, defaultdict
from functools import lru_cache
from typing import Any, Iterable

import networkx as nx

from .api import _gc_paused
from .errors import InputError
from .rewrite import RewriteReport

#: Refusals kept per rule, deepest first (the rest are counted): `--explain` prints 50 too.
MAX_REFUSALS = 50
#: Distinct reasons summarised per rule (names taken out, so the 128 copies of one reason count once).
MAX_REASONS = 8

_QUOTED = re.compile(r"'[^']*'")
#: A symbolic dim in a type text ("float[batch,unk__7,64]"): exporters number them per layer.
_SYMBOLIC_DIM = re.compile(r"(?<=[\[,])[^\],\d][^\],]*")


def report_data(report: RewriteReport, rules: Iterable[str], *, source: str = "", output: str | None = None) -> dict:
    """The report as JSON-able data; `rules` are the names run, in order (each gets a section,
    refusals only where it was explained)."""
    with _gc_paused():  # a tuple per traced input: the collector would rescan the graph's heap
        return _report_data(report, rules, source, output)


def _report_data(report: RewriteReport, rules: Iterable[str], source: str, output: str | None) -> dict:
    fused_by: dict[str, str] = {}
    for f in report.fusions:
        for name in f.matched:
            fused_by.setdefault(name, f.rule)
    misses = defaultdict(list)
    for m in report.near_misses:
        misses[m.rule].append(m)
    fusions = defaultdict(list)
    for f in report.fusions:
        fusions[f.rule].append(f)
    names = list(dict.fromkeys([*rules, *fusions]))  # lowering rules come after the run's rules
    return {
        "source": source,
        "output": output,
        "nodes": {"before": report.nodes_before, "after": report.nodes_after},
        "ops": {op: [report.ops_before.get(op, 0), report.ops_after.get(op, 0)]
                for op in sorted(set(report.ops_before) | set(report.ops_after))},
        "stages": {k: round(v, 4) for k, v in report.stages.items()},
        "canonicalized": dict(sorted(report.canonicalized.items())),
        "passes": report.passes,
        "rule_errors": {e.rule: {"count": e.count, "first": e.message} for e in report.errors.values()},
        "rules": [_rule_data(name, fusions[name], misses[name], fused_by) for name in names],
    }


def _rule_data(rule: str, fusions: list, misses: list, fused_by: dict[str, str]) -> dict:
    misses = sorted(misses, key=lambda m: -m.depth)
    reasons = Counter(_QUOTED.sub("…", m.reason) for m in misses)
    return {
        "rule": rule,
        "fusions": len(fusions),
        "shapes": _shapes(fusions),
        "refused": len(misses),
        "reasons": [{"reason": r, "count": n} for r, n in reasons.most_common(MAX_REASONS)],
        "refusals": [{"node": m.root, "reason": m.reason, "depth": m.depth,
                      "fused_by": fused_by.get(m.node) if m.node else None} for m in misses[:MAX_REFUSALS]],
    }


def _shapes(fusions: list) -> list[dict]:
    """Fusions grouped by shape (ops, wiring, types), most frequent first; each group keeps
    its first instance's nodes for the drawing and every instance's node names."""
    groups: dict[Any, dict] = {}
    for f in fusions:
        nodes = f.nodes or {"matched": [], "created": []}
        key = (_signature(nodes["matched"]), _signature(nodes["created"]))
        group = groups.get(key)
        if group is None:
            group = groups[key] = {"count": 0, "matched": nodes["matched"], "created": nodes["created"],
                                   "instances": []}
        group["count"] += 1
        group["instances"].append({"matched": _labels(f.matched, nodes["matched"]),
                                   "created": _labels(f.created, nodes["created"])})
    return sorted(groups.values(), key=lambda g: -g["count"])


def _labels(names: list[str], traced: list[dict]) -> list[str]:
    """Node names, an unnamed node (ONNX allows it) told by what it computes instead."""
    if all(names) or len(traced) != len(names):
        return names
    return [name or f"{n['op']} -> {n['outputs'][0][0] if n['outputs'] else '?'}" for name, n in zip(names, traced)]


def _signature(nodes: list[dict]) -> tuple:
    """The shape of a node list without its names: each node's op, and per input where it comes
    from (an earlier node's output, else an outside value's type and constness); symbolic dims
    count as one, since exporters name them apart per layer."""
    made: dict[str, tuple[int, int]] = {}
    sig = []
    for i, n in enumerate(nodes):
        ins = tuple(made.get(name, (_unnamed_dims(typ), const)) for name, typ, const in n["inputs"])
        sig.append((n["op"], ins, tuple((_unnamed_dims(t), leaves) for _, t, leaves in n["outputs"])))
        for j, (name, _, _) in enumerate(n["outputs"]):
            made[name] = (i, j)
    return tuple(sig)


@lru_cache(maxsize=4096)
def _unnamed_dims(type_text: str) -> str:
    return _SYMBOLIC_DIM.sub("?", type_text)


# -- drawing --------------------------------------------------------------------------------

_ROW = 58        # vertical distance between layers
_GAP = 14        # horizontal gap between boxes
_CHAR = 6.6      # width of a character of the 11px label font
_BOX_H = 24
_DOT = 5         # radius of an outside value's dot


def draw(nodes: list[dict]) -> str:
    """An inline SVG of `nodes` (traced nodes, in order): each op a box, each value entering
    from outside a dot (hollow for a constant) or, for a non-constant, a labelled pill; each
    value that leaves a pill below its producer. Layers by `networkx`."""
    g = nx.DiGraph()
    producer: dict[str, str] = {}
    info: dict[str, dict] = {}
    for i, n in enumerate(nodes):
        key = f"n{i}"
        g.add_node(key)
        info[key] = {"kind": "op", "label": n["op"].split(".")[-1], "title": _node_title(n)}
        for name, _, _ in n["outputs"]:
            producer[name] = key
    for i, n in enumerate(nodes):
        for name, typ, const in n["inputs"]:
            if not name:
                continue
            src = producer.get(name)
            if src is None:
                src = f"v:{name}"
                if src not in info:
                    info[src] = {"kind": "const" if const else "input", "label": _short(name),
                                 "title": f"{name}\n{typ or 'type unknown'}" + ("\nconstant" if const else "")}
                    g.add_node(src)
            g.add_edge(src, f"n{i}", title=f"{name}: {typ}" if typ else name)
    for i, n in enumerate(nodes):
        for name, typ, leaves in n["outputs"]:
            if leaves:
                dst = f"o:{name}"
                info[dst] = {"kind": "output", "label": _short(name),
                             "title": f"{name}\n{typ or 'type unknown'}\noutput"}
                g.add_edge(f"n{i}", dst, title=name)
    pos, width, height = _layout(g, info)
    parts = [f'<svg class="drawing" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" role="img">']
    for a, b, data in g.edges(data=True):
        (x1, y1), (x2, y2) = pos[a], pos[b]
        y1 += _half_height(info[a])
        y2 -= _half_height(info[b]) + 3
        mid = (y1 + y2) / 2
        curve = f"M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} {x2:.1f},{y2:.1f}"
        parts.append(f'<path class="edge" d="{curve}" '
                     f'marker-end="url(#fg-arrow)"><title>{_esc(data["title"])}</title></path>')
    for key in g.nodes:
        x, y = pos[key]
        node = info[key]
        title = f"<title>{_esc(node['title'])}</title>"
        if node["kind"] == "const":
            parts.append(f'<g class="value const">{title}<circle cx="{x:.1f}" cy="{y:.1f}" r="{_DOT}"/></g>')
            continue
        w = _box_width(node)
        cls = "op" if node["kind"] == "op" else f"value {node['kind']}"
        rx = 4 if node["kind"] == "op" else _BOX_H / 2
        h = _BOX_H if node["kind"] == "op" else _BOX_H - 6
        parts.append(f'<g class="{cls}">{title}<rect x="{x - w / 2:.1f}" y="{y - h / 2:.1f}" width="{w:.1f}" '
                     f'height="{h}" rx="{rx}"/><text x="{x:.1f}" y="{y + 4:.1f}">{_esc(node["label"])}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _layout(g: nx.DiGraph, info: dict[str, dict]) -> tuple[dict[str, tuple[float, float]], float, float]:
    """Layered positions. Ops take their topological generation among ops (from 1); a value
    entering sits one layer above its first reader and an output one below its producer, so
    no edge of a constant crosses the whole drawing. Within a layer nodes sit in the order of
    their parents' mean position (one sweep down), then are spaced by their widths."""
    ops = g.subgraph(k for k in g if info[k]["kind"] == "op")
    depth_of = {k: d + 1 for d, layer in enumerate(nx.topological_generations(ops)) for k in layer}
    for k in g:
        if info[k]["kind"] in ("const", "input"):
            depth_of[k] = min(depth_of[c] for c in g.successors(k)) - 1
        elif info[k]["kind"] == "output":
            depth_of[k] = max(depth_of[p] for p in g.predecessors(k)) + 1
    top = min(depth_of.values(), default=0)
    layers: list[list[str]] = [[] for _ in range(max(depth_of.values(), default=0) - top + 1)]
    for k in g:  # insertion order: the nodes' order in the graph
        layers[depth_of[k] - top].append(k)
    order: dict[str, float] = {}
    for depth, layer in enumerate(layers):
        if depth:
            layer.sort(key=lambda k: sum(order.get(p, 0) for p in g.predecessors(k)) / max(1, g.in_degree(k)))
        for i, key in enumerate(layer):
            order[key] = i
    widths = [sum(_box_width(info[k]) for k in layer) + _GAP * (len(layer) - 1) for layer in layers]
    total = max(widths, default=0) + 2 * _GAP
    pos = {}
    for depth, (layer, w) in enumerate(zip(layers, widths)):
        x = (total - w) / 2
        for key in layer:
            bw = _box_width(info[key])
            pos[key] = (x + bw / 2, _GAP + _BOX_H / 2 + depth * _ROW)
            order[key] = x + bw / 2
            x += bw + _GAP
    return pos, total, 2 * _GAP + _BOX_H + max(0, len(layers) - 1) * _ROW


def _box_width(node: dict) -> float:
    if node["kind"] == "const":
        return 2 * _DOT
    return max(36.0, len(node["label"]) * _CHAR + 16)


def _half_height(node: dict) -> float:
    return _DOT if node["kind"] == "const" else (_BOX_H if node["kind"] == "op" else _BOX_H - 6) / 2


def _node_title(n: dict) -> str:
    lines = [n["name"] or "(unnamed)", n["op"]]
    lines += [f"in  {name or '(none)'}: {typ or '?'}" for name, typ, _ in n["inputs"]]
    lines += [f"out {name}: {typ or '?'}" for name, typ, _ in n["outputs"]]
    return "\n".join(lines)


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


# -- page ----------------------------------------------------------------------------------

def render_html(data: dict) -> str:
    """One self-contained HTML page of `report_data`'s data."""
    body = [
        f"<h1>fusegraph report <small>{_esc(data['source'])}</small></h1>",
        _overview(data),
        '<div class="tools"><input id="search" type="search" placeholder="search rules, nodes, ops, reasons" '
        'autocomplete="off"> <button type="button" id="expand">expand all</button> '
        '<button type="button" id="collapse">collapse all</button> <span id="hits"></span></div>',
    ]
    quiet = [r["rule"] for r in data["rules"] if not r["fusions"] and not r["refused"]]
    body += [_rule_section(r) for r in data["rules"] if r["fusions"] or r["refused"]]
    if quiet:
        body.append(f'<p class="quiet">No fusion and no refusal: {_esc(", ".join(quiet))}</p>')
    return _PAGE.format(title=_esc(f"fusegraph report: {data['source']}"), style=_STYLE, script=_SCRIPT,
                        arrow=_ARROW, body="\n".join(body))


def _overview(data: dict) -> str:
    nodes = data["nodes"]
    stages = data["stages"]
    longest = max(stages.values(), default=0) or 1
    stage_rows = "".join(
        f'<tr><td>{_esc(k)}</td><td class="num">{v:.3f} s</td><td><span class="bar" '
        f'style="width:{160 * v / longest:.0f}px"></span></td></tr>' for k, v in stages.items())
    changed = {op: c for op, c in data["ops"].items() if c[0] != c[1]}
    op_rows = "".join(f'<tr><td>{_esc(op)}</td><td class="num">{b}</td><td class="num">{a}</td></tr>'
                      for op, (b, a) in changed.items())
    fused = sum(r["fusions"] for r in data["rules"])
    refused = sum(r["refused"] for r in data["rules"])
    canon = ", ".join(f"{k} {v}" for k, v in data["canonicalized"].items()) or "nothing"
    errors = "".join(f'<p class="error">rule {_esc(rule)} failed on {e["count"]} candidate(s), left unfused: '
                     f'{_esc(e["first"])}</p>' for rule, e in data["rule_errors"].items())
    written = f"<p>Written to <code>{_esc(data['output'])}</code>.</p>" if data.get("output") else ""
    return (f'<section class="overview"><div><h2>Nodes</h2><p class="big">{nodes["before"]} &rarr; '
            f'{nodes["after"]}</p><p>{fused} fusions, {refused} refused candidates, {data["passes"]} passes; '
            f'canonicalized: {_esc(canon)}.</p>{written}{errors}</div>'
            f'<div><h2>Time per stage</h2><table class="stages">{stage_rows}</table></div>'
            f'<div><h2>Ops changed</h2><div class="ops-box"><table class="ops">'
            f'<tr><th>op</th><th>before</th><th>after</th></tr>'
            f'{op_rows}</table></div></div></section>')


def _rule_section(r: dict) -> str:
    parts = [f'<details class="rule item" open><summary><span class="name">{_esc(r["rule"])}</span> '
             f'<span class="count">{r["fusions"]} fused</span> <span class="count refused">{r["refused"]} refused'
             f'</span></summary>']
    for i, shape in enumerate(r["shapes"]):
        parts.append(_shape_block(r["rule"], i, shape))
    if r["refused"]:
        parts.append(_refusals(r))
    parts.append("</details>")
    return "".join(parts)


def _shape_block(rule: str, index: int, shape: dict) -> str:
    ops = Counter(n["op"].split(".")[-1] for n in shape["matched"])
    became = ", ".join(n["op"] for n in shape["created"]) or "(nothing)"
    caption = (f'{shape["count"]} &times; {len(shape["matched"])} nodes ('
               + _esc(", ".join(f"{k}×{v}" if v > 1 else k for k, v in sorted(ops.items())))
               + f') &rarr; {_esc(became)}')
    rows = "".join(
        f'<li class="item">{_esc(", ".join(inst["matched"]))} <b>&rarr;</b> {_esc(", ".join(inst["created"]))}</li>'
        for inst in shape["instances"])
    return (f'<div class="shape item"><p class="caption">{caption}</p><div class="pair">'
            f'<figure><figcaption>matched</figcaption>{draw(shape["matched"])}</figure>'
            f'<div class="becomes">&rArr;</div>'
            f'<figure><figcaption>fused</figcaption>{draw(shape["created"])}</figure></div>'
            f'<details class="instances"><summary>{shape["count"]} instance(s), by node name</summary>'
            f'<ol>{rows}</ol></details></div>')


def _refusals(r: dict) -> str:
    reasons = "".join(f'<li><span class="num">{x["count"]}</span> {_esc(x["reason"])}</li>' for x in r["reasons"])
    rows = "".join(
        f'<li class="item"><code>{_esc(m["node"])}</code>: {_esc(m["reason"])}'
        + (f' <span class="note">(fused by {_esc(m["fused_by"])})</span>' if m["fused_by"] else "") + "</li>"
        for m in r["refusals"])
    more = r["refused"] - len(r["refusals"])
    tail = f'<p class="note">… {more} more (the deepest {len(r["refusals"])} are listed)</p>' if more > 0 else ""
    return (f'<details class="refusals"{" open" if r["refused"] <= 10 else ""}><summary>{r["refused"]} refused '
            f'candidate(s), deepest reason first</summary><p class="note">Most frequent reasons:</p>'
            f'<ul class="reasons">{reasons}</ul><ol class="refusal-list">{rows}</ol>{tail}</details>')


_ARROW = ('<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>'
          '<marker id="fg-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
          'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#667"/></marker></defs></svg>')

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{style}</style></head>
<body>{arrow}
{body}
<script>{script}</script>
</body></html>
"""

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1400px;padding:16px 24px;
  color:#1d2330;background:#fafbfc}
h1{font-size:22px;margin:4px 0 12px}h1 small{font-weight:normal;color:#667;font-size:15px}
h2{font-size:15px;margin:0 0 6px}
.overview{display:flex;gap:32px;background:#fff;border:1px solid #dde;border-radius:8px;padding:12px 16px}
.overview>div:first-child{flex:1 1 360px}.ops-box{max-height:230px;overflow:auto;padding-right:8px}
.big{font-size:26px;margin:0 0 4px}
table{border-collapse:collapse}td,th{padding:1px 10px 1px 0;text-align:left}
.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:10px;background:#5b8def;border-radius:2px}
.tools{position:sticky;top:0;background:#fafbfc;padding:10px 0;z-index:1}
#search{width:380px;padding:5px 8px;font-size:14px}#hits{color:#667}
details.rule{background:#fff;border:1px solid #dde;border-radius:8px;margin:10px 0;padding:6px 12px}
details.rule>summary{cursor:pointer;font-size:15px}.name{font-weight:600}
.count{color:#2a7a3b;margin-left:10px}.count.refused{color:#a05a00}
.shape{border-top:1px solid #eef;margin-top:8px;padding-top:6px}.caption{margin:2px 0;color:#334}
.pair{display:flex;align-items:flex-start;gap:18px;overflow-x:auto}
figure{margin:0}figcaption{font-size:12px;color:#667}.becomes{font-size:28px;color:#667;align-self:center}
svg.drawing{background:#fff}
svg .op rect{fill:#e8efff;stroke:#5b8def}
svg .op text,svg .value text{font:11px system-ui,sans-serif;text-anchor:middle;fill:#1d2330}
svg .value.input rect{fill:#f3f3f3;stroke:#999}svg .value.output rect{fill:#eaf7ec;stroke:#2a7a3b}
svg .value.const circle{fill:#fff;stroke:#999}
svg .edge{fill:none;stroke:#889;stroke-width:1.2}
svg g:hover rect,svg g:hover circle{stroke-width:2.5}
.instances ol,.refusal-list{font:12px ui-monospace,monospace;max-height:320px;overflow:auto}
.note{color:#667;font-size:12px}.quiet{color:#667}.error{color:#b00020}
.reasons{font-size:13px}
.hidden{display:none}
"""

_SCRIPT = """
(function () {
  var box = document.getElementById('search');
  var hits = document.getElementById('hits');
  function filter() {
    var q = box.value.trim().toLowerCase();
    var rules = document.querySelectorAll('details.rule');
    var shown = 0;
    rules.forEach(function (rule) {
      var ruleHit = !q || rule.querySelector('summary').textContent.toLowerCase().indexOf(q) >= 0;
      var any = ruleHit;
      rule.querySelectorAll('li.item').forEach(function (li) {
        var hit = ruleHit || li.textContent.toLowerCase().indexOf(q) >= 0;
        li.classList.toggle('hidden', !hit);
        if (hit && q && !ruleHit) { var d = li.closest('details'); if (d) d.open = true; shown++; }
        any = any || hit;
      });
      rule.querySelectorAll('.shape').forEach(function (shape) {
        var hit = ruleHit || !q || shape.textContent.toLowerCase().indexOf(q) >= 0;
        shape.classList.toggle('hidden', !hit);
      });
      rule.classList.toggle('hidden', !any);
      if (q && any) rule.open = true;
    });
    hits.textContent = q ? shown + ' matching line(s)' : '';
  }
  box.addEventListener('input', filter);
  function setAll(open) { document.querySelectorAll('details').forEach(function (d) { d.open = open; }); }
  document.getElementById('expand').addEventListener('click', function () { setAll(true); });
  document.getElementById('collapse').addEventListener('click', function () { setAll(false); });
})();
"""


def check_report_path(path: str, *inputs_and_outputs: str | None) -> None:
    """Refuse, before any work, a report path that can't be written or would overwrite the
    model read or written: its folder must exist, and what is there must be a regular file or
    nothing (the report is renamed over it: never over a device such as /dev/null, a FIFO)."""
    if os.path.isdir(path):
        raise InputError(f"--report {path}: is a folder")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise InputError(f"--report {path}: exists and is not a regular file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"--report {path}: no such folder {folder}")
    for other in inputs_and_outputs:
        if other and os.path.exists(other) and os.path.exists(path) and os.path.samefile(path, other):
            raise InputError(f"--report {path}: is the model {other}")
        if other and os.path.abspath(other) == os.path.abspath(path):
            raise InputError(f"--report {path}: is the model {other}")


def write_report(path: str, data: dict) -> None:
    """Write the page to `path` atomically: a temporary file in its folder renamed over it, so
    `path` holds the old report or the new one, never half of one."""
    page = render_html(data).encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=".fusegraph-report-", suffix=".html", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(page)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(f"--report {path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
