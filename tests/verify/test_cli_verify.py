"""`rewrite verify A B` and `rewrite --verify`: exit 0 on a match, 1 on a mismatch, 2 on bad
input; tolerances, dynamic dims, .npz inputs and JSON output."""

import json
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper

from fusegraph.cli import main
from fusegraph.verify import compare


def _model(path, op="Relu", dims=("batch", 4), scale=None, out_name="y"):
    nodes = [helper.make_node(op, ["x"], ["h"])]
    inits = []
    if scale is None:
        nodes.append(helper.make_node("Identity", ["h"], [out_name]))
    else:
        inits.append(helper.make_tensor("s", TensorProto.FLOAT, [], [scale]))
        nodes.append(helper.make_node("Mul", ["h", "s"], [out_name]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
                          [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, list(dims))], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(path))
    return str(path)


def test_equal_models_pass(tmp_path, capsys):
    a, b = _model(tmp_path / "a.onnx"), _model(tmp_path / "b.onnx", scale=1.0)
    assert main(["verify", a, b]) == 0
    assert "ok" in capsys.readouterr().out


def test_mismatch_exits_1_and_tolerances_decide(tmp_path):
    a, b = _model(tmp_path / "a.onnx"), _model(tmp_path / "b.onnx", scale=1.01)
    assert main(["verify", a, b]) == 1
    assert main(["verify", a, b, "--rtol", "2e-2"]) == 0
    assert main(["verify", a, b, "--atol", "0", "--rtol", "0"]) == 1


def test_json_reports_per_output_errors(tmp_path, capsys):
    a, b = _model(tmp_path / "a.onnx"), _model(tmp_path / "b.onnx", op="Abs")
    assert main(["verify", a, b, "--json", "--seed", "3"]) == 1
    (d,) = json.loads(capsys.readouterr().out)
    assert d["name"] == "y" and d["ok"] is False and d["max_abs"] > 0.1


def test_dynamic_dims_from_shape(tmp_path, capsys):
    a, b = _model(tmp_path / "a.onnx"), _model(tmp_path / "b.onnx")
    assert main(["verify", a, b, "--shape", "x:5x4", "--json"]) == 0
    assert main(["verify", a, b, "--shape", "nope:5x4"]) == 2
    assert main(["verify", a, b, "--shape", "x5x4"]) == 2


def test_inputs_from_npz(tmp_path):
    a, b = _model(tmp_path / "a.onnx"), _model(tmp_path / "b.onnx", op="Abs")
    pos = tmp_path / "pos.npz"
    np.savez(pos, x=np.abs(np.random.default_rng(0).normal(size=(3, 4))).astype(np.float32))
    assert main(["verify", a, b, "--inputs", str(pos)]) == 0  # Relu == Abs on positive inputs
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, z=np.zeros((3, 4), np.float32))
    assert main(["verify", a, b, "--inputs", str(wrong)]) == 2
    assert main(["verify", a, b, "--inputs", str(tmp_path / "missing.npz")]) == 2


def test_bad_files_exit_2(tmp_path, capsys):
    a = _model(tmp_path / "a.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    assert main(["verify", a, str(junk)]) == 2
    assert main(["verify", a, str(tmp_path / "absent.onnx")]) == 2
    assert main(["verify", a]) == 2
    other = _model(tmp_path / "o.onnx", out_name="z")
    assert main(["verify", a, other]) == 2
    assert "rewrite: error" in capsys.readouterr().err


def test_regression_identical_infinities_compare_equal():
    """compare() once flagged +inf vs +inf as a mismatch (inf - inf is NaN)."""
    inf = np.array([np.inf, -np.inf, 1.0], np.float32)
    (d,) = compare({"y": inf}, {"y": inf.copy()})
    assert d.ok and d.max_abs == 0.0
    (d,) = compare({"y": inf}, {"y": -inf})
    assert d.ok is False


def test_rewrite_verify_flag_end_to_end(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4).ravel().tolist())
    b = helper.make_tensor("b", TensorProto.FLOAT, [4], [0.1, 0.2, 0.3, 0.4])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
                           helper.make_node("Relu", ["a"], ["y"])], "g", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w, b])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(src))
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "fusegraph.cli", str(src), "-o", str(out), "--verify",
                           "--shape", "x:3x4", "--json"], capture_output=True, text=True)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        proc = subprocess.run([sys.executable, "-c", "import sys; from fusegraph.cli import main; "
                               "sys.exit(main(sys.argv[1:]))", str(src), "-o", str(out), "--verify",
                               "--shape", "x:3x4", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["fusions"] and all(d["ok"] for d in summary["verify"])
    assert main(["verify", str(src), str(out), "--shape", "x:7x4"]) == 0


def test_corrupt_npz_is_one_line_exit_2(tmp_path):
    a = _model(tmp_path / "a.onnx")
    good = tmp_path / "good.npz"
    np.savez_compressed(good, x=np.ones((3, 4), np.float32))
    data = good.read_bytes()
    cases = {"truncated.npz": data[: len(data) // 2], "garbage.npz": b"PK\x03\x04" + b"\xff" * 200,
             "flipped.npz": data[:60] + bytes(b ^ 0xFF for b in data[60:90]) + data[90:]}
    np.save(tmp_path / "array.npy", np.ones((3, 4), np.float32))
    cases["array.npy"] = (tmp_path / "array.npy").read_bytes()
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        proc = subprocess.run([sys.executable, "-m", "fusegraph.cli", "verify", a, a, "--inputs", str(tmp_path / name)],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (name, proc.stderr)
        assert proc.stderr.startswith(f"rewrite: error: {tmp_path / name}: "), proc.stderr
        assert ("not an .npz archive" if name.endswith(".npy") else "cannot read inputs") in proc.stderr


def _batch_one_only(path):
    """A model with a dynamic batch dim that only runs at batch 1 (as the dynamo exports do)."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 4])
    g = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Relu", ["r"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [shape])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(path))
    return str(path)


def test_default_dims_fall_back_to_one_and_are_reported(tmp_path, capsys):
    a = _batch_one_only(tmp_path / "a.onnx")
    assert main(["verify", a, a]) == 0
    assert "dims: batch=1" in capsys.readouterr().out
    assert main([a, "-o", str(tmp_path / "out.onnx"), "--verify", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["verify_dims"] == {"batch": 1} and summary["written"] == str(tmp_path / "out.onnx")
    assert main(["verify", a, a, "--shape", "x:2x4"]) == 2  # dims the user fixed are not second-guessed


def test_default_dims_stay_two_where_the_model_runs_there(tmp_path, capsys):
    a = _model(tmp_path / "a.onnx")
    assert main(["verify", a, a]) == 0
    assert "dims: batch=2" in capsys.readouterr().out
