"""`rewrite shard` and `rewrite verify-shards`: files written, what they print, exit codes 0/1/2."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from fusegraph.cli import main
from llama_like import Config, build


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "llama.onnx"
    onnx.save(build(Config(layers=2, heads=4, kv_heads=2)), path)
    return str(path)


def shard(capsys, *argv):
    code = main(["shard", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_shard_writes_rank_models_and_verify_shards_passes(tmp_path, model_path, capsys):
    out_dir = tmp_path / "tp2"
    out_dir.mkdir()
    code, out, err = shard(capsys, model_path, "--tp", "2", "-o", str(out_dir))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "tp 2: 11 column-parallel, 4 row-parallel projections, 1 vocabulary-parallel embedding"
    assert lines[1] == "collectives per rank: AllGather 1, AllReduce 5"
    assert lines[2].startswith("weights per rank: ") and "= 1/2 of" in lines[2]
    assert sorted(os.listdir(out_dir)) == ["rank0.onnx", "rank1.onnx", "shard.json"]
    manifest = json.loads((out_dir / "shard.json").read_text())
    assert manifest["tp"] == 2 and manifest["ranks"] == ["rank0.onnx", "rank1.onnx"]
    for r in range(2):
        onnx.checker.check_model(str(out_dir / f"rank{r}.onnx"), full_check=True)
    assert main(["verify-shards", model_path, str(out_dir)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "ranks: 2 (lock step, collectives in numpy)"
    assert printed[-1].startswith("logits: max abs ") and printed[-1].endswith(" ok")


def test_external_data_rank_models(tmp_path, model_path, capsys):
    out_dir = tmp_path / "ext"
    out_dir.mkdir()
    code, out, err = shard(capsys, model_path, "--tp", "4", "-o", str(out_dir), "--external-data")
    assert code == 0, err
    assert sorted(os.listdir(out_dir)) == sorted([f"rank{r}.onnx{s}" for r in range(4) for s in ("", ".data")] + ["shard.json"])
    rank = onnx.load(str(out_dir / "rank3.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in rank.graph.initializer)
    assert main(["verify-shards", model_path, str(out_dir)]) == 0
    capsys.readouterr()


def test_a_model_with_external_data_shards_without_touching_it(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(build(Config(layers=1)), str(src / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.weights", size_threshold=256)
    before = (src / "m.weights").read_bytes()
    out_dir = tmp_path / "tp2"
    out_dir.mkdir()
    code, out, err = shard(capsys, str(src / "m.onnx"), "--tp", "2", "-o", str(out_dir))
    assert code == 0, err
    assert (out_dir / "rank0.onnx.data").exists() and (src / "m.weights").read_bytes() == before
    assert main(["verify-shards", str(src / "m.onnx"), str(out_dir)]) == 0
    capsys.readouterr()


def test_a_tampered_rank_fails_verification_with_exit_1(tmp_path, model_path, capsys):
    out_dir = tmp_path / "tp2"
    out_dir.mkdir()
    assert shard(capsys, model_path, "--tp", "2", "-o", str(out_dir))[0] == 0
    rank = onnx.load(str(out_dir / "rank1.onnx"))
    t = next(t for t in rank.graph.initializer if ".tp2" in t.name and len(t.dims) == 2)
    a = onnx.numpy_helper.to_array(t) * 1.5
    t.CopyFrom(onnx.numpy_helper.from_array(a.astype(np.float32), t.name))
    onnx.save(rank, str(out_dir / "rank1.onnx"))
    assert main(["verify-shards", model_path, str(out_dir)]) == 1
    assert "MISMATCH" in capsys.readouterr().out


@pytest.mark.parametrize("argv_of, message", [
    (lambda m, d: [m, "--tp", "3", "-o", d], "cannot shard over tp 3: "),
    (lambda m, d: [m, "--tp", "0", "-o", d], "--tp 0: the tensor-parallel size must be at least 1"),
    (lambda m, d: [m, "--tp", "2", "-o", d + "/missing"], "no such folder"),
    (lambda m, d: [m + ".nope", "--tp", "2", "-o", d], "no such file"),
    (lambda m, d: [m, "-o", d], "the following arguments are required: --tp"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, model_path, capsys, argv_of, message):
    code, out, err = shard(capsys, *argv_of(model_path, str(tmp_path)))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("rewrite: error: ") and message in err, err
    assert not any(n.startswith("rank") for n in os.listdir(tmp_path))


def test_heads_not_divisible_is_refused_with_its_reason(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(build(Config(heads=3, kv_heads=3, hidden=24, ffn=24, vocab=48)), path)
    code, out, err = shard(capsys, str(path), "--tp", "2", "-o", str(tmp_path))
    assert code == 2
    assert "3 groups (heads)" in err and "3 does not divide by tp 2" in err and err.count("\n") == 1


def test_verify_shards_refuses_a_folder_with_a_missing_rank(tmp_path, model_path, capsys):
    out_dir = tmp_path / "tp2"
    out_dir.mkdir()
    assert shard(capsys, model_path, "--tp", "2", "-o", str(out_dir))[0] == 0
    os.rename(out_dir / "rank1.onnx", out_dir / "rank2.onnx")
    assert main(["verify-shards", model_path, str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert err == f"rewrite: error: {out_dir}: rank1.onnx is missing (found ranks [0, 2])\n"


def test_verify_shards_refuses_too_few_ranks(tmp_path, model_path, capsys):
    out_dir = tmp_path / "tp4"
    out_dir.mkdir()
    assert shard(capsys, model_path, "--tp", "4", "-o", str(out_dir))[0] == 0
    for r in (2, 3):
        os.unlink(out_dir / f"rank{r}.onnx")
    assert main(["verify-shards", model_path, str(out_dir)]) == 2
    assert capsys.readouterr().err == ("rewrite: error: the rank models' collectives are over 4 ranks, "
                                       "but 2 rank models were given\n")

