"""Run tensor-parallel rank models together on the CPU: ONNX Runtime for everything between
collectives, numpy (`collectives.reference`) for the collectives across the ranks.

Each rank model is cut into stages at its collectives: a node's stage is one more than the
stage of any collective it depends on. Stage k of every rank runs as one ORT session (its
inputs: graph inputs and values of earlier stages; its outputs: what later stages, the
collectives and the graph outputs read), then the collectives whose inputs stage k produced
run across the ranks, in lock step, as NCCL would between the GPUs. The ranks must hold the same
collectives in the same order (what `fusegraph.shard` writes); a mismatch is bad input.

`verify_shards` compares the gathered outputs with the unsharded model's (`rewrite verify-shards`).
Cost: one ORT session per rank and stage (built once), the collectives in numpy.
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np
import onnx
from onnx import helper

from ..errors import InputError
from ..ops import collectives
from .differential import _dim_attempts, compare, make_inputs, outputs, session


class LockstepRunner:
    """The rank models (in rank order), cut into stages and loaded into ONNX Runtime once;
    `run(feeds)` gives each rank's outputs."""

    def __init__(self, ranks: list[onnx.ModelProto | str]):
        if not ranks:
            raise InputError("no rank models to run")
        self.models = [onnx.load(r) if isinstance(r, str) else r for r in ranks]
        self.stages = [_stages(m) for m in self.models]
        calls = {tuple((c.op_type, tuple(sorted(collectives.attributes(c).items())))
                       for c in m.graph.node if collectives.is_collective(c)) for m in self.models}
        if len(calls) != 1:
            raise InputError("the rank models do not call the same collectives in the same order")
        groups = {dict(attrs).get("group_size") for _, attrs in next(iter(calls))}
        if groups - {len(ranks)}:
            raise InputError(f"the rank models' collectives are over {sorted(groups)[0]} ranks, "
                             f"but {len(ranks)} rank models were given")
        self.sessions = [[_session(seg, m, f"rank {r} stage {k}") for k, (seg, _) in enumerate(stages)]
                         for r, (m, stages) in enumerate(zip(self.models, self.stages))]

    def run(self, feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        env = [dict(feeds) for _ in self.models]
        for k in range(len(self.stages[0])):
            for r, sess in enumerate(self.sessions):
                if sess[k] is not None:
                    wanted = {i.name for i in sess[k].get_inputs()}
                    env[r].update(outputs(sess[k], {n: v for n, v in env[r].items() if n in wanted}))
            for c in range(len(self.stages[0][k][1])):
                nodes = [self.stages[r][k][1][c] for r in range(len(self.models))]
                results = collectives.reference(nodes[0], [env[r][n.input[0]] for r, n in enumerate(nodes)])
                for r, (n, y) in enumerate(zip(nodes, results)):
                    env[r][n.output[0]] = y
        return [{o.name: env[r][o.name] for o in m.graph.output} for r, m in enumerate(self.models)]


def _stages(model: onnx.ModelProto) -> list[tuple[onnx.ModelProto | None, list[onnx.NodeProto]]]:
    """[(the ORT model of stage k or None when empty, the collectives closing stage k)]."""
    g = model.graph
    stage_of: dict[str, int] = {}
    node_stage = []
    for n in g.node:
        k = max((stage_of.get(x, 0) for x in n.input if x), default=0)
        node_stage.append(k)
        for o in n.output:
            stage_of[o] = k + 1 if collectives.is_collective(n) else k
    count = max(node_stage, default=0) + 1
    readers: dict[str, set[int]] = {}
    for n, k in zip(g.node, node_stage):
        for x in n.input:
            readers.setdefault(x, set()).add(k if not collectives.is_collective(n) else -1 - k)
    graph_outputs = {o.name for o in g.output}
    inits = {t.name: t for t in g.initializer}
    types = _types(model)
    result = []
    for k in range(count):
        nodes = [n for n, s in zip(g.node, node_stage) if s == k and not collectives.is_collective(n)]
        closing = [n for n, s in zip(g.node, node_stage) if s == k and collectives.is_collective(n)]
        if not nodes:
            result.append((None, closing))
            continue
        made = {o for n in nodes for o in n.output}
        read = {x for n in nodes for x in n.input if x} | {x for n in nodes for a in n.attribute
                                                           if a.type == onnx.AttributeProto.GRAPH for x in _outer(a.g)}
        ins = [x for x in dict.fromkeys(sorted(read)) if x not in made and x not in inits]
        outs = [o for o in dict.fromkeys(o for n in nodes for o in n.output)
                if o and (o in graph_outputs or any(s != k for s in readers.get(o, ())))]
        seg = helper.make_graph(
            nodes, f"{g.name}_stage{k}",
            [_typed(x, types) for x in ins], [_typed(o, types) for o in outs],
            initializer=[inits[x] for x in sorted(read) if x in inits])
        m = helper.make_model(seg, opset_imports=[o for o in model.opset_import if o.domain != collectives.DOMAIN or
                                                  any(f.domain == o.domain for f in model.functions)],
                              ir_version=model.ir_version)
        m.functions.extend(model.functions)
        result.append((m, closing))
    return result


def _outer(g: onnx.GraphProto) -> set:
    from ..sharding import _outer_names
    return _outer_names(g)


def _types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    g = inferred.graph
    return {v.name: v.type for v in list(g.input) + list(g.value_info) + list(g.output)}


def _typed(name: str, types: dict) -> onnx.ValueInfoProto:
    t = types.get(name)
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.elem_type:
        raise InputError(f"cannot type {name!r} between the stages of a rank model")
    return helper.make_tensor_value_info(name, t.tensor_type.elem_type, None)


def _session(seg, model, where):
    if seg is None:
        return None
    try:
        return session(seg)
    except Exception as e:  # ORT's own error types
        raise InputError(f"{where}: ONNX Runtime refuses it: {str(e).splitlines()[0]}") from None


def rank_files(folder: str) -> list[str]:
    """rank0.onnx .. rank{N-1}.onnx in `folder`, all present, in rank order."""
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: " + ("is not a folder" if os.path.exists(folder) else "no such folder"))
    found = {}
    for path in glob.glob(os.path.join(folder, "rank*.onnx")):
        m = re.fullmatch(r"rank(\d+)\.onnx", os.path.basename(path))
        if m:
            found[int(m.group(1))] = path
    if not found:
        raise InputError(f"{folder}: no rank0.onnx .. rankN.onnx in it (written by `rewrite shard`)")
    tp = _manifest_tp(folder)
    if tp is not None and all(r in found for r in range(tp)):
        # the last `rewrite shard` into the folder wrote these: rank files past its tp are an
        # earlier, larger tp's
        found = {r: path for r, path in found.items() if r < tp}
    missing = [r for r in range(max(found) + 1) if r not in found]
    if missing:
        raise InputError(f"{folder}: rank{missing[0]}.onnx is missing (found ranks {sorted(found)})")
    return [found[r] for r in range(len(found))]


def _manifest_tp(folder: str) -> int | None:
    """The tp of the `shard.json` that `rewrite shard` wrote last into `folder` (None without a
    readable one: then the rank files found are the ranks)."""
    import json
    try:
        with open(os.path.join(folder, "shard.json")) as f:
            tp = json.load(f).get("tp")
    except (OSError, ValueError, AttributeError):
        return None
    return tp if isinstance(tp, int) and not isinstance(tp, bool) and tp >= 1 else None


def embedding_vocab(model: onnx.ModelProto) -> dict[str, int]:
    """Graph inputs that index an embedding table (Gather from a [V, H] initializer): their V,
    so that test ids cover every rank's part of the vocabulary, not just its first rows."""
    inits = {t.name: t for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    vocab = {}
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] in inputs and n.input[0] in inits \
                and len(inits[n.input[0]].dims) == 2:
            v = inits[n.input[0]].dims[0]
            vocab[n.input[1]] = min(v, vocab.get(n.input[1], v))
    return vocab


def _reference_session(original):
    try:
        return session(original)
    except Exception as e:  # ORT's own error types
        raise InputError(f"the original model: ONNX Runtime refuses it: {str(e).splitlines()[0]}") from None


def _feeds(header, reference, shapes, seed, dims_used):
    """Random inputs the original runs on (free dims as `rewrite verify` picks them), with ids
    drawn over each embedding's whole vocabulary, and the original's outputs on them."""
    vocab = embedding_vocab(header)
    failures = []
    for fixed in _dim_attempts(header, shapes):
        dims = dict(fixed)
        feeds = make_inputs(header, shapes, seed, dims_used=dims)
        rng = np.random.default_rng(seed + 1)
        for name, v in vocab.items():
            if name in feeds:
                feeds[name] = rng.integers(0, v, size=feeds[name].shape).astype(feeds[name].dtype)
        try:
            expected = outputs(reference, feeds)
        except Exception as e:  # onnxruntime's own error types: dims the model cannot run at
            failures.append(e)
            continue
        if dims_used is not None:
            dims_used.update(dims)
        return feeds, expected
    raise failures[0]


def verify_shards(original: onnx.ModelProto | str, ranks: list[onnx.ModelProto | str],
                  shapes: dict[str, tuple[int, ...]] | None = None, *, feeds: dict[str, np.ndarray] | None = None,
                  atol: float | None = None, rtol: float | None = None, seed: int = 0,
                  dims_used: dict[str, int] | None = None):
    """Run the original and the rank models (lock step) on the same inputs; compare every rank's
    outputs with the original's. Returns one `verify.OutputDiff` per output (the worst rank)."""
    header = original if isinstance(original, onnx.ModelProto) else onnx.load(original, load_external_data=False)
    runner = LockstepRunner(ranks)
    reference = _reference_session(original)
    try:
        if feeds is None:
            feeds, expected = _feeds(header, reference, shapes or {}, seed, dims_used)
        else:
            expected = outputs(reference, feeds)
        got = runner.run(feeds)
    except InputError:
        raise
    except Exception as e:  # ORT's own error types: a feed or a dim the models cannot run at
        raise InputError(f"ONNX Runtime: {str(e).splitlines()[0]}") from None
    worst = {}
    for per_rank in got:
        for d in compare(expected, per_rank, atol, rtol):
            if d.name not in worst or (not d.ok and worst[d.name].ok) or d.max_abs > worst[d.name].max_abs:
                worst[d.name] = d
    return [worst[name] for name in expected]
