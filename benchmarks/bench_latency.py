"""End-to-end ONNX Runtime latency: does a rewritten model run faster than the export it came from?

A rewrite exists to make inference faster, so this measures whole models, not kernels: each
architecture is built from a config of realistic width (hidden 512, 8 heads, a few layers,
random weights, no download), exported by TorchScript (opset 17, dynamic batch and sequence),
and then run in ONNX Runtime's CPU provider as

* `original`: the export itself;
* `fusegraph`: `rewrite` with the default rules (the portable output), and `fusegraph:<target>`
  for every lowering target fusegraph offers (`--target`);
* `ort-transformers`: onnxruntime.transformers' offline optimizer (`optimize_model`);
* `onnxscript`: onnxscript's ORT fusions (`optimize_for_ort`);

side by side in one run, with the thread count fixed (intra-op threads = `--threads`, one
inter-op thread, sequential execution, default graph optimizations). Each cell is the median
of `--runs` timed runs after `--warmup` untimed ones; "x" is original / variant (above 1 is
faster). Every variant's outputs are compared with the original's on the same inputs (max abs
difference), so a fast wrong model shows up. Each variant runs in its own subprocess so its
peak resident memory (MiB, load + every shape) is its own.

    python benchmarks/bench_latency.py                       # every model, batch 1 and 4, seq 128 and 512
    python benchmarks/bench_latency.py --only llama --seq 128 --batch 1 --runs 10

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


ARCHS = {
    "llama": Arch("llama", ("input_ids", "attention_mask"), "qwen3"),
    "bert": Arch("bert", ("input_ids", "attention_mask"), "bert"),
    "gpt2": Arch("gpt2", ("input_ids", "attention_mask"), "gpt2"),
    "vit": Arch("vit", ("pixel_values",), "vit"),
    "whisper_encoder": Arch("whisper_encoder", ("input_features",), "bart"),
}
#: Sequence-free architectures run at their config's own length (ViT: 16x16 patches of 224
#: pixels, 197 tokens; the Whisper encoder: 512 frames, 256 positions).
FIXED_SEQ = {"vit": 197, "whisper_encoder": 256}
LAYERS = 4


def build(name: str):
    """A torch module and its config, random weights from a fixed seed."""
    import torch
    import transformers as tf
    torch.manual_seed(SEED)
    common = dict(attn_implementation="eager")
    if name == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=LAYERS, hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
                             intermediate_size=1376, vocab_size=4096, max_position_embeddings=1024,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False)
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
                               num_mel_bins=80, max_source_positions=256, vocab_size=4096)
        return tf.WhisperModel._from_config(cfg, **common).get_encoder().eval(), cfg
    raise ValueError(name)


def feeds_for(arch: Arch, batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    out = {}
    for name in arch.inputs:
        if name == "input_ids":
            out[name] = rng.integers(0, 4096, size=(batch, seq), dtype=np.int64)
        elif name == "attention_mask":
            out[name] = np.ones((batch, seq), np.int64)
        elif name == "pixel_values":
            out[name] = rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)
        else:
            out[name] = rng.standard_normal((batch, 80, 512), dtype=np.float32)
    return out


def export(arch: Arch) -> Path:
    """The TorchScript export (opset 17, dynamic batch and sequence), cached by name."""
    path = CACHE / f"{arch.name}.onnx"
    if path.exists():
        return path
    import torch
    CACHE.mkdir(parents=True, exist_ok=True)
    model, _ = build(arch.name)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            return self.model(**dict(zip(arch.inputs, args)), return_dict=True).last_hidden_state

    seq = FIXED_SEQ.get(arch.name, 16)
    args = tuple(torch.from_numpy(a) for a in feeds_for(arch, 2, seq).values())
    dynamic = {n: ({0: "batch"} if arch.name in FIXED_SEQ else {0: "batch", 1: "seq"}) for n in arch.inputs}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper().eval(), args, str(path), dynamo=False, opset_version=17,
                          input_names=list(arch.inputs), output_names=["last_hidden_state"],
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
        from fusegraph.lowering import TARGETS
    except ImportError:
        return []
    return [t for t in TARGETS if t != "portable"]


def variants() -> dict:
    out = {"original": None, "fusegraph": fusegraph_variant(None)}
    out.update({f"fusegraph:{t}": fusegraph_variant(t) for t in fusegraph_targets()})
    out.update({"ort-transformers": ort_transformers_variant, "onnxscript": onnxscript_variant})
    return out


# -- measuring (in a subprocess per variant) ----------------------------------------------------
def measure(model_path: str, arch: Arch, shapes: list[tuple[int, int]], threads: int, warmup: int,
            runs: int) -> dict:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    out = {}
    for batch, seq in shapes:
        feeds = feeds_for(arch, batch, seq)
        for _ in range(warmup):
            y = sess.run(None, feeds)[0]
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t0)
        np.save(f"{model_path}.{batch}x{seq}.npy", y)
        out[f"{batch}x{seq}"] = float(np.median(times))
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_variant(path: Path, arch: Arch, shapes, args) -> dict:
    cmd = [sys.executable, __file__, "--measure", str(path), "--arch", arch.name, "--threads", str(args.threads),
           "--warmup", str(args.warmup), "--runs", str(args.runs), "--shapes",
           *[f"{b}x{s}" for b, s in shapes]]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=list(ARCHS))
    p.add_argument("--batch", nargs="*", type=int, default=[1, 4])
    p.add_argument("--seq", nargs="*", type=int, default=[128, 512])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--variants", nargs="*", help="subset of the variants (default: all)")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--arch", help=argparse.SUPPRESS)
    p.add_argument("--shapes", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        shapes = [tuple(map(int, s.split("x"))) for s in args.shapes]
        print(json.dumps(measure(args.measure, ARCHS[args.arch], shapes, args.threads, args.warmup, args.runs)))
        return

    all_variants = variants()
    chosen = {k: v for k, v in all_variants.items() if not args.variants or k in args.variants or k == "original"}
    rows = []
    for name in args.only:
        arch = ARCHS[name]
        src = export(arch)
        seqs = [FIXED_SEQ[name]] if name in FIXED_SEQ else args.seq
        shapes = [(b, s) for b in args.batch for s in seqs]
        results, nodes = {}, {}
        for label, make in chosen.items():
            path = src
            if make is not None:
                path = CACHE / f"{name}.{label.replace(':', '-')}.onnx"
                try:
                    t0 = time.perf_counter()
                    model = make(src, arch)
                    model.ir_version = min(model.ir_version, 10)
                    onnx.save(model, str(path))
                    results.setdefault(label, {})["rewrite_s"] = time.perf_counter() - t0
                except Exception as e:  # a variant that fails is reported, the run goes on
                    results[label] = {"error": f"rewrite: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
                    continue
            nodes[label] = len(onnx.load(str(path), load_external_data=False).graph.node)
            results.setdefault(label, {}).update(run_variant(path, arch, shapes, args))
            if "error" not in results[label] and label != "original":
                diffs = [float(np.max(np.abs(np.load(f"{path}.{b}x{s}.npy") - np.load(f"{src}.{b}x{s}.npy"))))
                         for b, s in shapes]
                results[label]["max_abs"] = max(diffs)
            print(f"{name} {label}: {results[label]}", file=sys.stderr, flush=True)
        rows.append((name, shapes, results, nodes))
    print(render(rows, list(chosen), args))


def render(rows, labels, args) -> str:
    lines = [
        "## End-to-end latency in ONNX Runtime (CPU)",
        "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {platform.machine()}, {os.cpu_count()} cores, no GPU; "
        f"onnxruntime {__import__('onnxruntime').__version__}, {args.threads} intra-op thread(s), sequential, "
        f"default graph optimizations; median of {args.runs} runs after {args.warmup} warm-up runs. "
        f"Models: TorchScript exports (opset 17, dynamic axes), hidden 512, 8 heads (Llama 4 KV heads), "
        f"{LAYERS} layers, random weights. Command: `python benchmarks/bench_latency.py "
        f"--batch {' '.join(map(str, args.batch))} --seq {' '.join(map(str, args.seq))} --runs {args.runs}`.",
        "",
        "Each cell: milliseconds (original / variant: above 1.00x is faster than the export). "
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
                    cells.append(f"{r[key] * 1e3:.1f} ({base[key] / r[key]:.2f}x)")
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
