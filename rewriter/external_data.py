"""Where a tensor's bytes are, checked before anything reads or copies them.

ONNX lets a TensorProto keep its data in another file (`location`, `offset`, `length`); a model
file is untrusted input, so every such reference is resolved here once and refused (InputError)
unless it names a regular file inside the model's folder — no absolute path, no `..` or symlink
leading out, as `onnx.checker` requires — that holds all the bytes the tensor's shape needs.
Tensors kept inline must hold exactly the bytes their shape needs, too: a short `raw_data` loads
in onnx and fails later in ONNX Runtime.

`repack` streams the referenced bytes of every external tensor of a model into one new file
(what `model_io.save_model` writes beside an output in another folder) and points the tensors at
it: only what the model references is copied, in chunks, never the whole weights in memory.

Cost: one stat per external file and O(1) per tensor for the checks; `repack` reads each
referenced byte once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

import numpy as np
import onnx
from onnx import helper

from .errors import InputError

#: Elements of these types are packed below a byte; the rest take their numpy itemsize.
_PACKED_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in
                (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
                if hasattr(onnx.TensorProto, name)}
#: Types whose storage size this module does not vouch for (variable length or 6-bit packing).
_UNSIZED = {onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING} | {
    getattr(onnx.TensorProto, name) for name in ("FLOAT6E2M3", "FLOAT6E3M2") if hasattr(onnx.TensorProto, name)}
#: Typed fields with one entry per element (complex types: two), for the inline check.
_ONE_PER_ELEMENT = {"float_data", "int64_data", "double_data", "uint64_data", "int32_data"}
#: Offsets of big tensors in a repacked file are aligned as `onnx.save` aligns them, so that
#: ONNX Runtime can map them instead of reading them.
ALIGN_THRESHOLD = 1 << 20
ALIGNMENT = 1 << 16
_CHUNK = 8 << 20


@dataclass(frozen=True)
class Extent:
    """The bytes of one external tensor: `length` bytes of `path` from `offset`."""
    path: str
    offset: int
    length: int


def element_count(t: onnx.TensorProto) -> int:
    if any(d < 0 for d in t.dims):
        raise InputError(f"tensor {t.name!r}: negative dimension in its shape {list(t.dims)}")
    return math.prod(t.dims)


def nbytes(t: onnx.TensorProto) -> int | None:
    """The bytes the tensor's shape and type need, or None where that is not fixed."""
    count = element_count(t)
    if t.data_type in _UNSIZED or t.data_type not in onnx.TensorProto.DataType.values():
        return None
    bits = _PACKED_BITS.get(t.data_type) or np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize * 8
    return (count * bits + 7) // 8


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers and tensor attributes, in subgraphs and
    local functions too (all of them may hold external data)."""
    yield from _graph_tensors(model.graph)
    for f in model.functions:
        for n in f.node:
            yield from _attribute_tensors(n)


def _graph_tensors(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from g.initializer
    for sparse in g.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for n in g.node:
        yield from _attribute_tensors(n)


def _attribute_tensors(n: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for a in n.attribute:
        if a.HasField("t"):
            yield a.t
        yield from a.tensors
        if a.HasField("sparse_tensor"):
            yield a.sparse_tensor.values
            yield a.sparse_tensor.indices
        if a.HasField("g"):
            yield from _graph_tensors(a.g)
        for sub in a.graphs:
            yield from _graph_tensors(sub)


def is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def locate(t: onnx.TensorProto, base_dir: str, sizes: dict[str, int] | None = None) -> Extent:
    """Resolve an external tensor's bytes inside `base_dir`, or raise InputError saying why.
    `sizes` caches file sizes across calls (one stat per file)."""
    info = {e.key: e.value for e in t.external_data}
    where = f"tensor {t.name!r}: external data"
    if len(info) != len(t.external_data):  # readers disagree on which of two locations counts
        raise InputError(f"{where} names a key twice")
    location = info.get("location", "")
    if not location:
        raise InputError(f"{where} has no location")
    if "\0" in location:
        raise InputError(f"{where} location {location!r} holds a NUL byte")
    if os.path.isabs(location) or location.startswith(("/", "\\")):
        raise InputError(f"{where} location {location!r} is an absolute path; it must be relative to the model's folder")
    root = os.path.realpath(base_dir)
    path = os.path.realpath(os.path.join(root, location))
    if os.path.commonpath([root, path]) != root:
        raise InputError(f"{where} location {location!r} leads outside the model's folder {base_dir}")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise InputError(f"{where} has a non-integer offset or length") from None
    if offset < 0 or (length is not None and length < 0):
        raise InputError(f"{where} has a negative offset or length")
    needed = nbytes(t)
    if length is not None and needed is not None and length != needed:
        raise InputError(f"{where} length {length} is not the {needed} bytes its shape {list(t.dims)} needs")
    length = needed if length is None else length
    if length is None:
        raise InputError(f"{where} has no length and a type of no fixed size")
    sizes = {} if sizes is None else sizes
    if path not in sizes:
        if not os.path.exists(path):
            raise InputError(f"{where} file {location!r} is missing from {base_dir}")
        if not os.path.isfile(path):
            raise InputError(f"{where} location {location!r} is not a regular file")
        sizes[path] = os.path.getsize(path)
    if offset + length > sizes[path]:
        raise InputError(f"{where} needs bytes {offset}..{offset + length} of {location!r}, "
                         f"which has {sizes[path]} (truncated?)")
    return Extent(path, offset, length)


def check_inline(t: onnx.TensorProto) -> None:
    """Refuse an inline tensor whose data does not fill its shape (or overfills it)."""
    needed = nbytes(t)
    if t.data_type == onnx.TensorProto.STRING and len(t.string_data) != element_count(t):
        raise InputError(f"tensor {t.name!r}: holds {len(t.string_data)} strings, "
                         f"its shape {list(t.dims)} needs {element_count(t)}")
    if needed is None:
        return
    if t.HasField("raw_data"):
        if len(t.raw_data) != needed:
            raise InputError(f"tensor {t.name!r}: raw_data holds {len(t.raw_data)} bytes, "
                             f"its shape {list(t.dims)} needs {needed}")
        return
    if t.data_type in _PACKED_BITS:
        return  # packed sub-byte typed data: left to onnx
    field = helper.tensor_dtype_to_field(t.data_type)
    if field not in _ONE_PER_ELEMENT:
        return
    count = element_count(t) * (2 if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1)
    held = len(getattr(t, field))
    if held != count:
        raise InputError(f"tensor {t.name!r}: holds {held} values in {field}, its shape {list(t.dims)} needs {count}")


def check_model(model: onnx.ModelProto, base_dir: str | None) -> list[Extent]:
    """Check every tensor of the model (external ones only where `base_dir` is known);
    return the extents of the external ones. One pass over every node's attributes: about
    1 us a node, so callers do it once per model."""
    return check_tensors(all_tensors(model), base_dir)


def check_tensors(tensors: Iterable[onnx.TensorProto], base_dir: str | None) -> list[Extent]:
    sizes: dict[str, int] = {}
    extents = []
    for t in tensors:
        if is_external(t):
            if base_dir is not None:
                extents.append(locate(t, base_dir, sizes))
        else:
            check_inline(t)
    return extents


def read(t: onnx.TensorProto, base_dir: str) -> bytes:
    """The bytes of one external tensor (for small ones: constants a pattern tests)."""
    extent = locate(t, base_dir)
    with open(extent.path, "rb") as f:
        f.seek(extent.offset)
        data = f.read(extent.length)
    if len(data) != extent.length:
        raise InputError(f"tensor {t.name!r}: external data file {extent.path} was truncated while being read")
    return data


def repack(model: onnx.ModelProto, base_dir: str, out: BinaryIO, location: str) -> int:
    """Copy the bytes of every external tensor into `out` (open for writing at position 0) and
    point the tensors at `location` there; return how many tensors were copied."""
    tensors = [t for t in all_tensors(model) if is_external(t)]
    sizes: dict[str, int] = {}
    placed = sorted(((locate(t, base_dir, sizes), t) for t in tensors), key=lambda p: (p[0].path, p[0].offset))
    position = 0
    source: BinaryIO | None = None
    try:
        for extent, t in placed:
            if source is None or source.name != extent.path:
                if source is not None:
                    source.close()
                source = open(extent.path, "rb")
            if extent.length >= ALIGN_THRESHOLD and position % ALIGNMENT:
                pad = ALIGNMENT - position % ALIGNMENT
                out.write(b"\0" * pad)
                position += pad
            source.seek(extent.offset)
            left = extent.length
            while left:
                chunk = source.read(min(left, _CHUNK))
                if not chunk:
                    raise InputError(f"tensor {t.name!r}: external data file {extent.path} was truncated while being copied")
                out.write(chunk)
                left -= len(chunk)
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(position)), ("length", str(extent.length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            position += extent.length
    finally:
        if source is not None:
            source.close()
    return len(placed)
