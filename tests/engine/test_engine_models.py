"""Every exported model under tests/data/models parses with no unsupported node and builds,
before and after fusegraph rewrites it: rewriting must never make a buildable model unbuildable.

Engines build in about a second each on 2 CPU cores with TensorRT-RTX, so all of them run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine_models import requires_tensorrt
from fusegraph.engine import build_engine

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
MANIFEST = json.loads((MODELS / "MANIFEST.json").read_text())["models"] if (MODELS / "MANIFEST.json").is_file() else {}

pytestmark = [pytest.mark.tensorrt, requires_tensorrt]


def profile(entry: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """min 1 on every dynamic axis, opt the manifest's example shape, max twice it."""
    ranges = {}
    for inp in entry["inputs"]:
        opt = tuple(inp["example_shape"])
        dynamic = [isinstance(d, str) for d in inp["dims"]]
        ranges[inp["name"]] = {"min": tuple(1 if dyn else d for d, dyn in zip(opt, dynamic)), "opt": opt,
                               "max": tuple(2 * d if dyn else d for d, dyn in zip(opt, dynamic))}
    return ranges


ON_DISK = sorted(p.name for p in MODELS.glob("*.onnx"))


def test_there_are_models_to_build():
    assert ON_DISK, f"no exported models in {MODELS}"


@pytest.mark.parametrize("name", ON_DISK)
@pytest.mark.parametrize("rewrite", [False, True], ids=["exported", "rewritten"])
def test_model_parses_and_builds(tmp_path, name, rewrite):
    entry = MANIFEST.get(name)
    assert entry is not None, f"{name} is missing from MANIFEST.json (its input shapes are there)"
    report = build_engine(MODELS / name, tmp_path / "model.engine", ranges=profile(entry), rewrite=rewrite)
    assert report["parse"]["unsupported"] == []
    assert report["engine_info"]["layer_count"] > 0 and (tmp_path / "model.engine").is_file()
    assert all(op["implementation"] != "not found in the network" for op in report["fused_ops"])
    if entry["opset"] >= 23 and entry["op_histogram"].get("Attention"):
        assert len(report["attention"]["layers"]) == entry["op_histogram"]["Attention"]
