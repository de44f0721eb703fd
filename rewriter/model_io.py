"""Loading, validating and saving models, safely.

- Weights in external data files are never read: the model is loaded without them, their
  TensorProtos keep pointing at the files, and a model saved elsewhere gets the files copied
  (streamed) beside it, so a > 2 GB model is rewritten in the memory of its graph alone.
- Bad input is an `InputError` with one line that says what is wrong: a missing, truncated or
  non-ONNX file, a graph with a cycle or a dangling input, an opset this onnx does not know.
- Saving writes a temporary file next to the target and renames it, so no partial output is
  ever left behind, and the input file is never opened for writing.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import onnx
from google.protobuf.message import DecodeError

from .errors import InputError
from .ir import Graph

#: The newest IR version ONNX Runtime 1.31 loads; onnx 1.23 would write 14 by default.
MAX_IR_VERSION = 13
#: Local functions (how fused ops carry their decomposition) need IR version 8.
MIN_IR_VERSION_WITH_FUNCTIONS = 8


def load_model(path: str) -> onnx.ModelProto:
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not an ONNX file")
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InputError(f"{path}: not a valid ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'cannot parse'})") from None
    if not model.HasField("graph") or not model.ir_version:
        raise InputError(f"{path}: not a valid ONNX model (no graph or no IR version; truncated or not ONNX?)")
    return model


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


def save_model(model: onnx.ModelProto, path: str, source_dir: str | None = None) -> None:
    """Write `model` to `path` atomically; copy external data files it references if needed."""
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise InputError(f"{path}: directory {out_dir} does not exist")
    if model.functions and model.ir_version < MIN_IR_VERSION_WITH_FUNCTIONS:
        model.ir_version = MIN_IR_VERSION_WITH_FUNCTIONS
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    copied: list[str] = []
    fd, tmp = tempfile.mkstemp(prefix=".fusegraph-", suffix=".onnx", dir=out_dir)
    os.close(fd)
    try:
        if source_dir is not None and os.path.abspath(source_dir) != out_dir:
            for location in sorted(external_locations(model)):
                src = os.path.join(source_dir, location)
                dst = os.path.join(out_dir, location)
                if not os.path.exists(dst):
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copyfile(src, dst)
                    copied.append(dst)
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        for dst in copied:
            os.unlink(dst)
        raise


def external_locations(model: onnx.ModelProto) -> set[str]:
    """The external data files the model's initializers point at."""
    out: set[str] = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            out.update(e.value for e in t.external_data if e.key == "location")
    return out
