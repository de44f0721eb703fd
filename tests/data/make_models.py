"""Generate the real-model ONNX corpus that fusegraph's transformer fusions are tested on.

Why: hand-written pattern tests only prove that a pattern matches the graph its author
imagined. The graphs that users hand to fusegraph come out of ``torch.onnx.export`` of
Hugging Face models, and every exporter / attention implementation / shape mode spells
attention, norms, GELU and RoPE differently (Constant nodes vs initializers, Gemm vs
MatMul+Add, decomposed softmax attention vs opset-23 ``Attention``, Shape/Gather chains
for dynamic axes, causal-mask construction, Casts).  This script freezes a grid of such
exports so that the fusion library can be tested against them without torch installed.

Grid: architecture x attn_implementation (eager, sdpa) x exporter x shape mode, where
exporter is ``torchscript`` (``dynamo=False``, opset 17), ``dynamo18`` (``dynamo=True``,
opset 18) and, for sdpa only, ``dynamo23`` (``dynamo=True``, opset 23: the exporter turns
``scaled_dot_product_attention`` into the ONNX ``Attention`` op there; eager attention at
opset 23 is the same graph as at opset 18, so it is not repeated).  Shape mode is
``static`` (example shapes baked in) or ``dynamic`` (batch and sequence axes symbolic;
ViT and the Whisper encoder only have a dynamic batch, their other axes are fixed by the
config).  Every architecture gets both shape modes (for ViT and the Whisper encoder
``static`` fixes the batch too, the only axis their dynamic exports leave free).  Where a
dynamic export fails, the static export of the same grid point still covers the case
(``static_fallback`` in the manifest marks a static export made only for that reason); every
failure is recorded under ``export_failures``.
Encoder-decoder models (T5, BART) are exported as one graph of the full forward (encoder +
decoder, no cache), fed ``input_ids``, ``attention_mask`` and ``decoder_input_ids``.

Models are built from tiny configs with random weights (fixed seed, no downloads): 2
layers, hidden 64, 4 heads (2 KV heads for Llama/Mistral/Qwen2), MLP width 128 (64 for T5
and BART, whose full encoder+decoder would otherwise reach 1 MB a file), vocab 128.
The counts the fusion library must reach are derived from the config (layers x per-layer
blocks), not from the graph, and written to ``models/MANIFEST.json`` together with each
file's inputs, outputs, op histogram and the result of checking it (onnx full check,
an onnxruntime CPU run compared to PyTorch, and for dynamic files a second run at other
shapes).

Run by hand in an environment with torch, transformers, onnx, onnxruntime and onnxscript
(not the project's dev venv)::

    python tests/data/make_models.py            # whole grid
    python tests/data/make_models.py gpt2 bert  # only these architectures (manifest merged)
    python tests/data/make_models.py mistral --modes static  # only its static files

Exports are deterministic: rerunning rewrites byte-identical files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers

SEED = 0
ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = ROOT / "tests" / "data" / "models"
MANIFEST = OUT_DIR / "MANIFEST.json"
VOCAB = 128
BATCH, SEQ, DEC_SEQ = 2, 16, 8
# Second shape used to prove that a dynamic export really is dynamic.
ALT_BATCH, ALT_SEQ, ALT_DEC_SEQ = 3, 11, 5
MAX_IR_VERSION = 10  # onnxruntime 1.31 loads IR <= 11; 10 is what both exporters can target
# Per-node metadata the dynamo exporter writes that is dropped to keep the corpus small (and
# free of this machine's paths): Python stack traces and the class hierarchy, which repeats
# "namespace".  namespace, name_scopes and fx_node are kept: they tell which HF module and
# aten op a node came from.
DROPPED_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.class_hierarchy")


@dataclass
class Arch:
    """One architecture: how to build it, what it is fed, and what the fusions must find."""

    name: str
    build: object  # callable(attn_implementation) -> torch.nn.Module in eval mode
    inputs: dict  # input name -> (kind, axes); kind in ids|mask|zeros|float; axes symbolic names
    outputs: list
    config: dict  # the tiny config, recorded in the manifest
    expected: dict  # counts derived from the config
    notes: str = ""
    shape_modes: tuple = ("static", "dynamic")
    call_kwargs: dict = field(default_factory=lambda: {"use_cache": False})  # extra forward kwargs


class Wrapper(torch.nn.Module):
    """Fixes the positional order of inputs and returns plain tensors.

    HF ``forward`` signatures put ``past_key_values``/``cache_position`` between the
    inputs we feed, and return ``ModelOutput``; the exporters want positional tensors in
    and a tuple out, with names we choose.
    """

    def __init__(self, arch, model, input_names):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output_names = list(arch.outputs)
        self.extra_kwargs = arch.call_kwargs

    def forward(self, *args):
        out = self.model(**dict(zip(self.input_names, args)), **self.extra_kwargs, return_dict=True)
        return tuple(out[name] for name in self.output_names)


def _from_config(cls, cfg, attn):
    torch.manual_seed(SEED)
    return cls._from_config(cfg, attn_implementation=attn).eval()


def gpt2(attn):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=128, vocab_size=VOCAB,
                                  n_positions=64, bos_token_id=0, eos_token_id=0, use_cache=False)
    return _from_config(transformers.GPT2Model, cfg, attn), cfg


def bert(attn):
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                                  pad_token_id=0, use_cache=False)
    return _from_config(transformers.BertModel, cfg, attn), cfg


def _decoder_only(config_cls, model_cls, **extra):
    def build(attn):
        cfg = config_cls(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False, **extra)
        return _from_config(model_cls, cfg, attn), cfg
    return build


def t5(attn):
    # gated-gelu = the Flan-T5 / T5 v1.1 MLP (GeGLU with the tanh GELU); plain "relu" T5
    # would give no GELU at all.
    cfg = transformers.T5Config(num_layers=2, num_decoder_layers=2, d_model=64, d_kv=16, num_heads=4,
                                d_ff=64, vocab_size=VOCAB, feed_forward_proj="gated-gelu",
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, use_cache=False)
    return _from_config(transformers.T5Model, cfg, attn), cfg


def bart(attn):
    cfg = transformers.BartConfig(encoder_layers=2, decoder_layers=2, d_model=64, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                  vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=1,
                                  bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                                  forced_eos_token_id=2, use_cache=False)
    return _from_config(transformers.BartModel, cfg, attn), cfg


def vit(attn):
    cfg = transformers.ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                 intermediate_size=128, image_size=32, patch_size=8, num_channels=3)
    return _from_config(transformers.ViTModel, cfg, attn), cfg


def whisper_encoder(attn):
    cfg = transformers.WhisperConfig(encoder_layers=2, decoder_layers=2, d_model=64, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                     num_mel_bins=80, max_source_positions=16, max_target_positions=32,
                                     vocab_size=VOCAB, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                     decoder_start_token_id=0, use_cache=False)
    return _from_config(transformers.WhisperModel, cfg, attn).get_encoder().eval(), cfg


TEXT = {"input_ids": ("ids", ("batch", "seq")), "attention_mask": ("mask", ("batch", "seq"))}
ENC_DEC = {**TEXT, "decoder_input_ids": ("ids", ("batch", "decoder_seq"))}
L = 2  # layers everywhere (encoder and decoder alike)


def _counts(attention, norm, norm_kind, gelu=0, gelu_kind=None, rope=0, glu=0, glu_kind=None):
    return {"attention": attention, "norm": norm, "norm_kind": norm_kind, "gelu": gelu, "gelu_kind": gelu_kind,
            "rope": rope, "glu_mlp": glu, "glu_kind": glu_kind}


ARCHS = [
    Arch("gpt2", gpt2, TEXT, ["last_hidden_state"], {},
         _counts(L, 2 * L + 1, "LayerNorm", L, "tanh"),
         "Conv1D layers (Gemm/MatMul with transposed weight layout); gelu_new = tanh approximation; "
         "norms: ln_1, ln_2 per layer + ln_f"),
    Arch("bert", bert, {**TEXT, "token_type_ids": ("zeros", ("batch", "seq"))},
         ["last_hidden_state", "pooler_output"], {},
         _counts(L, 2 * L + 1, "LayerNorm", L, "erf"),
         "norms: embeddings LayerNorm + attention-output and output LayerNorm per layer (post-norm, "
         "residual Add right before each: SkipLayerNorm candidates); pooler is Gemm+Tanh, not a GELU"),
    Arch("llama", _decoder_only(transformers.LlamaConfig, transformers.LlamaModel), TEXT, ["last_hidden_state"], {},
         _counts(L, 2 * L + 1, "RMSNorm", rope=2 * L, glu=L, glu_kind="SwiGLU"),
         "GQA 4 q heads / 2 kv heads (repeat_kv); RoPE counted once for q and once for k per layer; "
         "norms: input_layernorm, post_attention_layernorm per layer + final norm"),
    Arch("mistral", _decoder_only(transformers.MistralConfig, transformers.MistralModel), TEXT,
         ["last_hidden_state"], {},
         _counts(L, 2 * L + 1, "RMSNorm", rope=2 * L, glu=L, glu_kind="SwiGLU"),
         "like llama, with the default sliding_window=4096 (the mask builder adds a sliding-window term)"),
    Arch("qwen2", _decoder_only(transformers.Qwen2Config, transformers.Qwen2Model), TEXT, ["last_hidden_state"], {},
         _counts(L, 2 * L + 1, "RMSNorm", rope=2 * L, glu=L, glu_kind="SwiGLU"),
         "like llama, with biases on the q/k/v projections"),
    Arch("t5", t5, ENC_DEC, ["last_hidden_state", "encoder_last_hidden_state"], {},
         _counts(3 * L, 2 * L + 1 + 3 * L + 1, "RMSNorm", 2 * L, "tanh", glu=2 * L, glu_kind="GeGLU"),
         "full encoder+decoder forward; attention = encoder self + decoder self (causal) + decoder cross per "
         "layer, unscaled (no 1/sqrt(d)) with a relative position bias added to the scores; T5LayerNorm is "
         "RMSNorm (no mean subtraction, no bias); gelu counted inside the GeGLU MLPs"),
    Arch("bart", bart, ENC_DEC, ["last_hidden_state", "encoder_last_hidden_state"], {},
         _counts(3 * L, 1 + 2 * L + 1 + 3 * L, "LayerNorm", 2 * L, "erf"),
         "full encoder+decoder forward; attention = encoder self + decoder self (causal) + decoder cross per "
         "layer; norms: layernorm_embedding of encoder and decoder + 2 per encoder layer + 3 per decoder layer"),
    Arch("vit", vit, {"pixel_values": ("float", ("batch", None, None, None))},
         ["last_hidden_state", "pooler_output"], {},
         _counts(L, 2 * L + 1, "LayerNorm", L, "erf"),
         "image 32x32, patch 8 -> 16 patches + CLS = 17 tokens; pre-norm; patch embedding is a Conv; "
         "pooler is Gemm+Tanh", call_kwargs={}),
    Arch("whisper_encoder", whisper_encoder, {"input_features": ("float", ("batch", None, None))},
         ["last_hidden_state"], {},
         _counts(L, 2 * L + 1, "LayerNorm", 2 + L, "erf"),
         "encoder only; input_features [batch, 80 mel bins, 2*max_source_positions=32] (length fixed by the "
         "model); gelu count includes the 2 GELUs after the two input Convs", call_kwargs={}),
]


EXPORTS = [  # (label, dynamo, opset, attn implementations it is run for)
    ("torchscript", False, 17, ("eager", "sdpa")),
    ("dynamo18", True, 18, ("eager", "sdpa")),
    ("dynamo23", True, 23, ("sdpa",)),
]


def example_inputs(arch: Arch, cfg, batch, seq, dec_seq, rng) -> dict:
    """Tensors for one forward: token ids within vocab, masks of ones, float features."""
    shapes = {"pixel_values": (batch, cfg.num_channels, cfg.image_size, cfg.image_size) if arch.name == "vit" else None,
              "input_features": (batch, cfg.num_mel_bins, 2 * cfg.max_source_positions)
              if arch.name == "whisper_encoder" else None}
    out = {}
    for name, (kind, _) in arch.inputs.items():
        length = dec_seq if name == "decoder_input_ids" else seq
        if kind == "ids":
            out[name] = torch.from_numpy(rng.integers(0, cfg.vocab_size, size=(batch, length), dtype=np.int64))
        elif kind == "mask":
            out[name] = torch.ones(batch, length, dtype=torch.int64)
        elif kind == "zeros":
            out[name] = torch.zeros(batch, length, dtype=torch.int64)
        else:
            out[name] = torch.from_numpy(rng.standard_normal(shapes[name], dtype=np.float32))
    return out


def dynamic_spec(arch: Arch):
    """Symbolic axes per input, as {input: {axis: name}} (None axes stay static)."""
    return {name: {i: ax for i, ax in enumerate(axes) if ax} for name, (_, axes) in arch.inputs.items()}


def export(arch, model, inputs, dynamo, opset, dynamic, path: Path) -> None:
    """Export one file (exporter chatter silenced), IR capped, bulky node metadata dropped."""
    wrapper = Wrapper(arch, model, inputs).eval()
    args = tuple(inputs.values())
    spec = dynamic_spec(arch) if dynamic else None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = None
            if spec:
                dims = {}
                # The wrapper takes *args, so dynamic_shapes is a tuple matching them.
                shapes = (tuple({i: dims.setdefault(ax, torch.export.Dim(ax)) for i, ax in axes.items()}
                                for axes in spec.values()),)
            program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset,
                                        input_names=list(inputs), output_names=arch.outputs,
                                        dynamic_shapes=shapes)
            program.save(str(path))
        else:
            torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=opset,
                              input_names=list(inputs), output_names=arch.outputs,
                              dynamic_axes={**spec, **{o: {0: "batch"} for o in arch.outputs}} if spec else None)
    model_proto = onnx.load(str(path))
    model_proto.ir_version = min(model_proto.ir_version, MAX_IR_VERSION)
    for node in model_proto.graph.node:
        kept = [p for p in node.metadata_props if p.key not in DROPPED_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(model_proto, str(path))


def check(path: Path, arch, cfg, model, inputs, dynamic, rng) -> dict:
    """onnx full check + ORT CPU run vs PyTorch (and at a second shape when dynamic)."""
    result = {}
    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        result["onnx_checker"] = "ok"
    except Exception as e:  # recorded, the file is kept
        result["onnx_checker"] = f"FAIL: {type(e).__name__}: {str(e)[:400]}"
    runs = [("example", inputs)]
    if dynamic:
        runs.append(("alt_shape", example_inputs(arch, cfg, ALT_BATCH, ALT_SEQ, ALT_DEC_SEQ, rng)
                     if arch.name not in ("vit", "whisper_encoder")
                     else example_inputs(arch, cfg, ALT_BATCH, None, None, rng)))
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        result["ort"] = f"FAIL (session): {type(e).__name__}: {str(e)[:400]}"
        return result
    feeds_names = [i.name for i in sess.get_inputs()]
    for tag, feed in runs:
        try:
            got = sess.run(None, {k: v.numpy() for k, v in feed.items() if k in feeds_names})
            with torch.no_grad():
                ref = Wrapper(arch, model, feed).eval()(*feed.values())
            err = max(float(np.max(np.abs(g - r.numpy()))) for g, r in zip(got, ref))
            result[f"ort_{tag}"] = "ok" if err < 1e-3 else "MISMATCH vs torch"
            result[f"max_abs_diff_{tag}"] = err
            result[f"shapes_{tag}"] = {k: list(v.shape) for k, v in feed.items()}
        except Exception as e:
            result[f"ort_{tag}"] = f"FAIL: {type(e).__name__}: {str(e)[:400]}"
    return result


def graph_io(model_proto):
    def dims(t):
        return [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]
    dtype = lambda t: onnx.helper.tensor_dtype_to_np_dtype(t.type.tensor_type.elem_type).name  # noqa: E731
    return ([{"name": i.name, "dtype": dtype(i), "dims": dims(i)} for i in model_proto.graph.input],
            [{"name": o.name, "dtype": dtype(o), "dims": dims(o)} for o in model_proto.graph.output])


def histogram(model_proto):
    counts = Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                     for n in model_proto.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def config_summary(cfg):
    keys = ["model_type", "num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers",
            "decoder_layers", "hidden_size", "n_embd", "d_model", "num_attention_heads", "n_head", "num_heads",
            "num_key_value_heads", "encoder_attention_heads", "decoder_attention_heads", "head_dim", "d_kv", "intermediate_size", "n_inner", "d_ff", "encoder_ffn_dim",
            "vocab_size", "hidden_act", "activation_function", "feed_forward_proj", "sliding_window",
            "image_size", "patch_size", "num_mel_bins", "max_source_positions", "rms_norm_eps",
            "layer_norm_eps", "layer_norm_epsilon"]
    d = cfg.to_dict()
    return {k: d[k] for k in keys if d.get(k) is not None}


def failure_reason(e: Exception) -> str:
    """The exception's own message: the dynamo exporter wraps it in boilerplate and ANSI colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1].strip()
    return f"{type(e).__name__}: {text[:800]}"


def generate(arch, label, dynamo, opset, attn, dynamic, path: Path) -> dict:
    """Export one grid point, check it, and return its manifest entry (raises if export fails)."""
    rng = np.random.default_rng(SEED)
    model, cfg = arch.build(attn)
    inputs = example_inputs(arch, cfg, BATCH, SEQ, DEC_SEQ, rng)
    try:
        export(arch, model, inputs, dynamo, opset, dynamic, path)
    except Exception:
        path.unlink(missing_ok=True)
        raise
    checks = check(path, arch, cfg, model, inputs, dynamic, rng)
    proto = onnx.load(str(path))
    ins, outs = graph_io(proto)
    for i in ins:
        i["example_shape"] = list(inputs[i["name"]].shape)
    return {
        "architecture": arch.name,
        "hf_class": type(model).__name__,
        "attn_implementation": attn,
        "exporter": f"torch.onnx.export(dynamo={dynamo})",
        "exporter_label": label,
        "opset": opset,
        "ir_version": proto.ir_version,
        "dynamic": dynamic,
        "dynamic_axes": dynamic_spec(arch) if dynamic else {},
        "inputs": ins,
        "outputs": outs,
        "node_count": len(proto.graph.node),
        "initializer_count": len(proto.graph.initializer),
        "file_bytes": path.stat().st_size,
        "op_histogram": histogram(proto),
        "expected": arch.expected,
        "notes": arch.notes,
        "config": config_summary(cfg),
        "checks": checks,
    }


def write_manifest(manifest: dict) -> None:
    manifest["models"] = dict(sorted(manifest["models"].items()))
    manifest["export_failures"] = dict(sorted(manifest["export_failures"].items()))
    for entry in manifest["models"].values():
        # True when the file passed the onnx full check and every ORT run matched PyTorch;
        # consumers that execute the originals should skip the others.
        entry["checks_ok"] = all(v == "ok" for k, v in entry["checks"].items()
                                 if k == "onnx_checker" or k.startswith("ort_"))
    manifest["generator"] = {
        "script": "tests/data/make_models.py", "seed": SEED, "torch": torch.__version__,
        "transformers": transformers.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
        "onnxscript": __import__("onnxscript").__version__, "python": sys.version.split()[0],
        "example_shapes": {"batch": BATCH, "seq": SEQ, "decoder_seq": DEC_SEQ},
        "alt_shapes_for_dynamic_check": {"batch": ALT_BATCH, "seq": ALT_SEQ, "decoder_seq": ALT_DEC_SEQ},
        "dropped_node_metadata": list(DROPPED_METADATA),
        "expected_counts_legend": {
            "attention": "attention blocks (self + cross); the fusion target is one attention op each",
            "norm": "LayerNorm or RMSNorm instances (norm_kind), before any Skip* merging",
            "gelu": "GELU activations, including those inside GeGLU MLPs (gelu_kind: erf exact or tanh approx)",
            "rope": "rotary embedding applications, counted separately for q and for k",
            "glu_mlp": "gated MLPs (glu_kind SwiGLU or GeGLU)",
        },
    }
    MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archs", nargs="*", help="architectures to (re)generate; default all")
    parser.add_argument("--modes", nargs="+", choices=("static", "dynamic"), default=["static", "dynamic"],
                        help="shape modes to (re)generate; files and entries of the others are kept")
    args = parser.parse_args(argv)
    selected = [a for a in ARCHS if not args.archs or a.name in args.archs]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {"models": {}, "export_failures": {}}
    for arch in selected:
        # The selected shape modes of an architecture are regenerated whole: their entries (and
        # below, files) of grid points no longer in the grid go.
        manifest["models"] = {k: v for k, v in manifest["models"].items()
                              if v["architecture"] != arch.name
                              or ("dynamic" if v["dynamic"] else "static") not in args.modes}
        manifest["export_failures"] = {k: v for k, v in manifest["export_failures"].items()
                                       if not k.startswith(f"{arch.name}-") or k.rsplit("-", 1)[1] not in args.modes}
        for label, dynamo, opset, attns in EXPORTS:
            for attn in attns:
                modes = [m for m in arch.shape_modes if m in args.modes]
                for mode in modes:
                    stem = f"{arch.name}-{attn}-{label}-{mode}"
                    path = OUT_DIR / f"{stem}.onnx"
                    t0 = time.time()
                    try:
                        entry = generate(arch, label, dynamo, opset, attn, mode == "dynamic", path)
                    except Exception as e:
                        reason = failure_reason(e)
                        manifest["export_failures"][stem] = reason
                        print(f"EXPORT FAILED {stem}: {reason}", flush=True)
                        if mode == "dynamic" and "static" not in arch.shape_modes:
                            modes.append("static")  # keep the grid point covered at fixed shapes
                    else:
                        # True for a static export made only because the dynamic one failed.
                        entry["static_fallback"] = mode not in arch.shape_modes
                        manifest["models"][path.name] = entry
                        status = ", ".join(f"{k}={v}" for k, v in entry["checks"].items()
                                           if not k.startswith("shapes"))
                        print(f"wrote {path.relative_to(ROOT)} ({entry['file_bytes'] // 1024} KiB, "
                              f"{entry['node_count']} nodes, {time.time() - t0:.1f}s) {status}", flush=True)
                    write_manifest(manifest)  # after every file, so an interrupted run keeps its work
        for old in OUT_DIR.glob(f"{arch.name}-*.onnx"):
            if old.name not in manifest["models"]:
                old.unlink()
    print(f"wrote {MANIFEST.relative_to(ROOT)} ({len(manifest['models'])} models, "
          f"{len(manifest['export_failures'])} export failures)")


if __name__ == "__main__":
    main()
