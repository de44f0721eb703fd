"""End-to-end ONNX Runtime latency: does a rewritten model run faster than the export it came from?

A rewrite exists to make inference faster, so this measures whole models, not kernels: each
architecture is built from a config of realistic width (hidden 512, 8 heads, a few layers,
random weights, no download), exported by TorchScript (opset 17, dynamic batch and sequence),
and then run in ONNX Runtime's CPU provider as

* `original`: the export itself, and `original (A/A)` the same file in a second session (the
  noise floor: on a shared machine their difference is what a cell's ratio can mean);
* `fusegraph`: `rewrite` with the default rules (the portable output), and `fusegraph:<target>`
  for every lowering target fusegraph offers (`--target`);
* `ort-transformers`: onnxruntime.transformers' offline optimizer (`optimize_model`);
* `onnxscript`: onnxscript's ORT fusions (`optimize_for_ort`);

side by side in one run, with the thread count fixed (intra-op threads = `--threads`, one
inter-op thread, sequential execution, default graph optimizations). Each cell is the median
of `--runs` timed runs (`--decode-runs` for the decode step) after `--warmup` untimed ones,
the variants' sessions side by side in one process taking turns run by run (so a passing load
on a shared machine falls on all alike); "x" is the median over those rounds of original /
variant (above 1 is faster). Every variant's outputs are compared with the original's on the
same inputs (max abs difference), so a fast wrong model shows up.
Each variant is also loaded and run once in a subprocess of its own, whose peak resident
memory (MiB, load + every shape) is the variant's.

    python benchmarks/bench_latency.py --runs 30 --decode-runs 300   # the table of RESULTS.md §7
    python benchmarks/bench_latency.py --only llama --seq 128 --batch 1 --runs 10
    python benchmarks/bench_latency.py --engines --no-latency  # only the TensorRT-RTX engine table
    python benchmarks/bench_latency.py --only bert --batch 1 --seq 128 --profile  # + kernel time per op type

Needs torch and transformers (the exports) and onnxscript (a peer); exports are cached in
`out/latency/` (gitignored). Prints the markdown section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "out" / "latency"
SEED = 0


@dataclass(frozen=True)
class Arch:
    """One architecture: how to build it, what it reads, what ORT's optimizer calls it."""

    name: str
    inputs: tuple[str, ...]     # ids | mask | pixels | features, in the forward's order
    ort_model_type: str
    heads: int = 8
    hidden: int = 512
    #: A KV-cache decode step: one new token after `seq` cached positions (the past keys and
    #: values are inputs, the presents outputs); its "batch x seq" is batch x past length.
    decode: bool = False


ARCHS = {
    "llama": Arch("llama", ("input_ids", "attention_mask"), "qwen3"),
    "llama_decode": Arch("llama_decode", ("input_ids", "attention_mask"), "qwen3", decode=True),
    # the upper width (hidden 1024: 16 heads of 64, 8 KV heads); not in the default run
    "llama_h1024": Arch("llama_h1024", ("input_ids", "attention_mask"), "qwen3", heads=16, hidden=1024),
    "bert": Arch("bert", ("input_ids", "attention_mask"), "bert"),
    "gpt2": Arch("gpt2", ("input_ids", "attention_mask"), "gpt2"),
    "vit": Arch("vit", ("pixel_values",), "vit"),
    "whisper_encoder": Arch("whisper_encoder", ("input_features",), "bart"),
}
#: Sequence-free architectures run at their config's own length (ViT: 16x16 patches of 224
#: pixels, 197 tokens; the Whisper encoder: 512 frames, 256 positions).
FIXED_SEQ = {"vit": 197, "whisper_encoder": 256}
LAYERS = 4
KV_HEADS, HEAD_DIM = 4, 64


def build(name: str):
    """A torch module and its config, random weights from a fixed seed."""
    import torch
    import transformers as tf
    torch.manual_seed(SEED)
    common = dict(attn_implementation="eager")
    if name in ("llama", "llama_decode", "llama_h1024"):
        arch = ARCHS[name]
        cfg = tf.LlamaConfig(num_hidden_layers=LAYERS, hidden_size=arch.hidden, num_attention_heads=arch.heads,
                             num_key_value_heads=arch.heads // 2, intermediate_size=arch.hidden * 43 // 16,
                             vocab_size=4096,
                             max_position_embeddings=1024, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                             use_cache=name == "llama_decode")
        return tf.LlamaModel._from_config(cfg, **common).eval(), cfg
    if name == "bert":
        cfg = tf.BertConfig(num_hidden_layers=LAYERS, hidden_size=512, num_attention_heads=8, intermediate_size=2048,
                            vocab_size=4096, max_position_embeddings=1024)
        return tf.BertModel._from_config(cfg, **common).eval(), cfg
    if name == "gpt2":
        cfg = tf.GPT2Config(n_layer=LAYERS, n_embd=512, n_head=8, vocab_size=4096, n_positions=1024, use_cache=False)
        return tf.GPT2Model._from_config(cfg, **common).eval(), cfg
    if name == "vit":
        cfg = tf.ViTConfig(num_hidden_layers=LAYERS, hidden_size=512, num_attention_heads=8, intermediate_size=2048,
                           image_size=224, patch_size=16)
        return tf.ViTModel._from_config(cfg, **common).eval(), cfg
    if name == "whisper_encoder":
        cfg = tf.WhisperConfig(encoder_layers=LAYERS, decoder_layers=1, d_model=512, encoder_attention_heads=8,
                               decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                               num_mel_bins=80, max_source_positions=256, vocab_size=4096, pad_token_id=0,
                               bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
        return tf.WhisperModel._from_config(cfg, **common).get_encoder().eval(), cfg
    raise ValueError(name)


def past_names(arch: Arch) -> list[str]:
    return [f"past_{kind}_{i}" for i in range(LAYERS) for kind in ("key", "value")] if arch.decode else []


def feeds_for(arch: Arch, batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    out = {}
    for name in arch.inputs:
        if name == "input_ids":
            out[name] = rng.integers(0, 4096, size=(batch, 1 if arch.decode else seq), dtype=np.int64)
        elif name == "attention_mask":
            out[name] = np.ones((batch, seq + 1 if arch.decode else seq), np.int64)
        elif name == "pixel_values":
            out[name] = rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)
        else:
            out[name] = rng.standard_normal((batch, 80, 512), dtype=np.float32)
    for name in past_names(arch):
        out[name] = rng.standard_normal((batch, KV_HEADS, seq, HEAD_DIM), dtype=np.float32)
    return out


def export(arch: Arch) -> Path:
    """The TorchScript export (opset 17, dynamic batch and sequence), cached by name."""
    path = CACHE / f"{arch.name}.onnx"
    if path.exists():
        return path
    import torch
    CACHE.mkdir(parents=True, exist_ok=True)
    model, config = build(arch.name)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            if not arch.decode:
                return self.model(**dict(zip(arch.inputs, args)), return_dict=True).last_hidden_state
            from transformers import DynamicCache
            n = len(arch.inputs)
            cache = DynamicCache(config=config)
            for i in range(LAYERS):
                cache.update(args[n + 2 * i], args[n + 2 * i + 1], i)
            out = self.model(**dict(zip(arch.inputs, args)), past_key_values=cache, use_cache=True, return_dict=True)
            presents = (t for layer in out.past_key_values.layers for t in (layer.keys, layer.values))
            return (out.last_hidden_state, *presents)

    seq = FIXED_SEQ.get(arch.name, 16)
    args = tuple(torch.from_numpy(a) for a in feeds_for(arch, 2, seq).values())
    dynamic = {n: ({0: "batch"} if arch.name in FIXED_SEQ else {0: "batch", 1: "seq"}) for n in arch.inputs}
    presents = [n.replace("past", "present") for n in past_names(arch)]
    if arch.decode:
        dynamic = {"input_ids": {0: "batch"}, "attention_mask": {0: "batch", 1: "total"},
                   **{n: {0: "batch", 2: "past"} for n in past_names(arch)},
                   **{n: {0: "batch", 2: "total"} for n in presents}}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper().eval(), args, str(path), dynamo=False, opset_version=17,
                          input_names=list(arch.inputs) + past_names(arch),
                          output_names=["last_hidden_state"] + presents,
                          dynamic_axes={**dynamic, "last_hidden_state": {0: "batch"}})
    m = onnx.load(str(path))
    m.ir_version = min(m.ir_version, 10)
    onnx.save(m, str(path))
    return path


# -- variants ---------------------------------------------------------------------------------
def fusegraph_variant(target: str | None):
    def make(src: Path, arch: Arch) -> onnx.ModelProto:
        from fusegraph.api import rewrite_with_report
        kwargs = {"target": target} if target else {}
        return rewrite_with_report(onnx.load(str(src)), **kwargs)[0]
    return make


def ort_transformers_variant(src: Path, arch: Arch) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return optimize_model(str(src), model_type=arch.ort_model_type, num_heads=arch.heads,
                              hidden_size=arch.hidden, opt_level=0).model


def onnxscript_variant(src: Path, arch: Arch) -> onnx.ModelProto:
    import onnx_ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    model = onnx_ir.load(str(src))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        optimize_for_ort(model)
    return onnx_ir.to_proto(model)


def fusegraph_targets() -> list[str]:
    """The lowering targets this fusegraph offers beyond the portable default."""
    try:
        from fusegraph.ops.lowering import TARGETS
    except ImportError:
        return []
    return [t for t in TARGETS if t != "portable"]


def variants() -> dict:
    # "original (A/A)" is the export again, in a session of its own: its distance from
    # "original" is the run's noise floor.
    out = {"original": None, "original (A/A)": None, "fusegraph": fusegraph_variant(None)}
    out.update({f"fusegraph:{t}": fusegraph_variant(t) for t in fusegraph_targets()})
    out.update({"ort-transformers": ort_transformers_variant, "onnxscript": onnxscript_variant})
    return out


# -- measuring ---------------------------------------------------------------------------------
def session(model_path: str | Path, threads: int):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def measure_memory(model_path: str, arch: Arch, shapes: list[tuple[int, int]], threads: int) -> dict:
    """In a process of its own: load, run every shape once, keep the first output (for the
    comparison) and report the process's peak resident memory."""
    sess = session(model_path, threads)
    for batch, seq in shapes:
        np.save(f"{model_path}.{batch}x{seq}.npy", sess.run(None, feeds_for(arch, batch, seq))[0])
    return {"peak_mib": peak_mib()}


def peak_mib() -> float:
    """This process's peak resident memory: VmHWM, which starts afresh at exec (ru_maxrss keeps
    the parent's peak across fork + exec, so every variant would report the parent's)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_memory(path: Path, arch: Arch, shapes, args) -> dict:
    cmd = [sys.executable, __file__, "--measure", str(path), "--arch", arch.name, "--threads", str(args.threads),
           "--shapes", *[f"{b}x{s}" for b, s in shapes]]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def runs_for(arch: Arch, args) -> int:
    """A decode step takes a few milliseconds, so it gets more runs for the same confidence."""
    return args.decode_runs if arch.decode else args.runs


def time_interleaved(paths: dict[str, Path], arch: Arch, shapes, args) -> dict[str, dict[str, float]]:
    """Median seconds per run of every variant and shape, and its speed-up over the first variant
    (the original). The variants' sessions live side by side and take turns run by run (the
    first to go rotating), so a load that comes and goes on a shared machine falls on every
    variant alike; the speed-up is the median over those rounds of original / variant, steadier
    there than the ratio of two medians, which a burst of load in one variant's runs moves."""
    sessions = {label: session(path, args.threads) for label, path in paths.items()}
    labels = list(sessions)
    out: dict[str, dict[str, float]] = {label: {} for label in labels}
    for batch, seq in shapes:
        feeds = feeds_for(arch, batch, seq)
        for _ in range(args.warmup):
            for label in labels:
                sessions[label].run(None, feeds)
        times: dict[str, list[float]] = {label: [] for label in labels}
        for r in range(runs_for(arch, args)):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                t0 = time.perf_counter()
                sessions[label].run(None, feeds)
                times[label].append(time.perf_counter() - t0)
        base = np.asarray(times[labels[0]])
        for label in labels:
            out[label][f"{batch}x{seq}"] = float(np.median(times[label]))
            # the median over rounds of original / variant, each round's runs side by side in time
            out[label][f"{batch}x{seq} x"] = float(np.median(base / np.asarray(times[label])))
    return out


# -- where the time goes ------------------------------------------------------------------------
def variant_path(name: str, label: str, src: Path) -> Path:
    return src if label.startswith("original") else CACHE / f"{name}.{label.replace(':', '-')}.onnx"


def profile_kernels(path: Path, arch: Arch, shape: tuple[int, int], args) -> dict[str, tuple[float, int]]:
    """ONNX Runtime's profiler (`SessionOptions.enable_profiling`) over `--profile-runs` runs of
    one shape: per op type of the graph it optimized, kernel milliseconds per run and nodes."""
    import tempfile
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as work:
        opts.profile_file_prefix = str(Path(work) / "profile")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feeds = feeds_for(arch, *shape)
        for _ in range(1 + args.profile_runs):  # the first run allocates: its events are dropped below
            sess.run(None, feeds)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    start_us = sorted(e["ts"] for e in events if e.get("name") == "model_run")[1]
    runs: dict[str, list[float]] = {}
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start_us:
            runs.setdefault(e["name"], []).append(e["dur"] / 1e3)
            op_of[e["name"]] = e["args"]["op_name"]
    out: dict[str, tuple[float, int]] = {}
    for node, durations in runs.items():  # each node's median: a preempted run does not count
        ms, n = out.get(op_of[node], (0.0, 0))
        out[op_of[node]] = (ms + float(np.median(durations)), n + 1)
    return out


def render_profile(rows: list[tuple[str, tuple[int, int], dict]], args) -> str:
    lines = ["## Where the time goes: ONNX Runtime's profiler", "",
             f"Kernel milliseconds by op type of the graph ONNX Runtime optimized (nodes in brackets): "
             f"each node's median over {args.profile_runs} profiled runs of the first shape (after one "
             f"untimed run), summed per op type; {args.threads} intra-op thread(s). Kernel times leave "
             f"out the executor's per-node overhead, which `total` does not show either. "
             f"Command: `python benchmarks/bench_latency.py --profile` with the table's flags.", ""]
    for name, (b, s), per_variant in rows:
        labels = [label for label in per_variant if label != "original (A/A)"]
        ops = sorted({op for p in per_variant.values() for op in p},
                     key=lambda op: -max(p.get(op, (0.0, 0))[0] for p in per_variant.values()))
        lines += [f"{name} {b}x{s}:", "", "| op type | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for op in ops[:args.profile_top]:
            cells = [f"{per_variant[label][op][0]:.3f} ({per_variant[label][op][1]})" if op in per_variant[label]
                     else "–" for label in labels]
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
        totals = [f"{sum(ms for ms, _ in per_variant[label].values()):.3f} "
                  f"({sum(n for _, n in per_variant[label].values())})" for label in labels]
        lines += ["| total | " + " | ".join(totals) + " |", ""]
    return "\n".join(lines) + "\n"


# -- TensorRT-RTX engines ----------------------------------------------------------------------
def engine_ranges(arch: Arch, shapes: list[tuple[int, int]]) -> dict[str, dict[str, tuple[int, ...]]]:
    """One optimization profile over the measured shapes: min batch and sequence 1, opt the
    first shape, max the largest batch and sequence."""
    def dims(batch: int, seq: int) -> dict[str, tuple[int, ...]]:
        return {name: a.shape for name, a in feeds_for(arch, batch, seq).items()}
    fixed = FIXED_SEQ.get(arch.name)
    lo = dims(1, fixed or 1)
    opt = dims(*shapes[0])
    hi = dims(max(b for b, _ in shapes), max(s for _, s in shapes))
    return {name: {"min": lo[name], "opt": opt[name], "max": hi[name]} for name in opt}


def engine_row(name: str, src: Path, arch: Arch, shapes) -> dict[str, dict]:
    """Engine layers of the export, its rewrite and the rewrite with plugins (built on the CPU)."""
    import tempfile
    from fusegraph.plugins.engine import build_engine
    from fusegraph.errors import InputError
    out = {}
    with tempfile.TemporaryDirectory() as work:
        for label, kw in (("original", {}), ("rewritten", {"rewrite": True}),
                          ("--plugins", {"rewrite": True, "plugins": True})):
            try:
                r = build_engine(src, Path(work) / f"{name}.engine", ranges=engine_ranges(arch, shapes),
                                 write_report=False, **kw)
            except InputError as e:
                out[label] = {"error": str(e).splitlines()[0][:160]}
                continue
            kinds = {}
            for op in r.get("fused_ops", []):
                kinds[op["implementation"]] = kinds.get(op["implementation"], 0) + 1
            out[label] = {"layers": r["engine_info"]["layer_count"], "types": r["engine_info"]["layer_types"],
                          "network": r["parse"]["network_layers"], "fused": kinds,
                          "build_s": r["engine_info"]["build_seconds"]}
            print(f"{name} engine {label}: {out[label]}", file=sys.stderr, flush=True)
    return out


def render_engines(rows: list[tuple[str, dict]]) -> str:
    from fusegraph.plugins import tensorrt_shim
    b = tensorrt_shim.backend()
    lines = ["## TensorRT-RTX engines of the same exports", "",
             f"{b['flavour']} {b['version']}, built on the CPU (no GPU), one profile over the measured shapes. "
             "Engine layers are the builder's (kernels, mostly Myelin); kinds: the engine layers' types; "
             "fused ops: what the rewrite's fused nodes became with `--plugins`.", "",
             "| model | original: engine layers (network layers) | rewritten | --plugins | --plugins: kinds | "
             "--plugins: fused ops |", "|---|---|---|---|---|---|"]

    def cell(r: dict) -> str:
        return "error" if "error" in r else f"{r['layers']} ({r['network']})"
    for name, r in rows:
        plugged = r.get("--plugins", {"error": ""})
        kinds = "" if "error" in plugged else ", ".join(f"{v} {k}" for k, v in sorted(plugged["types"].items()))
        fused = "" if "error" in plugged else ", ".join(f"{v} {k}" for k, v in sorted(plugged["fused"].items()))
        original, rewritten = r.get("original", {"error": ""}), r.get("rewritten", {"error": ""})
        lines.append(f"| {name} | {cell(original)} | {cell(rewritten)} | {cell(plugged)} | {kinds} | {fused} |")
    errors = [f"{name} {label}: {v['error']}" for name, r in rows for label, v in r.items() if "error" in v]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=[a for a in ARCHS if a != "llama_h1024"],
                   help="architectures (default: all but llama_h1024, the wider Llama)")
    p.add_argument("--batch", nargs="*", type=int, default=[1, 4])
    p.add_argument("--seq", nargs="*", type=int, default=[128, 512])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=20, help="timed runs per variant and shape, interleaved")
    p.add_argument("--decode-runs", type=int, default=200, help="--runs for the KV-cache decode step")
    p.add_argument("--variants", nargs="*", help="subset of the variants (default: all)")
    p.add_argument("--engines", action="store_true", help="also build TensorRT-RTX engines of original / "
                   "rewritten / --plugins and print their layer counts (CPU build; slow)")
    p.add_argument("--no-latency", action="store_true", help="with --engines: only the engines table")
    p.add_argument("--profile", action="store_true", help="also profile every variant at the first shape: "
                   "kernel time per op type (ONNX Runtime's profiler)")
    p.add_argument("--profile-runs", type=int, default=10)
    p.add_argument("--profile-top", type=int, default=12, help="op types shown per model (the costliest)")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--arch", help=argparse.SUPPRESS)
    p.add_argument("--shapes", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        shapes = [tuple(map(int, s.split("x"))) for s in args.shapes]
        print(json.dumps(measure_memory(args.measure, ARCHS[args.arch], shapes, args.threads)))
        return

    all_variants = variants()
    chosen = {k: v for k, v in all_variants.items()
              if not args.variants or k in args.variants or k in ("original", "original (A/A)")}
    rows, engine_rows, profile_rows = [], [], []
    for name in args.only:
        arch = ARCHS[name]
        src = export(arch)
        seqs = [FIXED_SEQ[name]] if name in FIXED_SEQ else args.seq
        shapes = [(b, s) for b in args.batch for s in seqs]
        if not args.no_latency:
            rows.append((name, shapes, *latency_row(name, arch, src, shapes, chosen, args)))
            if args.profile:
                results = rows[-1][2]
                profile_rows.append((name, shapes[0], {
                    label: profile_kernels(variant_path(name, label, src), arch, shapes[0], args)
                    for label in chosen if "error" not in results.get(label, {"error": ""})}))
        if args.engines:
            engine_rows.append((name, engine_row(name, src, arch, shapes)))
    if rows:
        print(render(rows, list(chosen), args))
    if profile_rows:
        print(render_profile(profile_rows, args))
    if engine_rows:
        print(render_engines(engine_rows))


def latency_row(name: str, arch: Arch, src: Path, shapes, chosen: dict, args) -> tuple[dict, dict]:
    """Every chosen variant of one export: its timings, peak memory, node count and error."""
    results, nodes, paths = {}, {}, {}
    for label, make in chosen.items():
        path = src
        if make is not None:
            path = variant_path(name, label, src)
            try:
                t0 = time.perf_counter()
                model = make(src, arch)
                model.ir_version = min(model.ir_version, 10)
                onnx.save(model, str(path))
                results.setdefault(label, {})["rewrite_s"] = time.perf_counter() - t0
            except Exception as e:  # a variant that fails is reported, the run goes on
                results[label] = {"error": f"rewrite: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
                continue
        nodes[label], paths[label] = len(onnx.load(str(path), load_external_data=False).graph.node), path
    for label, path in list(paths.items()):
        results.setdefault(label, {}).update(run_memory(path, arch, shapes, args))
        if "error" in results[label]:
            print(f"{name} {label}: {results[label]}", file=sys.stderr, flush=True)
            del paths[label]
    for label, timings in time_interleaved(paths, arch, shapes, args).items():
        results[label].update(timings)
        if label != "original":
            diffs = [float(np.max(np.abs(np.load(f"{paths[label]}.{b}x{s}.npy") - np.load(f"{src}.{b}x{s}.npy"))))
                     for b, s in shapes]
            results[label]["max_abs"] = max(diffs)
        print(f"{name} {label}: {results[label]}", file=sys.stderr, flush=True)
    return results, nodes


def render(rows, labels, args) -> str:
    lines = [
        "## End-to-end latency in ONNX Runtime (CPU)",
        "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {platform.machine()}, {os.cpu_count()} cores, no GPU; "
        f"onnxruntime {__import__('onnxruntime').__version__}, {args.threads} intra-op thread(s), sequential, "
        f"default graph optimizations; median of {args.runs} runs ({args.decode_runs} for the decode step) "
        f"after {args.warmup} warm-up runs, the "
        f"variants' runs interleaved in one process. The machine is shared: other processes ran alongside. "
        f"Models: TorchScript exports (opset 17, dynamic axes), hidden 512, 8 heads (Llama 4 KV heads; "
        f"llama_h1024: hidden 1024, 16 heads, 8 KV heads), "
        f"{LAYERS} layers, random weights; llama_decode is one KV-cache decode step of the Llama (one new "
        f"token after `seq` cached positions: its batch x seq is batch x past length). "
        f"Command: `python benchmarks/bench_latency.py "
        f"--only {' '.join(args.only)} --batch {' '.join(map(str, args.batch))} --seq {' '.join(map(str, args.seq))} --runs {args.runs} "
        f"--decode-runs {args.decode_runs}`.",
        "",
        "Each cell: median milliseconds (x: the median over the interleaved rounds of original / variant; "
        "above 1.00x is faster than the export). "
        "max abs: largest output difference vs the original over every shape. peak: resident MiB of "
        "the measuring process.",
        "",
    ]
    head = ["model", "batch x seq"] + labels
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, shapes, results, nodes in rows:
        base = results.get("original", {})
        for b, s in shapes:
            key = f"{b}x{s}"
            cells = [name, key]
            for label in labels:
                r = results.get(label, {})
                if "error" in r:
                    cells.append("error")
                elif key in r and key in base:
                    cells.append(f"{r[key] * 1e3:.1f} ({r[f'{key} x']:.2f}x)")
                else:
                    cells.append("–")
            lines.append("| " + " | ".join(cells) + " |")
        info = []
        for label in labels:
            r = results.get(label, {})
            if "error" in r:
                info.append(f"{label}: {r['error']}")
            else:
                extra = f", max abs {r['max_abs']:.1e}" if "max_abs" in r else ""
                info.append(f"{label}: {nodes.get(label, '?')} nodes, peak {r.get('peak_mib', 0):.0f} MiB{extra}")
        lines.append(f"| {name} | notes | " + "; ".join(info) + " |" + " |" * (len(labels) - 1))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
