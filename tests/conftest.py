"""Hypothesis profiles: "ci" (default: quick and derandomized, so CI is repeatable) and "long"
(HYPOTHESIS_PROFILE=long: the fuzzer's >= 10,000 graphs, random seeds); and `corpus` importable
from every test directory."""

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("long", max_examples=10_000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# tests/corpus.py (the real-export corpus: manifest, representative subset, known misses) is
# shared by tests/patterns and tests/engine: importable as `corpus` from any test directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
