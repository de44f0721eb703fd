"""Fault injection: whatever stops `rewrite` (SIGINT, SIGTERM, SIGKILL at any phase, a full
disk, a folder it may not write), the output is complete and valid or absent, nothing is left
behind but what a later run removes (temporary files of a SIGKILLed process), and the input and
everything outside the output folder are untouched.

Each case runs the command in a subprocess through a harness that fires the fault at a chosen
call inside a phase (the n-th chunk of the weights copy, the n-th write of the model, the
rename that publishes the output, ...); n is drawn from a seeded RNG, so a failure names its
case and reproduces.
"""

import errno
import hashlib
import os
import random
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

from fusegraph.model_io import TEMP_PREFIX
from fusegraph.verify.testing import make_model, node
from fusegraph.verify import verify_models

F = np.float32

#: argv: TRAP FAULT NTH REWRITE-ARGS...; FAULT is a signal number, or -errno to raise that OSError.
HARNESS = r'''
import os, sys
trap, fault, nth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
argv = sys.argv[4:]
sys.argv = ["rewrite"] + argv  # the name the console script runs under
calls = 0

def fire():
    global calls
    calls += 1
    if calls == nth:
        if fault < 0:
            raise OSError(-fault, os.strerror(-fault))
        os.kill(os.getpid(), fault)

if trap == "import":
    class FireOnOnnx:
        def find_spec(self, name, path=None, target=None):
            if name == "onnx":
                fire()
    sys.meta_path.insert(0, FireOnOnnx())

import importlib
from fusegraph import cli, external_data, model_io
import onnx
rewriter = importlib.import_module("fusegraph.rewrite")  # the module, not the function of that name

def after(f):
    def wrapped(*a, **k):
        out = f(*a, **k)
        fire()
        return out
    return wrapped

class Writes:
    """A file whose writes fire (the weights copy writes in 1 MB chunks)."""
    def __init__(self, f):
        self.f = f
    def write(self, data):
        fire()
        return self.f.write(data)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()
    def __getattr__(self, name):
        return getattr(self.f, name)

def opener(suffix):
    def open_(path, mode="r", *a, **k):
        f = open(path, mode, *a, **k)
        return Writes(f) if "w" in mode and str(path).endswith(suffix) else f
    return open_

external_data._CHUNK = 1 << 20
if trap == "load":
    onnx.load = after(onnx.load)
elif trap == "rewrite":
    rewriter.Rewriter.run = after(rewriter.Rewriter.run)
elif trap == "copy":
    model_io.open = opener(".data")
elif trap == "write":
    model_io.open = opener(".onnx")
elif trap == "publish":
    os.replace = after(os.replace)
sys.exit(cli.main(argv))
'''

WEIGHT = (2048, 2048)  # 16 MB: 16 chunks to interrupt


def fixture_model(seed):
    rng = np.random.default_rng(seed)
    k, n = WEIGHT
    return make_model([node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["a"]), node("Relu", ["a"], ["y"])],
                      {"x": (F, [2, k])}, {"y": (F, [2, n])},
                      {"w": rng.standard_normal((k, n)).astype(F), "b": rng.standard_normal(n).astype(F)})


def snapshot(root, skip=None):
    out = {}
    for folder, dirs, files in os.walk(root):
        if skip is not None:
            dirs[:] = [d for d in dirs if os.path.join(folder, d) != skip]
        for name in dirs + files:
            p = os.path.join(folder, name)
            st = os.lstat(p)
            digest = hashlib.sha256(open(p, "rb").read()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), digest)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """src/m.onnx (weights in m.onnx.data), old/m.onnx (other weights) and old_out/o.onnx, the
    rewrite of old/m.onnx: the older output a run may find at its -o."""
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("src", 0), ("old", 1)):
        (root / name).mkdir()
        onnx.save(fixture_model(seed), str(root / name / "m.onnx"), save_as_external_data=True,
                  location="m.onnx.data", size_threshold=0)
    (root / "old_out").mkdir()
    subprocess.run([sys.executable, "-m", "fusegraph.cli", str(root / "old" / "m.onnx"), "-o",
                    str(root / "old_out" / "o.onnx")], check=True, capture_output=True)
    return root


def harness(trap, fault, nth, src, out, **kw):
    return subprocess.run([sys.executable, "-c", HARNESS, trap, str(fault), str(nth), src, "-o", out],
                          capture_output=True, text=True, timeout=60, **kw)


def setup_case(tmp_path, models, with_older_output):
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    for name in ("m.onnx", "m.onnx.data"):
        os.link(models / "src" / name, work / "src" / name)  # the bytes are never written: hard links do
    out = work / "out"
    out.mkdir()
    if with_older_output:  # copies: onnx's checker refuses weights with several hard links
        for name in ("o.onnx", "o.onnx.data"):
            shutil.copyfile(models / "old_out" / name, out / name)
    return str(work / "src" / "m.onnx"), out


def check_output_whole_or_absent(out, src, older, killed=False):
    """The output folder holds the whole output (new, or the older one) or nothing, plus, only
    after SIGKILL, temporary files of our naming (which the next run removes)."""
    names = set(os.listdir(out))
    temps = {n for n in names if re.fullmatch(re.escape(TEMP_PREFIX) + r"\d+-[0-9a-f]+\.(onnx|data)", n)}
    assert killed or not temps, f"temporary files left: {temps}"
    assert names - temps in (set(), {"o.onnx", "o.onnx.data"}), names
    if "o.onnx" in names:
        onnx.checker.check_model(str(out / "o.onnx"), full_check=True)
        new = all(d.ok for d in verify_models(src, str(out / "o.onnx")))
        old = older is not None and all(d.ok for d in verify_models(older, str(out / "o.onnx")))
        assert new or old, "the output computes neither the new nor the older model"
        return "new" if new else "old"
    return None


SIGNALS = {"SIGINT": (signal.SIGINT, 130, "rewrite: interrupted (SIGINT)"),
           "SIGTERM": (signal.SIGTERM, 143, "rewrite: terminated (SIGTERM)"),
           "SIGKILL": (signal.SIGKILL, -signal.SIGKILL, None)}
#: Phases and how many calls each makes (the n-th is drawn among them).
PHASES = {"import": 1, "load": 1, "rewrite": 1, "copy": 17, "write": 1, "publish": 2}


@pytest.mark.parametrize("phase", sorted(PHASES))
@pytest.mark.parametrize("sig", sorted(SIGNALS))
def test_signal_at_any_phase_leaves_a_whole_output_or_none(tmp_path, models, phase, sig):
    signum, code, message = SIGNALS[sig]
    if phase == "import" and sig == "SIGTERM":
        code, message = -signal.SIGTERM, None  # before fusegraph's handler exists: killed, nothing written
    rng = random.Random(f"{phase}-{sig}")
    nth = rng.randint(1, PHASES[phase])
    if sig == "SIGKILL" and phase == "publish" and nth == 1:
        nth = 2  # the one window the README states: killed between the two renames, OUT.data without OUT
    older = str(models / "old" / "m.onnx")
    src, out = setup_case(tmp_path, models, with_older_output=True)
    outside = snapshot(tmp_path, skip=str(out))
    fixtures = snapshot(models)
    proc = harness(phase, signum, nth, src, str(out / "o.onnx"))
    case = f"{phase}/{sig}/n={nth}: rc {proc.returncode}, stderr {proc.stderr[-400:]!r}"
    assert proc.returncode == code, case
    if message is not None:
        assert proc.stderr.strip().splitlines() == [message], case
    assert snapshot(tmp_path, skip=str(out)) == outside, case
    result = check_output_whole_or_absent(out, src, older, killed=sig == "SIGKILL")
    if sig != "SIGKILL" and phase == "publish":
        assert result == "new", "a signal during the renames is held back until the output is whole"
    elif phase != "publish":
        assert result == "old", "interrupted before the renames: the older output stays as it was"
    assert snapshot(models) == fixtures
    if sig == "SIGKILL":
        if phase in ("copy", "write"):
            assert any(n.startswith(TEMP_PREFIX) for n in os.listdir(out)), "killed mid-write: its temporary files remain"
        again = subprocess.run([sys.executable, "-m", "fusegraph.cli", src, "-o", str(out / "o.onnx")],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        assert check_output_whole_or_absent(out, src, None) == "new"
        assert snapshot(tmp_path, skip=str(out)) == outside


@pytest.mark.parametrize("phase", ["copy", "write"])
def test_disk_full_is_one_line_and_nothing_left(tmp_path, models, phase):
    src, out = setup_case(tmp_path, models, with_older_output=False)
    outside = snapshot(tmp_path, skip=str(out))
    nth = random.Random(phase).randint(1, PHASES[phase])
    proc = harness(phase, -errno.ENOSPC, nth, src, str(out / "o.onnx"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("rewrite: error: ") and "No space left on device" in proc.stderr
    assert os.listdir(out) == [] and snapshot(tmp_path, skip=str(out)) == outside


@pytest.mark.parametrize("limit", [4 << 20, 16 << 10])
def test_file_size_limit_is_one_line_and_nothing_left(tmp_path, models, limit):
    """A real write failure from the kernel (EFBIG under RLIMIT_FSIZE, as a full disk gives
    ENOSPC): in the weights copy (4 MB) or in the model itself (inline weights, 16 KB)."""
    src, out = setup_case(tmp_path, models, with_older_output=False)
    if limit < 1 << 20:
        src = str(tmp_path / "inline.onnx")
        onnx.save(fixture_model(2), src)
    outside = snapshot(tmp_path, skip=str(out))

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    proc = subprocess.run([sys.executable, "-m", "fusegraph.cli", src, "-o", str(out / "o.onnx")],
                          capture_output=True, text=True, timeout=60, preexec_fn=limited)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "File too large" in proc.stderr
    assert os.listdir(out) == [] and snapshot(tmp_path, skip=str(out)) == outside


def test_folder_that_cannot_be_written_is_one_line(tmp_path, models):
    src, out = setup_case(tmp_path, models, with_older_output=False)
    if os.geteuid() == 0:
        target = "/sys/fusegraph-fault-test.onnx"  # root writes through file modes; sysfs refuses it
    else:
        os.chmod(out, 0o555)
        target = str(out / "o.onnx")
    proc = subprocess.run([sys.executable, "-m", "fusegraph.cli", src, "-o", target],
                          capture_output=True, text=True, timeout=60)
    os.chmod(out, 0o755)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot write" in proc.stderr and "Permission denied" in proc.stderr
    assert not os.path.exists(target)
    assert os.listdir(out) == []


def wait_until_importing_onnx(proc, timeout=30.0):
    """Until the child has loaded onnx's extension (fusegraph is importing): before that it is
    the interpreter's own startup, which no program can make quiet."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if "onnx_cpp2py_export" in open(f"/proc/{proc.pid}/maps").read():
                return
        except OSError:
            pass
        time.sleep(0.005)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/PID/maps (Linux)")
@pytest.mark.parametrize("sig", sorted(SIGNALS))
def test_signal_at_a_random_moment(tmp_path, models, sig):
    """The same promises with the signal sent from outside at a random time of the run."""
    signum, code, message = SIGNALS[sig]
    rng = random.Random(sig)
    for attempt in range(2):
        case_dir = tmp_path / str(attempt)
        case_dir.mkdir()
        src, out = setup_case(case_dir, models, with_older_output=False)
        outside = snapshot(case_dir, skip=str(out))
        proc = subprocess.Popen([sys.executable, "-m", "fusegraph.cli", src, "-o", str(out / "o.onnx")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_until_importing_onnx(proc)
        delay = rng.uniform(0.0, 0.8)
        time.sleep(delay)
        proc.send_signal(signum)
        stderr = proc.communicate(timeout=60)[1]
        case = f"{sig} after {delay:.3f}s: rc {proc.returncode}, stderr {stderr[-400:]!r}"
        # 0: it finished first; killed by the signal itself (-signum, silently): it came before
        # fusegraph's handler was installed (SIGTERM while importing: nothing written yet) or after
        # the interpreter dropped the handlers on its way out (the output complete)
        assert proc.returncode in (0, code, -signum), case
        if proc.returncode == -signum:
            assert stderr == "", case
        if proc.returncode == code and message is not None:
            assert stderr.strip().splitlines() == [message], case
        check_output_whole_or_absent(out, src, None, killed=sig == "SIGKILL")
        assert snapshot(case_dir, skip=str(out)) == outside, case


def test_concurrent_writers_of_one_output_leave_one_whole_output(tmp_path, models):
    src, out = setup_case(tmp_path, models, with_older_output=False)
    procs = [subprocess.Popen([sys.executable, "-m", "fusegraph.cli", src, "-o", str(out / "o.onnx")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert check_output_whole_or_absent(out, src, None) == "new"
