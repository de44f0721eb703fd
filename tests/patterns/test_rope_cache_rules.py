"""Opset-23 RotaryEmbedding with a batch-1 cache over a wider batch: the rule broadcasts the cache,
so the model runs at every batch and computes, row by row, what the export computes at batch 1."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st

from fusegraph import rewrite, rewrite_with_report
from fusegraph.verify.testing import assert_rewrites, make_model, manifest_feeds, node, op_counts
from fusegraph.verify import run

F = np.float32
MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
MANIFEST = json.loads((MODELS / "MANIFEST.json").read_text())["models"]


def rope_model(heads, seq, dim, rotary_dim, interleaved, cache_batch=1, x_batch="batch"):
    rng = np.random.default_rng(heads * 100 + seq * 10 + dim)
    half = (rotary_dim or dim) // 2
    angles = rng.uniform(0, 3, (cache_batch, seq, half)).astype(F)
    attrs = {"interleaved": interleaved}
    if rotary_dim:
        attrs["rotary_embedding_dim"] = rotary_dim
    return make_model([node("RotaryEmbedding", ["x", "cos", "sin"], ["y"], **attrs)],
                      {"x": (F, [x_batch, heads, seq, dim])}, {"y": (F, [x_batch, heads, seq, dim])},
                      {"cos": np.cos(angles), "sin": np.sin(angles)}, opset=23)


def rows_match_batch_one(original, rewritten, feeds):
    """Row i of the rewritten model at batch B == the original at batch 1 on row i."""
    wide = run(rewritten, feeds)
    for i in range(next(iter(feeds.values())).shape[0]):
        narrow = run(original, {k: v[i:i + 1] for k, v in feeds.items()})
        for name, value in narrow.items():
            np.testing.assert_allclose(wide[name][i:i + 1], value, rtol=1e-5, atol=1e-6)


@given(heads=st.integers(1, 3), seq=st.integers(1, 6), dim=st.sampled_from([4, 8, 12]),
       partial=st.booleans(), interleaved=st.sampled_from([0, 1]), batch=st.integers(2, 4))
@settings(max_examples=15, deadline=None)
def test_cache_broadcast_over_batch(heads, seq, dim, partial, interleaved, batch):
    rotary_dim = dim // 2 if partial and dim % 4 == 0 else 0
    model = rope_model(heads, seq, dim, rotary_dim, interleaved)
    out = assert_rewrites(model, shapes={"x": (1, heads, seq, dim)}, expect={"RotaryEmbedding": 1, "Expand": 2})
    feeds = {"x": np.random.default_rng(batch).standard_normal((batch, heads, seq, dim)).astype(F)}
    with pytest.raises(Exception):
        run(model, feeds)  # the export itself has no result at this batch
    rows_match_batch_one(model, out, feeds)


@pytest.mark.parametrize("cache_batch,x_batch", [(2, 2), (1, 1), (3, "batch")])
def test_no_rewrite_when_batches_already_agree_or_cache_is_not_batch_one(cache_batch, x_batch):
    model = rope_model(2, 3, 4, 0, 0, cache_batch=cache_batch, x_batch=x_batch)
    _, report = rewrite_with_report(model)
    assert "rope_cache.broadcast_batch" not in report.per_rule
    assert op_counts(rewrite(model))["Expand"] == 0


@pytest.mark.parametrize("name", sorted(n for n in MANIFEST if "dynamo23-dynamic" in n and not MANIFEST[n]["checks_ok"]))
def test_dynamo23_exports_run_at_every_batch_after_rewriting(name):
    model = onnx.load(MODELS / name)
    out, report = rewrite_with_report(model)
    assert report.per_rule["rope_cache.broadcast_batch"] == MANIFEST[name]["expected"]["rope"]
    feeds = manifest_feeds(MANIFEST[name])
    wide = {k: np.concatenate([v, v[:, ::-1]]) if v.dtype != np.int64 or "mask" in k else
            np.concatenate([v, (v + 1) % MANIFEST[name]["config"]["vocab_size"]]) for k, v in feeds.items()}
    rows_match_batch_one(model, out, wide)
