"""The known-misses table (tests/data/known_misses.json) is well-formed and does what the
real-model tests rely on: a listed shortfall may grow, never drop, and goes once fully fused."""

from __future__ import annotations

from collections import Counter

import pytest

import corpus
from corpus import FUSED_OPS, KNOWN_MISSES, MANIFEST, RESIDUE, check_coverage

CATEGORIES = set(FUSED_OPS)


def test_every_entry_names_a_corpus_file_a_category_and_a_reason():
    for name, categories in KNOWN_MISSES.items():
        assert name in MANIFEST, f"{name} is not in MANIFEST.json"
        for category, miss in categories.items():
            assert category in CATEGORIES | {"ort_cpu_run"}, (name, category)
            assert miss["reason"].strip(), (name, category)
            if category in CATEGORIES:
                assert 0 <= miss["fused"] < miss["expected"] == MANIFEST[name]["expected"][category], (name, miss)
    for name, ops in RESIDUE.items():
        assert name in MANIFEST and all(o["count"] > 0 and o["reason"] for o in ops.values()), name


@pytest.fixture
def listed(monkeypatch):
    """A corpus file with 2+ attention blocks, listed (for the test) as fusing 1 of them."""
    name = next(n for n in sorted(MANIFEST) if MANIFEST[n]["expected"]["attention"] >= 2)
    expected = MANIFEST[name]["expected"]["attention"]
    monkeypatch.setitem(corpus.KNOWN_MISSES, name, {"attention": {"fused": 1, "expected": expected, "reason": "test"}})
    return name, expected


def _counts(n):
    return Counter({FUSED_OPS["attention"][0]: n})


def test_a_listed_miss_may_grow_but_not_drop(listed):
    name, expected = listed
    assert check_coverage(name, "attention", _counts(1)) is False
    with pytest.raises(AssertionError, match="dropped from 1 to 0"):
        check_coverage(name, "attention", _counts(0))


def test_a_listed_miss_that_fuses_fully_asks_for_its_entry_to_go(listed):
    name, expected = listed
    with pytest.raises(AssertionError, match="drop its entry"):
        check_coverage(name, "attention", _counts(expected))


def test_an_unlisted_category_must_fuse_exactly(listed, monkeypatch):
    name, expected = listed
    monkeypatch.setitem(corpus.KNOWN_MISSES, name, {})
    with pytest.raises(AssertionError, match=f"1 of {expected} attention fused"):
        check_coverage(name, "attention", _counts(1))
    assert check_coverage(name, "attention", _counts(expected)) is True


def test_the_default_run_covers_every_family():
    families = {MANIFEST[n]["architecture"] for n in corpus.NAMES}
    chosen = {MANIFEST[n]["architecture"] for n in corpus.REPRESENTATIVE}
    assert families == chosen and len(families) >= 20
