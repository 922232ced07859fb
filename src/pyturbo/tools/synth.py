"""Synthetic GGUF models: llama-architecture files (ModelShape, PRESETS) and GPT-OSS mixture-of-experts files
(GptOssShape, GPT_OSS_PRESETS) with random weights, deterministic by seed.

Prefill speed depends on shapes, not on weight values, so benchmarks and tests use these instead of downloads.
The header is written first and then one tensor at a time, so even a 70B-shaped file never needs all its weights
in memory, and an interrupted write never leaves a truncated file at the destination.

    path = cached_model("bench-8l")                          # written once, then reused
    path = cached_model("gpt-oss-tiny")                      # a GPT-OSS-shaped MoE small enough for CPU tests
    write_model("m.gguf", ModelShape(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=4, n_vocab=1000))
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import settings

# Part of cached file names: bump whenever write_model's output for the same arguments changes.
FORMAT_VERSION = 3

# dtype name -> (GGMLQuantizationType name, LlamaFileType value for general.file_type)
DTYPES: dict[str, tuple[str, int]] = {
    "f32": ("F32", 0), "f16": ("F16", 1), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2),
}
_QK = 32  # values per block of q8_0 / q4_0: rows must be a whole number of blocks

# Values generated per chunk; each chunk has its own random stream (keyed by seed, tensor, chunk), so chunks can be
# generated on several threads and the bytes do not depend on the thread count. Changing it changes the output.
_CHUNK = 1 << 22


@dataclass(frozen=True)
class ModelShape:
    """Hyper-parameters of a llama-architecture model (n_embd = n_head * head_dim)."""
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_ctx_train: int = 32768
    dtype: str = "f16"
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-5

    def __post_init__(self):
        for name in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "n_vocab", "n_ctx_train"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name} must be a positive int, not {v!r}")
        for name in ("rope_freq_base", "rms_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive finite number, not {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}): "
                             f"change n_head to a divisor of n_embd or n_embd to a multiple of n_head")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv}): "
                             f"change n_head_kv to a divisor of n_head")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, not {self.dtype!r}")
        if DTYPES[self.dtype][0] not in ("F32", "F16") and (self.n_embd % _QK or self.n_ff % _QK):
            raise ValueError(f"dtype {self.dtype!r} stores rows in blocks of {_QK} values, so n_embd and n_ff must be "
                             f"multiples of {_QK} (got n_embd={self.n_embd}, n_ff={self.n_ff}): round them up to a "
                             f"multiple of {_QK} or use dtype 'f16'")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_params(self) -> int:
        E, F, kv = self.n_embd, self.n_ff, self.n_head_kv * self.head_dim
        per_layer = 2 * E + 2 * E * E + 2 * kv * E + 3 * F * E
        return 2 * self.n_vocab * E + E + self.n_layer * per_layer


PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(n_layer=4, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, n_vocab=512, dtype="f32"),
    "bench-small": ModelShape(n_layer=8, n_embd=512, n_ff=1408, n_head=8, n_head_kv=2, n_vocab=8000),
    "bench-8l": ModelShape(n_layer=8, n_embd=1024, n_ff=2816, n_head=16, n_head_kv=4, n_vocab=32000),
    "bench-16l": ModelShape(n_layer=16, n_embd=1024, n_ff=2816, n_head=16, n_head_kv=4, n_vocab=32000),
    "8b": ModelShape(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, n_vocab=128256, n_ctx_train=131072),
    "8b-q4": ModelShape(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, n_vocab=128256,
                        n_ctx_train=131072, dtype="q4_0"),
    "70b": ModelShape(n_layer=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, n_vocab=128256,
                      n_ctx_train=131072, dtype="q4_0"),
}


@dataclass(frozen=True)
class GptOssShape:
    """Hyper-parameters of a GPT-OSS model (llama.cpp's "gpt-oss" architecture): attention with sinks, q/k/v/o
    biases and a head_dim of its own (n_head * head_dim need not be n_embd); every other layer, the first included,
    attends to a sliding window of n_swa tokens (llama.cpp's default pattern for the arch); each layer's feed-forward
    is n_expert SwiGLU experts (with biases) of which a router picks n_expert_used per token. Expert weights are
    MXFP4, as the released models ship them; the router and the 1-D tensors F32; the other matrices F16. RoPE is
    YaRN-scaled (factor yarn_factor from yarn_orig_ctx to n_ctx_train)."""
    n_layer: int
    n_embd: int
    n_ff_exp: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_expert_used: int
    n_swa: int
    n_vocab: int
    n_ctx_train: int = 131072
    yarn_orig_ctx: int = 4096
    yarn_factor: float = 32.0
    rope_freq_base: float = 150000.0
    rms_eps: float = 1e-5

    def __post_init__(self):
        for name in ("n_layer", "n_embd", "n_ff_exp", "n_head", "n_head_kv", "head_dim", "n_expert", "n_expert_used",
                     "n_swa", "n_vocab", "n_ctx_train", "yarn_orig_ctx"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name} must be a positive int, not {v!r}")
        for name in ("yarn_factor", "rope_freq_base", "rms_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive finite number, not {v!r}")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv})")
        if self.n_expert_used > self.n_expert:
            raise ValueError(f"n_expert_used ({self.n_expert_used}) must be at most n_expert ({self.n_expert})")
        if self.n_embd % _QK or self.n_ff_exp % _QK:
            raise ValueError(f"MXFP4 experts store rows in blocks of {_QK} values, so n_embd and n_ff_exp must be "
                             f"multiples of {_QK} (got n_embd={self.n_embd}, n_ff_exp={self.n_ff_exp})")

    @property
    def n_params(self) -> int:
        E, F, X = self.n_embd, self.n_ff_exp, self.n_expert
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        attn = (E * q + q) + 2 * (E * kv + kv) + (q * E + E) + self.n_head + 2 * E
        moe = (E * X + X) + X * (3 * E * F + 2 * F + E)
        return 2 * self.n_vocab * E + E + self.n_layer * (attn + moe)


# GPT-OSS shapes: gpt-oss-20b / -120b have the released models' hyper-parameters (OpenAI's config.json, which
# llama.cpp's convert_hf_to_gguf.py copies into the GGUF keys _start_gpt_oss_writer writes; llama.cpp's loader names
# 24 layers "20B" and 36 "120B"); gpt-oss-tiny is the same architecture small enough for CPU tests, its sliding
# window short enough that a prompt of a few hundred tokens crosses it; its n_ff_exp and n_head * head_dim differ
# from n_embd (as in the released models: 4096 != 2880), so a transposed tensor cannot load.
GPT_OSS_PRESETS: dict[str, GptOssShape] = {
    "gpt-oss-tiny": GptOssShape(n_layer=4, n_embd=128, n_ff_exp=96, n_head=4, n_head_kv=2, head_dim=48, n_expert=8,
                                n_expert_used=2, n_swa=64, n_vocab=512),
    "gpt-oss-20b": GptOssShape(n_layer=24, n_embd=2880, n_ff_exp=2880, n_head=64, n_head_kv=8, head_dim=64,
                               n_expert=32, n_expert_used=4, n_swa=128, n_vocab=201088),
    "gpt-oss-120b": GptOssShape(n_layer=36, n_embd=2880, n_ff_exp=2880, n_head=64, n_head_kv=8, head_dim=64,
                                n_expert=128, n_expert_used=4, n_swa=128, n_vocab=201088),
}


# ---- a tiny real vocabulary: SentencePiece style ("llama" tokenizer), byte fallback ----------------------------------

_WORDS = ("the of and to in is that for it as with was on be by at this are from or have an not but all were when we "
          "there can which their if do will each about how up out them then she many some so these would other into "
          "has more her two like him see time could no make than first been its who now people my made over did down "
          "only way find use may water long little very after words called just where most know hello world quick "
          "brown fox jumps lazy dog prompt token model layer device pipeline stage batch fast").split()


def _tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, types): <unk> <s> </s>, 256 byte tokens, then normal pieces by descending score."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256                                  # UNKNOWN, CONTROL x2, BYTE
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = ["\u2581" + w for w in _WORDS]
    # llama.cpp's SPM tokenizer only merges adjacent pieces into pieces that exist, so each word needs its prefixes
    prefixes = [w[:i] for w in words for i in range(3, len(w))]
    pieces = ["\u2581"] + words + prefixes + ["\u2581" + c for c in letters] + letters + list("0123456789.,;:!?'\"-()")
    pieces = list(dict.fromkeys(pieces))
    tokens += pieces
    types += [1] * len(pieces)                                     # NORMAL
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


# A chat template for the tiny vocabulary (its only special tokens are <s> and </s>): each message ends with EOS,
# so a model that learned it would stop there.
TINY_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}"
                      "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def tiny_vocab_size() -> int:
    """n_vocab a shape needs for write_model(..., vocab='tiny')."""
    return len(_tiny_vocab()[0])


# ---- writing ---------------------------------------------------------------------------------------------------------

def _tensor_plan(shape: ModelShape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape (rows=out, cols=in)) in file order; 1-D tensors are norm weights."""
    E, F, kv = shape.n_embd, shape.n_ff, shape.n_head_kv * shape.head_dim
    plan = [("token_embd.weight", (shape.n_vocab, E))]
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (E,)), (b + "attn_q.weight", (E, E)), (b + "attn_k.weight", (kv, E)),
                 (b + "attn_v.weight", (kv, E)), (b + "attn_output.weight", (E, E)), (b + "ffn_norm.weight", (E,)),
                 (b + "ffn_gate.weight", (F, E)), (b + "ffn_up.weight", (F, E)), (b + "ffn_down.weight", (E, F))]
    plan += [("output_norm.weight", (E,)), ("output.weight", (shape.n_vocab, E))]
    return plan


def _storage(shp: tuple[int, ...], dtype: str):
    """(numpy dtype, storage shape, raw GGML type or None) of a tensor as written to the file. dtype: a DTYPES key,
    or "mxfp4" (GPT-OSS's experts); a quantized tensor's last dimension is stored as bytes of its blocks."""
    import gguf
    if dtype == "f32":
        return np.dtype(np.float32), shp, None
    if dtype == "f16":
        return np.dtype(np.float16), shp, None
    qtype = getattr(gguf.GGMLQuantizationType, DTYPES[dtype][0] if dtype in DTYPES else dtype.upper())
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return np.dtype(np.uint8), (*shp[:-1], shp[-1] // block * type_size), qtype


def _add_tensor_infos(w, tensors) -> list[tuple]:
    """Register (name, numpy shape, dtype, init) tensors with the writer, in file order; returns the plan the data
    writer follows: (shape, numpy dtype, storage shape, raw GGML type, init) per tensor."""
    plan = []
    for name, shp, dtype, init in tensors:
        np_dtype, store, qtype = _storage(shp, dtype)
        # a uint8 storage shape with a raw type is converted back to the logical shape by the writer
        w.add_tensor_info(name, store, np_dtype, math.prod(store) * np_dtype.itemsize, raw_dtype=qtype)
        plan.append((shp, np_dtype, store, qtype, init))
    return plan


def _fill(out: np.ndarray, cols: int, seed: int, index: int, chunk: int, r0: int, r1: int, qtype,
          init: str = "matrix") -> None:
    """Generate rows r0:r1 (cols values each) of tensor `index` in float32 and store them encoded in out[r0:r1].

    init says how values are drawn: "matrix" normal(0, 1/sqrt(cols)); "norm" 1 + normal(0, 0.02), so activations
    keep their scale through the layers; "bias" normal(0, 0.02); "sink" normal(0, 1) (one logit per head, the
    scale of the attention scores)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, chunk)))
    if init != "matrix":
        x = rng.standard_normal(out[r0:r1].shape, dtype=np.float32)
        if init != "sink":
            x *= np.float32(0.02)
        if init == "norm":
            x += np.float32(1.0)
        out[r0:r1] = x
        return
    if qtype is not None:
        out[r0:r1] = _random_blocks(rng, r1 - r0, cols, qtype)
        return
    x = rng.standard_normal((r1 - r0, cols), dtype=np.float32)
    x *= np.float32(1.0 / math.sqrt(cols))  # normal(0, 1/sqrt(fan_in)): outputs keep the inputs' scale
    out[r0:r1] = x


def _random_blocks(rng: np.random.Generator, rows: int, cols: int, qtype) -> np.ndarray:
    """rows x cols weights as q8_0 / q4_0 blocks: codes drawn uniformly and symmetric around zero, one scale chosen
    so that the weights' std is 1/sqrt(fan_in) like the float types'. Drawing the codes directly instead of
    quantizing normal floats makes a 70B-shaped file a matter of its disk writes (quantizing in numpy is many times
    slower)."""
    import gguf
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype == gguf.GGMLQuantizationType.MXFP4:
        return _random_mxfp4(rng, rows, cols)
    out = np.empty((rows, cols // block, type_size), np.uint8)   # per block: fp16 scale, then the codes
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        out[..., 2:] = rng.integers(-127, 128, size=out[..., 2:].shape, dtype=np.int8).view(np.uint8)
        code_std = math.sqrt((255 ** 2 - 1) / 12)                  # uniform on -127..127
    elif qtype == gguf.GGMLQuantizationType.Q4_0:
        # a byte holds two 4-bit codes, value = code - 8; codes 1..15 keep the values symmetric (-7..7)
        lo = rng.integers(1, 16, size=out[..., 2:].shape, dtype=np.uint8)
        hi = rng.integers(1, 16, size=out[..., 2:].shape, dtype=np.uint8)
        out[..., 2:] = lo | (hi << 4)
        code_std = math.sqrt((15 ** 2 - 1) / 12)
    else:
        raise ValueError(f"no random block generator for {qtype.name}")
    scale = np.array([1.0 / (code_std * math.sqrt(cols))], dtype="<f2")
    out[..., :2] = scale.view(np.uint8)
    return out.reshape(rows, -1)


def _add_vocab(w, vocab: str, chat_template: str | None) -> None:
    """Tokenizer metadata: none (llama.cpp adds dummy tokens), or the tiny SentencePiece-style vocabulary."""
    if vocab == "none":
        w.add_tokenizer_model("none")
    else:
        tokens, scores, types = _tiny_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        if chat_template is not None:
            w.add_chat_template(chat_template)


# MXFP4 (the OCP microscaling format GPT-OSS ships its experts in): a block is one E8M0 exponent byte, then 32 4-bit
# E2M1 codes, two per byte. ggml stores the codes' values doubled (gguf.quants.MXFP4.kvalues) and halves the scale.
_MXFP4_KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float64)


def _random_mxfp4(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """rows x cols weights as MXFP4 blocks: random bytes for the codes (every nibble is a valid E2M1 code, uniform
    over the 16), one exponent for the whole tensor, the power of two that brings the weights' std nearest to
    1/sqrt(fan_in) like the float types'. A value is kvalue * 2**(e - 128) (ggml's e8m0_to_fp32_half)."""
    code_std = math.sqrt(np.mean(_MXFP4_KVALUES ** 2))
    e = 128 + round(math.log2(1.0 / (code_std * math.sqrt(cols))))
    out = np.empty((rows, cols // _QK, 1 + _QK // 2), np.uint8)
    out[..., 0] = e
    out[..., 1:] = rng.integers(0, 256, size=out[..., 1:].shape, dtype=np.uint8)
    return out.reshape(rows, -1)


def _start_writer(tmp: Path, shape: ModelShape, seed: int, vocab: str, chat_template: str | None = None):
    """A GGUFWriter on tmp with all metadata and tensor infos added, and the plan of the tensors to write."""
    import gguf

    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"pyturbo synthetic {shape.n_layer}x{shape.n_embd} seed {seed}")
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_layer_norm_rms_eps(float(shape.rms_eps))
    w.add_rope_freq_base(float(shape.rope_freq_base))
    w.add_rope_dimension_count(shape.head_dim)
    w.add_file_type(DTYPES[shape.dtype][1])
    if DTYPES[shape.dtype][0] not in ("F32", "F16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(shape.n_vocab)
    _add_vocab(w, vocab, chat_template)

    # norm weights stay F32 (llama.cpp requires it); the matrices, token_embd included, use the model's dtype
    return w, _add_tensor_infos(w, [(name, shp, shape.dtype, "matrix") if len(shp) == 2 else (name, shp, "f32", "norm")
                                    for name, shp in _tensor_plan(shape)])


def _gpt_oss_tensor_plan(shape: GptOssShape) -> list[tuple[str, tuple[int, ...], str, str]]:
    """(name, numpy shape (out, in; experts first), storage dtype, init) in file order: the tensors llama.cpp's
    gpt-oss loader (src/models/openai-moe.cpp) requires, with q/k/v biases as the released models have them."""
    E, F, X = shape.n_embd, shape.n_ff_exp, shape.n_expert
    q, kv = shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim
    plan = [("token_embd.weight", (shape.n_vocab, E), "f16", "matrix")]
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (E,), "f32", "norm"),
                 (b + "attn_q.weight", (q, E), "f16", "matrix"), (b + "attn_q.bias", (q,), "f32", "bias"),
                 (b + "attn_k.weight", (kv, E), "f16", "matrix"), (b + "attn_k.bias", (kv,), "f32", "bias"),
                 (b + "attn_v.weight", (kv, E), "f16", "matrix"), (b + "attn_v.bias", (kv,), "f32", "bias"),
                 (b + "attn_output.weight", (E, q), "f16", "matrix"), (b + "attn_output.bias", (E,), "f32", "bias"),
                 (b + "attn_sinks.weight", (shape.n_head,), "f32", "sink"),
                 (b + "post_attention_norm.weight", (E,), "f32", "norm"),
                 (b + "ffn_gate_inp.weight", (X, E), "f32", "matrix"), (b + "ffn_gate_inp.bias", (X,), "f32", "bias"),
                 (b + "ffn_gate_exps.weight", (X, F, E), "mxfp4", "matrix"),
                 (b + "ffn_gate_exps.bias", (X, F), "f32", "bias"),
                 (b + "ffn_up_exps.weight", (X, F, E), "mxfp4", "matrix"),
                 (b + "ffn_up_exps.bias", (X, F), "f32", "bias"),
                 (b + "ffn_down_exps.weight", (X, E, F), "mxfp4", "matrix"),
                 (b + "ffn_down_exps.bias", (X, E), "f32", "bias")]
    plan += [("output_norm.weight", (E,), "f32", "norm"), ("output.weight", (shape.n_vocab, E), "f16", "matrix")]
    return plan


def _start_gpt_oss_writer(tmp: Path, shape: GptOssShape, seed: int, vocab: str, chat_template: str | None = None):
    """_start_writer for a GptOssShape: the GGUF keys llama.cpp reads for "gpt-oss" (those convert_hf_to_gguf.py
    writes for the released models)."""
    import gguf

    w = gguf.GGUFWriter(tmp, "gpt-oss")
    w.add_name(f"pyturbo synthetic gpt-oss {shape.n_layer}x{shape.n_embd}x{shape.n_expert}e seed {seed}")
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff_exp)
    w.add_expert_feed_forward_length(shape.n_ff_exp)
    w.add_expert_count(shape.n_expert)
    w.add_expert_used_count(shape.n_expert_used)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_sliding_window(shape.n_swa)   # the pattern is the arch's default: even layers windowed, odd layers full
    w.add_layer_norm_rms_eps(float(shape.rms_eps))
    w.add_rope_freq_base(float(shape.rope_freq_base))
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(float(shape.yarn_factor))
    w.add_rope_scaling_orig_ctx_len(shape.yarn_orig_ctx)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(shape.n_vocab)
    _add_vocab(w, vocab, chat_template)

    return w, _add_tensor_infos(w, _gpt_oss_tensor_plan(shape))


def write_model(path: str | os.PathLike, shape: ModelShape | GptOssShape, *, seed: int = 0, vocab: str = "none",
                progress: bool = False, chat_template: str | None = None) -> Path:
    """Write a llama GGUF (a ModelShape) or a gpt-oss GGUF (a GptOssShape) with random weights to path and return it
    as a Path.

    vocab='none': no tokenizer (llama.cpp adds n_vocab dummy tokens; feed token ids). vocab='tiny': a small
    SentencePiece-style vocabulary with byte fallback, so any text tokenizes; needs shape.n_vocab == tiny_vocab_size().
    chat_template (Jinja2 source, e.g. TINY_CHAT_TEMPLATE) goes to tokenizer.chat_template; it needs a vocabulary.
    Same arguments give the same bytes. progress=True shows a bar on stderr.
    """
    if not isinstance(shape, (ModelShape, GptOssShape)):
        raise TypeError(f"shape must be a ModelShape or GptOssShape (or one of PRESETS, GPT_OSS_PRESETS), "
                        f"not {type(shape).__name__}")
    if vocab not in ("none", "tiny"):
        raise ValueError(f"vocab must be 'none' or 'tiny', not {vocab!r}")
    if vocab == "tiny" and shape.n_vocab != tiny_vocab_size():
        raise ValueError(f"vocab='tiny' has {tiny_vocab_size()} tokens but the shape has n_vocab={shape.n_vocab}: "
                         f"use dataclasses.replace(shape, n_vocab={tiny_vocab_size()})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, not {seed!r}")
    if chat_template is not None and (vocab == "none" or not isinstance(chat_template, str)):
        raise ValueError("chat_template must be a str and needs a vocabulary (vocab='tiny')")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # same directory, so the final rename is atomic; unique, so concurrent writers of one path do not collide
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)

    w, bar = None, None
    pool = ThreadPoolExecutor(max_workers=max(1, min(32, os.cpu_count() or 1)))
    try:
        start = _start_gpt_oss_writer if isinstance(shape, GptOssShape) else _start_writer
        w, plan = start(tmp, shape, seed, vocab, chat_template)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(plan), desc=f"writing {path.name}", unit="tensor", file=sys.stderr)
        for index, (shp, np_dtype, store, qtype, init) in enumerate(plan):
            # one tensor at a time: peak memory is about the largest tensor. A 3-D tensor (one matrix per expert)
            # is generated as the rows of all its matrices.
            rows, cols = (shp[0], shp[0]) if len(shp) == 1 else (math.prod(shp[:-1]), shp[-1])
            out = np.empty(store if len(shp) == 1 else (rows, store[-1]), np_dtype)
            step = rows if len(shp) == 1 else max(1, _CHUNK // cols)
            futures = [pool.submit(_fill, out, cols, seed, index, c, r0, min(r0 + step, rows), qtype, init)
                       for c, r0 in enumerate(range(0, rows, step))]
            for f in futures:
                f.result()
            w.write_tensor_data(out.reshape(store))
            del out
            if bar is not None:
                bar.update(1)
        w.close()
        tmp.chmod(0o644)  # mkstemp makes it private; a model file is not secret
        tmp.replace(path)
    except BaseException:
        if w is not None:
            w.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    return path


# ---- cache -----------------------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """$PYTURBO_CACHE, or ~/.cache/pyturbo/models."""
    return settings.read("PYTURBO_CACHE")


def cached_model(name_or_shape: str | ModelShape | GptOssShape, *, seed: int = 0, vocab: str = "none",
                 cache_dir: str | os.PathLike | None = None, progress: bool = False,
                 chat_template: str | None = None) -> Path:
    """A synthetic model (PRESETS or GPT_OSS_PRESETS name, ModelShape or GptOssShape) in the cache directory, written
    the first time it is asked for (its path: cached_path).
    """
    path = cached_path(name_or_shape, seed=seed, vocab=vocab, cache_dir=cache_dir, chat_template=chat_template)
    if not path.is_file():
        write_model(path, preset_shape(name_or_shape), seed=seed, vocab=vocab, progress=progress,
                    chat_template=chat_template)
    return path


def preset_shape(name_or_shape: str | ModelShape | GptOssShape) -> ModelShape | GptOssShape:
    """The shape of a PRESETS or GPT_OSS_PRESETS name (a shape is returned as it is)."""
    presets = {**PRESETS, **GPT_OSS_PRESETS}
    if isinstance(name_or_shape, str):
        if name_or_shape not in presets:
            raise ValueError(f"unknown preset {name_or_shape!r}; choose one of {list(presets)} or pass a ModelShape")
        return presets[name_or_shape]
    if isinstance(name_or_shape, (ModelShape, GptOssShape)):
        return name_or_shape
    raise TypeError(f"expected a preset name or a ModelShape, not {type(name_or_shape).__name__}")


def cached_path(name_or_shape: str | ModelShape | GptOssShape, *, seed: int = 0, vocab: str = "none",
                cache_dir: str | os.PathLike | None = None, chat_template: str | None = None) -> Path:
    """Where cached_model keeps this synthetic model (whether or not it is written yet).

    The file name spells out every field of the shape, the seed, the vocabulary and FORMAT_VERSION, so a change to
    any of them gives another file.
    """
    s = preset_shape(name_or_shape)
    if vocab not in ("none", "tiny"):
        raise ValueError(f"vocab must be 'none' or 'tiny', not {vocab!r}")
    if isinstance(s, GptOssShape):
        head = (f"gpt-oss-L{s.n_layer}-E{s.n_embd}-F{s.n_ff_exp}-H{s.n_head}-KV{s.n_head_kv}-D{s.head_dim}"
                f"-X{s.n_expert}-U{s.n_expert_used}-W{s.n_swa}-V{s.n_vocab}-C{s.n_ctx_train}-Y{s.yarn_orig_ctx}"
                f"x{float(s.yarn_factor)!r}")
    else:
        head = (f"llama-L{s.n_layer}-E{s.n_embd}-F{s.n_ff}-H{s.n_head}-KV{s.n_head_kv}-V{s.n_vocab}-C{s.n_ctx_train}"
                f"-{s.dtype}")
    name = (f"{head}-rope{float(s.rope_freq_base)!r}-eps{float(s.rms_eps)!r}-seed{seed}-vocab_{vocab}"
            f"{_template_tag(chat_template)}-v{FORMAT_VERSION}.gguf")
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return path / name


def _template_tag(chat_template: str | None) -> str:
    import hashlib
    return "" if chat_template is None else "-tmpl_" + hashlib.sha256(chat_template.encode()).hexdigest()[:12]


__all__ = ["ModelShape", "PRESETS", "GptOssShape", "GPT_OSS_PRESETS", "DTYPES", "FORMAT_VERSION", "write_model",
           "cached_model", "cached_path", "preset_shape", "default_cache_dir", "tiny_vocab_size", "TINY_CHAT_TEMPLATE"]
