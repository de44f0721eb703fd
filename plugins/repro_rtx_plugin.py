"""Reproducer: TensorRT-RTX's ONNX parser aborts the process when it adds a Python IPluginV3.

    python plugins/repro_rtx_plugin.py            # plain `import tensorrt_rtx_bindings`: aborts
    python plugins/repro_rtx_plugin.py --shim     # through fusegraph.plugins.tensorrt_shim: builds

What happens (tensorrt-rtx-cu13-bindings/-libs 1.7.1.116, Linux x86-64, with or without a GPU):
the parser finds the registered creator and creates the plugin ("Successfully created plugin"),
then, to add the IPluginV3 layer, it `dlopen`s "libtensorrt_rtx.so" to look up
`getPrivateApi_INTERNAL`. The wheel ships only `libtensorrt_rtx.so.1`, the dlopen fails inside
a function-local static initializer of a noexcept function, and libstdc++ calls
std::terminate(): "terminate called without an active exception", SIGABRT, during
`parse()`; no plugin method beyond the constructor has run and the builder is never reached.
(gdb: abort <- std::terminate <- libtensorrt_onnxparser_rtx.so.1 <- parseFromFile; LD_DEBUG=files
shows "file=libtensorrt_rtx.so [0]; dynamically loaded by .../libtensorrt_onnxparser_rtx.so.1"
as the last load.) Any way of making the unversioned name resolve fixes it: a symlink
libtensorrt_rtx.so -> libtensorrt_rtx.so.1 in the tensorrt_rtx_libs folder (the parser's
RPATH is $ORIGIN) or in a folder on LD_LIBRARY_PATH at process start, or fusegraph's
in-process workaround (`tensorrt_shim._load_rtx_libraries`). With it the plugin's build-time
methods run and the engine builds on a CPU-only machine.

This file is also run by tests/engine/test_engine_plugins.py, in a subprocess, to record the
current behaviour: once a TensorRT-RTX release fixes the lookup, that test fails and says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import onnx
from onnx import TensorProto, helper


def make_model(path: str) -> None:
    """One custom node, `ReproIdentity`, for the parser to hand to the plugin."""
    g = helper.make_graph([helper.make_node("ReproIdentity", ["X"], ["Y"], name="repro_node")], "repro",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 8])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shim", action="store_true", help="import TensorRT through fusegraph.plugins.tensorrt_shim")
    args = ap.parse_args()
    if args.shim:
        from fusegraph.plugins import tensorrt_shim

        trt = tensorrt_shim.load()
    else:
        import tensorrt_rtx_bindings as trt

    class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self) -> None:
            for base in (trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
                base.__init__(self)
            self.num_outputs, self.plugin_name, self.plugin_version, self.plugin_namespace = 1, "ReproIdentity", "1", ""
            print("plugin constructed", flush=True)

        def get_capability_interface(self, capability):
            return self

        def clone(self):
            return Plugin()

        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[0])]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            return desc.format == trt.TensorFormat.LINEAR and desc.type == trt.DataType.FLOAT

        def configure_plugin(self, inputs, outputs):
            pass

        def on_shape_change(self, inputs, outputs):
            pass

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([])

        def attach_to_context(self, context):
            return self.clone()

        def set_tactic(self, tactic):
            pass

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            raise RuntimeError("not run here: the repro only builds")

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_version, self.plugin_namespace = "ReproIdentity", "1", ""
            self.field_names = trt.PluginFieldCollection([])

        def create_plugin(self, name, fields, phase):
            return Plugin()

    print(f"{trt.__name__} {trt.__version__}", flush=True)
    creator = Creator()
    assert trt.get_plugin_registry().register_creator(creator, "")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "repro.onnx")
        make_model(path)
        print("parsing", flush=True)
        ok = parser.parse_from_file(path)
    print(f"parsed: {ok}", flush=True)
    if not ok:
        return 1
    layer = network.get_layer(0)
    print(f"layer: {layer.name} {layer.type.name}", flush=True)
    engine = builder.build_serialized_network(network, builder.create_builder_config())
    print(f"built: {engine is not None} ({engine.nbytes if engine else 0} bytes)", flush=True)
    return 0 if engine is not None else 1


if __name__ == "__main__":
    sys.exit(main())
