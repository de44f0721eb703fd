"""Loading, validating and saving models, safely.

- Weights in external data files are never read: the model is loaded without them, their
  TensorProtos keep pointing at the files, so a > 2 GB model is rewritten in the memory of its
  graph alone. Every reference is checked first (`external_data`): inside the model's folder,
  present, long enough; inline tensors must fill their shape.
- Bad input is an `InputError` with one line that says what is wrong: a missing, truncated or
  non-ONNX file, an IR version or opset this onnx does not know, a graph with a cycle or a
  dangling input, a folder or device where the output should go, a folder we cannot write.
- Saving never writes through an existing name. The model (and, for an output in another folder
  than the input, one file `OUT.data` holding the weights it references) is written under
  temporary names `.fusegraph-tmp-<pid>-<random>.{onnx,data}` in the output's folder and renamed
  into place last, weights first, with SIGINT, SIGTERM and SIGHUP held back for those renames: the output
  is whole (old or new) or absent, never torn. A failure or signal removes the temporary files; a
  process killed outright (SIGKILL) leaves them, and the next save into that folder removes the
  ones whose process is gone. The input model and its data files are never opened for writing,
  and an output that would replace one of them is refused (the model itself only with `in_place`).
- Files are created with the mode `open()` gives (0o666 less the umask), as any other tool's.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import onnx
from google.protobuf.message import DecodeError

from . import external_data
from .ops import fused_ops
from .errors import InputError
from .ir import Graph
from .rewrite import FUSIONS_KEY
from .serialize import serialized

#: The newest IR version ONNX Runtime 1.31 loads; onnx 1.23 would write 14 by default.
MAX_IR_VERSION = 13
#: Local functions (how fused ops carry their decomposition) need IR version 8.
MIN_IR_VERSION_WITH_FUNCTIONS = 8
TEMP_PREFIX = ".fusegraph-tmp-"
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-[0-9a-f]+\.(onnx|data)")
#: Signals held back while the output is renamed into place (the CLI turns them into cleanup).
_DEFERRED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def load_model(path: str) -> onnx.ModelProto:
    return load_checked(path)[0]


def load_checked(path: str) -> tuple[onnx.ModelProto, list[external_data.Extent]]:
    """The model at `path` (weights left on disk) and where its external data lies, every
    tensor checked (`external_data.check_model`)."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not an ONNX file")
    if not os.path.isfile(path):  # a FIFO or a device such as /dev/zero would be read forever
        raise InputError(f"{path}: is not a regular file")
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InputError(f"{path}: not a valid ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'cannot parse'})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if not model.HasField("graph") or not model.ir_version:
        raise InputError(f"{path}: not a valid ONNX model (no graph or no IR version; truncated or not ONNX?)")
    if model.ir_version > onnx.IR_VERSION:
        raise InputError(f"{path}: IR version {model.ir_version} is newer than this onnx knows ({onnx.IR_VERSION})")
    try:
        return model, external_data.check_model(model, os.path.dirname(os.path.abspath(path)))
    except InputError as e:
        raise InputError(f"{path}: {e}") from None


def validate(model: onnx.ModelProto, graph: Graph, source: str = "model") -> None:
    """Refuse what the rewriter cannot reason about, before touching anything."""
    known = onnx.defs.onnx_opset_version()
    default = graph.opset.get("")
    if default is None:
        raise InputError(f"{source}: no opset import for the default ONNX domain")
    if default > known:
        raise InputError(f"{source}: unknown opset {default} for the default domain (this onnx knows up to {known})")
    if default < 7:
        raise InputError(f"{source}: opset {default} is too old (fusegraph needs 7 or newer)")
    try:
        # What the rewriter may read: initializers and Constant values (load_checked has seen
        # every tensor of a model that came from a file; this covers models handed over).
        constants = (n.attr("value") for n in graph.by_op.get(("", "Constant"), ()))
        external_data.check_tensors(itertools.chain(graph.initializers.values(),
                                                    (t for t in constants if t is not None)), graph.base_dir)
    except InputError as e:
        raise InputError(f"{source}: {e}") from None
    _check_fusion_record(model, source)
    _check_names_and_ops(model, default, source)
    defined = {v.name for v in graph.inputs} | set(graph.initializers) | set(graph.constants)
    for v in graph.values.values():
        if v.producer is None and v.consumers and v.name not in defined:
            n = next(iter(v.consumers))
            raise InputError(f"{source}: node {n.name!r} ({n.op_type}) reads {v.name!r}, "
                             "which no node, graph input or initializer defines")
    for v in graph.outputs:
        if v.producer is None and v.name not in defined:
            raise InputError(f"{source}: graph output {v.name!r} is not computed by any node")
    graph.toposort()


#: Ops ONNX Runtime registers in the default domain at versions ONNX does not: its
#: transformers optimizer writes LayerNormalization into opset < 17 models, and
#: SimplifiedLayerNormalization (`--target onnxruntime` too). A model with them is ONNX
#: Runtime's own, valid there.
RUNTIME_DEFAULT_DOMAIN_OPS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization"})


def _check_names_and_ops(model: onnx.ModelProto, opset: int, source: str) -> None:
    """What ONNX Runtime refuses to load and the rewriter would carry into its output: a graph
    input named twice, a node output that redefines a graph input or an initializer (each
    name is defined once), and a standard op used below the opset that introduced it (`Gelu`
    before 20) unless a local function defines it or ONNX Runtime registers it there
    (`RUNTIME_DEFAULT_DOMAIN_OPS`). An op name ONNX does not know at any opset passes: in the
    default domain that is how TensorRT names its plugins (`EfficientNMS_TRT`; its parser
    resolves an unknown op through the plugin registry), and the rewriter leaves such a node
    as it is. The main graph only, one pass over its nodes."""
    g = model.graph
    inputs = [i.name for i in g.input]
    if len(set(inputs)) != len(inputs):
        twice = next(n for n in inputs if inputs.count(n) > 1)
        raise InputError(f"{source}: graph input {twice!r} is declared twice")
    defined = set(inputs) | {t.name for t in g.initializer}
    local = {(f.domain, f.name) for f in model.functions}
    too_new: dict[str, int | None] = {}
    for n in g.node:
        for out in n.output:
            if out in defined:
                raise InputError(f"{source}: node {n.name!r} ({n.op_type}) redefines {out!r}, "
                                 "a graph input or initializer")
        if n.domain in ("", "ai.onnx") and (n.domain, n.op_type) not in local:
            if n.op_type not in too_new:
                too_new[n.op_type] = _introduced_after(n.op_type, opset)
            if too_new[n.op_type] is not None:
                raise InputError(f"{source}: node {n.name!r}: {n.op_type!r} is an ONNX op from opset "
                                 f"{too_new[n.op_type]}, not at the model's opset {opset}")


def _introduced_after(op_type: str, opset: int) -> int | None:
    """The opset that introduced standard op `op_type` where that is after `opset`; None where
    the op exists at `opset`, ONNX Runtime registers it there, or ONNX knows no such op."""
    if op_type in RUNTIME_DEFAULT_DOMAIN_OPS or not onnx.defs.has(op_type):
        return None
    try:
        onnx.defs.get_schema(op_type, opset, "")
        return None
    except onnx.defs.SchemaError:
        return min(s.since_version for s in onnx.defs.get_all_schemas_with_history()
                   if s.name == op_type and s.domain == "")


def check_own_domain(model: onnx.ModelProto, source: str = "model") -> None:
    """Before a rewrite: a fused op's local function in the `fusegraph` domain is fusegraph's to
    write, and each rewrite replaces it with this version's body (`fused_ops.attach_functions`).
    A model that defines one otherwise would change meaning silently, so it is refused, unless
    a fusegraph rewrite wrote the model (its fusion record: bodies of an older fusegraph are
    replaced by design) or the body is one this fusegraph writes. (Building an engine keeps a
    model's functions as they are: `build` does not ask this.)"""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if any(p.key == FUSIONS_KEY for p in model.metadata_props):
        return
    for f in model.functions:
        if f.domain == fused_ops.DOMAIN and f.name in fused_ops.REGISTRY and not fused_ops.writes(f, opset):
            raise InputError(f"{source}: the model defines function {f.domain}.{f.name} itself, which fusegraph "
                             f"writes (the {f.domain!r} domain is fusegraph's own): give it another domain")


def _check_fusion_record(model: onnx.ModelProto, source: str) -> None:
    """A rewritten model's record (`FUSIONS_KEY`) is extended by the next rewrite
    (`rewrite.finalize`): it must be a list of fusions."""
    for p in model.metadata_props:
        if p.key == FUSIONS_KEY:
            try:
                record = json.loads(p.value)
            except ValueError:
                record = None
            if not isinstance(record, list) or not all(isinstance(f, dict) for f in record):
                raise InputError(f"{source}: metadata {FUSIONS_KEY!r} is not a JSON list of fusions")


def check_output(path: str, source: str | None = None, data: list[external_data.Extent] = (), *,
                 in_place: bool = False) -> None:
    """Refuse an output that cannot or must not be written, before any work: a folder, a
    missing folder, an existing non-regular file (a device, a FIFO: fusegraph writes only
    regular files and never renames over anything else), the input model `source` (unless
    `in_place`) or one of its external data files `data` (always)."""
    target = os.path.abspath(path)
    if os.path.isdir(target) or path.endswith(os.sep):
        raise InputError(f"{path}: is a directory; -o takes a file name")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise InputError(f"{path}: folder {folder} " + ("is not a folder" if os.path.exists(folder) else "does not exist"))
    _refuse_non_regular(path)
    if source is None:
        return
    if _same_file(target, source) and not in_place:
        raise InputError(f"{path}: is the input model; pass --in-place to replace it")
    written = [path]
    if data and not _same_file(folder, os.path.dirname(os.path.abspath(source))):
        written.append(data_path(path))
        _refuse_non_regular(written[-1])
    for out in written:
        for extent in data:
            if _same_file(out, extent.path):
                raise InputError(f"{out}: is an external data file of the input {source}; it is never overwritten")


def _refuse_non_regular(path: str) -> None:
    if os.path.exists(path) and not os.path.isfile(path):
        raise InputError(f"{path}: exists and is not a regular file (fusegraph writes only regular files)")


def data_path(model_path: str) -> str:
    """Where the weights of a model saved in another folder than its input go."""
    return model_path + ".data"


def save_model(model: onnx.ModelProto, path: str, source_dir: str | None = None, *,
               check: Callable[[str], bool] | None = None) -> bool:
    """Write `model` to `path` atomically (see the module docstring).

    External data (`source_dir` given: the folder of an input that has some): in that folder
    the tensors keep pointing at the input's files; elsewhere the bytes they reference are
    copied into `path + ".data"` and the tensors (of `model`, edited) point there. `check`, if
    given, receives the path of the complete model under its temporary name (its weights beside
    it, also temporary) and decides whether it is renamed into place; returns whether the
    output was written.
    """
    check_output(path)
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temps(folder)
    if model.functions and model.ir_version < MIN_IR_VERSION_WITH_FUNCTIONS:
        model.ir_version = MIN_IR_VERSION_WITH_FUNCTIONS
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    copy_weights = source_dir is not None and not _same_file(source_dir, folder)
    if copy_weights:
        _refuse_non_regular(data_path(path))
    temps: list[str] = []
    try:
        tmp_data = None
        if copy_weights:
            tmp_data = _new_temp(folder, ".data", temps)
            with open(tmp_data, "wb") as f:
                copied = external_data.repack(model, source_dir, f,
                                              os.path.basename(tmp_data if check else data_path(path)))
            if not copied:  # the rewrite left no tensor on disk
                _unlink_quietly(tmp_data)
                tmp_data = None
        tmp_model = _new_temp(folder, ".onnx", temps)
        _write(tmp_model, model)
        if check is not None:
            if not check(tmp_model):
                return False
            if tmp_data is not None:
                _point_external_data(model, os.path.basename(data_path(path)))
                _write(tmp_model, model)
        with _signals_deferred():
            if tmp_data is not None:
                if os.path.lexists(path):
                    os.unlink(path)  # the old output must never be seen with the new weights
                os.replace(tmp_data, data_path(path))
            os.replace(tmp_model, path)
            temps.clear()
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        for tmp in temps:
            _unlink_quietly(tmp)
    return True


def _write(path: str, model: onnx.ModelProto) -> None:
    with open(path, "wb") as f:
        for piece in serialized(model):
            f.write(piece)


def _point_external_data(model: onnx.ModelProto, location: str) -> None:
    for t in external_data.all_tensors(model):
        if external_data.is_external(t):
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = location


def _new_temp(folder: str, suffix: str, temps: list[str]) -> str:
    """Create an empty temporary file of our own naming (registered before it exists, so that a
    signal between the two still gets it removed) with the mode open() would give it."""
    path = os.path.join(folder, f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}{suffix}")
    temps.append(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
    return path


def remove_stale_temps(folder: str) -> list[str]:
    """Remove the temporary files a killed fusegraph left in `folder` (those whose process is
    gone); return their names."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TEMP_NAME.fullmatch(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            if _unlink_quietly(os.path.join(folder, name)):
                removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _unlink_quietly(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back until the block is done, then deliver them to the handlers
    they were meant for: the renames that publish an output are not interrupted halfway.
    (Python signal handlers can only be set from the main thread; elsewhere this is a no-op.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for sig in _DEFERRED_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is not None:
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in caught:
            signal.raise_signal(sig)
