"""Draw RESULTS.md's curves: PNGs next to it, from the tables the benchmarks recorded there.

    python benchmarks/plot_results.py [--results benchmarks/RESULTS.md] [--out benchmarks/]

- `rewrite_time.png`: rewrite seconds against graph nodes, log-log, per tool (§1, the table
  `bench_rewrite.py` prints: fusegraph, onnxscript's rewriter, onnx-graphsurgeon's import/export).
- `coverage.png`: per architecture family, the share of expected attention/norm/GELU/RoPE blocks
  each fuser fuses (§2, `bench_coverage.py`'s per-model table, each model's count capped at its
  expected, as the summary counts them).
- `kernels_roofline.png`: each kernel table's rows (§5, `bench_kernels.py`) as fractions of the
  measured ceiling (matmul TFLOP/s or copy GB/s), the median per op and kind of implementation.

The tables are the record (the benchmarks print them, and RESULTS.md keeps each run's), so
the figures are redrawn from RESULTS.md alone, on any machine; rerun a benchmark, paste its
table, rerun this. Needs matplotlib (`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
FUSERS = ("original", "ort-transformers", "onnxscript", "fusegraph")
CATEGORIES = ("attention", "norm", "gelu", "rope")


def tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """Every Markdown table: (nearest heading above, header cells, rows of cells)."""
    found, heading, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|\s*:?-{3}", lines[i + 1]):
            header = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            found.append((heading, header, rows))
            continue
        i += 1
    return found


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _number(text: str) -> float:
    return float(text.replace(",", "").rstrip("%x").split()[0])


def plot_rewrite_time(found, out: Path, plt) -> Path:
    speed = next(rows for _, header, rows in found if header[:2] == ["tool", "nodes"] and "rewrite s" in header)
    header = next(h for _, h, rows in found if rows is speed)
    col = header.index("rewrite s")
    series = defaultdict(list)
    for row in speed:
        series[row[0]].append((_number(row[1]), _number(row[col])))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for tool, points in series.items():
        points.sort()
        ax.loglog(*zip(*points), marker="o", label=tool)
    ax.set_xlabel("graph nodes")
    ax.set_ylabel("rewrite seconds")
    ax.set_title("Rewrite time vs graph size (RESULTS.md §1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, out / "rewrite_time.png", plt)


def plot_coverage(found, out: Path, plt) -> Path:
    header, rows = next((h, r) for _, h, r in found if h[:3] == ["model", "nodes", "expected a/n/g/r"])
    fused = defaultdict(lambda: defaultdict(int))
    expected = defaultdict(int)
    for row in rows:
        family = row[0].split("-")[0]
        want = _counts(row[header.index("expected a/n/g/r")])
        expected[family] += sum(want)
        for fuser in FUSERS:
            got = _counts(row[header.index(f"{fuser} a/n/g/r")])
            fused[family][fuser] += sum(min(g, w) for g, w in zip(got, want))
    families = sorted(f for f in expected if expected[f])
    fig, ax = plt.subplots(figsize=(max(8.0, 0.42 * len(families)), 4.6))
    width = 0.8 / len(FUSERS)
    for k, fuser in enumerate(FUSERS):
        xs = [i + (k - (len(FUSERS) - 1) / 2) * width for i in range(len(families))]
        ax.bar(xs, [fused[f][fuser] / expected[f] for f in families], width, label=fuser)
    ax.set_xticks(range(len(families)), families, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("expected blocks fused")
    ax.set_ylim(0, 1.05)
    ax.set_title("Coverage per architecture family: attention, norm, GELU, RoPE (RESULTS.md §2)")
    ax.legend(ncol=4, fontsize=8, loc="lower right")
    return _save(fig, out / "coverage.png", plt)


def _counts(cell: str) -> list[int]:
    """'2/5/0*/0' -> [2, 5, 0, 0]; an ERROR (or a dash) fused nothing."""
    parts = cell.replace("*", "").split("/")
    if len(parts) != len(CATEGORIES) or not all(p.strip().isdigit() for p in parts):
        return [0] * len(CATEGORIES)
    return [int(p) for p in parts]


def plot_kernels(found, out: Path, plt) -> Path:
    panels = [(heading, h, r) for heading, h, r in found if "of ceiling" in h]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8.5, 3.4 * len(panels)), squeeze=False)
    for ax, (heading, header, rows) in zip(axes[:, 0], panels):
        share = defaultdict(lambda: defaultdict(list))
        for row in rows:
            kind = _implementation_kind(row[header.index("implementation")])
            try:
                share[row[header.index("op")]][kind].append(_number(row[header.index("of ceiling")]) / 100)
            except ValueError:
                continue
        ops = list(share)
        kinds = [k for k in ("fused triton", "torch / vendor", "unfused") if any(k in share[o] for o in ops)]
        width = 0.8 / len(kinds)
        for k, kind in enumerate(kinds):
            xs = [i + (k - (len(kinds) - 1) / 2) * width for i in range(len(ops))]
            ax.bar(xs, [statistics.median(share[o][kind]) if share[o][kind] else 0 for o in ops], width, label=kind)
        ax.set_xticks(range(len(ops)), ops, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("of the roofline (median)")
        ax.set_title(heading[:90], fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("Kernels as fractions of the measured ceiling (RESULTS.md §5)")
    return _save(fig, out / "kernels_roofline.png", plt)


def _implementation_kind(text: str) -> str:
    if text.startswith("fused triton"):
        return "fused triton"
    if text.startswith("unfused") or "(unfused)" in text:
        return "unfused"
    return "torch / vendor"


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    found = tables(args.results.read_text(encoding="utf-8"))
    for draw in (plot_rewrite_time, plot_coverage, plot_kernels):
        print(f"wrote {draw(found, args.out, plt)}")


if __name__ == "__main__":
    main()
