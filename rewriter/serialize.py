"""A model's bytes in pieces: what `SerializeToString` gives, never all of it in memory at once.

`SerializeToString` builds the whole file in memory beside the model (in a buffer that grows by
doubling) before a byte of it is used; for a model of 20 MB of weights that is two copies more
at the peak. `serialized(model)` yields the same bytes a few at a time: the elements of the
model's and its graph's repeated message fields (nodes, initializers, value infos, opset
imports, functions) one by one, every other field alone. A message's fields serialize in
field-number order, which `ListFields` gives; the graph is written behind its length, summed
from its pieces by a first pass (each piece is serialized twice: CPU for memory).

`substitute` writes another element in an element's place (by field name): shape inference is
handed the model with each weight reduced to its type (`ir.infer_types`) without a copy of the
model being made first.

A model or graph holding fields this onnx does not know (kept as unknown fields when parsed) is
serialized at once, as `SerializeToString` would, unknown fields included (with `substitute`,
for inference, they are left out: nothing reads them there).
"""

from __future__ import annotations

from typing import Callable, Iterator

import onnx
from google.protobuf import unknown_fields
from google.protobuf.message import Message

#: (field name, element) -> the element to write in its place.
Substitute = Callable[[str, Message], Message]


def serialized(model: onnx.ModelProto, substitute: Substitute | None = None) -> Iterator[bytes]:
    """`model.SerializeToString()` in pieces (with `substitute`: of the model it describes)."""
    if substitute is None and (unknown_fields.UnknownFieldSet(model) or unknown_fields.UnknownFieldSet(model.graph)):
        yield model.SerializeToString()
        return
    for field, value in model.ListFields():
        if field.name == "graph":
            yield _key(field.number) + _varint(sum(len(piece) for piece in _pieces(value, substitute)))
            yield from _pieces(value, substitute)
        else:
            yield from _field_pieces(model, field, value, substitute)


def _pieces(message: Message, substitute: Substitute | None) -> Iterator[bytes]:
    for field, value in message.ListFields():
        yield from _field_pieces(message, field, value, substitute)


def _field_pieces(message: Message, field, value, substitute: Substitute | None) -> Iterator[bytes]:
    """One field of `message`, serialized: a repeated message element by element."""
    if field.is_repeated and field.message_type is not None:
        key = _key(field.number)
        for item in value:
            data = (item if substitute is None else substitute(field.name, item)).SerializeToString()
            yield key + _varint(len(data)) + data
        return
    alone = type(message)()
    if field.is_repeated:
        getattr(alone, field.name).extend(value)
    elif field.message_type is not None:
        getattr(alone, field.name).CopyFrom(value)
    else:
        setattr(alone, field.name, value)
    yield alone.SerializeToString()


def _key(number: int) -> bytes:
    """The tag of a length-delimited field."""
    return _varint(number << 3 | 2)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
