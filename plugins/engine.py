"""From an ONNX model to a TensorRT engine, with a report of what TensorRT made of it.

`build_engine` parses (optionally after rewriting), sets up optimization profiles for dynamic
inputs, handles opset-23 `Attention` that has no dedicated kernel, builds, and writes the
engine atomically (a temp file renamed at the end: a failed build leaves nothing behind). Its
report says which nodes TensorRT could not parse (with the parser's reason), what became of
every `fusegraph` fused op (plugin layer, native attention/normalization, or the inlined
local-function body), and the engine's layers.

`inspect_engine` describes an engine file. Deserializing one needs a CUDA driver and a GPU the
engine supports; where that fails (CPU-only machines, TensorRT-RTX on compute capability 9.0)
it falls back on the report `build_engine` wrote beside the engine, which holds the builder's
own per-layer log.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from fusegraph.api import rewrite_file
from fusegraph.errors import InputError
from fusegraph.ir import Graph
from fusegraph.model_io import load_checked, validate

from . import tensorrt_shim as shim

DOMAIN = "fusegraph"
PLUGIN_NAMESPACE = "fusegraph"  # never "", so the override cannot capture standard ONNX ops
DEDICATED_KERNEL_MISSING = "not supported by a dedicated kernel"
#: What the runtime's errors say when the file itself is no engine (measured on TensorRT-RTX
#: 1.7 with other files, and engines cut at 10 bytes to 100 KB).
_NOT_AN_ENGINE = ("magicTag", "readHeader", "Serialization assertion")

Shape = tuple[int, ...]


class ParseError(InputError):
    """TensorRT's parser rejected the model; `errors` lists the nodes and the parser's reasons."""

    def __init__(self, model: str, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        nodes = ", ".join(f"{e['node'] or '?'} ({e['op'] or '?'})" for e in errors)
        super().__init__(f"TensorRT cannot parse {model}: {len(errors)} error(s) at {nodes}")


class BuildError(InputError):
    """The builder produced no engine; `errors` holds what it logged."""

    def __init__(self, model: str, errors: list[str]) -> None:
        self.errors = errors
        super().__init__(f"TensorRT could not build an engine from {model}: "
                         + (errors[-1] if errors else "no error was logged"))


def parse_dims(text: str) -> Shape:
    """'1x128' -> (1, 128); '' or 'scalar' -> ()."""
    if text in ("", "scalar"):
        return ()
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise InputError(f"bad shape {text!r}: expected dimensions joined by 'x', e.g. 1x128") from None
    if any(d < 0 or d >= 1 << 63 for d in dims):
        raise InputError(f"bad shape {text!r}: dimensions must be >= 0 and fit in int64")
    return dims


def _profile(network: Any, shapes: dict[str, Shape],
             ranges: dict[str, dict[str, Shape]]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """One optimization profile covering every input with a dynamic dimension.

    `shapes` fixes min = opt = max; `ranges` gives any of min/opt/max (a missing opt is max,
    a missing min is opt). Static inputs need nothing; naming one checks the shape matches.
    """
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    described = ", ".join(f"{n}:{'x'.join(str(d) for d in s) or 'scalar'}" for n, s in inputs.items())
    unknown = sorted((set(shapes) | set(ranges)) - set(inputs))
    if unknown:
        raise InputError(f"no input named {', '.join(unknown)}; the model's inputs are {described} (-1 = dynamic)")
    profile = {}
    for name, dims in inputs.items():
        if name in shapes:
            lo = opt = hi = shapes[name]
        elif name in ranges:
            r = ranges[name]
            hi = r.get("max") or r.get("opt") or r.get("min")
            opt = r.get("opt") or hi
            lo = r.get("min") or opt
        elif -1 in dims:
            raise InputError(f"input {name} has dynamic dimensions {dims}; give its shape with "
                             f"--shape {name}:DIMS or --min/--opt/--max {name}:DIMS (inputs: {described})")
        else:
            continue
        for s in (lo, opt, hi):
            if len(s) != len(dims) or any(d != -1 and d != v for d, v in zip(dims, s)):
                raise InputError(f"shape {'x'.join(map(str, s))} does not fit input {name} of shape {dims}")
        if any(a > b for a, b in zip(lo, opt)) or any(a > b for a, b in zip(opt, hi)):
            raise InputError(f"input {name}: need min <= opt <= max, got {lo}, {opt}, {hi}")
        profile[name] = (lo, opt, hi)
    return profile


def _fused_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN]


def _route_to_plugins(model: onnx.ModelProto, registered: set[str]) -> list[str]:
    """Point every fused node that has a registered plugin at the `fusegraph` plugin namespace.

    The parser looks plugins up by op type, the `plugin_version` attribute (default "1") and the
    `plugin_namespace` attribute (default ""), ignoring the node's domain; with the override
    flag on, a plugin in namespace "" would also capture standard ops of the same name (ONNX
    `Attention`). Nodes without a plugin keep their local function.
    """
    routed = []
    for node in _fused_nodes(model):
        if node.op_type in registered and not any(a.name == "plugin_namespace" for a in node.attribute):
            node.attribute.append(helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE))
            routed.append(node.name)
    return routed


# Fused ops whose ONNX-standard namesake means the same thing. TensorRT's parser dispatches on
# op type alone (the domain is ignored) and prefers a native importer to a local function, so
# these become native layers (for Attention, a fused attention kernel), which is what we want.
SAME_AS_ONNX = {"Attention", "Gelu"}


def _unshadow(model: onnx.ModelProto, parser: Any) -> dict[str, str]:
    """Rename fused ops that a native importer would otherwise take with the wrong semantics (or
    refuse: `_unlike_onnx`).

    fusegraph's RotaryEmbedding (cos/sin broadcastable to [B, H, S, rotary_dim]) shares its name
    with ONNX-23 RotaryEmbedding (cos/sin caches [S, rotary_dim/2]); TensorRT imports it natively
    and rejects or misreads the caches. Renaming the op and its local function ("X" ->
    "X_fusegraph") makes the parser inline the function. Nodes routed to a plugin keep their
    name (the plugin override comes before native importers). Returns {old: new}.
    """
    renamed = {f.name: f"{f.name}_{DOMAIN}" for f in model.functions
               if f.domain == DOMAIN and f.name not in SAME_AS_ONNX and parser.supports_operator(f.name)}
    for f in model.functions:
        if f.domain == DOMAIN and f.name in renamed:
            f.name = renamed[f.name]
    unlike = set()
    for nodes in (model.graph.node, *(f.node for f in model.functions)):
        for node in nodes:
            routed = any(a.name == "plugin_namespace" for a in node.attribute)
            if node.domain == DOMAIN and node.op_type in renamed and not routed:
                node.op_type = renamed[node.op_type]
            elif node.domain == DOMAIN and node.op_type in SAME_AS_ONNX and not routed and _unlike_onnx(node):
                unlike.add(node.op_type)
                node.op_type = f"{node.op_type}_{DOMAIN}"
    for f in [f for f in model.functions if f.domain == DOMAIN and f.name in unlike]:
        twin = onnx.FunctionProto()
        twin.CopyFrom(f)
        twin.name = f"{f.name}_{DOMAIN}"
        model.functions.append(twin)
    return {**renamed, **{name: f"{name}_{DOMAIN}" for name in unlike}}


def _unlike_onnx(node: onnx.NodeProto) -> bool:
    """A `SAME_AS_ONNX` node whose attributes the native importer would refuse: a soft-capped
    `Attention` (TensorRT-RTX 1.7: "Setting softcap is not supported"). It is called through a
    renamed twin of its function, which the parser inlines."""
    return any(a.name == "softcapped" and a.i for a in node.attribute)


def _name_overloads(model: onnx.ModelProto) -> dict[str, str]:
    """Give each overload of a fused op that has several a name of its own, callers included.

    Below opset 15 fused ops' bodies are per element type, told apart by `overload`
    (`fusegraph.ops.fused_ops`); TensorRT's parser looks local functions up by name alone (measured
    with TensorRT-RTX 1.7: every caller gets the same body, and the other type fails to parse).
    "Gelu" overload "float16" becomes "Gelu_float16". Nodes routed to a plugin keep their name.
    Returns {"Gelu/float16": "Gelu_float16"}.
    """
    overloads = collections.defaultdict(set)
    for f in model.functions:
        if f.domain == DOMAIN and f.overload:
            overloads[f.name].add(f.overload)
    renamed = {(name, o): f"{name}_{o}" for name, found in overloads.items() if len(found) > 1 for o in found}
    for item in (*model.functions, *model.graph.node):
        new = renamed.get((item.name if isinstance(item, onnx.FunctionProto) else item.op_type, item.overload))
        if item.domain != DOMAIN or new is None:
            continue
        if isinstance(item, onnx.FunctionProto):
            item.name, item.overload = new, ""
        elif not any(a.name == "plugin_namespace" for a in item.attribute):
            item.op_type, item.overload = new, ""
    return {f"{name}/{o}": new for (name, o), new in renamed.items()}


_FUNCTION_CALL = re.compile(r"\| ([^|\]]+?) \((\w+)\)")
_ENGINE_LAYER = re.compile(r"^Name: (?P<name>.*?), LayerType: (?P<type>[^,]*),.*?"
                           r"TacticName: (?P<tactic>[^,]*), StreamId: \d+, Metadata: (?P<metadata>.*)$")


def _callers(metadata: str) -> set[str]:
    """Names of the local-function call nodes a layer was inlined from ('[ONNX Layer: x | n (Op)]')."""
    return {m.group(1) for m in _FUNCTION_CALL.finditer(metadata or "")}


def engine_layers_from_log(report: str | None) -> list[dict[str, str]]:
    """Layers from the builder's verbose "Layers:" report (one 'Name: ..., LayerType: ...' line each)."""
    layers = []
    for line in (report or "").splitlines():
        m = _ENGINE_LAYER.match(line)
        if m:
            layers.append(m.groupdict())
    return layers


def engine_layers_from_inspector(text: str) -> list[dict[str, str]]:
    """Layers from IEngineInspector's JSON (dicts at DETAILED verbosity, bare names otherwise)."""
    layers = []
    for layer in json.loads(text).get("Layers", []):
        if isinstance(layer, str):
            layers.append({"name": layer, "type": "", "tactic": "", "metadata": ""})
        else:
            layers.append({"name": layer.get("Name", ""), "type": layer.get("LayerType", ""),
                           "tactic": str(layer.get("TacticName", "")), "metadata": layer.get("Metadata", "")})
    return layers


def _network_layers(network: Any) -> list[dict[str, str]]:
    out = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        out.append({"name": layer.name, "type": layer.type.name, "metadata": layer.metadata})
    return out


def _fused_op_report(fused: list[tuple[str, str]], network_layers: list[dict[str, str]],
                     engine_layers: list[dict[str, str]]) -> list[dict[str, Any]]:
    """What each fused node (name, op) became: a plugin layer, a native layer, or its body."""
    report = []
    for name, op in fused:
        marker = f"[ONNX Layer: {name}]"  # a body node without a name takes its caller's
        mine = [l for l in network_layers if name in _callers(l["metadata"]) or marker in l["metadata"]
                or (l["type"] == "PLUGIN_V3" and l["name"] == name)]
        types = [l["type"] for l in mine]
        if "PLUGIN_V3" in types:
            how = "plugin"
        elif "ATTENTION_INPUT" in types or "ATTENTION_OUTPUT" in types:
            how = "native attention"
        elif "NORMALIZATION" in types:
            how = "native normalization"
        elif "ROTARY_EMBEDDING" in types:
            how = "native rotary embedding"
        elif mine:
            how = "inlined local function"
        else:
            how = "not found in the network"
        report.append({
            "node": name, "op": op, "implementation": how,
            "network_layer_types": dict(collections.Counter(types)),
            "engine_layers": [l["name"] for l in engine_layers
                              if name in _callers(l["metadata"]) or marker in l["metadata"]],
        })
    return report


class _HeldStderr:
    def __init__(self) -> None:
        self.text = b""

    def release(self) -> None:
        """Pass on what was held back (the build was not retried, so it is news)."""
        if self.text:
            os.write(2, self.text)
            self.text = b""


@contextlib.contextmanager
def _stderr_held_back(hold: bool):
    """Hold back what the library writes to fd 2 during a build that may be retried.

    TensorRT-RTX prints "Internal Error: MyelinCheckException ... not supported by a dedicated
    kernel" straight to stderr before the auto-decomposable retry succeeds; users should not see
    an internal error for a build that worked. If the build is not retried, `release()` it.
    """
    held = _HeldStderr()
    if not hold:
        yield held
        return
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            held.text = f.read()


def _attention_policy(mode: str | bool) -> str:
    if mode in ("auto", "always", "never"):
        return str(mode)
    if mode is True:
        return "always"
    if mode is False:
        return "never"
    raise InputError(f"decomposable_attention must be 'auto', 'always' or 'never', not {mode!r}")


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make engines private to their builder
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def report_path(engine_path: str | os.PathLike) -> Path:
    """Where `build_engine` writes its report beside the engine (read back by `inspect_engine`)."""
    return Path(f"{os.fspath(engine_path)}.json")


def _rewrite(model_path: Path, workdir: str) -> tuple[Path, dict[str, Any]]:
    out = Path(workdir) / f"{model_path.stem}.rewritten.onnx"
    result = rewrite_file(str(model_path), str(out), target="tensorrt")
    summary = {"nodes_before": result.nodes_before, "nodes_after": result.nodes_after,
               "fusions": dict(result.per_rule)}
    return out, summary


def build_engine(model_path: str | os.PathLike, out_path: str | os.PathLike, *,
                 precisions: tuple[str, ...] = (), strongly_typed: bool = False,
                 shapes: dict[str, Shape] | None = None,
                 ranges: dict[str, dict[str, Shape]] | None = None,
                 plugins: bool = False, decomposable_attention: str | bool = "auto",
                 rewrite: bool = False, workspace: int | None = None,
                 write_report: bool = True) -> dict[str, Any]:
    """Build `model_path` into a serialized engine at `out_path`; return the build report.

    decomposable_attention: 'auto' builds as the model asks and, only if the builder rejects an
    attention for lack of a dedicated kernel, marks every attention decomposable and builds
    again; 'always' marks them up front (measured: no change to engines that have a kernel);
    'never' leaves them. Raises ParseError/BuildError (InputErrors) and writes nothing then.
    """
    model_path, out_path = Path(model_path), Path(out_path)
    if not model_path.is_file():
        raise InputError(f"no such model file: {model_path}")
    policy = _attention_policy(decomposable_attention)
    shim.load()  # a missing TensorRT is an InputError before any work
    report: dict[str, Any] = {"model": str(model_path), "engine": str(out_path), "backend": shim.backend()}
    with tempfile.TemporaryDirectory(prefix="fusegraph-build-") as work:
        if rewrite:
            parsed_path, report["rewrite"] = _rewrite(model_path, work)
            report["rewritten_model"] = str(parsed_path)
        else:
            parsed_path = model_path
        # What `rewrite` refuses, TensorRT's parser must not see either: a truncated file, an IR
        # version or opset onnx does not know, external data outside the model's folder, a
        # cycle or a dangling input (the parser accepts some of these, or fails in many lines).
        model, _ = load_checked(str(parsed_path))
        validate(model, Graph(model, str(parsed_path.parent)), str(model_path))
        fused = [(n.name, n.op_type) for n in _fused_nodes(model)]

        logger = shim.make_logger(verbose=True)
        registered: list[dict[str, str]] = []
        if plugins:
            from fusegraph.plugins import register_all  # imports TensorRT's plugin base classes
            registered = register_all()
            report["plugins_registered"] = registered
            report["routed_to_plugins"] = _route_to_plugins(model, {p["name"] for p in registered})
        builder = shim.create_builder(logger)
        network = shim.create_network(builder, strongly_typed)
        parser = shim.create_parser(network, logger, plugin_override=plugins)
        report["renamed_for_parser"] = {**_name_overloads(model), **_unshadow(model, parser)}
        # The path lets the parser find external weight files next to the model.
        if not parser.parse(model.SerializeToString(), str(parsed_path)):
            errors = shim.parser_errors(parser)
            report["parse"] = {"unsupported": errors}
            raise ParseError(str(model_path), errors)
        network_layers = _network_layers(network)
        report["parse"] = {
            "onnx_nodes": len(model.graph.node), "network_layers": len(network_layers),
            "network_layer_types": dict(collections.Counter(l["type"] for l in network_layers)),
            "unsupported": [],
        }

        profile = _profile(network, shapes or {}, ranges or {})
        report["inputs"] = [
            {"name": network.get_input(i).name, "dtype": network.get_input(i).dtype.name,
             "shape": list(network.get_input(i).shape),
             **({"min": list(profile[n][0]), "opt": list(profile[n][1]), "max": list(profile[n][2])}
                if (n := network.get_input(i).name) in profile else {})}
            for i in range(network.num_inputs)]
        config = shim.create_config(builder, precisions=precisions, workspace=workspace,
                                    profiles=[profile] if profile else [])

        attention = shim.attention_layers(network)
        attn_report: dict[str, Any] = {"layers": [a.name for a in attention], "decomposable": [],
                                       "reason": None}
        if attention and policy == "always":
            attn_report["reason"] = "asked for (--decomposable-attention always)"
        start = time.perf_counter()
        for attempt in (1, 2):
            if attn_report["reason"]:
                for a in attention:
                    a.decomposable = True
                attn_report["decomposable"] = [a.name for a in attention]
            seen = len(logger.messages)
            may_retry = attempt == 1 and policy == "auto" and bool(attention)
            with _stderr_held_back(may_retry) as held:
                serialized = builder.build_serialized_network(network, config)
            build_errors = [m for sev, m in logger.messages[seen:] if sev in ("ERROR", "INTERNAL_ERROR")]
            if serialized is None and may_retry and any(DEDICATED_KERNEL_MISSING in m for m in build_errors):
                attn_report["reason"] = ("the builder has no dedicated kernel for "
                                         + ("this attention" if len(attention) == 1 else "these attentions")
                                         + " (shape/dtype); decomposed into generic kernels instead")
                continue
            held.release()
            break
        build_seconds = time.perf_counter() - start
        report["attention"] = attn_report
        if serialized is None:
            if any(DEDICATED_KERNEL_MISSING in m for m in build_errors):
                build_errors.append("an attention has no dedicated kernel for its shape/dtype; "
                                    "build with --decomposable-attention auto (or always)")
            raise BuildError(str(model_path), build_errors)

        data = bytes(serialized)
        engine_layers = engine_layers_from_log(logger.layer_report)
        report["fused_ops"] = _fused_op_report(fused, network_layers, engine_layers)
        report["engine_info"] = {
            "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "build_seconds": round(build_seconds, 3),
            "layer_count": len(engine_layers),
            "layer_types": dict(collections.Counter(l["type"] for l in engine_layers)),
            "layers": engine_layers, "layer_source": "builder log",
        }
        report["warnings"] = logger.warnings()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(out_path, data)
        if write_report:
            _write_atomically(report_path(out_path), json.dumps(report, indent=1).encode())
    return report


def inspect_engine(path: str | os.PathLike, *, plugins: bool = False) -> dict[str, Any]:
    """Describe an engine: its I/O tensors and layers from IEngineInspector where it deserializes,
    else the layers `build_engine` recorded beside it (if the engine's hash still matches)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such engine file: {path}")
    data = path.read_bytes()
    if not data:
        raise InputError(f"{path} is empty, not an engine")
    digest = hashlib.sha256(data).hexdigest()
    report: dict[str, Any] = {"engine": str(path), "size_bytes": len(data), "sha256": digest,
                              "backend": shim.backend()}
    if plugins:
        from fusegraph.plugins import register_all
        register_all()
    logger = shim.make_logger()
    runtime, engine = shim.deserialize(data, logger)
    if engine is not None:
        report["io"] = [{"name": (n := engine.get_tensor_name(i)), "mode": engine.get_tensor_mode(n).name,
                         "dtype": engine.get_tensor_dtype(n).name, "shape": list(engine.get_tensor_shape(n))}
                        for i in range(engine.num_io_tensors)]
        report["layers"] = engine_layers_from_inspector(shim.inspector_json(engine))
        report["layer_source"] = "engine inspector"
        del engine, runtime
    else:
        errors = logger.errors()
        # The file's own bytes refused (a foreign magic tag, a header cut short, a size that
        # does not match the header): not an engine, as opposed to one this machine cannot run.
        if any(mark in e for e in errors for mark in _NOT_AN_ENGINE):
            raise InputError(f"{path} is not a {report['backend']['flavour']} engine "
                             f"(truncated, or another file): {errors[0]}")
        report["deserialize_error"] = errors[0] if errors else "deserialization failed"
        sidecar = report_path(path)
        built = json.loads(sidecar.read_text()) if sidecar.is_file() else None
        if built and built.get("engine_info", {}).get("sha256") == digest:
            report["layers"] = built["engine_info"]["layers"]
            report["layer_source"] = f"build report {sidecar}"
            report["io"] = built.get("inputs")
            report["fused_ops"] = built.get("fused_ops")
            report["attention"] = built.get("attention")
        else:
            report["layers"] = None
            report["layer_source"] = ("none: the engine cannot be deserialized here and "
                                      + (f"{sidecar} describes another engine" if built else f"{sidecar} is missing"))
    if report["layers"] is not None:
        report["layer_count"] = len(report["layers"])
        report["layer_types"] = dict(collections.Counter(l["type"] for l in report["layers"]))
    return report
