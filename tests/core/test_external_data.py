"""Models whose weights live in external data files are rewritten without reading the weights:
the output keeps them external, beside it, and computes the same thing."""

import hashlib
import os
import re
import stat
import subprocess
import sys

import numpy as np
import onnx
import pytest

from fusegraph import rewrite_file
from fusegraph.verify.testing import make_model, node, op_counts
from fusegraph.verify import verify_models

F = np.float32


def save_external(model, path):
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=os.path.basename(path) + ".data", size_threshold=0)


def mlp(k, n, seed=0):
    rng = np.random.default_rng(seed)
    return make_model([node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["a"]), node("Relu", ["a"], ["y"])],
                      {"x": (F, [2, k])}, {"y": (F, [2, n])},
                      {"w": rng.standard_normal((k, n)).astype(F), "b": rng.standard_normal(n).astype(F)})


def test_external_weights_stay_external_and_are_copied_beside_the_output(tmp_path):
    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    dst_dir.mkdir()
    src = str(src_dir / "m.onnx")
    save_external(mlp(64, 32), src)
    data_before = open(src + ".data", "rb").read()
    report = rewrite_file(src, str(dst_dir / "m.onnx"))
    assert dict(report.per_rule) == {"gemm_epilogue.matmul_act": 1}
    out = onnx.load(str(dst_dir / "m.onnx"), load_external_data=False)
    assert op_counts(out) == {"fusegraph.MatMulBiasRelu": 1}
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in out.graph.initializer)
    assert open(dst_dir / "m.onnx.data", "rb").read() == data_before
    assert open(src + ".data", "rb").read() == data_before
    diffs = verify_models(src, str(dst_dir / "m.onnx"))
    assert all(d.ok for d in diffs), diffs


def test_weights_are_not_read_into_memory(tmp_path):
    """A 256 MB weight: rewriting must not grow the process by anything like it."""
    src = str(tmp_path / "big.onnx")
    save_external(mlp(8192, 8192), src)
    script = (
        "import resource, sys; from fusegraph import rewrite_file;"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        f"r = rewrite_file({src!r}, {str(tmp_path / 'out.onnx')!r});"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "print(dict(r.per_rule), (after - before) // 1024)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    fusions, grown_mb = proc.stdout.rsplit(" ", 1)
    assert "gemm_epilogue.matmul_act" in fusions
    assert int(grown_mb) < 64, f"process grew by {grown_mb} MB for a 256 MB weight"


# -- untrusted references: every one is checked before anything is read or written ----------------

def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fusegraph.cli", *args], capture_output=True, text=True, **kw)


def snapshot(root):
    """Every path under `root` with its kind and content digest: what 'untouched' compares."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(folder, name)
            st = os.lstat(p)
            digest = hashlib.sha256(open(p, "rb").read()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), digest)
    return out


def external_model(folder, name="m.onnx", location="weights.bin", seed=0):
    os.makedirs(os.path.dirname(os.path.join(folder, location)), exist_ok=True)
    path = os.path.join(folder, name)
    onnx.save(mlp(4, 3, seed), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)
    return path


def edit_external(path, **entries):
    """Rewrite the external_data entries of the model's first initializer (the weight)."""
    model = onnx.load(path, load_external_data=False)
    t = model.graph.initializer[0]
    info = {e.key: e.value for e in t.external_data} | entries
    del t.external_data[:]
    for key, value in info.items():
        if value is not None:
            t.external_data.add(key=key, value=str(value))
    onnx.save(model, path)


def second_location(tmp_path, src):
    model = onnx.load(src, load_external_data=False)
    model.graph.initializer[0].external_data.add(key="location", value="../secret.bin")
    onnx.save(model, src)


def escape_symlink(tmp_path, src):
    os.symlink(str(tmp_path / "secret.bin"), os.path.join(os.path.dirname(src), "link.bin"))
    edit_external(src, location="link.bin")


def truncate(tmp_path, src):
    data = os.path.join(os.path.dirname(src), "weights.bin")
    os.truncate(data, os.path.getsize(data) - 4)


def short_raw_data(tmp_path, src):
    model = mlp(4, 3)
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    onnx.save(model, src)


def set_metadata(tmp_path, src):
    model = onnx.load(src, load_external_data=False)
    onnx.helper.set_model_props(model, {"fusegraph.fusions": "{not json"})
    onnx.save(model, src)


def set_ir_version(tmp_path, src):
    model = onnx.load(src, load_external_data=False)
    model.ir_version = 99
    onnx.save(model, src)


BAD_REFERENCES = {
    "traversal": (lambda tmp_path, src: edit_external(src, location="../../../../../../../../etc/passwd"),
                  "leads outside the model's folder"),
    "absolute": (lambda tmp_path, src: edit_external(src, location=str(tmp_path / "secret.bin")), "absolute path"),
    "symlink_escape": (escape_symlink, "leads outside the model's folder"),
    "missing": (lambda tmp_path, src: os.unlink(os.path.join(os.path.dirname(src), "weights.bin")), "is missing"),
    "truncated": (truncate, "truncated?"),
    "offset_past_end": (lambda tmp_path, src: edit_external(src, offset=1 << 20), "truncated?"),
    "wrong_length": (lambda tmp_path, src: edit_external(src, length=7), "length 7 is not the 48 bytes"),
    "no_location": (lambda tmp_path, src: edit_external(src, location=None), "has no location"),
    "folder_location": (lambda tmp_path, src: (os.mkdir(os.path.join(os.path.dirname(src), "sub")),
                                               edit_external(src, location="sub")), "is not a regular file"),
    "negative_offset": (lambda tmp_path, src: edit_external(src, offset=-4), "negative offset"),
    "two_locations": (second_location, "names a key twice"),
    "nul_byte": (lambda tmp_path, src: edit_external(src, location="weights.bin\0../../x"), "NUL byte"),
    "raw_data_short": (short_raw_data, "raw_data holds 44 bytes, its shape [4, 3] needs 48"),
    "fusions_metadata": (set_metadata, "'fusegraph.fusions' is not a JSON list"),
    "ir_version_99": (set_ir_version, "IR version 99 is newer than this onnx knows"),
}


@pytest.mark.parametrize("case", sorted(BAD_REFERENCES))
def test_bad_data_references_are_refused_nothing_read_or_written(tmp_path, case):
    """Refused before any read or write: exit 2, one line; the input, the file it points at and
    every folder stay as they were (no `o1/etc/passwd` beside a deep output)."""
    (tmp_path / "secret.bin").write_bytes(b"s" * 4096)
    src = external_model(str(tmp_path / "m"))
    make_bad, message = BAD_REFERENCES[case]
    make_bad(tmp_path, src)
    deep = tmp_path / "o1" / "o2" / "o3" / "o4" / "o5" / "o6"
    deep.mkdir(parents=True)
    before = snapshot(tmp_path)
    proc = cli(src, "-o", str(deep / "p.onnx"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rewrite: error: ") and message in lines[0], proc.stderr
    assert snapshot(tmp_path) == before


def test_verify_refuses_an_escaping_reference_before_onnx_runtime_reads_it(tmp_path):
    src = external_model(str(tmp_path / "m"))
    edit_external(src, location="../secret.bin")
    (tmp_path / "secret.bin").write_bytes(b"s" * 4096)
    proc = cli("verify", src, src)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "leads outside" in proc.stderr, proc.stderr


def test_reference_inside_the_folder_through_dot_dot_is_fine(tmp_path):
    folder = tmp_path / "m"
    src = external_model(str(folder))
    (folder / "sub").mkdir()
    edit_external(src, location="sub/../weights.bin")
    proc = cli(src, "-o", str(tmp_path / "out.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert all(d.ok for d in verify_models(src, str(tmp_path / "out.onnx")))


def test_library_reader_refuses_an_escaping_constant(tmp_path):
    """The IR reads small external constants for pattern conditions: the same checks apply
    when a model reaches the API without load_model."""
    from fusegraph import InputError, rewrite_with_report
    src = external_model(str(tmp_path / "m"))
    edit_external(src, location="../secret.bin")
    (tmp_path / "secret.bin").write_bytes(b"s" * 4096)
    with pytest.raises(InputError, match="leads outside"):
        rewrite_with_report(onnx.load(src, load_external_data=False), base_dir=str(tmp_path / "m"))


# -- weights copied beside an output: named after it, written like it, never reused ----------------

def test_two_models_with_the_same_weight_file_name_keep_their_own_weights(tmp_path):
    """a/m.onnx and b/m.onnx both use weights.bin: b's output must compute with b's weights."""
    a = external_model(str(tmp_path / "a"), seed=1)
    b = external_model(str(tmp_path / "b"), seed=2)
    out = tmp_path / "out"
    out.mkdir()
    assert cli(a, "-o", str(out / "a.onnx")).returncode == 0
    assert cli(b, "-o", str(out / "b.onnx")).returncode == 0
    assert sorted(os.listdir(out)) == ["a.onnx", "a.onnx.data", "b.onnx", "b.onnx.data"]
    for src, dst in ((a, out / "a.onnx"), (b, out / "b.onnx")):
        diffs = verify_models(src, str(dst))
        assert all(d.ok and d.max_abs < 1e-5 for d in diffs), diffs


def test_torn_or_stale_files_in_the_output_folder_are_never_reused(tmp_path):
    """A partial weights file from an interrupted copy (under the input's name or ours) does not
    make the next run 'succeed' with a model ONNX Runtime cannot load."""
    src = external_model(str(tmp_path / "m"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"torn")
    (out / "o.onnx.data").write_bytes(b"torn")
    proc = cli(src, "-o", str(out / "o.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert (out / "weights.bin").read_bytes() == b"torn"  # not ours: left alone
    diffs = verify_models(src, str(out / "o.onnx"))
    assert all(d.ok for d in diffs), diffs
    again = cli(src, "-o", str(out / "o.onnx"))
    assert again.returncode == 0 and all(d.ok for d in verify_models(src, str(out / "o.onnx")))


def test_only_referenced_bytes_are_copied_and_big_tensors_aligned(tmp_path):
    from fusegraph.external_data import ALIGNMENT
    folder = tmp_path / "m"
    folder.mkdir()
    src = str(folder / "m.onnx")
    save_external(mlp(512, 1024), src)  # a 2 MB weight, then the bias
    with open(src + ".data", "ab") as f:
        f.write(b"junk" * 1000)  # bytes no tensor references
    dst = tmp_path / "o.onnx"
    rewrite_file(src, str(dst))
    out = onnx.load(str(dst), load_external_data=False)
    info = {t.name: {e.key: e.value for e in t.external_data} for t in out.graph.initializer}
    assert {i["location"] for i in info.values()} == {"o.onnx.data"}
    assert int(info["w"]["offset"]) % ALIGNMENT == 0
    assert os.path.getsize(str(dst) + ".data") < os.path.getsize(src + ".data")
    assert all(d.ok for d in verify_models(src, str(dst)))


def test_output_in_the_input_folder_shares_the_input_weights(tmp_path):
    src = external_model(str(tmp_path / "m"))
    before = snapshot(tmp_path / "m")
    assert cli(src, "-o", str(tmp_path / "m" / "fused.onnx")).returncode == 0
    after = snapshot(tmp_path / "m")
    assert set(after) - set(before) == {"fused.onnx"} and all(after[k] == v for k, v in before.items())
    assert all(d.ok for d in verify_models(src, str(tmp_path / "m" / "fused.onnx")))


# -- outputs that would destroy the input or replace what is not a file ------------------------------

def test_output_equal_to_the_input_or_its_data_file_is_refused(tmp_path):
    src = external_model(str(tmp_path / "m"))
    before = snapshot(tmp_path)
    for target in (src, str(tmp_path / "m" / "weights.bin"), str(tmp_path / "m" / "." / "m.onnx")):
        proc = cli(src, "-o", target)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "is an external data file of the input" in cli(src, "-o", str(tmp_path / "m" / "weights.bin"),
                                                           "--in-place").stderr
    os.symlink(src, str(tmp_path / "link.onnx"))
    assert "is the input model" in cli(src, "-o", str(tmp_path / "link.onnx")).stderr
    os.unlink(str(tmp_path / "link.onnx"))
    assert snapshot(tmp_path) == before


def test_output_whose_weights_file_would_be_an_input_data_file_is_refused(tmp_path):
    """Input a/m.onnx keeps weights in a/o/x.onnx.data; an output a/o/x.onnx would put its own
    weights over that file."""
    folder = tmp_path / "a"
    src = external_model(str(folder), location="o/x.onnx.data")
    before = snapshot(tmp_path)
    proc = cli(src, "-o", str(folder / "o" / "x.onnx"))
    assert proc.returncode == 2 and "is an external data file of the input" in proc.stderr
    assert snapshot(tmp_path) == before


def test_in_place_rewrites_the_model_and_keeps_its_weights(tmp_path):
    src = external_model(str(tmp_path / "m"))
    copy = external_model(str(tmp_path / "ref"))
    weights = (tmp_path / "m" / "weights.bin").read_bytes()
    proc = cli(src, "-o", src, "--in-place")
    assert proc.returncode == 0, proc.stderr
    assert op_counts(onnx.load(src, load_external_data=False)) == {"fusegraph.MatMulBiasRelu": 1}
    assert (tmp_path / "m" / "weights.bin").read_bytes() == weights
    assert sorted(os.listdir(tmp_path / "m")) == ["m.onnx", "weights.bin"]
    assert all(d.ok for d in verify_models(copy, src))


def test_escaping_reference_in_a_constant_node_is_refused(tmp_path):
    """External data may hang off a Constant node's tensor too (onnx's convert_attribute)."""
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(np.arange(3, dtype=F).tobytes())
    value = onnx.TensorProto(name="c", data_type=onnx.TensorProto.FLOAT, dims=[3])
    value.data_location = onnx.TensorProto.EXTERNAL
    value.external_data.add(key="location", value="../secret.bin")
    model = make_model([node("Constant", [], ["c"], value=value), node("Add", ["x", "c"], ["y"])],
                       {"x": (F, [3])}, {"y": (F, [3])})
    onnx.save(model, str(folder / "m.onnx"))
    before = snapshot(tmp_path)
    proc = cli(str(folder / "m.onnx"), "-o", str(tmp_path / "out.onnx"))
    assert proc.returncode == 2 and "leads outside" in proc.stderr, proc.stderr
    assert snapshot(tmp_path) == before


def _tensor(data_type, dims, **fields):
    t = onnx.TensorProto(name="t", data_type=data_type, dims=dims)
    for key, value in fields.items():
        if key == "raw_data":
            t.raw_data = value
        else:
            getattr(t, key).extend(value)
    return t


T = onnx.TensorProto


@pytest.mark.parametrize("tensor,message", [
    (_tensor(T.FLOAT, [2, 3], float_data=[1.0] * 5), "holds 5 values in float_data"),
    (_tensor(T.INT64, [4], int64_data=[1] * 3), "holds 3 values in int64_data"),
    (_tensor(T.FLOAT16, [3], int32_data=[0] * 2), "holds 2 values in int32_data"),
    (_tensor(T.COMPLEX64, [2], float_data=[0.0] * 2), "holds 2 values in float_data"),
    (_tensor(T.STRING, [3], string_data=[b"a"]), "holds 1 strings"),
    (_tensor(T.FLOAT, [2], raw_data=b"\0" * 12), "raw_data holds 12 bytes, its shape [2] needs 8"),
    (_tensor(T.FLOAT, [3], float_data=[]), "holds 0 values"),
    (_tensor(T.FLOAT, [-1, 2], float_data=[]), "negative dimension"),
])
def test_inline_tensors_must_fill_their_shape(tensor, message):
    from fusegraph import InputError
    from fusegraph.external_data import check_inline
    with pytest.raises(InputError, match=re.escape(message)):
        check_inline(tensor)


@pytest.mark.parametrize("tensor", [
    _tensor(T.FLOAT, [2, 3], float_data=[1.0] * 6), _tensor(T.INT4, [3], raw_data=b"\0\0"),
    _tensor(T.BOOL, [0]), _tensor(T.STRING, [2], string_data=[b"a", b"bc"]),
    _tensor(T.COMPLEX128, [1], double_data=[1.0, 2.0]),
])
def test_inline_tensors_that_fill_their_shape_pass(tensor):
    from fusegraph.external_data import check_inline
    check_inline(tensor)
