"""Differential runs: the original and the rewritten model in ONNX Runtime on the same inputs.

Inputs are random but tame (floats in [-1, 1), token-like integers in a small range, masks of
ones) so that a NaN or an overflow means a real difference, not a bad draw; symbolic dims take
the value given by `--shape` or 2, the same for every input that shares the dim's name. An
export that runs only at some dims (the dynamo exports at batch 1) fails at 2: the original is
then tried with one free symbolic dim at 1 at a time, then all of them, and the dims used are
reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from fusegraph.errors import InputError, tolerance

#: (atol, rtol) per output dtype: an element passes if |a - b| <= atol + rtol * |b|.
TOLERANCES = {
    np.dtype(np.float64): (1e-9, 1e-7),
    np.dtype(np.float32): (1e-4, 1e-3),
    np.dtype(np.float16): (1e-2, 1e-2),
}
DEFAULT_DIM = 2


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    ok: bool


def add_comparison_options(parser) -> None:
    """The options of every command that compares outputs (`rewrite verify`, `verify-shards`):
    input shapes or arrays, tolerances, the seed of the random inputs, JSON output."""
    parser.add_argument("--shape", action="append", metavar="NAME:DIMS")
    parser.add_argument("--inputs", help=".npz file with the input arrays")
    parser.add_argument("--atol", type=tolerance)
    parser.add_argument("--rtol", type=tolerance)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")


def diff_lines(diffs: list[OutputDiff], dims: dict[str, int]) -> list[str]:
    """What the comparing commands print: the symbolic dims they chose, then one line per output."""
    lines = ["dims: " + ", ".join(f"{k}={v}" for k, v in dims.items())] if dims else []
    return lines + [f"{d.name}: max abs {d.max_abs:.3g}, max rel {d.max_rel:.3g} "
                    f"(atol {d.atol:g}, rtol {d.rtol:g}) {'ok' if d.ok else 'MISMATCH'}" for d in diffs]


def parse_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """`["input_ids:1x128", "mask:1x128"]` -> {"input_ids": (1, 128), ...}."""
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs or ():
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
        except ValueError:
            raise InputError(f"--shape {spec!r}: expected NAME:DIMxDIM..., e.g. input_ids:1x128") from None
    return out


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def make_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
                seed: int = 0, default_dim: int = DEFAULT_DIM,
                dims_used: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random feeds for the model's inputs; `dims_used`, if given, receives the value each
    symbolic dim took."""
    shapes = shapes or {}
    rng = np.random.default_rng(seed)
    dims: dict[str, int] = {} if dims_used is None else dims_used
    for vi in graph_inputs(model):
        if vi.name in shapes:
            for d, given in zip(vi.type.tensor_type.shape.dim, shapes[vi.name]):
                if d.dim_param:
                    dims.setdefault(d.dim_param, given)
    unknown = set(shapes) - {vi.name for vi in graph_inputs(model)}
    if unknown:
        raise InputError(f"--shape names no input of the model: {', '.join(sorted(unknown))}")
    feeds: dict[str, np.ndarray] = {}
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        if vi.name in shapes:
            shape = shapes[vi.name]
        else:
            shape = tuple(d.dim_value if d.HasField("dim_value") else dims.setdefault(d.dim_param or "?", default_dim)
                          for d in tt.shape.dim)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        feeds[vi.name] = _random(rng, vi.name, shape, dtype)
    return feeds


def _random(rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if "mask" in name.lower():
        return np.ones(shape, dtype)
    if "type" in name.lower() and dtype.kind in "iu":  # token_type_ids: a vocabulary of 1 or 2
        return np.zeros(shape, dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 8, size=shape).astype(dtype)
    return rng.uniform(-1.0, 1.0, size=shape).astype(dtype)


def run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run in ONNX Runtime on the CPU, without ORT's own graph rewrites."""
    return outputs(session(model), feeds)


def session(model: onnx.ModelProto | str):
    """An ONNX Runtime CPU session without ORT's own graph rewrites (loaded once, run often)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4  # errors reach the user as one line, not as ORT log output
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def outputs(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def compare(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray],
            atol: float | None = None, rtol: float | None = None) -> list[OutputDiff]:
    if list(expected) != list(actual):
        raise InputError(f"the models' outputs differ: {list(expected)} vs {list(actual)}")
    diffs = []
    for name, ref in expected.items():
        got = actual[name]
        a_tol, r_tol = TOLERANCES.get(ref.dtype, (0.0, 0.0))
        a_tol = a_tol if atol is None else atol
        r_tol = r_tol if rtol is None else rtol
        if got.shape != ref.shape or got.dtype != ref.dtype:
            diffs.append(OutputDiff(name, float("inf"), float("inf"), a_tol, r_tol, False))
            continue
        r = ref.astype(np.float64)
        g = got.astype(np.float64)
        with np.errstate(invalid="ignore"):
            # Equal elements (the same infinity included) and NaN against NaN agree.
            err = np.where((g == r) | (np.isnan(g) & np.isnan(r)), 0.0, np.abs(g - r))
        max_abs = float(np.nanmax(err, initial=0.0)) if not np.isnan(err).any() else float("inf")
        max_rel = float(np.max(err / (np.abs(r) + 1e-12), initial=0.0)) if np.isfinite(max_abs) else float("inf")
        with np.errstate(invalid="ignore"):  # err 0 passes even where |r| is NaN or inf
            ok = bool(np.all((err == 0) | (err <= a_tol + r_tol * np.abs(r)))) and bool(np.isfinite(max_abs))
        diffs.append(OutputDiff(name, max_abs, max_rel, a_tol, r_tol, ok))
    return diffs


def verify_models(original: onnx.ModelProto | str, rewritten: onnx.ModelProto | str,
                  shapes: dict[str, tuple[int, ...]] | None = None, *, feeds: dict[str, np.ndarray] | None = None,
                  atol: float | None = None, rtol: float | None = None, seed: int = 0,
                  dims_used: dict[str, int] | None = None) -> list[OutputDiff]:
    """Run both models on the same inputs and compare every output. Without `feeds`, free
    symbolic dims take the first values the original runs with (`_dim_attempts`); `dims_used`,
    if given, receives the value each symbolic dim took."""
    if feeds is not None:
        return compare(run(original, feeds), run(rewritten, feeds), atol, rtol)
    header = original if isinstance(original, onnx.ModelProto) else onnx.load(original, load_external_data=False)
    reference = session(original)  # a model ONNX Runtime refuses fails here, once
    failures = []
    for fixed in _dim_attempts(header, shapes or {}):
        dims = dict(fixed)
        feeds = make_inputs(header, shapes, seed, dims_used=dims)
        try:
            expected = outputs(reference, feeds)
            break
        except Exception as e:  # onnxruntime's own error types: dims the model cannot run at
            failures.append(e)
    else:
        raise failures[0]  # at the default dims: the error the user can act on
    if dims_used is not None:
        dims_used.update(dims)
    return compare(expected, run(rewritten, feeds), atol, rtol)


def _dim_attempts(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> list[dict[str, int]]:
    """Values to try for the symbolic dims `--shape` leaves free: all at DEFAULT_DIM, then one
    at a time at 1 (batch 1, sequence still 2), then all at 1."""
    free = list(dict.fromkeys(d.dim_param for vi in graph_inputs(model) if vi.name not in shapes
                              for d in vi.type.tensor_type.shape.dim if d.dim_param))
    attempts: list[dict[str, int]] = [{}] + [{name: 1} for name in free]
    if len(free) > 1:
        attempts.append(dict.fromkeys(free, 1))
    return attempts
