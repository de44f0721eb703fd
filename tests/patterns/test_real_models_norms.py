"""Norms, GELUs and RoPE in the real exports (tests/data/models) are all fused, and the
rewritten model is valid and computes what the export computes.

Counts come from MANIFEST.json's `expected`, derived from each model's config, not from the
graph: a fused norm is a LayerNormalization / RMSNormalization or a fusegraph norm op.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from fusegraph.api import rewrite_with_report
from fusegraph.testing import manifest_feeds, op_counts
from fusegraph.verify import compare, run

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
MANIFEST = json.loads((MODELS / "MANIFEST.json").read_text())["models"] if (MODELS / "MANIFEST.json").exists() else {}
NAMES = sorted(n for n in MANIFEST if (MODELS / n).exists())

NORM_OPS = ("LayerNormalization", "RMSNormalization", "fusegraph.RMSNorm", "fusegraph.SkipRMSNorm",
            "fusegraph.SkipLayerNorm")
#: a GELU is fused as a GELU op, or inside a GEMM epilogue or a gated MLP
GELU_OPS = ("Gelu", "fusegraph.Gelu", "fusegraph.GeluTanh", "fusegraph.MatMulGelu", "fusegraph.MatMulBiasGelu",
            "fusegraph.MatMulGeluTanh", "fusegraph.MatMulBiasGeluTanh", "fusegraph.GeGLU", "fusegraph.GeGLUTanh")
ROPE_OPS = ("RotaryEmbedding", "fusegraph.RotaryEmbedding")


@pytest.fixture(scope="module", params=NAMES)
def rewritten(request):
    name = request.param
    model = onnx.load(MODELS / name)
    out, report = rewrite_with_report(model)
    return name, model, out, report


def test_every_norm_is_fused(rewritten):
    name, model, out, _ = rewritten
    counts = op_counts(out)
    assert sum(counts[k] for k in NORM_OPS) == MANIFEST[name]["expected"]["norm"], dict(counts)
    assert counts["ReduceMean"] == 0 and counts["Sqrt"] == 0


def test_every_gelu_is_fused(rewritten):
    name, model, out, _ = rewritten
    counts = op_counts(out)
    assert sum(counts[k] for k in GELU_OPS) == MANIFEST[name]["expected"]["gelu"], dict(counts)
    assert counts["Erf"] == 0 and counts["Pow"] == 0


def test_every_rope_is_fused(rewritten):
    name, model, out, _ = rewritten
    counts = op_counts(out)
    assert sum(counts[k] for k in ROPE_OPS) == MANIFEST[name]["expected"]["rope"], dict(counts)


def test_rewritten_model_is_valid_and_equal(rewritten):
    name, model, out, _ = rewritten
    onnx.checker.check_model(out, full_check=True)
    x = manifest_feeds(MANIFEST[name])
    diffs = compare(run(model, x), run(out, x), atol=1e-4, rtol=0.0)
    assert all(d.ok for d in diffs), diffs
