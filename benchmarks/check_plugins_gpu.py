"""Run every fusegraph plugin's logic on a GPU without TensorRT and check its outputs.

TensorRT (full or RTX) cannot run engines on the H100/H200 machines we have (no full TensorRT
there, and TensorRT-RTX refuses compute capability 9.0), so this drives the plugin cores the
TensorRT adapter delegates to, the way TensorRT would: output shapes and dtypes from the core,
format support queried per position, then `enqueue` with raw device pointers (CuPy
allocations) and a CUDA stream. The kernels launch through `fusegraph.kernels.launch`
(cuda-python, no torch). Each result is compared with onnxruntime running the fused op's
local function from `fusegraph.ops.fused_ops` where the rewriter defines it, else with the numpy
reference in `fusegraph.kernels.reference`.

    python benchmarks/check_plugins_gpu.py [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def import_fusegraph() -> None:
    """Import fusegraph, from this checkout's folders where it is not installed (GPU machine)."""
    try:
        import fusegraph  # noqa: F401
        return
    except ImportError:
        pass
    for name, folder in (("fusegraph", "rewriter"), ("fusegraph.kernels", "kernels"), ("fusegraph.plugins", "plugins"),
                         ("fusegraph.patterns", "patterns")):
        spec = importlib.util.spec_from_file_location(name, ROOT / folder / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


import_fusegraph()

import cupy as cp  # noqa: E402
import ml_dtypes  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

import fusegraph  # noqa: E402
from fusegraph.ops.activation_ops import GATED  # noqa: E402
from fusegraph.ops.fused_ops import REGISTRY  # noqa: E402
from fusegraph.kernels import reference  # noqa: E402
from fusegraph.plugins.core import CORES  # noqa: E402

NP = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
TOLERANCE = {"float32": 5e-3, "float16": 1e-2, "bfloat16": 5e-2}  # max |err| / max |ref|


def to_device(x: np.ndarray, dtype: str) -> cp.ndarray:
    """CuPy has no bfloat16: such tensors travel as their uint16 bit patterns."""
    a = x.astype(NP[dtype])
    return cp.asarray(a.view(np.uint16) if dtype == "bfloat16" else a)


def from_device(d: cp.ndarray, dtype: str) -> np.ndarray:
    a = cp.asnumpy(d)
    return (a.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else a).astype(np.float32)


def empty(shape, dtype: str) -> cp.ndarray:
    return cp.zeros(shape, np.uint16 if dtype == "bfloat16" else NP[dtype])


def ort_reference(op: str, attrs: dict, arrays: list[np.ndarray], n_out: int) -> list[np.ndarray] | None:
    """Run the rewriter's local function for `op` in onnxruntime (float32), if it defines one."""
    if op not in REGISTRY:
        return None
    fused = REGISTRY[op]
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape) for n, a in zip(fused.inputs, arrays)]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in fused.outputs[:n_out]]
    node = helper.make_node(op, list(fused.inputs[: len(arrays)]), list(fused.outputs[:n_out]), domain="fusegraph", **attrs)
    model = helper.make_model(helper.make_graph([node], "check", ins, outs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("fusegraph", 1)],
                              functions=[fused.function(18)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, dict(zip(fused.inputs, arrays)))


def numpy_reference(op: str, attrs: dict, a: list[np.ndarray]) -> list[np.ndarray]:
    f64 = np.float64
    spec = CORES[op].spec
    if spec.reference == "matmul_bias_act":
        return [reference.matmul_bias_act(a[0], a[1], a[2] if len(a) > 2 else None, spec.activation or "none",
                                          compute_dtype=f64)]
    if spec.reference == "swiglu":
        return [reference.swiglu(a[0], a[1], a[2], act=spec.activation, compute_dtype=f64)]
    if op in ("Attention", "MaskedAttention"):
        return [reference.attention(a[0], a[1], a[2], a[3] if len(a) > 3 else None, attrs.get("scale") or None,
                                    bool(attrs.get("is_causal")), compute_dtype=f64)]
    if op == "RMSNorm":
        return [reference.rms_norm(a[0], a[1], attrs["epsilon"], compute_dtype=f64)]
    if op == "SkipRMSNorm":
        y, s = reference.skip_rms_norm(a[0], a[1], a[2], attrs["epsilon"], compute_dtype=f64)
        return [y, s]
    if op == "SkipLayerNorm":
        y, s = reference.skip_layer_norm(a[0], a[1], a[2], a[3] if len(a) > 3 else None, attrs["epsilon"],
                                         compute_dtype=f64)
        return [y, s]
    if op == "RotaryEmbedding":
        return [reference.rotary_embedding(a[0], a[1], a[2], bool(attrs["interleaved"]), attrs["rotary_dim"],
                                           compute_dtype=f64)]
    raise ValueError(op)


def cases(rng: np.random.Generator):
    """(label, op, attributes, input arrays in float32)."""
    x, w, b = rng.standard_normal((3, 37, 64)), rng.standard_normal((64, 96)) / 8, rng.standard_normal(96)
    for op in sorted(o for o in CORES if o.startswith("MatMul")):
        yield op, op, {}, [x, w, b] if "Bias" in op else [x, w]
    q, k, v = rng.standard_normal((2, 8, 33, 64)), rng.standard_normal((2, 2, 40, 64)), rng.standard_normal((2, 2, 40, 64))
    yield "Attention causal GQA", "Attention", {"scale": 0.125, "is_causal": 1}, [q, k, v]
    mask = np.where(rng.random((33, 40)) < 0.2, -1e4, 0.0)
    yield "MaskedAttention [Sq,Sk] mask scale=0.1", "MaskedAttention", {"scale": 0.1, "is_causal": 0}, [q, k, v, mask]
    wu = rng.standard_normal((64, 96)) / 8
    for op in GATED:
        yield op, op, {}, [x, w, wu]
    h, r = rng.standard_normal((4, 17, 128)), rng.standard_normal((4, 17, 128))
    g, beta = 1 + rng.standard_normal(128) / 4, rng.standard_normal(128) / 4
    yield "RMSNorm", "RMSNorm", {"epsilon": 1e-6}, [h, g]
    yield "SkipRMSNorm", "SkipRMSNorm", {"epsilon": 1e-6}, [h, r, g]
    yield "SkipLayerNorm", "SkipLayerNorm", {"epsilon": 1e-5}, [h, r, g, beta]
    xr, ang = rng.standard_normal((2, 4, 9, 64)), rng.random((9, 32)) * 3
    for inter in (0, 1):
        yield f"RotaryEmbedding interleaved={inter} rd=32", "RotaryEmbedding", {"interleaved": inter, "rotary_dim": 32}, \
            [xr, np.cos(ang), np.sin(ang)]


def check(label: str, op: str, attrs: dict, arrays: list[np.ndarray], dtype: str, stream: cp.cuda.Stream) -> dict:
    core = CORES[op](**attrs)
    # inputs rounded to the dtype first, so reference and kernel see the same numbers
    arrays = [a.astype(NP[dtype]).astype(np.float32) for a in arrays]
    shapes = [a.shape for a in arrays]
    dtypes = [dtype] * len(arrays)
    n = len(arrays)
    assert all(core.supports(p, dtypes, n) for p in range(n)), "core refuses its own dtype"
    out_shapes, out_dtypes = core.output_shapes(shapes), core.output_dtypes(dtypes)
    assert all(core.supports(n + i, dtypes + out_dtypes[: i + 1], n) for i in range(len(out_dtypes)))
    ins = [to_device(a, dtype) for a in arrays]
    outs = [empty(s, d) for s, d in zip(out_shapes, out_dtypes)]
    start = time.perf_counter()
    core.enqueue(shapes, dtypes, [a.data.ptr for a in ins], [o.data.ptr for o in outs], stream.ptr)
    stream.synchronize()
    first_call = time.perf_counter() - start  # includes Triton's compile for this signature
    got = [from_device(o, d) for o, d in zip(outs, out_dtypes)]
    refs = ort_reference(op, core.attributes, arrays, len(outs))  # every attribute, as the rewriter writes them
    source = "onnxruntime (fused_ops local function)"
    if refs is None:
        refs, source = numpy_reference(op, attrs, arrays), "numpy reference"
    errs = [float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-6)) for g, r in zip(got, refs)]
    return {"case": label, "dtype": dtype, "shapes_ok": [tuple(g.shape) for g in got] == [tuple(r.shape) for r in refs],
            "rel_err": max(errs), "ok": max(errs) <= TOLERANCE[dtype] and all(np.isfinite(g).all() for g in got),
            "reference": source, "first_call_s": round(first_call, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    fusegraph.default_rules()  # registers every fused op's local function (the references)
    rng = np.random.default_rng(0)
    stream = cp.cuda.Stream(non_blocking=True)
    results = []
    print(f"GPU: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}  onnxruntime {ort.__version__}")
    for label, op, attrs, arrays in cases(rng):
        for dtype in ("float32", "float16", "bfloat16"):
            try:
                r = check(label, op, attrs, arrays, dtype, stream)
            except Exception as e:  # one failing op must not hide the others' results
                r = {"case": label, "dtype": dtype, "ok": False, "error": f"{type(e).__name__}: {e}"}
            results.append(r)
            print(f"{'ok ' if r['ok'] else 'BAD'} {label:42s} {dtype:9s} "
                  + (f"rel err {r['rel_err']:.2e}  vs {r['reference']}  first call {r['first_call_s']} s"
                     if "error" not in r else r["error"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    bad = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
