"""The one place fusegraph touches TensorRT's Python API.

Two packages provide that API under different names: NVIDIA's full `tensorrt` (needs NVIDIA's
own package index and a CUDA driver to build) and TensorRT-RTX, `tensorrt_rtx_bindings`, which
pip installs from PyPI and which parses ONNX and builds engines on a machine without a GPU.
Everything else in fusegraph goes through this module, so the differences between the two stay
here:

* RTX networks are always strongly typed (tensor types come from the model); it has no
  FP16/BF16 builder flags, so `--fp16`/`--bf16` exist only with full TensorRT.
* RTX's ONNX parser, when it adds an IPluginV3 layer, `dlopen`s the unversioned
  `libtensorrt_rtx.so` to reach a private API. The pip wheel ships only `libtensorrt_rtx.so.1`,
  so the lookup fails inside a `noexcept` static initializer and the process dies in
  `std::terminate()` ("terminate called without an active exception"), GPU or not.
  `_load_rtx_libraries` works around it in-process: it loads the two libraries through a
  private folder of symlinks that also holds `libtensorrt_rtx.so`, so the parser's `$ORIGIN`
  RPATH finds it (see plugins/repro_rtx_plugin.py for the reproducer).
* Engines can only be deserialized (and so inspected with IEngineInspector) where a CUDA
  driver runs them; the builder's verbose log carries the same per-layer report, which
  `CapturingLogger` keeps.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
from functools import lru_cache
from typing import Any

from fusegraph.errors import InputError

INSTALL_HINT = (
    "install TensorRT: `pip install tensorrt` (full TensorRT, with NVIDIA's libraries and a "
    "CUDA driver) or `pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs` "
    "(TensorRT-RTX; parses and builds without a GPU)"
)

_RTX_LIBS = ("libtensorrt_rtx.so.1", "libtensorrt_onnxparser_rtx.so.1")


def _load_rtx_libraries() -> str | None:
    """Load TensorRT-RTX's libraries from a folder where the parser also finds `libtensorrt_rtx.so`.

    Must run before `tensorrt_rtx_bindings` is first imported: the dynamic loader records the
    path a library was opened under, and the parser's RPATH ($ORIGIN) resolves against it. The
    bindings' own later loads of the real files then reuse these handles (same inode). Returns
    the folder, or None where nothing needed doing (not Linux, no libs wheel, already imported).
    """
    if not sys.platform.startswith("linux") or "tensorrt_rtx_bindings" in sys.modules:
        return None
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or spec.origin is None:
        return None
    src = os.path.dirname(spec.origin)
    if not all(os.path.exists(os.path.join(src, lib)) for lib in _RTX_LIBS):
        return None
    folder = tempfile.mkdtemp(prefix="fusegraph-trt-rtx-")
    atexit.register(shutil.rmtree, folder, True)
    links = {lib: lib for lib in _RTX_LIBS} | {"libtensorrt_rtx.so": "libtensorrt_rtx.so.1"}
    for name, target in links.items():
        os.symlink(os.path.join(src, target), os.path.join(folder, name))
    for lib in _RTX_LIBS:
        ctypes.CDLL(os.path.join(folder, lib), mode=ctypes.RTLD_GLOBAL)
    return folder


@lru_cache(maxsize=None)
def load() -> Any:
    """The TensorRT module: `tensorrt` if it imports, else `tensorrt_rtx_bindings`.

    Set FUSEGRAPH_TENSORRT=tensorrt or =tensorrt_rtx to insist on one of them.
    """
    wanted = os.environ.get("FUSEGRAPH_TENSORRT", "")
    errors = []
    if wanted in ("", "tensorrt"):
        try:
            return importlib.import_module("tensorrt")
        except ImportError as e:  # also a broken install: tensorrt without its libraries
            errors.append(f"tensorrt: {e}")
    if wanted in ("", "tensorrt_rtx"):
        try:
            _load_rtx_libraries()
            return importlib.import_module("tensorrt_rtx_bindings")
        except (ImportError, OSError) as e:
            errors.append(f"tensorrt_rtx_bindings: {e}")
    raise InputError(f"TensorRT is not available ({'; '.join(errors) or wanted!r}); {INSTALL_HINT}")


def available() -> bool:
    """Whether either TensorRT module imports (for skipping tests and commands cleanly)."""
    try:
        load()
    except InputError:
        return False
    return True


def is_rtx() -> bool:
    return load().__name__.startswith("tensorrt_rtx")


def backend() -> dict[str, str]:
    trt = load()
    return {"module": trt.__name__, "version": trt.__version__,
            "flavour": "TensorRT-RTX" if is_rtx() else "TensorRT"}


@lru_cache(maxsize=None)
def _logger_class() -> type:
    trt = load()

    class CapturingLogger(trt.ILogger):
        """Keeps every message at or above `min_severity`, and the builder's layer report.

        TensorRT prints the engine's per-layer report ("Layers:" ...) at VERBOSE once a build
        with detailed profiling verbosity finishes; it is the only layer report available
        where engines cannot be deserialized, so it is kept whatever the threshold.
        """

        def __init__(self, min_severity: Any) -> None:
            trt.ILogger.__init__(self)
            self.min_severity = min_severity
            self.messages: list[tuple[str, str]] = []
            self.layer_report: str | None = None

        def log(self, severity: Any, msg: str) -> None:
            if msg.startswith("Layers:\n"):
                self.layer_report = msg
            if int(severity) <= int(self.min_severity):
                self.messages.append((severity.name, msg))

        def errors(self) -> list[str]:
            return [m for sev, m in self.messages if sev in ("ERROR", "INTERNAL_ERROR")]

        def warnings(self) -> list[str]:
            return [m for sev, m in self.messages if sev == "WARNING"]

    return CapturingLogger


def make_logger(verbose: bool = False) -> Any:
    """A capturing logger; it keeps warnings and errors, or everything when `verbose`."""
    sev = load().ILogger.Severity
    return _logger_class()(sev.VERBOSE if verbose else sev.WARNING)


def create_builder(logger: Any) -> Any:
    return load().Builder(logger)


def create_network(builder: Any, strongly_typed: bool = False) -> Any:
    """An explicit-batch network; RTX networks are strongly typed whatever the flag."""
    trt = load()
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return builder.create_network(flags)


def create_parser(network: Any, logger: Any, plugin_override: bool = False) -> Any:
    """An ONNX parser; `plugin_override` lets a registered plugin take a node that has a local
    function or a native importer (OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)."""
    trt = load()
    parser = trt.OnnxParser(network, logger)
    if plugin_override:
        if not hasattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE"):
            raise InputError(f"{trt.__name__} {trt.__version__}'s ONNX parser has no plugin override "
                             "flag (TensorRT >= 10.9 has it)")
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    return parser


def parser_errors(parser: Any) -> list[dict[str, Any]]:
    """The parser's errors, each with the ONNX node's name, op type and the parser's reason."""
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        out.append({
            "node": e.node_name(), "op": e.node_operator(), "code": e.code().name,
            "reason": e.desc(),
            "local_functions": list(e.local_function_stack()),
        })
    return out


PRECISIONS = ("fp16", "bf16", "tf32")


def create_config(builder: Any, *, precisions: tuple[str, ...] = (), workspace: int | None = None,
                  profiles: list[dict[str, tuple[tuple[int, ...], ...]]] | None = None,
                  detailed_profiling: bool = True) -> Any:
    """A builder config: precision flags, workspace limit (bytes) and optimization profiles.

    `profiles` holds one dict per profile mapping an input name to its (min, opt, max) shapes.
    FP16/BF16 flags exist only in full TensorRT; TensorRT-RTX builds strongly typed networks
    whose precision is the model's own, so asking it for them is an input error.
    """
    trt = load()
    config = builder.create_builder_config()
    for p in precisions:
        flag = getattr(trt.BuilderFlag, p.upper(), None)
        if p not in PRECISIONS or flag is None:
            raise InputError(
                f"--{p} is not supported by {backend()['flavour']} {trt.__version__}: "
                + ("TensorRT-RTX networks are strongly typed, so precision comes from the model's "
                   "tensor types; convert the model (e.g. to fp16) instead" if is_rtx()
                   else f"BuilderFlag has no {p.upper()}"))
        config.set_flag(flag)
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    for shapes in profiles or []:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    if detailed_profiling:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    return config


def attention_layers(network: Any) -> list[Any]:
    """The network's IAttention objects (one per ATTENTION_INPUT boundary layer)."""
    trt = load()
    kind = getattr(trt.LayerType, "ATTENTION_INPUT", None)
    found = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if kind is not None and layer.type == kind:
            layer.__class__ = trt.IAttentionBoundaryLayer  # TensorRT's documented downcast
            found.append(layer.attention)
    return found


def plugin_registry() -> Any:
    return load().get_plugin_registry()


def deserialize(data: bytes, logger: Any) -> tuple[Any, Any]:
    """(runtime, ICudaEngine or None); the engine must not outlive the runtime, so both are
    returned. None means the logger says why: no CUDA driver, unsupported GPU, missing plugin."""
    runtime = load().Runtime(logger)
    return runtime, runtime.deserialize_cuda_engine(data)


def inspector_json(engine: Any) -> str:
    """IEngineInspector's JSON description of every layer of a deserialized engine."""
    trt = load()
    return engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
