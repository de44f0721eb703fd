"""TensorRT IPluginV3 adapters around the plain-Python cores in `fusegraph.plugins.core`.

One generic plugin class and one creator class, parameterised by a core class, implement
IPluginV3 with the IPluginV3OneCore/OneBuild/OneRuntime capabilities and IPluginCreatorV3One,
the plugin API that both `tensorrt` and TensorRT-RTX's Python bindings offer. They only
translate between TensorRT's types (DimsExprs, PluginTensorDesc, DataType, PluginField) and
the core's plain values; every decision is the core's.

The ONNX parser creates a plugin for a node whose op type, `plugin_version` (default "1") and
`plugin_namespace` attributes name a registered creator (with OnnxParserFlag
.ENABLE_PLUGIN_OVERRIDE it does so even where the node has a local function); the node's other
attributes arrive as PluginFields.
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Any, Callable

import numpy as np

from fusegraph.plugins import tensorrt_shim

from .core import CORES, NAMESPACE, VERSION, PluginCore

_ROUTING_ATTRIBUTES = {"plugin_version", "plugin_namespace"}  # the parser's, not the op's


@lru_cache(maxsize=None)
def _dtype_maps() -> tuple[dict[Any, str], dict[str, Any]]:
    trt = tensorrt_shim.load()
    to_name = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.BF16: "bfloat16",
               trt.DataType.INT32: "int32", trt.DataType.INT64: "int64", trt.DataType.BOOL: "bool",
               trt.DataType.INT8: "int8"}
    return to_name, {v: k for k, v in to_name.items()}


def dtype_name(dtype: Any) -> str:
    return _dtype_maps()[0].get(dtype, str(dtype))


def fields_to_attributes(core_cls: type[PluginCore], fields: Any) -> dict[str, float | int]:
    """PluginFields (from the parser's ONNX attributes or a serialized engine) -> core attributes."""
    kinds = {f.name: f.kind for f in core_cls.fields}
    attributes = {}
    for f in fields:
        if f.name in _ROUTING_ATTRIBUTES:
            continue
        if f.name not in kinds:
            raise ValueError(f"{core_cls.op} has no attribute {f.name}")
        value = np.asarray(f.data).reshape(-1)[0]
        attributes[f.name] = float(value) if kinds[f.name] == "float" else int(value)
    return attributes


def attributes_to_fields(core: PluginCore) -> Any:
    """Core attributes -> a PluginFieldCollection (what the engine stores for deserialization)."""
    trt = tensorrt_shim.load()
    fields = []
    for f in core.fields:
        value = core.attributes[f.name]
        if f.kind == "float":
            fields.append(trt.PluginField(f.name, np.array([value], np.float32), trt.PluginFieldType.FLOAT32))
        else:
            fields.append(trt.PluginField(f.name, np.array([value], np.int32), trt.PluginFieldType.INT32))
    return trt.PluginFieldCollection(fields)


@lru_cache(maxsize=None)
def plugin_base() -> type:
    """What every fusegraph IPluginV3 shares (the fused ops' plugins here, the collectives'):
    the three capability interfaces on one object, a core that knows the op, nothing to
    precompute at configure time, no tactics, a clone per execution context. Subclasses add
    the op's shapes, types, workspace, fields and enqueue."""
    trt = tensorrt_shim.load()

    class PluginBase(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, core: Any, num_outputs: int) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.core = core
            self.num_outputs = num_outputs
            self.plugin_name = core.op
            self.plugin_namespace = NAMESPACE
            self.plugin_version = VERSION
            self.timing_cache_id = ""

        def get_capability_interface(self, capability: Any) -> Any:
            return self

        def configure_plugin(self, inputs: list[Any], outputs: list[Any]) -> None:
            pass  # shapes arrive with every enqueue; nothing to precompute

        def get_valid_tactics(self) -> list[int]:
            return []

        def set_tactic(self, tactic: int) -> None:
            pass

        def attach_to_context(self, context: Any) -> Any:
            return self.clone()

    return PluginBase


@lru_cache(maxsize=None)
def plugin_classes() -> tuple[type, type]:
    """(Plugin, Creator) classes, made once the TensorRT module is known."""
    trt = tensorrt_shim.load()

    class Plugin(plugin_base()):
        def __init__(self, core: PluginCore) -> None:
            super().__init__(core, len(core.outputs))

        def clone(self) -> "Plugin":
            return Plugin(type(self.core)(**self.core.attributes))

        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            names = self.core.output_dtypes([dtype_name(t) for t in input_types])
            return [_dtype_maps()[1][n] for n in names]

        def get_output_shapes(self, inputs: list[Any], shape_inputs: list[Any], expr_builder: Any) -> list[Any]:
            self.core.check_input_count(len(inputs))
            refs = self.core.output_dims([len(i) for i in inputs])
            return [trt.DimsExprs([inputs[i][d] for i, d in out]) for out in refs]

        def supports_format_combination(self, pos: int, in_out: list[Any], num_inputs: int) -> bool:
            descs = [io.desc for io in in_out[: pos + 1]]
            if descs[pos].format != trt.TensorFormat.LINEAR:
                return False
            return self.core.supports(pos, [dtype_name(d.type) for d in descs], num_inputs)

        def on_shape_change(self, inputs: list[Any], outputs: list[Any]) -> None:
            self.core.check_shapes([tuple(i.dims) for i in inputs])

        def get_workspace_size(self, inputs: list[Any], outputs: list[Any]) -> int:
            return self.core.workspace_bytes([tuple(i.min) for i in inputs], [tuple(i.max) for i in inputs])

        def get_fields_to_serialize(self) -> Any:
            return attributes_to_fields(self.core)

        def enqueue(self, input_desc: list[Any], output_desc: list[Any], inputs: list[int],
                    outputs: list[int], workspace: int, stream: int) -> None:
            shapes = [tuple(d.dims) for d in input_desc]
            # TensorRT reserved workspace_bytes over the profile, at least what these shapes need
            scratch = (int(workspace), self.core.workspace_bytes(shapes, shapes)) if workspace else (0, 0)
            self.core.enqueue(shapes, [dtype_name(d.type) for d in input_desc],
                              [int(p) for p in inputs], [int(p) for p in outputs], int(stream), scratch)

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self, core_cls: type[PluginCore]) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.core_cls = core_cls
            self.name = core_cls.op
            self.plugin_namespace = NAMESPACE
            self.plugin_version = VERSION
            self.field_names = attributes_to_fields(core_cls())

        def create_plugin(self, name: str, fields: Any, phase: Any) -> Plugin:
            return Plugin(self.core_cls(**fields_to_attributes(self.core_cls, fields)))

    return Plugin, Creator


_registered: dict[str, Any] = {}  # creators must outlive the registry's references to them


def register_creators(registered: dict[str, Any], creators: dict[str, Callable[[], Any]]) -> list[dict[str, str]]:
    """Register each op's creator once (idempotent); `registered` keeps the creators, which must
    outlive the registry's references to them. Returns what `registered` holds."""
    registry = tensorrt_shim.plugin_registry()
    for op, make in creators.items():
        if op not in registered:
            creator = make()
            if not registry.register_creator(creator, NAMESPACE):
                raise RuntimeError(f"TensorRT refused to register the {op} plugin creator")
            registered[op] = creator
    return [{"name": op, "version": VERSION, "namespace": NAMESPACE} for op in registered]


def register_all() -> list[dict[str, str]]:
    """Register a creator for every fused op with a kernel (idempotent); returns what is registered."""
    _, creator_cls = plugin_classes()
    return register_creators(_registered, {op: partial(creator_cls, core_cls) for op, core_cls in CORES.items()})
