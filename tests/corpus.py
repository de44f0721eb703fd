"""The real-export corpus (tests/data/models) as the real-model tests see it: the manifest, the
files on disk, the categories of fused ops, and the reviewed table of fusions not reached yet.

Why a table: the corpus grows ahead of the rules (issue 11 added families whose attention, RoPE,
norm or GELU forms no rule matches yet). A test that asserts full coverage must still fail when
coverage DROPS on any file, so every shortfall is listed in ``tests/data/known_misses.json`` with
the count fusegraph reaches today and the reason (the issue item); `check_coverage` then asserts
``reached <= fused < expected`` for a listed category, ``fused == expected`` for every other one,
and fails once a listed category is fully fused: its entry must go, so that a stale entry cannot
hide a later drop. ``python tests/data/refresh_known_misses.py --write`` drops fully fused entries
and raises grown floors after the rules change; drops and new shortfalls it leaves to a person.

Default runs cover every file of the original nine families and one static and one dynamic
export per wider family (`REPRESENTATIVE`); the rest of the corpus runs under ``-m slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
MODELS = DATA / "models"
MANIFEST = json.loads((MODELS / "MANIFEST.json").read_text())["models"] if (MODELS / "MANIFEST.json").exists() else {}
NAMES = sorted(n for n in MANIFEST if (MODELS / n).exists())
_TABLE = json.loads((DATA / "known_misses.json").read_text())
KNOWN_MISSES, RESIDUE = _TABLE["misses"], _TABLE["residue"]

#: fused ops per category, as `fusegraph.verify.testing.op_counts` names them
FUSED_OPS = {
    "attention": ("Attention", "fusegraph.Attention", "fusegraph.MaskedAttention"),
    "norm": ("LayerNormalization", "RMSNormalization", "fusegraph.LayerNorm", "fusegraph.RMSNorm",
             "fusegraph.SkipRMSNorm", "fusegraph.SkipLayerNorm"),
    # a GELU is fused as a GELU op, or inside a GEMM epilogue or a gated MLP
    "gelu": ("Gelu", "fusegraph.Gelu", "fusegraph.GeluTanh", "fusegraph.MatMulGelu", "fusegraph.MatMulBiasGelu",
             "fusegraph.MatMulGeluTanh", "fusegraph.MatMulBiasGeluTanh", "fusegraph.GeGLU", "fusegraph.GeGLUTanh"),
    "rope": ("RotaryEmbedding", "fusegraph.RotaryEmbedding"),
}


#: How close a rewritten model's outputs must stay to the export's in ONNX Runtime, per form:
#: a fused op reorders float arithmetic, and half precision and int8 steps amplify that.
ATOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 6e-2, "qdq": 5e-2}


def _representative(names):
    """Every file of the original nine families (their counts come from the config; the wider
    families' from the model, `expected_derived_from`); of a wider family, its first static and
    first dynamic export in name order (torchscript before dynamo when both exported)."""
    chosen, seen = set(), set()
    for name in names:
        entry = MANIFEST[name]
        key = (entry["architecture"], entry["dynamic"])
        if entry.get("expected_derived_from", "config") == "config" or key not in seen:
            chosen.add(name)
            seen.add(key)
    return chosen


REPRESENTATIVE = _representative(sorted(NAMES, key=lambda n: ("dynamo" in n, n)))


def corpus_params(names=NAMES):
    """pytest params over corpus files: the representative ones plain, the others marked slow (a
    file missing from the manifest runs by default: its test must say so)."""
    return [pytest.param(n, id=n, marks=() if n in REPRESENTATIVE or n not in MANIFEST else pytest.mark.slow)
            for n in names]


def fused(counts, category) -> int:
    return sum(counts[o] for o in FUSED_OPS[category])


def atol(entry) -> float:
    return ATOL["qdq" if entry.get("quantization") else entry.get("dtype", "float32")]


def check_coverage(name, category, counts) -> bool:
    """Assert the file's fused count of `category` against the manifest and the known misses;
    True when the category is expected to be fully fused (callers then assert no residue)."""
    expected = MANIFEST[name]["expected"][category]
    got = fused(counts, category)
    miss = KNOWN_MISSES.get(name, {}).get(category)
    if miss is None:
        assert got == expected, f"{name}: {got} of {expected} {category} fused: {dict(counts)}"
        return True
    assert miss["expected"] == expected, f"{name}: the manifest now expects {expected} {category}: review its miss"
    assert got >= miss["fused"], (f"{name}: {category} coverage dropped from {miss['fused']} to {got} of "
                                  f"{expected} (known miss: {miss['reason']})")
    assert got < expected, (f"{name}: all {expected} {category} fuse now: drop its entry from "
                            f"tests/data/known_misses.json")
    return False


def runs_in_ort(name) -> bool:
    """False for an export listed (``ort_cpu_run``) as not running in ONNX Runtime CPU at all
    (bfloat16 kernels missing): its outputs cannot be compared, only its validity checked."""
    return "ort_cpu_run" not in KNOWN_MISSES.get(name, {})


def assert_original_does_not_run(name, run, model, feeds):
    """The listed reason still holds: the export fails in ONNX Runtime CPU for want of a kernel
    (once it runs, the entry must go and the comparison comes back)."""
    with pytest.raises(Exception, match="NOT_IMPLEMENTED|Could not find an implementation"):
        run(model, feeds)


def assert_no_residue(name, counts, ops):
    """After a category fully fused, none of its decomposed ops remain (`ops`, e.g. Erf and Pow
    after GELU fusion) beyond the exact residue the table lists for the file, with its reason."""
    allowed = RESIDUE.get(name, {})
    left = {op: counts[op] for op in ops if counts[op] != allowed.get(op, {}).get("count", 0)}
    assert not left, f"{name}: {left} left (allowed: {allowed})"
