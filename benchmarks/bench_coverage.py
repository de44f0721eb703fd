"""Fusion coverage on the real-model corpus: what each fuser finds on the same ONNX file.

Why: "fusegraph fuses transformers" only means something next to what the established
fusers reach on the very same exports.  For every model listed in
``tests/data/models/MANIFEST.json`` this runs

* onnxruntime.transformers' offline optimizer (``optimize_model``, the model_type that ORT
  documents for the architecture; llama-family decoders use "qwen3", the one decoder-only
  type with RoPE/GQA/RMSNorm handling; the Whisper encoder uses "bart" as ORT's own Whisper
  export does),
* onnxscript's ORT fusions (``onnxscript.rewriter.ort_fusions.optimize_for_ort``),
* fusegraph (``fusegraph_column``, filled in by the patterns work),

and counts the fused ops each produced (attention, norms, GELUs, RoPE) next to the counts
the manifest says a complete fuser must reach, plus node counts before/after, wall time
and the max abs difference of the fused model's outputs against the original's in
ONNX Runtime (CPU) on the same random inputs.  A fuser that raises on a model is reported
for that model; the run goes on.

    python benchmarks/bench_coverage.py [--out FILE]   # section 2 of benchmarks/RESULTS.md
    python benchmarks/bench_coverage.py --only llama gpt2   # filename substrings
    python benchmarks/bench_coverage.py --no-peers          # fusegraph's column alone
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import logging
import platform
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from fusegraph.verify.testing import manifest_feeds

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "tests" / "data" / "models" / "MANIFEST.json"
SEED = 0

# Fused op types per category, any domain (ai.onnx, com.microsoft).
CATEGORIES = {
    "attention": {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                  "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention", "DecoderMaskedSelfAttention",
                  "DecoderAttention", "PagedAttention", "SparseAttention", "QAttention", "LongformerAttention"},
    "norm": {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
             "SkipSimplifiedLayerNormalization", "RMSNormalization", "EmbedLayerNormalization"},
    "gelu": {"Gelu", "FastGelu", "BiasGelu"},
    "rope": {"RotaryEmbedding"},
}
CATEGORY_KEYS = list(CATEGORIES)  # table order: attention / norm / gelu / rope

# optimize_model's model_type per corpus architecture: the type ORT documents for the family where
# it has one, else the closest it has (rotary decoders "qwen3", encoders "bert", seq2seq "bart").
ORT_MODEL_TYPE = {"gpt2": "gpt2", "bert": "bert", "llama": "qwen3", "mistral": "qwen3", "qwen2": "qwen3",
                  "t5": "t5", "bart": "bart", "vit": "vit", "whisper_encoder": "bart",
                  "llama_decode": "qwen3", "gpt2_decode": "gpt2", "roberta": "bert", "distilbert": "bert",
                  "modernbert": "bert", "dinov2": "vit", "swin": "swin", "clip_vision": "clip", "deit": "vit",
                  "wav2vec2": "bart", "hubert": "bart", "gemma2": "qwen3", "gemma": "qwen3", "bloom": "gpt2",
                  "mpt": "gpt2", "falcon": "gpt_neox", "gpt_bigcode": "gpt2", "attention_pool": "bert",
                  "mixtral": "qwen3", "phi": "phi", "gptj": "gpt_neox", "gpt_neox": "gpt_neox",
                  "t5_encoder": "t5"}


def count_categories(model: onnx.ModelProto) -> dict:
    ops = Counter(n.op_type for n in model.graph.node)
    return {cat: sum(ops[o] for o in names) for cat, names in CATEGORIES.items()}


def run_ort(model_bytes: bytes, feeds: dict) -> list:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def max_abs_err(model: onnx.ModelProto, feeds: dict, reference: list) -> float:
    got = run_ort(model.SerializeToString(), feeds)
    return max(float(np.max(np.abs(g - r))) for g, r in zip(got, reference))


def ort_transformers_column(path: Path, entry: dict, opt_level: int) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = entry["config"]
    heads = (cfg.get("num_attention_heads") or cfg.get("n_head") or cfg.get("num_heads")
             or cfg.get("encoder_attention_heads") or cfg.get("n_heads"))
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or cfg.get("dim")
    if isinstance(heads, list):  # per stage (Swin): let the optimizer detect heads and width
        heads = hidden = 0
    return optimize_model(str(path), model_type=ORT_MODEL_TYPE[entry["architecture"]], num_heads=heads,
                          hidden_size=hidden, opt_level=opt_level).model


def onnxscript_column(path: Path, entry: dict, opt_level: int) -> onnx.ModelProto:
    import onnx_ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = onnx_ir.load(str(path))
    optimize_for_ort(model)
    return onnx_ir.to_proto(model)


PEERS = {"ort-transformers": ort_transformers_column, "onnxscript": onnxscript_column}


#: fusegraph's own ops (domain "fusegraph") per category, by name: MaskedAttention, RMSNorm,
#: SkipLayerNorm, GeluTanh, MatMulBiasGelu (a GELU fused into a GEMM epilogue), RotaryEmbedding.
FUSEGRAPH_CATEGORIES = {"attention": ("Attention",), "norm": ("Norm",), "gelu": ("Gelu", "GeGLU"),
                        "rope": ("Rotary",)}


def fusegraph_categories(model: onnx.ModelProto) -> dict:
    counts = count_categories(model)  # already counts any domain's ops of the standard names
    known = set().union(*CATEGORIES.values())
    for n in model.graph.node:
        if n.domain == "fusegraph" and n.op_type not in known:
            for cat, parts in FUSEGRAPH_CATEGORIES.items():
                if any(p in n.op_type for p in parts):
                    counts[cat] += 1
    return counts


def fusegraph_column(path) -> dict:
    """fusegraph's result on one corpus file, in the same shape as a peer's result: the full
    rule set (`fusegraph.api.rewrite_with_report` with the default rules), its fused ops counted
    in both the standard domain (opset-23 Attention, LayerNormalization, ...) and its own."""
    from fusegraph.api import rewrite_with_report

    path = Path(path)
    entry = json.loads(MANIFEST.read_text())["models"][path.name]
    result = {k: None for k in (*CATEGORY_KEYS, "nodes_after", "seconds", "max_abs_err", "error")}
    stage = "fusing"
    try:
        original = onnx.load(str(path))
        t0 = time.perf_counter()
        fused, _ = rewrite_with_report(original)
        result["seconds"] = time.perf_counter() - t0
        result.update(fusegraph_categories(fused), nodes_after=len(fused.graph.node))
        stage = "running the fused model"
        feeds = manifest_feeds(entry, SEED)
        result["max_abs_err"] = max_abs_err(fused, feeds, run_ort(original.SerializeToString(), feeds))
    except Exception as e:  # reported per model, never fatal
        where = traceback.extract_tb(e.__traceback__)[-1]
        message = str(e).splitlines()[0][:300] if str(e) else ""
        result["error"] = f"{stage}: {type(e).__name__}: {message} (at {Path(where.filename).name}:{where.lineno})"
    return result


def measure_peer(fn, path: Path, entry: dict, feeds: dict, reference: list, opt_level: int) -> dict:
    """Run one peer on one file; a peer's exception becomes the result's "error"."""
    result = {k: None for k in (*CATEGORY_KEYS, "nodes_after", "seconds", "max_abs_err", "error")}
    stage = "fusing"
    try:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            fused = fn(path, entry, opt_level)
        result["seconds"] = time.perf_counter() - t0
        result.update(count_categories(fused), nodes_after=len(fused.graph.node))
        stage = "running the fused model"
        result["max_abs_err"] = max_abs_err(fused, feeds, reference)
    except Exception as e:  # reported per model, never fatal
        where = traceback.extract_tb(e.__traceback__)[-1]
        message = str(e).splitlines()[0][:300] if str(e) else ""
        result["error"] = f"{stage}: {type(e).__name__}: {message} (at {Path(where.filename).name}:{where.lineno})"
    return result


def fmt_counts(res: dict, expected: dict | None = None) -> str:
    """'a/n/g/r', each marked with * where it falls short of the expected count."""
    if res.get("error") and res.get("attention") is None:
        return "ERROR"
    cells = []
    for k in CATEGORY_KEYS:
        v = res.get(k)
        cells.append("–" if v is None else f"{v}{'*' if expected and v < expected[k] else ''}")
    return "/".join(cells)


def fmt_num(v, spec):
    return "–" if v is None else format(v, spec)


def render(rows: list, peers: list, opt_level: int, skipped: dict) -> str:
    head = ["model", "nodes", "expected a/n/g/r", "original a/n/g/r"]
    for p in peers:
        head += [f"{p} a/n/g/r", f"{p} nodes", f"{p} s", f"{p} err"]
    lines = [
        "# Fusion coverage on the real-model corpus",
        "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {platform.machine()} CPU, "
        f"{__import__('os').cpu_count()} cores, no GPU. onnxruntime {ort.__version__}, "
        f"onnxscript {__import__('onnxscript').__version__}, onnx {onnx.__version__}. "
        f"ORT transformers optimizer run with opt_level={opt_level} (offline Python fusions only).",
        "",
        "Generated by `benchmarks/bench_coverage.py` on `tests/data/models/` (see its MANIFEST.json). "
        "a/n/g/r = fused attention / norm / GELU / RoPE ops in the output (any domain); `*` marks a "
        "count below what the config says a complete fuser reaches (expected). 'original' counts the "
        "same op types already present in the export (e.g. LayerNormalization, opset-23 Attention). "
        "err = max abs difference of the outputs vs the unfused model in ONNX Runtime CPU on random "
        "inputs; s = wall seconds of the fuser, one run on a machine shared with other jobs (indicative "
        "only, not a timing benchmark).",
        "",
        "## Summary: models where each fuser reaches the expected count",
        "",
        "| fuser | " + " | ".join(CATEGORY_KEYS) + " | errors |",
        "|---" * (len(CATEGORY_KEYS) + 2) + "|",
    ]
    for p in ["original", *peers]:
        reached = []
        for k in CATEGORY_KEYS:
            relevant = [r for r in rows if r["expected"][k] > 0]
            ok = sum(1 for r in relevant if (r[p].get(k) or 0) >= r["expected"][k])
            reached.append(f"{ok}/{len(relevant)}")
        errors = sum(1 for r in rows if r[p].get("error"))
        lines.append(f"| {p} | " + " | ".join(reached) + f" | {errors} |")
    lines += ["", "## Summary: fused blocks of the expected (each model's count capped at its expected)", "",
              "| fuser | " + " | ".join(CATEGORY_KEYS) + " |", "|---" * (len(CATEGORY_KEYS) + 1) + "|"]
    for p in ["original", *peers]:
        cells = [f"{sum(min(r[p].get(k) or 0, r['expected'][k]) for r in rows)}/{sum(r['expected'][k] for r in rows)}"
                 for k in CATEGORY_KEYS]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += ["", "## Per model", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [r["file"].removesuffix(".onnx"), str(r["nodes"]), fmt_counts(r["expected"]),
                 fmt_counts(r["original"])]
        for p in peers:
            res = r[p]
            cells += [fmt_counts(res, r["expected"]), fmt_num(res["nodes_after"], "d"),
                      fmt_num(res["seconds"], ".2f"), fmt_num(res["max_abs_err"], ".1e")]
        lines.append("| " + " | ".join(cells) + " |")
    failures = [(r["file"], p, r[p]["error"]) for r in rows for p in peers if r[p].get("error")]
    lines += ["", "## Fuser failures", ""]
    lines += [f"- `{f}` {p}: {e}" for f, p, e in failures] or ["None."]
    if skipped:
        lines += ["", "## Corpus files not measured", ""]
        lines += [f"- `{f}`: {why}" for f, why in skipped.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=[], help="keep files whose name contains any of these")
    parser.add_argument("--opt-level", type=int, default=0,
                        help="optimize_model opt_level (0: Python fusions only; >0 adds an ORT session pass)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--no-peers", action="store_true",
                        help="fusegraph's column alone (minutes, not the peers' hour): a rule change's effect")
    args = parser.parse_args(argv)

    logging.disable(logging.WARNING)  # the peers log every unmatched pattern
    manifest = json.loads(MANIFEST.read_text())
    measured = {} if args.no_peers else PEERS
    peers = [*measured, "fusegraph"]
    rows, skipped = [], {}
    for name, entry in manifest["models"].items():
        if args.only and not any(s in name for s in args.only):
            continue
        path = MANIFEST.parent / name
        original = onnx.load(str(path))
        feeds = manifest_feeds(entry, SEED)
        try:
            reference = run_ort(original.SerializeToString(), feeds)
        except Exception as e:  # the corpus records it too; nothing to compare against
            skipped[name] = f"original does not run in ONNX Runtime: {type(e).__name__}: {str(e)[:200]}"
            continue
        row = {"file": name, "nodes": len(original.graph.node), "expected": entry["expected"],
               "original": count_categories(original)}
        for peer, fn in measured.items():
            row[peer] = measure_peer(fn, path, entry, feeds, reference, args.opt_level)
        row["fusegraph"] = fusegraph_column(path)
        rows.append(row)
        print(f"{name}: " + "  ".join(f"{p}={fmt_counts(row[p], entry['expected'])}" for p in peers), flush=True)
    table = render(rows, peers, args.opt_level, skipped)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
