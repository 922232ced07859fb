"""Synthetic GGUF models: valid files, deterministic, clear errors (read back with gguf's reader, no llama.cpp)."""
from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest

from pyturbo import synth


def kv(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0", "q4_0"])
def test_written_file_has_the_shape_asked_for(tmp_path, dtype):
    shape = synth.ModelShape(n_layer=2, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, n_vocab=100, dtype=dtype)
    reader = gguf.GGUFReader(synth.write_model(tmp_path / "m.gguf", shape, seed=1))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 9 * 2
    assert list(tensors["blk.1.attn_k.weight"].shape) == [64, 32]       # GGUF lists dims innermost first
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [96, 64]
    assert list(tensors["token_embd.weight"].shape) == [64, 100]
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["output.weight"].tensor_type.name == synth.DTYPES[dtype][0]
    assert kv(reader, "general.architecture") == "llama"
    assert kv(reader, "general.file_type") == synth.DTYPES[dtype][1]
    assert kv(reader, "llama.block_count") == 2
    assert kv(reader, "llama.rope.dimension_count") == 16
    assert kv(reader, "llama.attention.head_count_kv") == 2
    assert kv(reader, "tokenizer.ggml.model") == "none" and kv(reader, "llama.vocab_size") == 100
    # weights are normal(0, 1/sqrt(fan_in)), whatever the storage type
    down = tensors["blk.0.ffn_down.weight"]
    w = gguf.quants.dequantize(down.data, down.tensor_type).reshape(64, 96)
    assert abs(w.std() * np.sqrt(96) - 1) < 0.1


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    shape = synth.PRESETS["tiny"]
    a = synth.write_model(tmp_path / "a.gguf", shape, seed=7).read_bytes()
    b = synth.write_model(tmp_path / "b.gguf", shape, seed=7).read_bytes()
    c = synth.write_model(tmp_path / "c.gguf", shape, seed=8).read_bytes()
    assert a == b and a != c
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "c.gguf"]  # no temporaries left


def test_tiny_vocab(tmp_path):
    shape = dataclasses.replace(synth.PRESETS["tiny"], n_vocab=synth.tiny_vocab_size())
    reader = gguf.GGUFReader(synth.write_model(tmp_path / "v.gguf", shape, vocab="tiny"))
    tokens, types = kv(reader, "tokenizer.ggml.tokens"), kv(reader, "tokenizer.ggml.token_type")
    assert kv(reader, "tokenizer.ggml.model") == "llama"
    assert len(tokens) == len(types) == len(kv(reader, "tokenizer.ggml.scores")) == synth.tiny_vocab_size()
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)] and set(types[3:259]) == {6}
    assert "\u2581the" in tokens and len(set(tokens)) == len(tokens)
    assert (kv(reader, "tokenizer.ggml.unknown_token_id"), kv(reader, "tokenizer.ggml.bos_token_id"),
            kv(reader, "tokenizer.ggml.eos_token_id"), kv(reader, "tokenizer.ggml.add_bos_token")) == (0, 1, 2, True)
    assert list(reader.tensors[0].shape) == [128, synth.tiny_vocab_size()]


def test_tiny_vocab_needs_matching_size(tmp_path):
    with pytest.raises(ValueError, match=f"n_vocab={synth.tiny_vocab_size()}"):
        synth.write_model(tmp_path / "v.gguf", synth.PRESETS["tiny"], vocab="tiny")
    assert not any(tmp_path.iterdir())


def test_cached_model_is_reused(tmp_path, monkeypatch):
    p1 = synth.cached_model("tiny", cache_dir=tmp_path)
    mtime = p1.stat().st_mtime_ns
    assert synth.cached_model("tiny", cache_dir=tmp_path) == p1 and p1.stat().st_mtime_ns == mtime
    assert synth.cached_model(synth.PRESETS["tiny"], cache_dir=tmp_path) == p1
    assert synth.cached_model("tiny", seed=1, cache_dir=tmp_path) != p1
    assert synth.cached_model(dataclasses.replace(synth.PRESETS["tiny"], dtype="f16"), cache_dir=tmp_path) != p1
    monkeypatch.setenv("PYTURBO_CACHE", str(tmp_path / "env"))
    assert synth.cached_model("tiny").parent == tmp_path / "env"


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(synth, "_fill", boom)
    with pytest.raises(KeyboardInterrupt):
        synth.write_model(tmp_path / "m.gguf", synth.PRESETS["tiny"])
    assert not any(tmp_path.iterdir())


def test_bad_shapes_say_what_to_fix():
    with pytest.raises(ValueError, match="multiple of n_head"):
        synth.ModelShape(n_layer=2, n_embd=100, n_ff=64, n_head=3, n_head_kv=1, n_vocab=10)
    with pytest.raises(ValueError, match="multiple of n_head_kv"):
        synth.ModelShape(n_layer=2, n_embd=64, n_ff=64, n_head=4, n_head_kv=3, n_vocab=10)
    with pytest.raises(ValueError, match="n_layer must be a positive int"):
        synth.ModelShape(n_layer=0, n_embd=64, n_ff=64, n_head=4, n_head_kv=1, n_vocab=10)
    with pytest.raises(ValueError, match="multiples of 32"):
        synth.ModelShape(n_layer=1, n_embd=48, n_ff=64, n_head=4, n_head_kv=1, n_vocab=10, dtype="q4_0")
    with pytest.raises(ValueError, match="dtype must be one of"):
        synth.ModelShape(n_layer=1, n_embd=64, n_ff=64, n_head=4, n_head_kv=1, n_vocab=10, dtype="bf16")
    with pytest.raises(ValueError, match="unknown preset"):
        synth.cached_model("gpt-5")
