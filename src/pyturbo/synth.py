"""Synthetic GGUF models: llama-architecture files with random weights, deterministic by seed.

Speed depends only on shapes, not on weight values, so benchmarks and tests use these instead of downloads.
Tensors are generated and written one at a time, so even an 8B-shaped file never needs all weights in memory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1  # part of cached file names: bump when what write_model produces changes

DTYPES = {  # name -> (GGMLQuantizationType name, LlamaFileType value)
    "f32": ("F32", 0), "f16": ("F16", 1), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2),
}


@dataclass(frozen=True)
class ModelShape:
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
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive int, not {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {self.dtype!r}")
        if self.dtype.startswith("q") and (self.n_embd % 32 or self.n_ff % 32):
            raise ValueError(f"{self.dtype} needs n_embd and n_ff to be multiples of 32 (got {self.n_embd}, {self.n_ff})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(n_layer=4, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, n_vocab=512, dtype="f32"),
    "bench-small": ModelShape(n_layer=8, n_embd=512, n_ff=1408, n_head=8, n_head_kv=2, n_vocab=8000),
    "bench-8l": ModelShape(n_layer=8, n_embd=1024, n_ff=2816, n_head=16, n_head_kv=4, n_vocab=32000),
    "bench-16l": ModelShape(n_layer=16, n_embd=1024, n_ff=2816, n_head=16, n_head_kv=4, n_vocab=32000),
    "8b": ModelShape(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, n_vocab=128256, n_ctx_train=131072),
    "70b": ModelShape(n_layer=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, n_vocab=128256,
                      n_ctx_train=131072, dtype="q4_0"),
}

# ---- a tiny real vocabulary (SentencePiece style, byte fallback) so tokenizer paths can be tested ---------------------

_WORDS = ("the of and to in is that for it as with was on be by at this are from or have an not but all were when we "
          "there can which their if do will each about how up out them then she many some so these would other into "
          "has more her two like him see time could no make than first been its who now people my made over did down "
          "only way find use may water long little very after words called just where most know hello world quick "
          "brown fox jumps lazy dog prompt token model layer device pipeline stage batch fast").split()


def _tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    tokens, types = ["<unk>", "<s>", "</s>"], [2, 3, 3]   # UNKNOWN, CONTROL, CONTROL
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256                                      # BYTE
    pieces = ["\u2581"] + ["\u2581" + w for w in _WORDS] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["\u2581" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = list(dict.fromkeys(pieces))
    tokens += pieces
    types += [1] * len(pieces)                              # NORMAL
    scores = [0.0] * (259) + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def tiny_vocab_size() -> int:
    return len(_tiny_vocab()[0])


# ---- writing ---------------------------------------------------------------------------------------------------------

def _tensor_plan(shape: ModelShape) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, numpy shape (rows=out, cols=in), is_matrix) in file order."""
    E, F, kv = shape.n_embd, shape.n_ff, shape.n_head_kv * shape.head_dim
    plan = [("token_embd.weight", (shape.n_vocab, E), True)]
    for i in range(shape.n_layer):
        plan += [(f"blk.{i}.attn_norm.weight", (E,), False), (f"blk.{i}.attn_q.weight", (E, E), True),
                 (f"blk.{i}.attn_k.weight", (kv, E), True), (f"blk.{i}.attn_v.weight", (kv, E), True),
                 (f"blk.{i}.attn_output.weight", (E, E), True), (f"blk.{i}.ffn_norm.weight", (E,), False),
                 (f"blk.{i}.ffn_gate.weight", (F, E), True), (f"blk.{i}.ffn_up.weight", (F, E), True),
                 (f"blk.{i}.ffn_down.weight", (E, F), True)]
    plan += [("output_norm.weight", (E,), False), ("output.weight", (shape.n_vocab, E), True)]
    return plan


def _encode(data: np.ndarray, dtype: str):
    """float32 data -> (array to write, raw GGML type or None)."""
    import gguf
    if dtype == "f32":
        return data, None
    if dtype == "f16":
        return data.astype(np.float16), None
    qtype = getattr(gguf.GGMLQuantizationType, DTYPES[dtype][0])
    return gguf.quants.quantize(data, qtype), qtype


def _generate(rng: np.random.Generator, shape: tuple[int, ...], is_matrix: bool) -> np.ndarray:
    if not is_matrix:  # norm weights: around one, so activations keep their scale
        return (1.0 + 0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / np.sqrt(shape[1]))


def write_model(path: str | os.PathLike, shape: ModelShape, *, seed: int = 0, vocab: str = "none",
                progress: bool = False) -> Path:
    """Write a llama GGUF with random weights. vocab='none' (no tokenizer, n_vocab dummy tokens) or 'tiny'."""
    import gguf

    path = Path(path)
    if vocab not in ("none", "tiny"):
        raise ValueError(f"vocab must be 'none' or 'tiny', not {vocab!r}")
    if vocab == "tiny" and shape.n_vocab != tiny_vocab_size():
        raise ValueError(f"vocab='tiny' has {tiny_vocab_size()} tokens: use a shape with n_vocab={tiny_vocab_size()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")

    w = gguf.GGUFWriter(tmp, "llama")
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_rope_freq_base(shape.rope_freq_base)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_file_type(DTYPES[shape.dtype][1])
    if vocab == "none":
        w.add_tokenizer_model("none")
        w.add_vocab_size(shape.n_vocab)
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

    plan = _tensor_plan(shape)
    # 1-D norm weights stay F32 (llama.cpp requires it); token_embd and the matrices use the model's dtype
    dtypes = {name: (shape.dtype if is_matrix else "f32") for name, _, is_matrix in plan}
    for name, shp, _ in plan:
        probe, raw = _encode(np.zeros(shp if len(shp) == 1 else (1, shp[1]), np.float32), dtypes[name])
        nbytes = probe.nbytes * (shp[0] if len(shp) > 1 else 1)
        # with a raw (quantized) type the shape given is the logical one only if the dtype is not uint8
        w.add_tensor_info(name, shp, np.dtype(np.float32) if raw is not None else probe.dtype, nbytes, raw_dtype=raw)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        rng = np.random.default_rng(seed)
        items = plan
        if progress:
            from tqdm import tqdm
            items = tqdm(plan, desc=f"writing {path.name}", unit="tensor")
        for name, shp, is_matrix in items:
            data, _ = _encode(_generate(rng, shp, is_matrix), dtypes[name])
            w.write_tensor_data(data)
        w.close()
        tmp.replace(path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("PYTURBO_CACHE") or Path.home() / ".cache" / "pyturbo") / "models"


def cached_model(name_or_shape: str | ModelShape, *, seed: int = 0, vocab: str = "none",
                 directory: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """A synthetic model in the cache directory, written the first time it is asked for."""
    if isinstance(name_or_shape, str):
        if name_or_shape not in PRESETS:
            raise ValueError(f"unknown preset {name_or_shape!r}; choose one of {sorted(PRESETS)}")
        shape, label = PRESETS[name_or_shape], name_or_shape
    else:
        shape, label = name_or_shape, "custom"
    key = hashlib.sha256(repr((dataclasses.astuple(shape), seed, vocab, FORMAT_VERSION)).encode()).hexdigest()[:12]
    path = Path(directory or cache_dir()) / f"{label}-{shape.dtype}-{key}.gguf"
    if not path.exists():
        write_model(path, shape, seed=seed, vocab=vocab, progress=progress)
    return path
