"""Bad input to every subcommand: exactly one `rewrite: error: ...` line and exit 2.

The README's contract holds for `rewrite`, `verify`, `shard`, `verify-shards`, `build` and
`inspect` alike: a truncated or non-ONNX file, an IR version or opset onnx does not know, a
cycle, a dangling input. `build` used to hand such models to TensorRT's parser, which built an
opset-99 model (exit 0) and reported a cycle in four lines; `inspect` described a truncated or
empty engine file and exited 0; `rewrite` wrote models ONNX Runtime refuses (a standard op used
before the opset that introduced it, a graph input declared twice, an initializer redefined by a node); `shard`
printed shape inference's own line before its error; `shard --tp 99999999999` made a name per rank before the plan
refused the tp (minutes, unbounded memory); `build --shape x:1e20` ended in a traceback.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from fusegraph.cli import main
from fusegraph.plugins import tensorrt_shim
from fusegraph.verify.testing import make_model, node

F = np.float32
requires_tensorrt = pytest.mark.skipif(not tensorrt_shim.available(), reason="needs tensorrt or tensorrt_rtx_bindings")


def _relu(**kw) -> onnx.ModelProto:
    return make_model([node("Relu", ["x"], ["y"])], {"x": (F, [2, 4])}, {"y": (F, [2, 4])}, **kw)


def _bad_models() -> dict:
    """name -> bytes of a file no subcommand may accept."""
    good = _relu().SerializeToString()
    cycle = make_model([node("Relu", ["b"], ["a"]), node("Add", ["a", "x"], ["b"]), node("Relu", ["b"], ["y"])],
                       {"x": (F, [2, 4])}, {"y": (F, [2, 4])})
    dangling = make_model([node("Add", ["x", "ghost"], ["y"])], {"x": (F, [2, 4])}, {"y": (F, [2, 4])})
    too_new_op = make_model([node("Gelu", ["x"], ["y"])], {"x": (F, [2, 4])}, {"y": (F, [2, 4])}, opset=17)
    input_twice = _relu()
    input_twice.graph.input.append(input_twice.graph.input[0])
    redefined = make_model([node("Relu", ["x"], ["w"]), node("Add", ["w", "x"], ["y"])], {"x": (F, [2, 4])},
                           {"y": (F, [2, 4])}, {"w": np.ones((2, 4), F)})
    return {"truncated": good[:-7], "text": b"hello world\n", "empty": b"",
            "cycle": cycle.SerializeToString(), "dangling": dangling.SerializeToString(),
            "opset99": _relu(opset=99).SerializeToString(), "ir99": _relu(ir_version=99).SerializeToString(),
            "opset5": _relu(opset=5).SerializeToString(),
            "op_newer_than_opset": too_new_op.SerializeToString(), "input_twice": input_twice.SerializeToString(),
            "initializer_redefined": redefined.SerializeToString()}


BAD = _bad_models()


def _one_error_line(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err)
    assert err.count("\n") == 1 and err.startswith("rewrite: error: "), err
    return err


@pytest.fixture
def files(tmp_path):
    for name, data in BAD.items():
        (tmp_path / f"{name}.onnx").write_bytes(data)
    onnx.save(_relu(), tmp_path / "ok.onnx")
    return tmp_path


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("command", ["rewrite", "verify", "shard", "verify-shards"])
def test_bad_model_is_one_error_line(files, capsys, bad, command):
    path, ok, out = str(files / f"{bad}.onnx"), str(files / "ok.onnx"), files / "out"
    out.mkdir()
    argv = {"rewrite": [path, "-o", str(out / "o.onnx")], "verify": ["verify", ok, path],
            "shard": ["shard", path, "--tp", "2", "-o", str(out)],
            "verify-shards": ["verify-shards", path, str(out)]}[command]
    _one_error_line(capsys, argv)
    assert not any(out.iterdir())


@pytest.mark.parametrize("op_type, opset", [("EfficientNMS_TRT", 17), ("MyPlugin", 17), ("LayerNormalization", 13),
                                            ("SimplifiedLayerNormalization", 17)])
def test_a_plugin_or_runtime_op_in_the_default_domain_passes_through(tmp_path, capsys, op_type, opset):
    """TensorRT resolves a default-domain op ONNX does not know through its plugin registry
    (EfficientNMS_TRT), and ONNX Runtime registers LayerNormalization below opset 17 (its
    optimizer writes it there): a model with them is rewritten around them, the node as it was."""
    nodes = [node("Relu", ["x"], ["r"]), node(op_type, ["r"], ["y"], name="kept", some_attr=3)]
    model = make_model(nodes, {"x": (F, [2, 4])}, {"y": (F, [2, 4])}, opset=opset)
    onnx.save(model, tmp_path / "m.onnx")
    assert main([str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx")]) == 0, capsys.readouterr().err
    kept = next(n for n in onnx.load(tmp_path / "o.onnx").graph.node if n.name == "kept")
    assert kept == nodes[1]


@requires_tensorrt
@pytest.mark.parametrize("bad", sorted(BAD))
def test_build_refuses_what_rewrite_refuses(files, capsys, bad):
    engine = files / "x.engine"
    err = _one_error_line(capsys, ["build", str(files / f"{bad}.onnx"), "-o", str(engine)])
    assert "TensorRT" not in err  # refused before the parser saw it
    assert not engine.exists()


@requires_tensorrt
def test_build_refuses_external_data_outside_the_model_folder(tmp_path, capsys):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(8, F).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    model = make_model([node("Add", ["x", "w"], ["y"])], {"x": (F, [2, 4])}, {"y": (F, [2, 4])},
                       {"w": np.ones((2, 4), F)})
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    w.external_data.add(key="location", value="../secret.bin")
    onnx.save(model, folder / "m.onnx")
    _one_error_line(capsys, ["build", str(folder / "m.onnx"), "-o", str(tmp_path / "x.engine")])
    assert not (tmp_path / "x.engine").exists()


@requires_tensorrt
@pytest.mark.parametrize("size", [0, 10, 100, 5000])
def test_inspect_refuses_an_empty_or_truncated_engine(files, capsys, size):
    engine = files / "x.engine"
    assert main(["build", str(files / "ok.onnx"), "-o", str(engine)]) == 0
    capsys.readouterr()
    cut = files / "cut.engine"
    cut.write_bytes(engine.read_bytes()[:size])
    _one_error_line(capsys, ["inspect", str(cut)])
    (files / "text.engine").write_bytes(b"hello world\n")
    _one_error_line(capsys, ["inspect", str(files / "text.engine")])


@requires_tensorrt
@pytest.mark.parametrize("shape", ["x:99999999999999999999x4", "x:-1x4", "x:2xa", "x:", "2x4"])
def test_build_refuses_a_bad_shape(files, capsys, shape):
    _one_error_line(capsys, ["build", str(files / "ok.onnx"), "-o", str(files / "x.engine"), "--shape", shape])
    assert not (files / "x.engine").exists()


@requires_tensorrt
@pytest.mark.parametrize("extra", [["--shape", "x:2x4", "--min", "x:1x4"], ["--shape", "x:2x4", "--shape", "x:3x4"],
                                   ["--max", "x:2x4", "--max", "x:3x4"]], ids=["shape_and_min", "shape_twice", "max_twice"])
def test_build_refuses_two_shapes_for_one_input(files, capsys, extra):
    """One of the two used to win silently."""
    _one_error_line(capsys, ["build", str(files / "ok.onnx"), "-o", str(files / "x.engine"), *extra])
    assert not (files / "x.engine").exists()


def test_list_rules_reads_no_model(files, capsys):
    """`rewrite --list-rules m.onnx` listed the rules and ignored the model it was given."""
    err = _one_error_line(capsys, ["--list-rules", str(files / "ok.onnx")])
    assert "--list-rules" in err
    assert main(["--list-rules"]) == 0 and "attention" in capsys.readouterr().out


def test_shard_refuses_a_huge_tp_before_naming_its_ranks(tmp_path, capsys):
    """A tp that divides no head count or column count is refused by the plan, at once."""
    w = np.ones((4, 6), F)
    model = make_model([node("MatMul", ["x", "w"], ["y"])], {"x": (F, [2, 4])}, {"y": (F, [2, 6])}, {"w": w})
    onnx.save(model, tmp_path / "m.onnx")
    out = tmp_path / "out"
    out.mkdir()
    err = _one_error_line(capsys, ["shard", str(tmp_path / "m.onnx"), "--tp", str(10 ** 12), "-o", str(out)])
    assert "tp 1000000000000" in err
    assert not any(out.iterdir())


@pytest.mark.parametrize("content", [b"\x08\x07\x12\x00binary", b"def f(:\n", b"\xff\xfe not utf-8\n", b"RULES = 5\n"],
                         ids=["binary", "syntax", "encoding", "no_rule_list"])
@pytest.mark.parametrize("suffix", [".py", ".onnx", ".txt"])
def test_a_rule_file_that_is_no_python_rule_list_is_one_error_line(files, capsys, content, suffix):
    """Whatever its name ends with (it used to be a traceback, exit 1, for any suffix but .py)."""
    rule_file = files / f"rules{suffix}"
    rule_file.write_bytes(content)
    err = _one_error_line(capsys, [str(files / "ok.onnx"), "-o", str(files / "o.onnx"), "--rule-file", str(rule_file)])
    assert "--rule-file" in err and not (files / "o.onnx").exists()


def test_a_rule_file_named_otherwise_than_py_still_loads(files, capsys):
    rule_file = files / "rules.txt"
    rule_file.write_text('from fusegraph import Rule\n'
                         'RULES = [Rule("relu_to_my", lambda op, x: op.Relu(x), lambda op, x: op.Relu(x, _domain="my"))]\n')
    assert main([str(files / "ok.onnx"), "-o", str(files / "o.onnx"), "--rule-file", str(rule_file)]) == 0
    assert [(n.domain, n.op_type) for n in onnx.load(files / "o.onnx").graph.node] == [("my", "Relu")]


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "1e-3x"])
@pytest.mark.parametrize("command", ["rewrite", "verify", "verify-shards"])
def test_a_tolerance_that_is_no_finite_non_negative_number_is_one_error_line(files, capsys, value, command):
    """--atol nan passed any exact match and refused any other silently, -1 refused everything."""
    ok = str(files / "ok.onnx")
    argv = {"rewrite": [ok, "-o", str(files / "o.onnx"), "--verify"], "verify": ["verify", ok, ok],
            "verify-shards": ["verify-shards", ok, str(files)]}[command]
    for option in ("--atol", "--rtol"):
        err = _one_error_line(capsys, argv + [option, value])
        assert option in err
    assert not (files / "o.onnx").exists()


def test_verify_shards_takes_the_ranks_of_the_last_shard_into_the_folder(tmp_path, capsys):
    """`shard --tp 2` then `--tp 1` into one folder leaves rank1.onnx of the first run; shard.json
    says tp 1, and verify-shards compared rank0 (tp 1) with that stale rank1 (exit 2: "the rank
    models do not call the same collectives")."""
    rng = np.random.default_rng(0)
    model = make_model([node("MatMul", ["x", "w"], ["h"]), node("Relu", ["h"], ["r"]), node("MatMul", ["r", "w2"], ["y"])],
                       {"x": (F, [2, 4])}, {"y": (F, [2, 4])},
                       {"w": rng.standard_normal((4, 8)).astype(F), "w2": rng.standard_normal((8, 4)).astype(F)})
    onnx.save(model, tmp_path / "m.onnx")
    out = tmp_path / "out"
    out.mkdir()
    assert main(["shard", str(tmp_path / "m.onnx"), "--tp", "2", "-o", str(out)]) == 0
    assert main(["shard", str(tmp_path / "m.onnx"), "--tp", "1", "-o", str(out)]) == 0
    assert (out / "rank1.onnx").exists()
    capsys.readouterr()
    assert main(["verify-shards", str(tmp_path / "m.onnx"), str(out)]) == 0
    assert "ranks: 1" in capsys.readouterr().out
