"""The graph objects the ONNX ecosystem passes around, to and from the ModelProto fusegraph rewrites.

`fusegraph.rewrite` takes any of them and gives back the kind it got:

| kind | in | back |
|---|---|---|
| `onnx.ModelProto` | as is | a new ModelProto |
| `onnx_graphsurgeon.Graph` | `gs.export_onnx` | `gs.import_onnx` of the result |
| `onnx_ir.Model` (also `onnxscript.ir.Model`) | `onnx_ir.serde.serialize_model` | `deserialize_model` |
| `ONNXProgram` (`torch.onnx.export(..., dynamo=True)`) | `model_proto` | a new one, same `exported_program` |

A path is not here: it is rewritten file to file (`fusegraph.rewrite_file`), so external data is
never loaded. The kinds are recognised through the modules already imported (an object of a
package's class exists only once that package is), so none of the optional packages is imported
to tell them apart. Each conversion costs one serialization of the graph and its weights, which
a ModelProto does not pay.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import onnx

from .errors import InputError

#: What `to_proto` accepts, for messages.
KINDS = "onnx.ModelProto, a path, onnx_graphsurgeon.Graph, onnx_ir.Model or torch.onnx.ONNXProgram"


def to_proto(model: Any) -> tuple[onnx.ModelProto, Callable[[onnx.ModelProto], Any]]:
    """The ModelProto of `model` (one the caller owns, so it may be edited in place only when
    `model` was not one already) and the function that turns a rewritten ModelProto back into
    `model`'s kind."""
    if isinstance(model, onnx.ModelProto):
        return model, lambda proto: proto
    gs = sys.modules.get("onnx_graphsurgeon")
    if gs is not None and isinstance(model, gs.Graph):
        return gs.export_onnx(model), gs.import_onnx
    ir = sys.modules.get("onnx_ir")
    if ir is not None and isinstance(model, ir.Model):
        return ir.serde.serialize_model(model), ir.serde.deserialize_model
    program_type = _onnx_program_type()
    if program_type is not None and isinstance(model, program_type):
        exported = model.exported_program
        return model.model_proto, lambda proto: program_type(_ir().serde.deserialize_model(proto), exported)
    raise InputError(f"cannot rewrite a {type(model).__module__}.{type(model).__qualname__}: "
                     f"pass {KINDS}")


def _onnx_program_type() -> type | None:
    """torch.onnx.ONNXProgram if torch's exporter has been imported (else none can exist)."""
    exporter = sys.modules.get("torch.onnx")
    return getattr(exporter, "ONNXProgram", None) if exporter is not None else None


def _ir():
    import onnx_ir
    return onnx_ir
