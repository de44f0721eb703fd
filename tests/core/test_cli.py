"""The `rewrite` command: the main job, its reports, and bad input (one line, exit 2, nothing
written, input untouched)."""

import hashlib
import json
import os
import stat
import subprocess
import sys

import numpy as np
import onnx
import pytest

from fusegraph.cli import main
from fusegraph.errors import InputError
from fusegraph.verify.testing import make_model, node

F = np.float32


def write(path, model):
    onnx.save(model, str(path))
    return str(path)


def mlp_model(act="Relu"):
    rng = np.random.default_rng(1)
    return make_model([node("MatMul", ["x", "w"], ["m"], name="mm"), node("Add", ["m", "b"], ["a"], name="add"),
                       node(act, ["a"], ["y"], name="act")],
                      {"x": (F, ["batch", 4])}, {"y": (F, ["batch", 3])},
                      {"w": rng.standard_normal((4, 3)).astype(F), "b": rng.standard_normal(3).astype(F)})


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_rewrite_verify_and_summary(tmp_path, capsys):
    src = write(tmp_path / "in.onnx", mlp_model())
    before = digest(src)
    rc = main([src, "-o", str(tmp_path / "out.onnx"), "--verify", "--shape", "x:5x4"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "nodes: 3 -> 1" in out and "gemm_epilogue.matmul_act" in out and "verify y:" in out and " ok" in out
    assert digest(src) == before
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")), full_check=True)


def test_json_summary(tmp_path, capsys):
    src = write(tmp_path / "in.onnx", mlp_model())
    assert main([src, "-o", str(tmp_path / "out.onnx"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["nodes_before"] == 3 and summary["nodes_after"] == 1
    assert summary["fusions"] == {"gemm_epilogue.matmul_act": 1}
    assert summary["ops"]["fusegraph.MatMulBiasRelu"] == [0, 1]


def test_rule_selection_and_listing(tmp_path, capsys):
    assert main(["--list-rules"]) == 0
    listed = capsys.readouterr().out
    assert "gemm_epilogue.matmul_act" in listed
    src = write(tmp_path / "in.onnx", mlp_model())
    assert main([src, "-o", str(tmp_path / "out.onnx"), "--rules", "gemm_epilogue.matmul_bias", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fusions"] == {"gemm_epilogue.matmul_bias": 1}


def test_explain_names_the_failed_constraint(tmp_path, capsys):
    model = mlp_model()
    model.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(np.ones((2, 3), F), "b"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    src = write(tmp_path / "in.onnx", model)
    assert main([src, "--explain", "gemm_epilogue.matmul_act", "--rules", "gemm_epilogue.matmul_act"]) == 0
    out = capsys.readouterr().out
    assert "explain gemm_epilogue.matmul_act: 0 matches rewritten, 1 candidates refused" in out
    assert "Relu 'act'" in out and "bias shape (2, 3) is not [N]" in out


def test_explain_reports_the_deepest_structural_failure(tmp_path, capsys):
    model = make_model([node("Sub", ["x", "b"], ["a"]), node("Relu", ["a"], ["y"], name="act")],
                       {"x": (F, [2, 3])}, {"y": (F, [2, 3])}, {"b": np.ones(3, F)})
    src = write(tmp_path / "in.onnx", model)
    assert main([src, "--explain", "gemm_epilogue.matmul_act", "--rules", "gemm_epilogue.*"]) == 0
    assert "expected Add, found Sub" in capsys.readouterr().out


def test_verify_mismatch_exits_1(tmp_path, capsys):
    a = write(tmp_path / "a.onnx", mlp_model("Relu"))
    b = write(tmp_path / "b.onnx", mlp_model("Sigmoid"))
    assert main(["verify", a, b]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    assert main(["verify", a, a, "--shape", "x:3x4"]) == 0


def cycle_model():
    return make_model([node("Add", ["x", "c"], ["a"], name="n1"), node("Relu", ["a"], ["c"], name="n2")],
                      {"x": (F, [2])}, {"c": (F, [2])})


def bad_inputs(tmp_path):
    good = onnx.save(mlp_model(), str(tmp_path / "good.onnx")) or str(tmp_path / "good.onnx")
    data = open(good, "rb").read()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.onnx").write_bytes(b"this is not a model\n" * 20)
    dangling = mlp_model()
    dangling.graph.node[1].input[1] = "nowhere"
    unknown = mlp_model()
    unknown.opset_import[0].version = 99
    return {
        "missing": (str(tmp_path / "missing.onnx"), "no such file"),
        "truncated": (str(tmp_path / "trunc.onnx"), "not a valid ONNX model"),
        "not_onnx": (str(tmp_path / "text.onnx"), "not a valid ONNX model"),
        "cycle": (write(tmp_path / "cycle.onnx", cycle_model()), "cycle"),
        "dangling": (write(tmp_path / "dangling.onnx", dangling), "'nowhere'"),
        "unknown_opset": (write(tmp_path / "opset.onnx", unknown), "unknown opset 99"),
    }


@pytest.mark.parametrize("case", ["missing", "truncated", "not_onnx", "cycle", "dangling", "unknown_opset"])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, case):
    path, message = bad_inputs(tmp_path)[case]
    before = digest(path) if os.path.exists(path) else None
    out_path = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "fusegraph.cli", path, "-o", str(out_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rewrite: error:") and message in lines[0], proc.stderr
    assert not out_path.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fusegraph-")] == []
    if before is not None:
        assert digest(path) == before


def test_unknown_rule_and_bad_flags_exit_2(tmp_path, capsys):
    src = write(tmp_path / "in.onnx", mlp_model())
    assert main([src, "-o", str(tmp_path / "o.onnx"), "--rules", "no_such_rule"]) == 2
    assert main([src]) == 2
    assert main([src, "-o", str(tmp_path / "o.onnx"), "--verify", "--shape", "x=5"]) == 2
    assert "no rule named 'no_such_rule'" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_failure_while_saving_leaves_no_partial_output(tmp_path, monkeypatch):
    from fusegraph import model_io
    src = write(tmp_path / "in.onnx", mlp_model())

    def boom(self):
        raise OSError("disk full")
    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", boom)
    with pytest.raises(InputError, match="cannot write .*disk full"):
        model_io.save_model(onnx.load(src), str(tmp_path / "out.onnx"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_console_script_is_installed():
    proc = subprocess.run(["rewrite", "--list-rules"], capture_output=True, text=True)
    assert proc.returncode == 0 and "gemm_epilogue" in proc.stdout


def test_verify_shape_mismatch_is_one_line_exit_2(tmp_path):
    src = write(tmp_path / "in.onnx", mlp_model())
    proc = subprocess.run([sys.executable, "-m", "fusegraph.cli", "verify", src, src, "--shape", "x:2x5"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("rewrite: error: ONNX Runtime:"), proc.stderr


USER_RULES = '''
from fusegraph import Rule

def pattern(op, x):
    return op.Mul(x, op.Sigmoid(x))

def replacement(op, x):
    return op.Silu(x, _domain="my.ops")

RULES = [Rule("my.silu", pattern, replacement)]
'''


def test_user_rule_file_joins_the_rule_set(tmp_path, capsys):
    model = make_model([node("Sigmoid", ["x"], ["s"]), node("Mul", ["x", "s"], ["y"])], {"x": (F, [2])}, {"y": (F, [2])})
    src = write(tmp_path / "in.onnx", model)
    (tmp_path / "my_rules.py").write_text(USER_RULES)
    rc = main([src, "-o", str(tmp_path / "out.onnx"), "--rule-file", str(tmp_path / "my_rules.py"),
               "--rules", "my.*", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["fusions"] == {"my.silu": 1}
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert [n.op_type for n in out.graph.node] == ["Silu"]
    assert {o.domain: o.version for o in out.opset_import}["my.ops"] == 1


@pytest.mark.parametrize("body,message", [
    ("from fusegraph import Rule\nRULES = [Rule('bad', lambda op, x: x, lambda op, x: x)]", "can't be matched"),
    ("RULES = 3", "define RULES"),
    ("import no_such_module_here", "ModuleNotFoundError"),
])
def test_bad_user_rule_file_is_one_line_exit_2(tmp_path, body, message):
    src = write(tmp_path / "in.onnx", mlp_model())
    (tmp_path / "r.py").write_text(body)
    proc = subprocess.run([sys.executable, "-m", "fusegraph.cli", src, "-o", str(tmp_path / "out.onnx"),
                           "--rule-file", str(tmp_path / "r.py")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out.onnx").exists()


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fusegraph.cli", *args], capture_output=True, text=True, **kw)


def one_error_line(proc, message):
    lines = proc.stderr.strip().splitlines()
    return (proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("rewrite: error: ")
            and message in lines[0])


def test_help_lists_the_subcommands():
    out = run_cli("--help").stdout
    for command in ("rewrite verify", "rewrite build", "rewrite inspect", "--in-place"):
        assert command in out, out


def non_regular(kind, path):
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "link_to_dev_null":
        os.symlink("/dev/null", path)
    else:
        os.mkdir(path)


@pytest.mark.parametrize("kind,message", [("fifo", "is not a regular file"),
                                          ("link_to_dev_null", "is not a regular file"),
                                          ("folder", "is a directory")])
def test_output_that_is_not_a_regular_file_is_refused_and_kept(tmp_path, kind, message):
    src = write(tmp_path / "in.onnx", mlp_model())
    target = str(tmp_path / "target")
    non_regular(kind, target)
    proc = run_cli(src, "-o", target, timeout=60)
    assert one_error_line(proc, message), proc.stderr
    st = os.lstat(target)
    assert {"fifo": stat.S_ISFIFO, "link_to_dev_null": stat.S_ISLNK, "folder": stat.S_ISDIR}[kind](st.st_mode)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "target"]


def test_character_device_output_is_refused(tmp_path):
    """A copy of /dev/null (a device node, as root can make) is never renamed over."""
    src = write(tmp_path / "in.onnx", mlp_model())
    dev = str(tmp_path / "null")
    try:
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        dev = "/dev/null"  # without CAP_MKNOD: the real one, which must stay a device
    proc = run_cli(src, "-o", dev)
    assert one_error_line(proc, "is not a regular file"), proc.stderr
    assert stat.S_ISCHR(os.stat(dev).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_output_mode_follows_the_umask(tmp_path, umask):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    model = mlp_model()
    onnx.save(model, str(src_dir / "in.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    script = (f"import os, sys; os.umask({umask}); from fusegraph.cli import main; "
              f"sys.exit(main([{str(src_dir / 'in.onnx')!r}, '-o', {str(tmp_path / 'out.onnx')!r}]))")
    assert subprocess.run([sys.executable, "-c", script], capture_output=True).returncode == 0
    for name in ("out.onnx", "out.onnx.data"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name


def test_missing_output_folder_is_one_rule_for_rewrite_and_build(tmp_path):
    src = write(tmp_path / "in.onnx", mlp_model())
    for args in ([src, "-o", str(tmp_path / "missing" / "dir" / "x.onnx")],
                 ["build", src, "-o", str(tmp_path / "missing" / "dir" / "x.engine")]):
        proc = run_cli(*args)
        assert one_error_line(proc, "does not exist"), proc.stderr
    proc = run_cli(src, "-o", str(tmp_path / "missing") + os.sep)  # a folder to be, not a file name
    assert one_error_line(proc, "is a directory"), proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


@pytest.mark.parametrize("spec", [",,", "", " , "])
def test_rules_naming_nothing_is_bad_input(tmp_path, spec):
    src = write(tmp_path / "in.onnx", mlp_model())
    proc = run_cli(src, "-o", str(tmp_path / "o.onnx"), "--rules", spec)
    assert one_error_line(proc, "names no rule"), proc.stderr
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("code", ["3", "0", "'bye'"])
def test_rule_file_calling_sys_exit_is_bad_input(tmp_path, code):
    src = write(tmp_path / "in.onnx", mlp_model())
    (tmp_path / "r.py").write_text(f"import sys\nsys.exit({code})\n")
    proc = run_cli(src, "-o", str(tmp_path / "o.onnx"), "--rule-file", str(tmp_path / "r.py"))
    assert one_error_line(proc, "called sys.exit("), proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_explain_goes_into_the_json(tmp_path, capsys):
    model = mlp_model()
    model.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(np.ones((2, 3), F), "b"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    src = write(tmp_path / "in.onnx", model)
    assert main([src, "--explain", "gemm_epilogue.matmul_act", "--rules", "gemm_epilogue.matmul_act",
                 "--json"]) == 0
    explanation = json.loads(capsys.readouterr().out)["explain"]
    assert explanation["rule"] == "gemm_epilogue.matmul_act" and explanation["matches_rewritten"] == 0
    assert [m["root"] for m in explanation["refused"]] == ["Relu 'act'"]
    assert "bias shape (2, 3) is not [N]" in explanation["refused"][0]["reason"]


def test_failed_verify_writes_nothing_and_keeps_an_older_output(tmp_path, monkeypatch, capsys):
    """--verify runs on the complete model under its temporary name: a mismatch (exit 1) or a
    model ONNX Runtime refuses (exit 2) leaves -o as it was."""
    from fusegraph.verify import differential as verify
    src = write(tmp_path / "in.onnx", mlp_model())
    out = tmp_path / "out.onnx"
    out.write_bytes(b"older output")
    real_run = verify.run

    def skewed(model, feeds):
        got = real_run(model, feeds)
        return {k: v + 1 for k, v in got.items()} if ".fusegraph-tmp-" in str(model) else got
    monkeypatch.setattr(verify, "run", skewed)
    assert main([src, "-o", str(out), "--verify"]) == 1
    assert "not written" in capsys.readouterr().out
    assert out.read_bytes() == b"older output"
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]

    def refuses(model, feeds):
        if ".fusegraph-tmp-" in str(model):
            raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : made up")
        return real_run(model, feeds)
    monkeypatch.setattr(verify, "run", refuses)
    assert main([src, "-o", str(out), "--verify"]) == 2
    assert "INVALID_GRAPH" in capsys.readouterr().err
    assert out.read_bytes() == b"older output"
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]


def test_malformed_fusion_record_is_bad_input(tmp_path):
    model = mlp_model()
    onnx.helper.set_model_props(model, {"fusegraph.fusions": '{"rule": "x"}'})
    src = write(tmp_path / "in.onnx", model)
    proc = run_cli(src, "-o", str(tmp_path / "o.onnx"))
    assert one_error_line(proc, "is not a JSON list of fusions"), proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


def test_rewriting_a_rewritten_model_extends_its_record(tmp_path):
    src = write(tmp_path / "in.onnx", mlp_model())
    assert main([src, "-o", str(tmp_path / "a.onnx")]) == 0
    assert main([str(tmp_path / "a.onnx"), "-o", str(tmp_path / "b.onnx")]) == 0
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "b.onnx")).metadata_props}
    assert [f["rule"] for f in json.loads(props["fusegraph.fusions"])] == ["gemm_epilogue.matmul_act"]


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_readme_explain_example_runs_on_the_shipped_model():
    """The README's `--explain` session, command and printed reasons, reproduced from the repo."""
    readme = open(os.path.join(REPO, "README.md")).read()
    block = readme.split("$ rewrite tests/data/explain_demo.onnx ", 1)[1].split("```", 1)[0]
    args, *printed = block.strip().splitlines()
    proc = subprocess.run([sys.executable, "-m", "fusegraph.cli", "tests/data/explain_demo.onnx",
                           *[a.strip("'") for a in args.split()]], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    got = proc.stdout.splitlines()
    assert [l for l in got if not l.startswith("nodes:")] == [l for l in printed if not l.startswith("nodes:")]


@pytest.mark.parametrize("target,message", [("/dev/zero", "is not a regular file"),
                                            ("fifo", "is not a regular file")])
def test_input_that_is_not_a_regular_file_is_refused_not_read_forever(tmp_path, target, message):
    if target == "fifo":
        target = str(tmp_path / "fifo.onnx")
        os.mkfifo(target)
    proc = run_cli(target, "-o", str(tmp_path / "o.onnx"), timeout=60)
    assert one_error_line(proc, message), proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_output_under_a_file_is_refused(tmp_path):
    src = write(tmp_path / "in.onnx", mlp_model())
    proc = run_cli(src, "-o", str(tmp_path / "in.onnx" / "x.onnx"))
    assert one_error_line(proc, "is not a folder"), proc.stderr


def test_closed_stdout_is_quiet(tmp_path):
    """`rewrite --list-rules | head -1`: the reader leaving is not an error worth a traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "fusegraph.cli", "--list-rules"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()
    assert proc.wait(timeout=60) in (0, 141)
    assert proc.stderr.read() == b""
