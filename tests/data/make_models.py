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

The wider families (``WIDE``, issue 11) are half as wide (hidden 32, 4 heads of 8, MLP 64,
vocab 64) so that the corpus stays under 60 MB: KV-cache decode steps (Llama, GPT-2: past
K/V in, present out), RoBERTa, DistilBERT, ModernBERT, DINOv2, Swin, CLIP vision, DeiT,
wav2vec2, HuBERT, Gemma2 (soft-capping), Gemma (GeGLU, MQA), Bloom and MPT (ALiBi), Falcon
and GPT-BigCode (MQA), nn.MultiheadAttention (heads in the batch), Mixtral (MoE), Phi, GPT-J,
GPT-NeoX (partial / interleaved RoPE), the original T5 encoder and DeBERTa-v2 (disentangled
attention). Each is exported with its
sdpa attention (eager where the family has no sdpa or sdpa drops what it tests: Gemma2's
soft-cap) by every exporter, static at batch 1 (the shape users export at) and dynamic.
Their counts are derived from the built model (``derive_expected``: the attention, norm,
GELU and gated-MLP modules its forward calls). ``FORMS`` adds the forms users feed for a few
original families: fp16, bf16, QDQ int8 (onnxruntime's quantize_static) and opset 13/14.
No diffusion UNet: transformers has none to build from. Exports that fail are recorded under
``export_failures``; so is a dynamic export that runs only at its example shapes.
Fusions fusegraph does not reach yet are listed in ``tests/data/known_misses.json`` (see
tests/corpus.py), by hand, with their reasons.

Run by hand in an environment with torch, transformers, onnx, onnxruntime and onnxscript
(not the project's dev venv)::

    python tests/data/make_models.py            # whole grid
    python tests/data/make_models.py gpt2 bert  # only these architectures (manifest merged)
    python tests/data/make_models.py mistral --modes static  # only its static files
    python tests/data/make_models.py llama --labels torchscript-qdq  # only these exporter labels

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
# free of this machine's paths): Python stack traces, the class hierarchy, and "namespace" (the
# module path with each module's class, a third of a small dynamo file).  name_scopes and
# fx_node are kept: they tell which HF module and aten op a node came from.
DROPPED_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.class_hierarchy", "namespace")


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
    attns: tuple = ("eager", "sdpa")  # attention implementations exported (dynamo23 only for sdpa)
    static_batch: int = 0  # batch of the static exports; 0: BATCH (the new families use 1, as users do)
    float_shape: object = None  # callable(cfg, batch, seq) -> shape of its float input(s)
    forms: tuple = ()  # extra (label, dynamo, opset, attn, dtype, quantize, modes) exports: FORMS
    rope: bool = False  # rotary q and k in every attention (counted when expected is derived)
    glu: tuple = ()  # (gated-MLP module class, kind) counted when expected is derived
    router_softmax: int = 0  # Softmax ops outside attention (MoE routers), recorded as expected softmax_left


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
        named = dict(zip(self.input_names, args))
        if any(n.startswith("past_key_") for n in named):
            layers = sorted(int(n.rsplit("_", 1)[1]) for n in named if n.startswith("past_key_"))
            cache = transformers.DynamicCache([(named.pop(f"past_key_{i}"), named.pop(f"past_value_{i}"))
                                               for i in layers])
            out = self.model(**named, past_key_values=cache, use_cache=True, return_dict=True)
            present = {f"present_{kind}_{i}": getattr(cache.layers[i], kind + "s")
                       for i in layers for kind in ("key", "value")}
            return (out.last_hidden_state, *(present[n] for n in self.output_names[1:]))
        out = self.model(**named, **self.extra_kwargs, return_dict=True)
        if not isinstance(out, dict):  # a plain torch module (nn.MultiheadAttention families)
            return out if isinstance(out, tuple) else (out,)
        return tuple(out[name] for name in self.output_names)


def _from_config(cls, cfg, attn, **load):
    torch.manual_seed(SEED)
    return cls._from_config(cfg, attn_implementation=attn, **load).eval()


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


# -- the wider families (issue 11): hidden 32, 4 heads of 8, MLP 64, vocab 64, 2 layers -------------
# Half the width of the families above: ~20 families x 5-6 exports must fit the corpus budget
# (< 60 MB committed), and the fusions do not depend on the width.
H, HEADS, FF, SMALL_VOCAB = 32, 4, 64, 64


NORM_CLASS = re.compile(r"(LayerNorm|RMSNorm)$")


def randomize_norms(model):
    """Move every norm's weight and bias off their 1 / 0 initialisation (seeded). Why: norms of
    one input with equal parameters are one computation, and the dynamo exporter merges them
    (GPT-NeoX's two parallel-residual LayerNorms became one), so the config's count would not
    be the graph's; random parameters also make a fusion that mixes up weight and bias fail."""
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for module in model.modules():
            if NORM_CLASS.search(type(module).__name__):
                for name in ("weight", "bias"):
                    param = getattr(module, name, None)
                    if isinstance(param, torch.nn.Parameter):
                        param.add_(0.1 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


def _tiny(config_cls, model_cls, load=None, **kw):
    """A builder for an HF model class from a tiny config (kw overrides the config's defaults;
    load: extra ``_from_config`` arguments), its norms' parameters randomized."""
    def build(attn):
        cfg = config_cls(**kw)
        return randomize_norms(_from_config(model_cls, cfg, attn, **(load or {}))), cfg
    return build


def _text(**kw):
    return {"vocab_size": SMALL_VOCAB, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0, "use_cache": False,
            **kw}


def _lm(**kw):  # the Llama-style config keys
    return _text(**{"num_hidden_layers": L, "hidden_size": H, "num_attention_heads": HEADS,
                    "intermediate_size": FF, "max_position_embeddings": 64, **kw})


def _vision(**kw):
    return dict(num_hidden_layers=L, hidden_size=H, num_attention_heads=HEADS, intermediate_size=FF,
                image_size=32, patch_size=8, num_channels=3, **kw)


def _audio(**kw):  # 2 feature convs (stride 5, 2) over 400 samples -> 39 frames
    return dict(vocab_size=SMALL_VOCAB, num_hidden_layers=L, hidden_size=H, num_attention_heads=HEADS,
                intermediate_size=FF, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                num_feat_extract_layers=2, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                feat_extract_norm="layer", **kw)


class AttentionPool(torch.nn.Module):
    """Heads merged into the batch, as ``nn.MultiheadAttention`` exports them: token embeddings,
    a pre-norm self-attention block with a GELU MLP, and an attention-pooling head (one learned
    probe query over the tokens, as CLIP/SigLIP-style poolers do)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(SMALL_VOCAB, H)
        self.norm1, self.norm2, self.norm_out = (torch.nn.LayerNorm(H) for _ in range(3))
        self.attn = torch.nn.MultiheadAttention(H, HEADS, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(H, FF), torch.nn.GELU(), torch.nn.Linear(FF, H))
        self.probe = torch.nn.Parameter(torch.randn(1, 1, H))
        self.pool = torch.nn.MultiheadAttention(H, HEADS, batch_first=True)

    def forward(self, input_ids, **_):
        x = self.embed(input_ids)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        pooled = self.pool(self.probe.expand(x.shape[0], -1, -1), x, x, need_weights=False)[0]
        return self.norm_out(x), pooled[:, 0]


def attention_pool(attn):
    torch.manual_seed(SEED)
    return randomize_norms(AttentionPool().eval()), transformers.PretrainedConfig(vocab_size=SMALL_VOCAB, hidden_size=H,
                                                                 num_attention_heads=HEADS,
                                                                 num_hidden_layers=1, intermediate_size=FF)


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


def _decode_inputs(layers):
    """A decode step: one new token, the mask over past + new, and every layer's cached K and V."""
    past = {f"past_{kind}_{i}": ("past", ("batch", None, "past_seq", None))
            for i in range(layers) for kind in ("key", "value")}
    return {"input_ids": ("ids", ("batch", None)), "attention_mask": ("mask", ("batch", "total_seq")), **past}


def _present(layers):
    return ["last_hidden_state", *(f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value"))]


IMAGE = {"pixel_values": ("float", ("batch", None, None, None))}
AUDIO = {"input_values": ("float", ("batch", "samples"))}
_image = lambda cfg, batch, seq: (batch, 3, 32, 32)  # noqa: E731
_audio_samples = lambda cfg, batch, seq: (batch, 25 * seq)  # noqa: E731  400 samples -> 39 frames
SDPA, EAGER = ("sdpa",), ("eager",)
T = transformers

#: The wider families (issue 11). expected=None: the counts are derived from the built model
#: (`derive_expected`: invocations of its attention / norm / GELU / gated-MLP modules during the
#: example forward, RoPE twice per attention where the family rotates q and k). Static exports
#: run at batch 1 (the shape users export at); eager-only families get no dynamo23 export.
WIDE = [{"static_batch": 1, "attns": SDPA, "call_kwargs": {}, **a} for a in [
    dict(name="llama_decode", build=_tiny(T.LlamaConfig, T.LlamaModel, **_lm(num_key_value_heads=2)),
         inputs=_decode_inputs(L), outputs=_present(L), rope=True, glu=("LlamaMLP", "SwiGLU"),
         notes="decode step with a KV cache: input_ids [batch, 1], past_key/value_<i> [batch, 2 kv heads, "
               "past_seq, 8] in, present_* (past + 1) out; GQA 4/2"),
    dict(name="gpt2_decode", build=_tiny(T.GPT2Config, T.GPT2Model, **_text(n_layer=L, n_embd=H, n_head=HEADS,
                                                                             n_inner=FF, n_positions=64)),
         inputs=_decode_inputs(L), outputs=_present(L),
         notes="decode step with a KV cache (past_key/value_<i> [batch, 4, past_seq, 8]); Conv1D, tanh GELU"),
    dict(name="roberta", build=_tiny(T.RobertaConfig, T.RobertaModel, **_lm(pad_token_id=1, bos_token_id=0,
                                                                            eos_token_id=2)),
         inputs=TEXT, outputs=["last_hidden_state"], notes="BERT-style post-norm encoder, offset positions"),
    dict(name="distilbert", build=_tiny(T.DistilBertConfig, T.DistilBertModel, vocab_size=SMALL_VOCAB, n_layers=L,
                                        n_heads=HEADS, dim=H, hidden_dim=FF, max_position_embeddings=64),
         inputs=TEXT, outputs=["last_hidden_state"], notes="post-norm encoder without token types"),
    dict(name="modernbert", build=_tiny(T.ModernBertConfig, T.ModernBertModel, vocab_size=SMALL_VOCAB,
                                        num_hidden_layers=L, hidden_size=H, num_attention_heads=HEADS,
                                        intermediate_size=FF, max_position_embeddings=64, local_attention=8,
                                        layer_types=["full_attention", "sliding_attention"], pad_token_id=0,
                                        eos_token_id=1, bos_token_id=2, cls_token_id=2, sep_token_id=1),
         inputs=TEXT, outputs=["last_hidden_state"], rope=True, glu=("ModernBertMLP", "GeGLU"),
         notes="pre-norm, bias-free LayerNorm (layer 0 has no attention norm), RoPE, GeGLU (erf), one "
               "global and one sliding-window (8) layer"),
    dict(name="dinov2", build=_tiny(T.Dinov2Config, T.Dinov2Model, num_hidden_layers=L, hidden_size=H,
                                    num_attention_heads=HEADS, mlp_ratio=2, image_size=32, patch_size=8),
         inputs=IMAGE, outputs=["last_hidden_state", "pooler_output"], float_shape=_image,
         notes="ViT with LayerScale and interpolated position embeddings"),
    dict(name="swin", build=_tiny(T.SwinConfig, T.SwinModel, image_size=32, patch_size=4, embed_dim=16,
                                  depths=[2, 1], num_heads=[2, 4], window_size=4, mlp_ratio=2.0),
         inputs=IMAGE, outputs=["last_hidden_state", "pooler_output"], float_shape=_image, attns=EAGER,
         notes="window attention with a relative position bias (windows in the batch); stage 0 block 2 is "
               "shifted (attention mask); patch merging"),
    dict(name="clip_vision", build=_tiny(T.CLIPVisionConfig, T.CLIPVisionModel, **_vision()),
         inputs=IMAGE, outputs=["last_hidden_state", "pooler_output"], float_shape=_image,
         notes="pre_layrnorm + pre-norm layers + post_layernorm; quick_gelu (x*sigmoid(1.702x)) is not "
               "counted as a GELU"),
    dict(name="deit", build=_tiny(T.DeiTConfig, T.DeiTModel, **_vision()),
         inputs=IMAGE, outputs=["last_hidden_state", "pooler_output"], float_shape=_image,
         notes="ViT with a distillation token (18 tokens)"),
    dict(name="wav2vec2", build=_tiny(T.Wav2Vec2Config, T.Wav2Vec2Model, **_audio()),
         inputs=AUDIO, outputs=["last_hidden_state"], float_shape=_audio_samples,
         notes="raw audio [batch, samples]: 2 feature convs with LayerNorm + GELU, grouped positional conv "
               "(+GELU), post-norm encoder"),
    dict(name="hubert", build=_tiny(T.HubertConfig, T.HubertModel, **_audio()),
         inputs=AUDIO, outputs=["last_hidden_state"], float_shape=_audio_samples,
         notes="like wav2vec2, with a LayerNorm in the feature projection"),
    dict(name="gemma2", build=_tiny(T.Gemma2Config, T.Gemma2Model, **_lm(num_key_value_heads=2, head_dim=8,
                                                                        query_pre_attn_scalar=8, sliding_window=8,
                                                                        layer_types=["sliding_attention",
                                                                                     "full_attention"])),
         inputs=TEXT, outputs=["last_hidden_state"], attns=EAGER, rope=True, glu=("Gemma2MLP", "GeGLU"),
         notes="attention logits soft-capped (tanh, cap 50; eager: sdpa has no softcap); sliding window 8 "
               "on layer 0; 4 RMSNorms per layer (pre/post attention and MLP); GeGLU with tanh GELU; GQA 4/2"),
    dict(name="gemma", build=_tiny(T.GemmaConfig, T.GemmaModel, **_lm(num_key_value_heads=1, head_dim=8)),
         inputs=TEXT, outputs=["last_hidden_state"], rope=True, glu=("GemmaMLP", "GeGLU"),
         notes="GeGLU (tanh GELU), RMSNorm with (1 + weight), multi-query (1 kv head), scaled embeddings"),
    dict(name="bloom", build=_tiny(T.BloomConfig, T.BloomModel, **_text(n_layer=L, hidden_size=H, n_head=HEADS)),
         inputs=TEXT, outputs=["last_hidden_state"], attns=EAGER,
         notes="ALiBi (baddbmm of the alibi bias, heads in the batch), fused QKV, factored tanh GELU (BloomGelu), "
               "embedding LayerNorm"),
    dict(name="mpt", build=_tiny(T.MptConfig, T.MptModel, n_layers=L, d_model=H, n_heads=HEADS, expansion_ratio=2,
                                 vocab_size=SMALL_VOCAB, max_seq_len=64, use_cache=False),
         inputs=TEXT, outputs=["last_hidden_state"], attns=EAGER,
         notes="ALiBi as a constant [heads, 1, seq] bias, bias-free LayerNorm, exact GELU"),
    dict(name="falcon", build=_tiny(T.FalconConfig, T.FalconModel, **_text(num_hidden_layers=L, hidden_size=H,
                                                                          num_attention_heads=HEADS,
                                                                          multi_query=True, ffn_hidden_size=FF,
                                                                          max_position_embeddings=64)),
         inputs=TEXT, outputs=["last_hidden_state"], rope=True,
         notes="multi-query (one kv head from a fused QKV), parallel attention + MLP off one LayerNorm, RoPE"),
    dict(name="gpt_bigcode", build=_tiny(T.GPTBigCodeConfig, T.GPTBigCodeModel,
                                         **_text(n_layer=L, n_embd=H, n_head=HEADS, n_inner=FF, n_positions=64,
                                                 multi_query=True)),
         inputs=TEXT, outputs=["last_hidden_state"],
         notes="multi-query attention (kv [batch, 1, seq, 8] broadcast over the heads), tanh GELU"),
    dict(name="attention_pool", build=attention_pool, inputs={"input_ids": ("ids", ("batch", "seq"))},
         outputs=["last_hidden_state", "pooled"], attns=("eager",),
         notes="torch.nn.MultiheadAttention (heads in the batch): a self-attention block and an "
               "attention-pooling head with one learned probe query; not an HF model"),
    dict(name="mixtral", build=_tiny(T.MixtralConfig, T.MixtralModel, load={"experts_implementation": "eager"},
                                     **_lm(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
         inputs=TEXT, outputs=["last_hidden_state"], rope=True, router_softmax=L,
         notes="sparse MoE (4 experts, top 2, the eager per-expert loop: the default grouped_mm has no ONNX "
               "export; the SwiGLU experts are not counted as gated MLPs), GQA 4/2"),
    dict(name="phi", build=_tiny(T.PhiConfig, T.PhiModel, **_lm(partial_rotary_factor=0.5)),
         inputs=TEXT, outputs=["last_hidden_state"], rope=True,
         notes="partial rotary (half of each head), parallel attention + MLP, tanh GELU (gelu_new)"),
    dict(name="gptj", build=_tiny(T.GPTJConfig, T.GPTJModel, **_text(n_layer=L, n_embd=H, n_head=HEADS,
                                                                    n_inner=FF, rotary_dim=4, n_positions=64)),
         inputs=TEXT, outputs=["last_hidden_state"], attns=EAGER, rope=True,
         notes="interleaved (rotate_every_two) partial RoPE on 4 of 8 dims, parallel attention + MLP"),
    dict(name="gpt_neox", build=_tiny(T.GPTNeoXConfig, T.GPTNeoXModel, **_lm(rotary_pct=0.5)),
         inputs=TEXT, outputs=["last_hidden_state"], rope=True,
         notes="partial RoPE (half of each head), per-head fused QKV, parallel residual, exact GELU"),
    dict(name="deberta_v2", build=_tiny(T.DebertaV2Config, T.DebertaV2Model,
                                        **_lm(type_vocab_size=0, relative_attention=True, position_buckets=8,
                                              max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
                                              position_biased_input=False, norm_rel_ebd="layer_norm",
                                              share_att_key=True)),
         inputs=TEXT, outputs=["last_hidden_state"], attns=EAGER,
         notes="disentangled attention: Q·Kᵀ/s plus the c2p and p2c relative-position terms (GatherElements of "
               "Q·posKᵀ and K·posQᵀ), heads in the batch, Where(Not(mask), lowest, ·); LayerNorm'd relative "
               "embeddings"),
    dict(name="t5_encoder", build=_tiny(T.T5Config, T.T5EncoderModel, **_text(num_layers=L, d_model=H, d_kv=8,
                                                                             num_heads=HEADS, d_ff=FF,
                                                                             feed_forward_proj="relu")),
         inputs=TEXT, outputs=["last_hidden_state"], attns=EAGER,
         notes="original T5 encoder only: ReLU MLP, unscaled attention with relative position bias, RMSNorm"),
]]


EXPORTS = [  # (label, dynamo, opset, attn implementations it is run for)
    ("torchscript", False, 17, ("eager", "sdpa")),
    ("dynamo18", True, 18, ("eager", "sdpa")),
    ("dynamo23", True, 23, ("sdpa",)),
]

#: The forms users feed, for a few architectures: (label, dynamo, opset, attn, dtype, quantize,
#: shape modes). dtype float16/bfloat16 converts the model (and its float inputs) before export;
#: quantize "static" runs onnxruntime.quantization.quantize_static (QDQ, int8 weights and
#: activations, symmetric, float biases: the form TensorRT takes; calibrated on 4 random feeds)
#: on the float export. Dynamic shapes only, except
#: one static fp16 Llama: the forms change dtypes and opsets, not the shape handling. (A T5 at
#: opset 14 was left out for size: 760 KB for what BERT's opset-14 file already covers.)
FORMS = {
    "llama": (("torchscript-fp16", False, 17, "sdpa", "float16", None, ("static", "dynamic")),
              ("dynamo18-bf16", True, 18, "sdpa", "bfloat16", None, ("dynamic",)),
              ("torchscript13", False, 13, "eager", "float32", None, ("dynamic",)),  # sdpa needs opset 14
              ("torchscript-qdq", False, 17, "sdpa", "float32", "static", ("dynamic",))),
    "bert": (("torchscript14", False, 14, "sdpa", "float32", None, ("dynamic",)),
             ("dynamo18-fp16", True, 18, "sdpa", "float16", None, ("dynamic",)),
             ("torchscript-qdq", False, 17, "sdpa", "float32", "static", ("dynamic",))),
    "gpt2": (("torchscript13", False, 13, "eager", "float32", None, ("dynamic",)),
             ("torchscript-bf16", False, 17, "sdpa", "bfloat16", None, ("dynamic",))),
    "vit": (("dynamo18-fp16", True, 18, "sdpa", "float16", None, ("dynamic",)),),
}
#: How close an export's ONNX Runtime outputs must be to PyTorch's, per form. Int8 activations of
#: a random-weight model calibrated on 4 random feeds are far from the float model (Llama's
#: outputs move by up to ~6): for QDQ the check proves the file runs at every shape, not equality.
TOLERANCE = {"float32": 1e-3, "float16": 3e-2, "bfloat16": 2.5e-1, "qdq": 10.0}

ARCHS += [Arch(expected=None, config={}, **a) for a in WIDE]
for _arch in ARCHS:
    _arch.forms = FORMS.get(_arch.name, ())


def grid(arch: Arch):
    """(label, dynamo, opset, attn, dtype, quantize, modes) of every export of an architecture."""
    for label, dynamo, opset, attns in EXPORTS:
        for attn in attns:
            if attn in arch.attns:
                yield label, dynamo, opset, attn, "float32", None, arch.shape_modes
    yield from arch.forms


def example_inputs(arch: Arch, cfg, batch, seq, dec_seq, rng, dtype=torch.float32) -> dict:
    """Tensors for one forward: token ids within vocab, masks of ones, float features, and for a
    decode step (seq = twice the cache length) one token, the cache and the mask over both."""
    shapes = {"pixel_values": (batch, cfg.num_channels, cfg.image_size, cfg.image_size) if arch.name == "vit" else None,
              "input_features": (batch, cfg.num_mel_bins, 2 * cfg.max_source_positions)
              if arch.name == "whisper_encoder" else None}
    if arch.float_shape:
        shapes = {name: arch.float_shape(cfg, batch, seq) for name in arch.inputs}
    past = (seq or SEQ) // 2
    lengths = {"seq": seq, "decoder_seq": dec_seq, "past_seq": past, "total_seq": past + 1, None: 1}
    out = {}
    for name, (kind, axes) in arch.inputs.items():
        length = lengths[axes[1]] if kind in ("ids", "mask", "zeros") else None
        if kind == "ids":
            out[name] = torch.from_numpy(rng.integers(0, cfg.vocab_size, size=(batch, length), dtype=np.int64))
        elif kind == "mask":
            out[name] = torch.ones(batch, length, dtype=torch.int64)
        elif kind == "zeros":
            out[name] = torch.zeros(batch, length, dtype=torch.int64)
        elif kind == "past":
            heads = cfg.num_attention_heads if cfg.model_type == "gpt2" else cfg.num_key_value_heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            out[name] = torch.from_numpy(rng.standard_normal((batch, heads, past, head_dim), dtype=np.float32))
        else:
            out[name] = torch.from_numpy(rng.standard_normal(shapes[name], dtype=np.float32))
        if out[name].is_floating_point():
            out[name] = out[name].to(dtype)
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
    drop_metadata(model_proto)
    onnx.save(model_proto, str(path))


def drop_metadata(model_proto) -> bool:
    """Remove the DROPPED_METADATA node properties in place; True if any was there."""
    dropped = False
    for node in model_proto.graph.node:
        kept = [p for p in node.metadata_props if p.key not in DROPPED_METADATA]
        dropped |= len(kept) < len(node.metadata_props)
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    return dropped


def check(path: Path, arch, cfg, model, inputs, dynamic, rng, dtype, tolerance) -> dict:
    """onnx full check + ORT CPU run vs PyTorch (and at a second shape when dynamic)."""
    result = {"tolerance": tolerance}
    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        result["onnx_checker"] = "ok"
    except Exception as e:  # recorded, the file is kept
        result["onnx_checker"] = f"FAIL: {type(e).__name__}: {str(e)[:400]}"
    runs = [("example", inputs)]
    if dynamic:
        runs.append(("alt_shape", example_inputs(arch, cfg, ALT_BATCH, ALT_SEQ, ALT_DEC_SEQ, rng, dtype)
                     if arch.name not in ("vit", "whisper_encoder")
                     else example_inputs(arch, cfg, ALT_BATCH, None, None, rng, dtype)))
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
            err = max(float(np.max(np.abs(np.asarray(g, np.float32) - r.float().numpy()))) for g, r in zip(got, ref))
            result[f"ort_{tag}"] = "ok" if err < tolerance else "MISMATCH vs torch"
            result[f"max_abs_diff_{tag}"] = err
            result[f"shapes_{tag}"] = {k: list(v.shape) for k, v in feed.items()}
        except Exception as e:
            result[f"ort_{tag}"] = f"FAIL: {type(e).__name__}: {str(e)[:400]}"
    return result


GELU_TANH_CLASSES = ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation", "BloomGelu")


def derive_expected(arch, model, inputs) -> dict:
    """The counts of a wider family, from the modules its example forward calls: attention
    modules (the innermost class named *Attention, or nn.MultiheadAttention), norms (*LayerNorm,
    *RMSNorm), GELUs (not QuickGELU, a sigmoid), gated MLPs (``arch.glu``); RoPE twice per
    attention where the family rotates q and k. Counted per call, as the export unrolls them."""
    calls, kinds = Counter(), {"norm": set(), "gelu": set()}

    def category(module):
        cls = type(module).__name__
        if isinstance(module, torch.nn.MultiheadAttention) or (
                cls.endswith("Attention") and not any(type(m).__name__.endswith("Attention")
                                                      for m in module.modules() if m is not module)):
            return "attention", None
        if NORM_CLASS.search(cls):
            return "norm", "RMSNorm" if "RMS" in cls or cls == "T5LayerNorm" else "LayerNorm"
        if ("GELU" in cls.upper() and "QUICK" not in cls.upper()) or cls == "BloomGelu":
            tanh = cls in GELU_TANH_CLASSES or getattr(module, "approximate", "none") == "tanh"
            return "gelu", "tanh" if tanh else "erf"
        if arch.glu and cls == arch.glu[0]:
            return "glu_mlp", None
        return None, None

    active = []  # a GELU module calling another is one GELU

    def pre(module, _):
        cat, kind = category(module)
        if cat and not (cat == "gelu" and "gelu" in active):
            calls[cat] += 1
            if kind:
                kinds[cat].add(kind)
        active.append(cat)

    def post(module, _, __):
        active.pop()

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with torch.no_grad():
            Wrapper(arch, model, inputs).eval()(*inputs.values())
    finally:
        for h in handles:
            h.remove()
    kind = lambda cat: "/".join(sorted(kinds[cat])) or None  # noqa: E731
    return {**_counts(calls["attention"], calls["norm"], kind("norm"), calls["gelu"], kind("gelu"),
                      2 * calls["attention"] if arch.rope else 0, calls["glu_mlp"], arch.glu[1] if arch.glu else None),
            "softmax_left": arch.router_softmax}


def quantized_policy(expected: dict, quantize) -> dict:
    """A QDQ export's targets: its attention stays unfused by policy (issue 11 item 11: BMMs that
    read DequantizeLinear stay visible, so TensorRT keeps them in INT8), so 0 attention ops are
    expected and the blocks are recorded as ``attention_left_quantized``."""
    if not quantize:
        return expected
    return {**expected, "attention": 0, "attention_left_quantized": expected["attention"],
            "softmax_left": expected.get("softmax_left", 0) + expected["attention"]}


def quantize_qdq(path: Path, arch, cfg, rng) -> None:
    """Replace the float export at `path` by its QDQ int8 form (ORT's static quantizer)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{k: v.numpy() for k, v in example_inputs(arch, cfg, BATCH, SEQ, DEC_SEQ, rng).items()}
                               for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        # The QDQ form ORT documents for TensorRT: symmetric (zero points 0) with float biases;
        # TensorRT refuses ORT's defaults (asymmetric activations, int32 DequantizeLinear biases).
        quantize_static(str(path), str(path), Feeds(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        extra_options={"QuantizeBias": False, "ActivationSymmetric": True, "WeightSymmetric": True})


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
            "layer_norm_eps", "layer_norm_epsilon", "n_layers", "n_heads", "dim", "hidden_dim", "num_kv_heads",
            "multi_query", "partial_rotary_factor", "rotary_pct", "rotary_dim", "attn_logit_softcapping",
            "query_pre_attn_scalar", "num_local_experts", "num_experts_per_tok", "embed_dim", "depths",
            "window_size", "expansion_ratio", "hidden_activation", "activation", "local_attention", "layer_types",
            "conv_dim", "feat_extract_norm"]
    d = cfg.to_dict()
    return {k: d[k] for k in keys if d.get(k) is not None}


def failure_reason(e: Exception) -> str:
    """The exception's own message: the dynamo exporter wraps it in boilerplate and ANSI colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1].strip()
    return f"{type(e).__name__}: {text[:800]}"


def generate(arch, label, dynamo, opset, attn, dtype, quantize, dynamic, path: Path) -> dict:
    """Export one grid point, check it, and return its manifest entry (raises if export fails)."""
    rng = np.random.default_rng(SEED)
    model, cfg = arch.build(attn)
    torch_dtype = getattr(torch, dtype)
    model = model.to(torch_dtype)
    batch = BATCH if dynamic or not arch.static_batch else arch.static_batch
    inputs = example_inputs(arch, cfg, batch, SEQ, DEC_SEQ, rng, torch_dtype)
    try:
        export(arch, model, inputs, dynamo, opset, dynamic, path)
        if quantize:
            quantize_qdq(path, arch, cfg, rng)
    except Exception:
        path.unlink(missing_ok=True)
        raise
    tolerance = TOLERANCE["qdq" if quantize else dtype]
    checks = check(path, arch, cfg, model, inputs, dynamic, rng, torch_dtype, tolerance)
    if checks.get("ort_example") == "ok" and checks.get("ort_alt_shape", "ok") != "ok":
        # The exporter baked an example dimension into the graph: a file that claims dynamic axes
        # but only runs at the shapes it was traced at is a failed dynamic export, not a model.
        path.unlink()
        raise RuntimeError(f"dynamic export runs only at its example shapes: {checks['ort_alt_shape'][:300]}")
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
        "dtype": dtype,
        "quantization": "QDQ int8 (onnxruntime.quantization.quantize_static)" if quantize else None,
        "expected": quantized_policy(arch.expected or derive_expected(arch, model.float(), {
            k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}), quantize),
        "expected_derived_from": "config" if arch.expected else "model forward (derive_expected)",
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
            "attention_left_quantized": "QDQ exports only: attention blocks whose BMMs read DequantizeLinear, left "
                                        "unfused by policy (attention is then 0)",
            "softmax_left": "Softmax ops a complete fuser leaves (MoE routers, quantized attention); absent: 0",
        },
    }
    MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archs", nargs="*", help="architectures to (re)generate; default all")
    parser.add_argument("--modes", nargs="+", choices=("static", "dynamic"), default=["static", "dynamic"],
                        help="shape modes to (re)generate; files and entries of the others are kept")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="exporter labels to (re)generate (torchscript, dynamo18, torchscript-fp16, ...); "
                             "default all; files and entries of the others are kept")
    args = parser.parse_args(argv)
    selected = [a for a in ARCHS if not args.archs or a.name in args.archs]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {"models": {}, "export_failures": {}}

    def selected_point(stem):  # a stem "<arch>-<attn>-<label>-<mode>" of a selected grid point
        label, mode = stem.split("-", 2)[2].rsplit("-", 1)
        return mode in args.modes and (args.labels is None or label in args.labels)

    for arch in selected:
        # The selected grid points of an architecture are regenerated whole: their entries (and
        # below, files) of grid points no longer in the grid go.
        mine = lambda stem: stem.startswith(f"{arch.name}-") and selected_point(stem)  # noqa: E731
        manifest["models"] = {k: v for k, v in manifest["models"].items() if not mine(k.removesuffix(".onnx"))}
        manifest["export_failures"] = {k: v for k, v in manifest["export_failures"].items() if not mine(k)}
        for label, dynamo, opset, attn, dtype, quantize, shape_modes in grid(arch):
            if args.labels is not None and label not in args.labels:
                continue
            modes = [m for m in shape_modes if m in args.modes]
            for mode in modes:
                stem = f"{arch.name}-{attn}-{label}-{mode}"
                path = OUT_DIR / f"{stem}.onnx"
                t0 = time.time()
                try:
                    entry = generate(arch, label, dynamo, opset, attn, dtype, quantize, mode == "dynamic", path)
                except Exception as e:
                    reason = failure_reason(e)
                    manifest["export_failures"][stem] = reason
                    print(f"EXPORT FAILED {stem}: {reason}", flush=True)
                    if mode == "dynamic" and "static" not in shape_modes:
                        modes.append("static")  # keep the grid point covered at fixed shapes
                else:
                    # True for a static export made only because the dynamic one failed.
                    entry["static_fallback"] = mode not in shape_modes
                    manifest["models"][path.name] = entry
                    status = ", ".join(f"{k}={v}" for k, v in entry["checks"].items()
                                       if not k.startswith("shapes"))
                    print(f"wrote {path.relative_to(ROOT)} ({entry['file_bytes'] // 1024} KiB, "
                          f"{entry['node_count']} nodes, {time.time() - t0:.1f}s) {status}", flush=True)
                write_manifest(manifest)  # after every file, so an interrupted run keeps its work
        write_manifest(manifest)  # entries of grid points no longer in the grid went above
        for old in OUT_DIR.glob(f"{arch.name}-*.onnx"):
            if old.name not in manifest["models"] and mine(old.name.removesuffix(".onnx")):
                old.unlink()
    print(f"wrote {MANIFEST.relative_to(ROOT)} ({len(manifest['models'])} models, "
          f"{len(manifest['export_failures'])} export failures)")


if __name__ == "__main__":
    main()
